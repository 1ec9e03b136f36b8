"""SDXL v-prediction and zero-terminal-SNR checkpoints (NoobAI-XL v-pred's settings) are
recognised from their files and run with their objective: noise predictions equal the ones
derived from diffusers' own pipeline UNet output and scheduler (``get_velocity`` inverted), on
tiny random SDXL models, CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

from cgidm_core.errors import IncompatiblePairError
from cgidm_core.models import detect_finetuned_kind, load_pair_from_paths
from cgidm_core.models.vpred import mark_converted_base, single_file_objective
from cgidm_testkit import tiny_families, tinymodels

PROMPT = "sks style"
CPU = {"device": "cpu"}
MARKERS = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}


@pytest.fixture(scope="module")
def vpred(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdxl-vpred")
    base = tiny_families.make_tiny_sdxl_vpred(root / "base")
    single = tinymodels.make_sdxl_single_file(base, root / "noob_ft.safetensors", seed=3,
                                              text_encoders=False)
    tiny_families.add_tensors(single, MARKERS)
    return {"base": base, "single_file": single,
            "eps_base": tinymodels.make_tiny_sdxl(root / "eps_base")}


def _unet_output(base: Path, unet_folder: Path, z, t):
    pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
    pipe.unet = UNet2DConditionModel.from_pretrained(unet_folder / "unet")
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        side = z.shape[-1] * 2
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32)
        out = pipe.unet(z, t, encoder_hidden_states=embeds.expand(len(z), -1, -1),
                        added_cond_kwargs={"text_embeds": pooled.expand(len(z), -1),
                                           "time_ids": time_ids.expand(len(z), -1)}).sample
    return out, pipe.scheduler


def test_zero_terminal_snr_v_pred_single_file_predicts_the_noise_diffusers_implies(vpred):
    pair = load_pair_from_paths(vpred["base"], vpred["single_file"], **CPU)
    assert detect_finetuned_kind(vpred["single_file"]) == "single_file"
    assert pair.prediction_type == pair.prediction_type_finetuned == "v_prediction"
    generator = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn((2, *pair.latent_shape), generator=generator) for _ in range(2))
    t = torch.tensor([20, 999])  # the last step: abar ~ 0, where only the rescaled schedule holds
    v_out, scheduler = _unet_output(vpred["base"], vpred["single_file"].parent
                                    / "noob_ft_diffusers", x0, t)
    # the pair's schedule is the pipeline's rescaled one (abar_T ~ 0, not SDXL's 0.0047)
    torch.testing.assert_close(pair.alphas_cumprod.cpu(), scheduler.alphas_cumprod.float())
    assert float(pair.alphas_cumprod[-1]) < 1e-6
    # the forward process is diffusers', and a perfect v-prediction gives back the noise
    z_t = pair.add_noise(x0, noise, t)
    abar = scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(z_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    from cgidm_core.models.predictions import output_to_eps

    # (DDPMScheduler's get_velocity on the same config: Euler's refuses integer timesteps)
    perfect_v = DDPMScheduler.from_config(scheduler.config).get_velocity(x0, noise, t)
    torch.testing.assert_close(output_to_eps(perfect_v, z_t, t, "v_prediction",
                                             pair.alphas_cumprod), noise, atol=1e-4, rtol=1e-4)
    # and the fine-tune's noise prediction is its UNet's v output, converted
    cond = pair.conditioning(PROMPT)
    with torch.no_grad():
        eps_ft = pair.eps_finetuned(x0, t, cond)
    torch.testing.assert_close(eps_ft, abar.sqrt() * v_out + (1 - abar).sqrt() * x0)


@pytest.mark.slow
def test_v_pred_marker_on_an_epsilon_base_and_ztsnr_mismatch(vpred, tmp_path):
    # a v-pred conversion fine-tune of an epsilon base (no ztsnr): each model keeps its objective
    single = tinymodels.make_sdxl_single_file(vpred["eps_base"], tmp_path / "v.safetensors",
                                              seed=4, text_encoders=False)
    tiny_families.add_tensors(single, {"v_pred": torch.tensor([])})
    pair = load_pair_from_paths(vpred["eps_base"], single, **CPU)
    assert (pair.prediction_type, pair.prediction_type_finetuned) == ("epsilon", "v_prediction")
    # zero terminal SNR on one side only: another schedule, refused before the UNet is converted
    with pytest.raises(IncompatiblePairError, match="zero terminal SNR"):
        load_pair_from_paths(vpred["eps_base"], vpred["single_file"], **CPU)
    plain = tinymodels.make_sdxl_single_file(vpred["eps_base"], tmp_path / "p.safetensors",
                                             seed=5, text_encoders=False)
    assert single_file_objective(list(MARKERS)).zero_terminal_snr is True
    assert single_file_objective(["model.diffusion_model.x"]).prediction_type is None
    pair = load_pair_from_paths(vpred["eps_base"], plain, **CPU)
    assert pair.prediction_type_finetuned == "epsilon"


def test_results_record_the_finetunes_prediction_type_next_to_the_bases(vpred, tmp_path):
    """A v-pred conversion of an epsilon base: results.json's pair (``describe()``) says what
    each model predicts, not only the base's."""
    single = tinymodels.make_sdxl_single_file(vpred["eps_base"], tmp_path / "v.safetensors",
                                              seed=4, text_encoders=False)
    tiny_families.add_tensors(single, {"v_pred": torch.tensor([])})
    described = load_pair_from_paths(vpred["eps_base"], single, **CPU).describe()
    assert (described["prediction_type"], described["prediction_type_finetuned"]) == (
        "epsilon", "v_prediction")


@pytest.mark.slow
def test_kohya_lora_metadata_must_agree_with_the_base(vpred, tmp_path):
    meta = {"ss_v_parameterization": "True", "ss_zero_terminal_snr": "True",
            "ss_output_name": "noob_style"}
    on_vpred = tinymodels.make_sdxl_kohya_lora(vpred["base"], tmp_path / "a" / "l.safetensors",
                                               seed=6, metadata=meta)
    pair = load_pair_from_paths(vpred["base"], on_vpred, **CPU)
    assert pair.prediction_type == "v_prediction"
    on_eps = tinymodels.make_sdxl_kohya_lora(vpred["eps_base"], tmp_path / "b" / "l.safetensors",
                                             seed=6, metadata=meta)
    with pytest.raises(IncompatiblePairError, match="v_prediction LoRA"):
        load_pair_from_paths(vpred["eps_base"], on_eps, **CPU)


def test_a_converted_single_file_base_gets_its_objective_written(vpred, tmp_path):
    """diffusers' from_single_file leaves an epsilon scheduler for a v-pred file: the converted
    folder's scheduler config is corrected from the file's markers (also for old conversions)."""
    import json
    import shutil

    folder = tmp_path / "converted"
    shutil.copytree(vpred["eps_base"], folder)
    mark_converted_base(folder, ["model.diffusion_model.x", *MARKERS])
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"]
    pair = load_pair_from_paths(folder, vpred["single_file"], **CPU)
    assert pair.prediction_type == "v_prediction" and float(pair.alphas_cumprod[-1]) < 1e-6


@pytest.mark.slow
def test_check_cli_on_a_v_pred_single_file(vpred, tmp_path, capsys):
    """``cgidm check`` as a user runs it on a NoobAI-style fine-tune (a v-pred / zero-terminal-
    SNR single file against its v-pred base): detected, run with the v objective, written out."""
    import json

    from cgidm.cli import main
    from tests.paths import SHARED_DATA

    picture = sorted((SHARED_DATA / "wikiart-vangogh" / "membership").glob("*.jpg"))[0]
    out = tmp_path / "out"
    code = main(["check", "--pretrained", str(vpred["base"]), "--finetuned",
                 str(vpred["single_file"]), "--steps", "1", "--resolution", "32", "--prompt",
                 PROMPT, "--out", str(out), str(picture)])
    assert code == 0, capsys.readouterr()
    pair = json.loads((out / "results.json").read_text())["settings"]["pair"]
    assert (pair["family"], pair["finetuned_kind"]) == ("stable-diffusion-xl", "single_file")
    assert pair["prediction_type"] == pair["prediction_type_finetuned"] == "v_prediction"

"""Flux.2 Klein: every layout predicts the velocity diffusers' own Flux2KleinPipeline computes,
and the latent codec is the pipeline's (patchified, batch-norm normalised).

References come from ``Flux2KleinPipeline`` itself (``encode_prompt`` with Qwen3 layers 9/18/27
and its text ids, ``_patchify_latents``, ``_pack_latents``, ``_prepare_latent_ids``,
``_unpack_latents_with_ids``, ``compute_empirical_mu`` at its default 50 steps through the
scheduler's ``time_shift``, ``load_lora_weights``), on tiny random models, CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from cgidm_core.errors import UnsupportedModelFamilyError
from cgidm_core.models import detect_finetuned_kind, load_pair_from_paths
from cgidm_core.models.flux2 import Flux2LoraPair, Flux2Pair
from cgidm_core.models.formats import pipeline_family
from cgidm_core.names import FLUX2_FAMILY
from cgidm_testkit import tiny_families

PROMPT = "sks style"
CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def klein(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux2-klein")
    base = tiny_families.make_tiny_flux2_klein(root / "base")
    return {
        "base": base,
        "transformer": tiny_families.make_flux2_transformer_folder(base, root / "db", seed=3),
        "lora": tiny_families.make_flux2_lora(base, root / "lora", seed=5),
    }


def _reference_pipeline(models: dict[str, Path], kind: str) -> Flux2KleinPipeline:
    pipe = Flux2KleinPipeline.from_pretrained(models["base"], local_files_only=True)
    if kind == "lora":
        pipe.load_lora_weights(str(models[kind]))
    elif kind != "base":
        pipe.transformer = Flux2Transformer2DModel.from_pretrained(models[kind] / "transformer")
    return pipe


def _reference_sigmas(pipe, z, t):
    mu = compute_empirical_mu(image_seq_len=z.shape[-2] * z.shape[-1], num_steps=50)
    return pipe.scheduler.time_shift(mu, 1.0, t.float() / 1000)


def _reference_velocity(pipe, z, t, sigma, prompt=PROMPT):
    batch, _, height, width = z.shape
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt(prompt, device="cpu")
        out = pipe.transformer(hidden_states=pipe._pack_latents(z),
                               timestep=(sigma * 1000) / 1000, guidance=None,
                               encoder_hidden_states=embeds.expand(batch, -1, -1),
                               txt_ids=text_ids.expand(batch, -1, -1),
                               img_ids=pipe._prepare_latent_ids(z), return_dict=False)[0]
        return pipe._unpack_latents_with_ids(out, pipe._prepare_latent_ids(z), height, width)


def _inputs(shape, batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=generator), torch.tensor([20, 700][:batch])


def test_detects_klein_and_tells_it_from_dev(klein, tmp_path):
    """A Klein transformer (no guidance embedding) in a folder that says ``Flux2Pipeline`` is
    neither: Flux.2 dev's entry refuses it by name."""
    import json
    import shutil

    assert pipeline_family(klein["base"]) == FLUX2_FAMILY
    assert detect_finetuned_kind(klein["transformer"]) == "dreambooth"
    assert detect_finetuned_kind(klein["lora"]) == "lora"
    dev = tmp_path / "dev"
    shutil.copytree(klein["base"], dev)
    index = json.loads((dev / "model_index.json").read_text())
    (dev / "model_index.json").write_text(json.dumps({**index, "_class_name": "Flux2Pipeline"}))
    with pytest.raises(UnsupportedModelFamilyError, match="Flux2Pipeline model whose "
                                                          "transformer has no guidance"):
        pipeline_family(dev)


#: A ``transformer/`` folder is compared with the pipeline by
#: test_a_bfl_single_file_predicts_like_its_folder (the folder and the file of the same weights).
@pytest.mark.parametrize("kind", ["lora"])
def test_layouts_predict_like_diffusers(klein, kind):
    pair = load_pair_from_paths(klein["base"], klein[kind], **CPU)
    assert type(pair) is (Flux2LoraPair if kind == "lora" else Flux2Pair)
    assert pair.latent_shape == (16, 8, 8) and pair.image_size == 32
    z, t = _inputs(pair.latent_shape)
    cond = pair.conditioning(PROMPT)
    with torch.no_grad():
        v_ft, v_pre = pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)
    base = _reference_pipeline(klein, "base")
    sigma = pair.sigmas(t, z)
    torch.testing.assert_close(sigma, _reference_sigmas(base, z, t), rtol=0, atol=1e-7)
    torch.testing.assert_close(v_pre, _reference_velocity(base, z, t, sigma))
    torch.testing.assert_close(v_ft, _reference_velocity(_reference_pipeline(klein, kind), z, t,
                                                         sigma))
    assert (v_ft - v_pre).abs().max() > 1e-3
    if kind == "lora":
        assert pair.unet_finetuned is pair.unet_pretrained and len(pair.unet_adapter) > 0


def test_a_bfl_single_file_predicts_like_its_folder(klein, tmp_path):
    """A Klein transformer in BFL's naming (written by the testkit's inverse of diffusers'
    converter) is recognised as a Klein single file, converted by diffusers with the base's
    config, and predicts exactly what the same weights do as a ``transformer/`` folder, and what
    ``Flux2KleinPipeline`` does with that folder's transformer."""
    from cgidm_core import families
    from cgidm_core.models.formats import safetensors_keys

    file = tiny_families.make_flux2_klein_single_file(klein["base"], tmp_path / "ft.safetensors",
                                                      seed=3)
    folder = tmp_path / "ft_diffusers"
    keys = safetensors_keys(file)
    assert "double_blocks.0.img_attn.qkv.weight" in keys and not any(
        k.startswith(("transformer_blocks.", "guidance_in.")) for k in keys)
    assert detect_finetuned_kind(file) == "single_file"
    assert [f.name for f in families.file_claims(keys, "single_file")] == [FLUX2_FAMILY]
    pair = load_pair_from_paths(klein["base"], file, **CPU)
    folder_pair = load_pair_from_paths(klein["base"], folder, **CPU)
    assert type(pair) is Flux2Pair and pair.finetuned_kind == "single_file"
    assert folder_pair.finetuned_kind == "dreambooth"
    z, t = _inputs(pair.latent_shape)
    cond = pair.conditioning(PROMPT)
    with torch.no_grad():
        v_ft, v_pre = pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)
        v_folder = folder_pair.eps_finetuned(z, t, folder_pair.conditioning(PROMPT))
    torch.testing.assert_close(v_ft, v_folder, rtol=0, atol=0)
    reference = _reference_pipeline({**klein, "ft": folder}, "ft")
    torch.testing.assert_close(v_ft, _reference_velocity(reference, z, t, pair.sigmas(t, z)))
    assert (v_ft - v_pre).abs().max() > 1e-3


def test_prefixed_diffusers_named_fp8_and_dev_single_files(klein, tmp_path):
    """ComfyUI's ``model.diffusion_model.`` prefix (which diffusers' converter does not strip)
    and a one-file state dict in diffusers' own naming load the same weights; a float8 file and
    a Flux.2 dev file (guidance embedding) are refused by name, as ``cgidm check`` meets them."""
    from safetensors.torch import load_file, save_file

    from cgidm_core.errors import IncompatiblePairError, ModelFormatError
    from cgidm_core.models.flux2 import load_single_file
    from cgidm_core.models.sd_loading import LoadOptions

    opts = LoadOptions(torch.device("cpu"), torch.float32, True)
    prefixed = tiny_families.make_flux2_klein_single_file(
        klein["base"], tmp_path / "comfy.safetensors", seed=3, prefix="model.diffusion_model.")
    assert detect_finetuned_kind(prefixed) == "single_file"
    ours = load_single_file(prefixed, klein["base"], opts).state_dict()
    theirs = tiny_families.load_flux2_transformer(tmp_path / "comfy_diffusers").state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    diffusers_named = tmp_path / "diffusers_named.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(diffusers_named))
    assert detect_finetuned_kind(diffusers_named) == "single_file"
    again = load_single_file(diffusers_named, klein["base"], opts).state_dict()
    assert all(torch.equal(again[k], theirs[k]) for k in theirs) and again.keys() == theirs.keys()
    state = {k.removeprefix("model.diffusion_model."): v for k, v in
             load_file(str(prefixed)).items()}
    fp8 = tmp_path / "fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()},
              str(fp8))
    with pytest.raises(ModelFormatError, match="float8-quantised Flux.2 transformer.*bf16"):
        load_pair_from_paths(klein["base"], fp8, **CPU)
    dev = tmp_path / "dev.safetensors"
    width = state["time_in.in_layer.weight"].shape
    save_file({**state, "guidance_in.in_layer.weight": torch.zeros(width),
               "guidance_in.out_layer.weight": state["time_in.out_layer.weight"].clone()},
              str(dev))
    with pytest.raises(IncompatiblePairError, match="Flux.2 dev.*Flux.2 Klein|Flux.2 Klein.*"
                                                    "Flux.2 dev"):
        load_pair_from_paths(klein["base"], dev, **CPU)


@pytest.mark.slow
def test_a_bfl_single_file_base_is_the_folder_base(klein, tmp_path):
    """The pretrained Klein transformer as one BFL file (``flux-2-klein-4b.safetensors``), its
    parts from the pipeline folder (``--pretrained-config``): the same base as the folder's."""
    from safetensors.torch import save_file

    state = tiny_families.load_flux2_transformer(klein["base"]).state_dict()
    file = tmp_path / "flux-2-klein-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_families.flux2_transformer_to_bfl(
        state).items()}, str(file))
    pair = load_pair_from_paths(file, klein["lora"], pretrained_config=klein["base"], **CPU)
    z, t = _inputs(pair.latent_shape)
    cond = pair.conditioning(PROMPT)
    with torch.no_grad():
        v_pre, v_ft = pair.eps_pretrained(z, t, cond), pair.eps_finetuned(z, t, cond)
    reference = _reference_pipeline(klein, "lora")
    sigma = pair.sigmas(t, z)
    torch.testing.assert_close(v_ft, _reference_velocity(reference, z, t, sigma))
    reference.disable_lora()
    torch.testing.assert_close(v_pre, _reference_velocity(reference, z, t, sigma))


@pytest.fixture(scope="module")
def lora_pair(klein):
    """One loaded LoRA pair for the tests that only read it (the codec, the method)."""
    return load_pair_from_paths(klein["base"], klein["lora"], **CPU)


@pytest.mark.slow
def test_latent_codec_is_the_pipelines(klein, lora_pair):
    pair = lora_pair
    pipe = _reference_pipeline(klein, "base")
    bn = pipe.vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latent = pipe._patchify_latents(pipe.vae.encode(x).latent_dist.mean)
        torch.testing.assert_close(pair.encode(x), (latent - mean) / std)
        z = torch.randn(1, *pair.latent_shape)
        image = pipe.vae.decode(pipe._unpatchify_latents(z * std + mean)).sample.clamp(-1, 1)
        torch.testing.assert_close(pair.decode(z), image)


@pytest.mark.slow
def test_the_method_runs_on_a_klein_lora_pair(lora_pair):
    """The inversion end to end on the patchified, normalised latent (encode, masked PGD on the
    velocity contrast, decode), twice with one seed: the same scores. One PGD step: a second
    runs the same code again (and costs as much)."""
    from cgidm_core import InversionConfig, authenticate
    from tests.paths import SHARED_DATA

    pair = lora_pair
    pictures = sorted((SHARED_DATA / "wikiart-vangogh" / "membership").glob("*.jpg"))[:2]
    config = InversionConfig(steps=1, seed=1)
    first = authenticate(pair, pictures, prompt=PROMPT, config=config, batch_size=2)
    again = authenticate(pair, pictures, prompt=PROMPT, config=config, batch_size=2)
    assert [r.score for r in first] == [r.score for r in again]
    assert all(r.recovered.size == (32, 32) for r in first)

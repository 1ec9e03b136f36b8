"""Chroma: every layout predicts the velocity diffusers' own ChromaPipeline computes.

References come from ``ChromaPipeline`` itself (``encode_prompt`` with T5's attention mask and the
text mask it builds, ``_prepare_attention_mask`` for the image tokens, ``_pack_latents`` /
``_prepare_latent_image_ids`` / ``_unpack_latents``, ``calculate_shift``'s ``mu`` through the
scheduler's ``time_shift``, ``load_lora_weights``), on tiny random models, CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel
from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift

from cgidm_core.errors import IncompatiblePairError
from cgidm_core.models import detect_finetuned_kind, load_pair_from_paths
from cgidm_core.models.chroma import ChromaLoraPair, ChromaPair
from cgidm_core.models.formats import pipeline_family, transformer_family
from cgidm_core.names import CHROMA_FAMILY
from cgidm_testkit import tiny_families, tinymodels

PROMPT = "sks style"
CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def chroma(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chroma")
    base = tiny_families.make_tiny_chroma(root / "base")
    return {
        "base": base,
        "pipeline": tiny_families.make_chroma_full_finetune(base, root / "full", seed=2),
        "transformer": tiny_families.make_chroma_transformer_folder(base, root / "db", seed=3),
        "single_file": tiny_families.make_chroma_single_file(base, root / "ft.safetensors",
                                                             seed=4),
        "lora": tiny_families.make_chroma_lora(base, root / "lora", seed=5),
        "kohya": tinymodels.make_flux_kohya_lora(base, root / "kohya" / "chroma.safetensors",
                                                 seed=6, with_clip=False),
    }


def _reference_pipeline(models: dict[str, Path], kind: str) -> ChromaPipeline:
    pipe = ChromaPipeline.from_pretrained(models["base"], local_files_only=True)
    if kind in ("lora", "kohya"):
        lora = models[kind]
        pipe.load_lora_weights(str(lora.parent if lora.is_file() else lora),
                               **({"weight_name": lora.name} if lora.is_file() else {}))
    elif kind != "base":
        folder = models[kind]
        if kind == "single_file":
            folder = folder.parent / f"{folder.stem}_diffusers"
        pipe.transformer = ChromaTransformer2DModel.from_pretrained(folder / "transformer")
    return pipe


def _reference_sigmas(pipe: ChromaPipeline, z, t) -> torch.Tensor:
    config = pipe.scheduler.config
    tokens = (z.shape[-2] // 2) * (z.shape[-1] // 2)
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)
    return pipe.scheduler.time_shift(mu, 1.0, t.float() / 1000)


def _reference_velocity(pipe: ChromaPipeline, z, t, sigma, prompt=PROMPT):
    """The transformer's output at noise level ``sigma`` as the pipeline calls it. ``sigma``
    is the pair's, checked against :func:`_reference_sigmas` to float32 rounding apart: Chroma's
    timestep MLP turns a 6e-8 rounding difference of the two equal formulas into 3e-5."""
    batch, channels, height, width = z.shape
    tokens = (height // 2) * (width // 2)
    with torch.no_grad():
        embeds, text_ids, mask, *_ = pipe.encode_prompt(prompt, device="cpu",
                                                        do_classifier_free_guidance=False)
        mask = pipe._prepare_attention_mask(batch, tokens, z.dtype, mask.expand(batch, -1))
        packed = pipe._pack_latents(z, batch, channels, height, width)
        ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", z.dtype)
        out = pipe.transformer(hidden_states=packed, timestep=sigma,
                               encoder_hidden_states=embeds.expand(batch, -1, -1),
                               txt_ids=text_ids, img_ids=ids, attention_mask=mask).sample
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(out, height * scale, width * scale, scale)


def _inputs(shape, batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=generator), torch.tensor([20, 700][:batch])


def test_detects_chroma_and_every_layout(chroma):
    assert pipeline_family(chroma["base"]) == CHROMA_FAMILY
    expected = {"pipeline": "pipeline", "transformer": "dreambooth",
                "single_file": "single_file", "lora": "lora", "kohya": "lora"}
    assert {k: detect_finetuned_kind(chroma[k]) for k in expected} == expected
    # lodestones' single files: Flux.1's BFL block names plus the guidance approximator
    bfl = ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
           "model.diffusion_model.distilled_guidance_layer.in_proj.weight"]
    assert transformer_family(bfl) == CHROMA_FAMILY
    assert transformer_family(bfl[:1]) == "flux"


#: The quick suite runs the kohya LoRA (converted by diffusers, adapter on/off); the rest is slow.
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) for k in
                                  ("pipeline", "transformer", "single_file", "lora")] + ["kohya"])
def test_layouts_predict_like_diffusers(chroma, kind):
    pair = load_pair_from_paths(chroma["base"], chroma[kind], **CPU)
    assert type(pair) is (ChromaLoraPair if kind in ("lora", "kohya") else ChromaPair)
    assert pair.family == CHROMA_FAMILY and pair.latent_shape == (16, 16, 16)
    z, t = _inputs(pair.latent_shape)
    cond = pair.conditioning(PROMPT)
    with torch.no_grad():
        v_ft, v_pre = pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)
    base = _reference_pipeline(chroma, "base")
    sigma = pair.sigmas(t, z)
    torch.testing.assert_close(sigma, _reference_sigmas(base, z, t), rtol=0, atol=1e-7)
    torch.testing.assert_close(v_pre, _reference_velocity(base, z, t, sigma))
    torch.testing.assert_close(v_ft, _reference_velocity(_reference_pipeline(chroma, kind), z, t,
                                                         sigma))
    assert (v_ft - v_pre).abs().max() > 1e-3
    if kind in ("lora", "kohya"):
        assert pair.unet_finetuned is pair.unet_pretrained and len(pair.unet_adapter) > 0


@pytest.mark.slow
def test_chroma_and_flux_files_do_not_mix(chroma, tmp_path):
    flux = tinymodels.make_tiny_flux(tmp_path / "flux", variant="schnell")
    with pytest.raises(IncompatiblePairError, match="is a Chroma (single-file|fine-tuned)"):
        load_pair_from_paths(flux, chroma["single_file"], **CPU)
    with pytest.raises(IncompatiblePairError, match="is a Chroma (single-file|fine-tuned)"):
        load_pair_from_paths(flux, chroma["transformer"], **CPU)
    flux_file = tinymodels.make_flux_single_file(flux, tmp_path / "flux_ft.safetensors")
    with pytest.raises(IncompatiblePairError,
                       match="Flux.1 single-file checkpoint but the pretrained model is Chroma"):
        load_pair_from_paths(chroma["base"], flux_file, **CPU)


@pytest.fixture(scope="module")
def klein_lora(tmp_path_factory) -> Path:
    """A tiny Flux.2 Klein LoRA of its double block's attention, as diffusers saves it (no
    header metadata): its names are a Chroma LoRA's, and both tiny transformers are 32 wide."""
    root = tmp_path_factory.mktemp("klein-on-chroma")
    base = tiny_families.make_tiny_flux2_klein(root / "klein")
    return tiny_families.make_flux2_lora(base, root / "lora", seed=7)


def _with_header(lora: Path, out: Path, metadata: dict[str, str]) -> Path:
    import shutil

    shutil.copytree(lora, out)
    tiny_families.add_tensors(out / "pytorch_lora_weights.safetensors", {}, metadata)
    return out


def test_a_klein_lora_is_refused_for_chroma_when_its_header_says_klein(chroma, klein_lora,
                                                                       tmp_path):
    """ai-toolkit's header names the base: refused before a weight is read, naming both."""
    from cgidm_core.errors import FamilyMismatchError

    tagged = _with_header(klein_lora, tmp_path / "aitk",
                          {"ss_base_model_version": "flux2_klein_4b", "ss_output_name": "sks"})
    with pytest.raises(FamilyMismatchError, match=r"trained for Flux\.2 Klein .*"
                       r"the base is Chroma.*check it against the Flux\.2 Klein base") as info:
        load_pair_from_paths(chroma["base"], tagged, **CPU)
    assert info.value.trained_for == ("flux2",) and info.value.code == "family_mismatch"


def test_cgidm_check_tells_which_base_a_klein_tagged_lora_was_trained_for(chroma, klein_lora,
                                                                          tmp_path, capsys):
    """As a user runs it: exit 2 and one line naming the base the LoRA was trained for."""
    from cgidm.cli import main
    from tests.paths import SHARED_DATA

    tagged = _with_header(klein_lora, tmp_path / "musubi",
                          {"modelspec.architecture": "Flux.2-klein-4b/lora"})
    picture = sorted((SHARED_DATA / "wikiart-vangogh" / "membership").glob("*.jpg"))[0]
    code = main(["check", "--pretrained", str(chroma["base"]), "--finetuned", str(tagged),
                 "--steps", "1", "--resolution", "32", "--prompt", PROMPT,
                 "--out", str(tmp_path / "out"), str(picture)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "was trained for Flux.2 Klein" in err and "'Flux.2-klein-4b/lora'" in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_klein_named_lora_without_a_header_loads_on_chroma_marked_ambiguous(chroma,
                                                                              klein_lora,
                                                                              tmp_path):
    """No metadata: the names fit Chroma, so it loads (as before), and the pair's describe()
    (results.json) says the family was inferred from the base; with a Chroma header it is
    the header's word, and Chroma's own LoRA is taken by its names and header alike."""
    from cgidm_core.families import get
    from cgidm_core.models.formats import check_finetune_family

    pair = load_pair_from_paths(chroma["base"], klein_lora, **CPU)
    assert type(pair) is ChromaLoraPair
    evidence = pair.describe()["family_evidence"]
    assert (evidence["family"], evidence["source"], evidence["ambiguous"]) == (
        CHROMA_FAMILY, "base", True)
    assert {"chroma", "flux2"} <= set(evidence["name_claims"])
    tagged = _with_header(klein_lora, tmp_path / "chroma_tagged",
                          {"modelspec.architecture": "chroma/lora"})
    said = check_finetune_family(get(CHROMA_FAMILY), "lora", tagged)
    assert said is not None and (said.source, said.ambiguous) == ("metadata", False)
    assert said.metadata == ("modelspec.architecture='chroma/lora'",)

"""Qwen-Image: every layout predicts the velocity diffusers' own QwenImagePipeline computes, and
the latent codec is the pipeline's (per-channel mean/std of its 3-D VAE).

References come from ``QwenImagePipeline`` itself (``encode_prompt``: its system template, the
first 34 tokens dropped, Qwen2.5-VL's last hidden states; ``_pack_latents`` / ``_unpack_latents``;
``calculate_shift``'s ``mu`` through the scheduler's ``time_shift``; the transformer called with
``img_shapes`` as its loop calls it; ``load_lora_weights``), on tiny random models, CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from cgidm_core.errors import IncompatiblePairError
from cgidm_core.models import detect_finetuned_kind, load_pair_from_paths
from cgidm_core.models.formats import pipeline_family
from cgidm_core.models.qwen_image import QwenImageLoraPair, QwenImagePair
from cgidm_core.names import QWEN_IMAGE_FAMILY
from cgidm_testkit import tiny_families

PROMPT = "sks style"
CPU = {"device": "cpu"}
LORAS = ("lora", "comfy_lora")
LATENT = (16, 8, 8)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen-image")
    base = tiny_families.make_tiny_qwen_image(root / "base")
    return {
        "base": base,
        "transformer": tiny_families.make_qwen_image_transformer_folder(base, root / "db",
                                                                        seed=3),
        "single_file": tiny_families.make_qwen_image_single_file(base, root / "ft.safetensors",
                                                                 seed=4),
        "lora": tiny_families.make_qwen_image_lora(base, root / "lora", seed=5),
        "comfy_lora": tiny_families.make_qwen_image_lora(
            base, root / "comfy" / "qwen_style.safetensors", seed=6, naming="comfy"),
    }


def _reference_pipeline(models: dict[str, Path], kind: str) -> QwenImagePipeline:
    pipe = QwenImagePipeline.from_pretrained(models["base"], local_files_only=True)
    if kind in LORAS:
        lora = models[kind]
        pipe.load_lora_weights(str(lora.parent if lora.is_file() else lora),
                               **({"weight_name": lora.name} if lora.is_file() else {}))
    elif kind != "base":
        folder = models[kind]
        if kind == "single_file":
            folder = folder.parent / f"{folder.stem}_diffusers"
        pipe.transformer = QwenImageTransformer2DModel.from_pretrained(folder / "transformer")
    return pipe


def _reference_sigmas(pipe: QwenImagePipeline, z, t) -> torch.Tensor:
    config = pipe.scheduler.config
    tokens = (z.shape[-2] // 2) * (z.shape[-1] // 2)
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)
    return pipe.scheduler.time_shift(mu, 1.0, t.float() / 1000)


def _reference_velocity(pipe: QwenImagePipeline, z, t, sigma, prompt=PROMPT):
    """At noise level ``sigma`` (the pair's, checked against :func:`_reference_sigmas`)."""
    batch, channels, height, width = z.shape
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt, device="cpu")
        packed = pipe._pack_latents(z, batch, channels, height, width)
        out = pipe.transformer(hidden_states=packed, timestep=(sigma * 1000) / 1000,
                               guidance=None, encoder_hidden_states_mask=mask,
                               encoder_hidden_states=embeds.expand(batch, -1, -1),
                               img_shapes=[[(1, height // 2, width // 2)]] * batch,
                               return_dict=False)[0]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(out, height * scale, width * scale, scale)[:, :, 0]


def _inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *LATENT), generator=generator), torch.tensor([20, 700][:batch])


def test_detects_qwen_image_and_every_layout(qwen):
    assert pipeline_family(qwen["base"]) == QWEN_IMAGE_FAMILY
    expected = {"transformer": "dreambooth", "single_file": "single_file", "lora": "lora",
                "comfy_lora": "lora"}
    assert {k: detect_finetuned_kind(qwen[k]) for k in expected} == expected


#: The quick suite runs the ComfyUI-named LoRA; the rest is slow.
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) for k in
                                  ("transformer", "single_file", "lora")] + ["comfy_lora"])
def test_layouts_predict_like_diffusers(qwen, kind):
    pair = load_pair_from_paths(qwen["base"], qwen[kind], **CPU)
    assert type(pair) is (QwenImageLoraPair if kind in LORAS else QwenImagePair)
    assert pair.family == QWEN_IMAGE_FAMILY and pair.pixels_per_latent == 4
    z, t = _inputs()
    cond = pair.conditioning(PROMPT)
    with torch.no_grad():
        v_ft, v_pre = pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)
    base = _reference_pipeline(qwen, "base")
    sigma = pair.sigmas(t, z)
    torch.testing.assert_close(sigma, _reference_sigmas(base, z, t), rtol=0, atol=1e-7)
    torch.testing.assert_close(v_pre, _reference_velocity(base, z, t, sigma))
    torch.testing.assert_close(v_ft, _reference_velocity(_reference_pipeline(qwen, kind), z, t,
                                                         sigma))
    assert (v_ft - v_pre).abs().max() > 1e-3
    if kind in LORAS:
        assert pair.unet_finetuned is pair.unet_pretrained and len(pair.unet_adapter) > 0


def test_latent_codec_is_the_pipelines(qwen):
    """Encoding normalises the VAE's mean per channel; decoding undoes it as the pipeline does
    before ``vae.decode``."""
    pair = load_pair_from_paths(qwen["base"], qwen["lora"], **CPU)
    pipe = _reference_pipeline(qwen, "base")
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = (pipe.vae.encode(x.unsqueeze(2)).latent_dist.mean - mean) / std
        torch.testing.assert_close(pair.encode(x), expected[:, :, 0])
        z = torch.randn(1, *LATENT)
        image = pipe.vae.decode(z.unsqueeze(2) * std + mean).sample[:, :, 0].clamp(-1, 1)
        torch.testing.assert_close(pair.decode(z), image)


@pytest.mark.slow
def test_qwen_image_files_on_another_base_are_refused(qwen, tmp_path):
    zimage = tiny_families.make_tiny_zimage(tmp_path / "zimage")
    with pytest.raises(IncompatiblePairError, match="is a Qwen-Image (single-file|fine-tuned)"):
        load_pair_from_paths(zimage, qwen["single_file"], **CPU)
    with pytest.raises(IncompatiblePairError, match="is a Qwen-Image (single-file|fine-tuned)"):
        load_pair_from_paths(zimage, qwen["transformer"], **CPU)


@pytest.mark.slow
def test_the_method_runs_on_a_qwen_image_lora_pair(qwen):
    """The inversion end to end (VAE encode with the normalised latent, masked PGD on the
    velocity contrast, decode) at 32 px, twice with one seed: the same scores. One PGD step: a
    second runs the same code again (and costs as much)."""
    from cgidm_core import InversionConfig, authenticate
    from tests.paths import SHARED_DATA

    pair = load_pair_from_paths(qwen["base"], qwen["comfy_lora"], **CPU)
    pictures = sorted((SHARED_DATA / "wikiart-vangogh" / "membership").glob("*.jpg"))[:2]
    config = InversionConfig(steps=1, seed=1, resolution=32)
    first = authenticate(pair, pictures, prompt=PROMPT, config=config, batch_size=2)
    again = authenticate(pair, pictures, prompt=PROMPT, config=config, batch_size=2)
    assert [r.score for r in first] == [r.score for r in again]
    assert all(r.recovered.size == (32, 32) for r in first)

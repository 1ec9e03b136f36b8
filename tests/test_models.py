"""Model pairs: every fine-tune format loads into a pair that predicts what the models predict.

References are computed with diffusers/transformers directly (and, for LoRA, with diffusers' own
``pipe.load_lora_weights``), so a pair that mixed up models, adapters or text encoders fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextModel, CLIPTokenizer

from cgidm_core.errors import (
    ConfigError,
    IncompatiblePairError,
    ModelFormatError,
    ModelNotFoundError,
)
from cgidm_core.models import (
    DDPMPair,
    StableDiffusionLoraPair,
    StableDiffusionPair,
    detect_finetuned_kind,
    load_pair_from_paths,
)
from cgidm_testkit import tinymodels

PROMPT = "sks style"
CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def sd_models(tiny_sd_pair, tmp_path_factory) -> dict[str, Path]:
    base, full = tiny_sd_pair
    root = tmp_path_factory.mktemp("sd_formats")
    single = tinymodels.make_single_file(base, root / "single.safetensors")
    return {
        "base": base,
        "pipeline": full,
        "dreambooth": tinymodels.make_dreambooth_folder(base, root / "db"),
        "dreambooth_unet_only": tinymodels.make_dreambooth_folder(
            base, root / "db_unet", text_encoders=()
        ),
        "lora_folder": tinymodels.make_lora(base, root / "lora"),
        "lora_file": tinymodels.make_lora(
            base, root / "lora_te", as_file=True, with_text_encoder=True
        ),
        "single_file": single,
        "single_file_reference": root / "single_diffusers",
    }


def _inputs(shape: tuple[int, int, int], batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=generator), torch.tensor([20, 700][:batch])


def _text_embedding(folder: Path, prompt: str, text_encoder_folder: Path | None = None):
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained((text_encoder_folder or folder) / "text_encoder")
    ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0]


def _reference_eps(unet_folder: Path, z, t, context) -> torch.Tensor:
    unet = UNet2DConditionModel.from_pretrained(unet_folder / "unet")
    with torch.no_grad():
        return unet(z, t, encoder_hidden_states=context.expand(len(z), -1, -1)).sample


def _eps(pair, z, t, prompt=PROMPT):
    cond = pair.conditioning(prompt)
    with torch.no_grad():
        return pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)


# -- detection -------------------------------------------------------------------------------------


def test_detects_every_format(sd_models, tiny_ddpm_pair):
    expected = {
        "base": "pipeline",
        "pipeline": "pipeline",
        "dreambooth": "dreambooth",
        "dreambooth_unet_only": "dreambooth",
        "lora_folder": "lora",
        "lora_file": "lora",
        "single_file": "single_file",
    }
    assert {name: detect_finetuned_kind(sd_models[name]) for name in expected} == expected
    assert detect_finetuned_kind(tiny_ddpm_pair[1]) == "ddpm"
    assert detect_finetuned_kind(sd_models["dreambooth"] / "unet") == "dreambooth"


# -- Stable Diffusion formats ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pipeline", "dreambooth", "dreambooth_unet_only", "single_file"])
def test_finetuned_formats_predict_like_their_models(sd_models, kind):
    base = sd_models["base"]
    pair = load_pair_from_paths(base, sd_models[kind], **CPU)
    assert isinstance(pair, StableDiffusionPair)
    assert pair.finetuned_kind == kind.replace("_unet_only", "")
    z, t = _inputs(pair.latent_shape)
    eps_ft, eps_pre = _eps(pair, z, t)

    base_context = _text_embedding(base, PROMPT)
    torch.testing.assert_close(eps_pre, _reference_eps(base, z, t, base_context))

    reference = sd_models["single_file_reference"] if kind == "single_file" else sd_models[kind]
    has_own_text_encoder = kind == "dreambooth"
    ft_context = _text_embedding(base, PROMPT, reference if has_own_text_encoder else None)
    torch.testing.assert_close(eps_ft, _reference_eps(reference, z, t, ft_context))
    assert (eps_ft - eps_pre).abs().max() > 1e-3
    assert eps_ft.dtype == torch.float32 and eps_ft.shape == z.shape


def test_text_encoder_is_shared_only_when_the_finetune_has_none(sd_models):
    unet_only = load_pair_from_paths(sd_models["base"], sd_models["dreambooth_unet_only"], **CPU)
    assert unet_only.text_encoder_finetuned is unet_only.text_encoder_pretrained
    with_encoder = load_pair_from_paths(sd_models["base"], sd_models["dreambooth"], **CPU)
    assert with_encoder.text_encoder_finetuned is not with_encoder.text_encoder_pretrained
    cond = with_encoder.conditioning(PROMPT)
    assert not torch.equal(cond.finetuned, cond.pretrained)
    # An unchanged text encoder in a full pipeline or a single file is kept once, too.
    for kind in ("pipeline", "single_file"):
        pair = load_pair_from_paths(sd_models["base"], sd_models[kind], **CPU)
        assert pair.text_encoder_finetuned is pair.text_encoder_pretrained
        assert len(pair.modules()) == 4  # two UNets, one VAE, one text encoder


@pytest.mark.parametrize("kind", ["lora_folder", "lora_file"])
def test_lora_pair_switches_one_unet(sd_models, kind):
    base, lora = sd_models["base"], sd_models[kind]
    pair = load_pair_from_paths(base, lora, **CPU)
    assert isinstance(pair, StableDiffusionLoraPair)
    unets = [m for m in pair.modules() if isinstance(m, UNet2DConditionModel)]
    assert len(unets) == 1 and pair.unet_finetuned is pair.unet_pretrained

    unet_bytes = sum(
        p.numel() * p.element_size() for n, p in unets[0].named_parameters() if "lora_" not in n
    )
    # two UNets, one VAE, one text encoder
    full = load_pair_from_paths(base, sd_models["pipeline"], **CPU)
    assert full.memory_bytes() - pair.memory_bytes() > 0.8 * unet_bytes

    z, t = _inputs(pair.latent_shape)
    eps_ft, eps_pre = _eps(pair, z, t)
    eps_ft_again, eps_pre_again = _eps(pair, z, t)  # switching back and forth is stable
    torch.testing.assert_close(eps_ft, eps_ft_again, rtol=0, atol=0)
    torch.testing.assert_close(eps_pre, eps_pre_again, rtol=0, atol=0)
    assert (eps_ft - eps_pre).abs().max() > 1e-3

    # adapter off = the base model itself
    base_context = _text_embedding(base, PROMPT)
    torch.testing.assert_close(eps_pre, _reference_eps(base, z, t, base_context))
    # adapter on = what diffusers' own LoRA loading gives
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.load_lora_weights(str(lora.parent if lora.is_file() else lora))
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        context = pipe.text_encoder(ids.input_ids)[0]
        expected = pipe.unet(z, t, encoder_hidden_states=context.expand(2, -1, -1)).sample
    torch.testing.assert_close(eps_ft, expected)
    cond = pair.conditioning(PROMPT)
    assert torch.equal(cond.finetuned, cond.pretrained) == (kind == "lora_folder")


def test_gradients_flow_to_the_input_only(sd_models):
    pair = load_pair_from_paths(sd_models["base"], sd_models["lora_folder"], **CPU)
    z, t = _inputs(pair.latent_shape)
    z.requires_grad_(True)
    cond = pair.conditioning(PROMPT)
    eps_ft, eps_pre = pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)
    loss = (eps_ft**2).mean() - (eps_pre**2).mean()
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(not p.requires_grad for m in pair.modules() for p in m.parameters())


def test_v_prediction_is_converted_to_eps(tmp_path):
    base = tinymodels.make_tiny_sd(tmp_path / "v_base", prediction_type="v_prediction")
    finetuned = tinymodels.make_dreambooth_folder(base, tmp_path / "v_ft", text_encoders=())
    pair = load_pair_from_paths(base, finetuned, **CPU)
    assert pair.prediction_type == "v_prediction"
    z, t = _inputs(pair.latent_shape)
    _, eps_pre = _eps(pair, z, t)
    v = _reference_eps(base, z, t, _text_embedding(base, PROMPT))
    abar = pair.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps_pre, abar.sqrt() * v + (1 - abar).sqrt() * z)


# -- codec and conditioning ------------------------------------------------------------------------


def test_encode_decode_shapes_and_determinism(sd_models):
    pair = load_pair_from_paths(sd_models["base"], sd_models["dreambooth_unet_only"], **CPU)
    assert pair.pixels_per_latent == 2 and pair.image_size == 16
    assert pair.latent_shape == (4, 8, 8)
    assert pair.alphas_cumprod.dtype == torch.float32 and pair.num_train_timesteps == 1000
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = pair.encode(images)
        again = pair.encode(images)
        decoded = pair.decode(latents)
        mean = pair.vae.encode(images).latent_dist.mean
    assert latents.shape == (3, 4, 8, 8) and latents.dtype == torch.float32
    assert torch.equal(latents, again)
    torch.testing.assert_close(latents, mean * 0.18215)
    assert decoded.shape == images.shape and decoded.min() >= -1 and decoded.max() <= 1


def test_conditioning_runs_each_text_encoder_once_per_prompt(sd_models):
    for kind, calls_per_prompt in (("dreambooth_unet_only", 1), ("dreambooth", 2)):
        pair = load_pair_from_paths(sd_models["base"], sd_models[kind], **CPU)
        calls: list[int] = []
        encoders = {id(m): m for m in (pair.text_encoder_pretrained, pair.text_encoder_finetuned)}
        for encoder in encoders.values():
            encoder.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        first = pair.conditioning("a painting")
        assert pair.conditioning("a painting") is first
        assert len(calls) == calls_per_prompt
        pair.conditioning("a photo")
        assert len(calls) == 2 * calls_per_prompt
        assert first.pretrained.shape == (1, 77, 32)


# -- pixel-space DDPM ------------------------------------------------------------------------------


def test_ddpm_pair(tiny_ddpm_pair):
    pre_dir, ft_dir = tiny_ddpm_pair
    pair = load_pair_from_paths(pre_dir, ft_dir, **CPU)
    assert isinstance(pair, DDPMPair) and pair.family == "ddpm"
    assert (pair.image_size, pair.pixels_per_latent, pair.latent_shape) == (16, 1, (3, 16, 16))
    assert pair.dtype == torch.float32 and pair.device.type == "cpu"
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(pair.encode(images), images)
    assert torch.equal(pair.decode(images * 3), (images * 3).clamp(-1, 1))
    assert pair.conditioning("anything") == pair.conditioning(None)
    z, t = _inputs(pair.latent_shape)
    eps_ft, eps_pre = _eps(pair, z, t)
    reference = UNet2DModel.from_pretrained(pre_dir / "unet")
    with torch.no_grad():
        torch.testing.assert_close(eps_pre, reference(z, t).sample)
    assert (eps_ft - eps_pre).abs().max() > 1e-3
    assert len(pair.modules()) == 2


def test_bfloat16_pair_returns_float32(tiny_ddpm_pair):
    pair = load_pair_from_paths(*tiny_ddpm_pair, device="cpu", dtype="bfloat16")
    assert pair.dtype == torch.bfloat16
    z, t = _inputs(pair.latent_shape)
    eps_ft, _ = _eps(pair, z, t)
    assert eps_ft.dtype == torch.float32


# -- refusals --------------------------------------------------------------------------------------


def test_missing_paths(tmp_path, sd_models):
    with pytest.raises(ModelNotFoundError):
        load_pair_from_paths(tmp_path / "nope", sd_models["dreambooth"], **CPU)
    with pytest.raises(ModelNotFoundError):
        load_pair_from_paths(sd_models["base"], tmp_path / "nope.safetensors", **CPU)
    with pytest.raises(ModelNotFoundError, match="allow_network"):
        load_pair_from_paths("nobody-here/not-a-cached-model", sd_models["dreambooth"], **CPU)


def test_pickle_weights_are_refused(tmp_path, sd_models):
    base = tmp_path / "bin_base"
    shutil.copytree(sd_models["base"], base)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    shutil.rmtree(base / "unet")
    unet.save_pretrained(base / "unet", safe_serialization=False)
    assert not list((base / "unet").glob("*.safetensors"))
    with pytest.raises(ModelFormatError, match="safetensors"):
        load_pair_from_paths(base, sd_models["dreambooth"], **CPU)
    with pytest.raises(ModelFormatError, match="safetensors"):
        load_pair_from_paths(sd_models["base"], base / "unet", finetuned_kind="dreambooth", **CPU)
    (tmp_path / "model.ckpt").write_bytes(b"not even a pickle")
    with pytest.raises(ModelFormatError, match="pickle"):
        detect_finetuned_kind(tmp_path / "model.ckpt")


def test_corrupt_files_are_refused(tmp_path, sd_models):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(ModelFormatError):
        detect_finetuned_kind(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sd_models["single_file"].read_bytes()[:5000])
    with pytest.raises(ModelFormatError):
        load_pair_from_paths(sd_models["base"], truncated, finetuned_kind="single_file", **CPU)
    broken = tmp_path / "broken_db"
    shutil.copytree(sd_models["dreambooth_unet_only"], broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    with pytest.raises(ModelFormatError):
        load_pair_from_paths(sd_models["base"], broken, **CPU)


def test_incompatible_pairs(tmp_path, sd_models, tiny_ddpm_pair):
    with pytest.raises(IncompatiblePairError):
        load_pair_from_paths(sd_models["base"], tiny_ddpm_pair[1], **CPU)
    with pytest.raises(IncompatiblePairError):
        load_pair_from_paths(tiny_ddpm_pair[0], sd_models["dreambooth"], **CPU)
    other = tinymodels.make_tiny_sd(tmp_path / "bigger", sample_size=16)
    bigger = tinymodels.make_dreambooth_folder(other, tmp_path / "bigger_db")
    with pytest.raises(IncompatiblePairError, match="latent"):
        load_pair_from_paths(sd_models["base"], bigger, **CPU)
    with pytest.raises(IncompatiblePairError, match="nothing to contrast"):
        load_pair_from_paths(sd_models["base"], sd_models["base"], **CPU)
    with pytest.raises(ConfigError):
        load_pair_from_paths(sd_models["base"], sd_models["dreambooth"], finetuned_kind="ckpt",
                             **CPU)

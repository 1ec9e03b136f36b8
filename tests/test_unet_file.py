"""Finetuned kind ``unet``: one bare UNet weights file, built with the base's UNet config.

Each family's pair from the bare file must predict exactly what the same UNet predicts when it
is loaded as a folder with its own config, so a file filled into the wrong architecture or
half-loaded fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cgidm_core.errors import IncompatiblePairError, ModelFormatError
from cgidm_core.models import (
    DDPMPair,
    StableDiffusionPair,
    detect_finetuned_kind,
    load_pair_from_paths,
)
from cgidm_core.models.sdxl import StableDiffusionXLPair
from cgidm_testkit import tinymodels

CPU = {"device": "cpu"}
PROMPT = "sks style"


def _bare(folder: Path, out: Path) -> Path:
    """The UNet weights of a folder's ``unet/`` as one file, without its config."""
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors", out)
    return out


def _eps(pair, z, t):
    cond = pair.conditioning(PROMPT)
    with torch.no_grad():
        return pair.eps_finetuned(z, t, cond), pair.eps_pretrained(z, t, cond)


def _inputs(shape):
    generator = torch.Generator().manual_seed(0)
    return torch.randn((2, *shape), generator=generator), torch.tensor([20, 700])


@pytest.fixture(scope="module")
def sd_unet(tiny_sd_pair, tmp_path_factory) -> dict[str, Path]:
    base, _ = tiny_sd_pair
    root = tmp_path_factory.mktemp("unet_file")
    folder = tinymodels.make_dreambooth_folder(base, root / "db", text_encoders=())
    return {"base": base, "folder": folder, "file": _bare(folder, root / "suspect.safetensors")}


def test_stable_diffusion_unet_file_predicts_like_its_folder(sd_unet):
    assert detect_finetuned_kind(sd_unet["file"]) == "unet"
    pair = load_pair_from_paths(sd_unet["base"], sd_unet["file"], **CPU)
    assert isinstance(pair, StableDiffusionPair) and pair.finetuned_kind == "unet"
    assert pair.text_encoder_finetuned is pair.text_encoder_pretrained  # the base's, shared
    reference = load_pair_from_paths(sd_unet["base"], sd_unet["folder"], **CPU)
    z, t = _inputs(pair.latent_shape)
    eps_ft, eps_pre = _eps(pair, z, t)
    ref_ft, ref_pre = _eps(reference, z, t)
    assert torch.equal(eps_ft, ref_ft) and torch.equal(eps_pre, ref_pre)
    assert (eps_ft - eps_pre).abs().max() > 1e-3
    assert all(not p.is_meta and p.dtype == torch.float32 for p in pair.unet_finetuned.parameters())


def test_bfloat16_unet_file(sd_unet):
    pair = load_pair_from_paths(sd_unet["base"], sd_unet["file"], device="cpu", dtype="bfloat16")
    assert {p.dtype for p in pair.unet_finetuned.parameters()} == {torch.bfloat16}


def test_sdxl_unet_file_predicts_like_its_folder(tmp_path):
    base = tinymodels.make_tiny_sdxl(tmp_path / "base")
    folder = tinymodels.make_dreambooth_folder(base, tmp_path / "db", ())
    file = _bare(folder, tmp_path / "suspect_xl.safetensors")
    pair = load_pair_from_paths(base, file, **CPU)
    assert isinstance(pair, StableDiffusionXLPair) and pair.finetuned_kind == "unet"
    z, t = _inputs(pair.latent_shape)
    eps_ft, eps_pre = _eps(pair, z, t)
    ref_ft, ref_pre = _eps(load_pair_from_paths(base, folder, **CPU), z, t)
    assert torch.equal(eps_ft, ref_ft) and torch.equal(eps_pre, ref_pre)


def test_pixel_ddpm_unet_file(tiny_ddpm_pair, tmp_path):
    pre, ft = tiny_ddpm_pair
    file = _bare(ft, tmp_path / "ddpm_unet.safetensors")
    # the service passes its kind
    pair = load_pair_from_paths(pre, file, finetuned_kind="unet", **CPU)
    assert isinstance(pair, DDPMPair)
    reference = load_pair_from_paths(pre, ft, **CPU)
    z, t = _inputs(pair.latent_shape)
    eps_ft, _ = _eps(pair, z, t)
    ref_ft, _ = _eps(reference, z, t)
    assert torch.equal(eps_ft, ref_ft)


def test_a_unet_file_of_another_base_is_refused(sd_unet, tiny_ddpm_pair, tmp_path):
    pre_ddpm, ft_ddpm = tiny_ddpm_pair
    pixel = _bare(ft_ddpm, tmp_path / "pixel.safetensors")
    with pytest.raises(IncompatiblePairError, match="do not fit the architecture"):
        load_pair_from_paths(sd_unet["base"], pixel, finetuned_kind="unet", **CPU)
    with pytest.raises(IncompatiblePairError, match="fine-tuned from this base"):
        load_pair_from_paths(pre_ddpm, sd_unet["file"], finetuned_kind="unet", **CPU)
    # one tensor missing: refused, never loaded with a random layer
    state = load_file(str(sd_unet["file"]))
    state.pop(sorted(state)[0])
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(IncompatiblePairError, match="1 missing tensors"):
        load_pair_from_paths(sd_unet["base"], tmp_path / "partial.safetensors", **CPU)


def test_a_corrupt_unet_file_is_refused(sd_unet, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(sd_unet["file"].read_bytes()[:1000])
    with pytest.raises(ModelFormatError):
        load_pair_from_paths(sd_unet["base"], broken, finetuned_kind="unet", **CPU)

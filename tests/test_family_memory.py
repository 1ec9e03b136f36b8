"""Memory planning for the big families: activation estimates, gradient checkpointing, configs.

The estimates are re-counted here on the meta device (full-size SDXL UNet and Flux transformer,
no storage, seconds), so a diffusers change that moves them fails; checkpointing must be really
switched on in the denoiser (its blocks run again in the backward pass) and change no score.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from benchmarks import activations
from cgidm_core import InversionConfig, authenticate
from cgidm_core.errors import ConfigError
from cgidm_core.families import FAMILIES
from cgidm_core.models import load_pair_from_paths
from cgidm_core.models.devices import (
    ACTIVATION_COUNTS,
    GPU_MEMORY_SHARE,
    MAX_GPU_BATCH,
    SD_BYTES_PER_IMAGE,
    checkpointing_needed,
    family_batch_size,
    image_activation_bytes,
)
from cgidm_testkit import tinymodels
from cgidm_testkit.full_size import flux, sd15, sdxl
from tests.paths import SHARED_DATA

GIB = 2**30
PROMPT = "sks style"


# -- the estimates -----------------------------------------------------------------------------


#: Families whose recount is done at the half side only (the full-size transformers: a pass at
#: 1024 px costs seconds each on a busy CPU; the half side runs every block all the same).
_HALF_SIDE_ONLY = {"sd3", "chroma", "z-image", "qwen-image", "flux2", "flux2-dev"}


@pytest.mark.slow  # GPU scripts/accounting run on the CPU: seconds to a minute
@pytest.mark.parametrize("family", sorted(f.name for f in FAMILIES if f.memory is not None
                                           and not f.memory.borrowed_from))
def test_activation_counts_are_what_the_meta_device_counts(family):
    dtype = torch.bfloat16 if family in activations.BF16_FAMILIES else torch.float16
    model = activations.denoiser(family, dtype)
    memory = next(f.memory for f in FAMILIES if f.name == family)
    assert sum(p.numel() for p in model.parameters()) == memory.denoiser_parameters
    smallest = min(side for side, _ in ACTIVATION_COUNTS[family])
    for (side, checkpointing), recorded in ACTIVATION_COUNTS[family].items():
        if family in _HALF_SIDE_ONLY and side != smallest:
            continue
        counted = activations.count(family, side, dtype, checkpointing, model)
        assert counted == pytest.approx(recorded, rel=0.02), (family, side, checkpointing)


def test_every_family_has_its_own_counts_and_the_docs_show_them():
    """No family borrows another's figures any more, Qwen-Image (20 B, 60 blocks) needs more
    per image than Flux.1 whose counts it used to borrow, and docs/FAMILIES.md holds the table
    ``benchmarks/family_memory.py`` prints from the registry."""
    from benchmarks import family_memory
    from tests.paths import REPO_ROOT

    latent = [f for f in FAMILIES if f.space == "latent"]
    assert all(f.memory is not None and not f.memory.borrowed_from for f in latent)
    assert all(f.memory.denoiser_parameters > 0 for f in latent)
    qwen = image_activation_bytes("qwen-image", 128 * 128, torch.bfloat16)
    assert qwen > image_activation_bytes("flux", 128 * 128, torch.bfloat16) * 1.2
    table = family_memory.markdown(family_memory.rows())
    assert table in (REPO_ROOT / "docs" / "FAMILIES.md").read_text()


def test_sd_estimate_matches_the_gpu_measurement_and_scales():
    sd = image_activation_bytes("stable-diffusion", 64 * 64, torch.float16)
    # benchmarks/gpu.py on an H200: 1.47-1.54 GiB per image; the old constant was 1.6 GiB
    assert 1.47 * GIB < sd <= SD_BYTES_PER_IMAGE * 1.01
    assert image_activation_bytes("stable-diffusion", 64 * 64, torch.float32) == pytest.approx(
        2 * sd, rel=1e-6)
    xl = image_activation_bytes("stable-diffusion-xl", 128 * 128, torch.float16)
    assert 9 * GIB < xl < 12 * GIB  # not SD scaled by area (6.4 GiB): SDXL keeps more per pixel
    xl_ckpt = image_activation_bytes("stable-diffusion-xl", 128 * 128, torch.float16, True)
    assert xl_ckpt < xl / 8
    flux_bytes = image_activation_bytes("flux", 128 * 128, torch.bfloat16)
    flux_half = image_activation_bytes("flux", 64 * 64, torch.bfloat16)
    assert flux_bytes > 40 * GIB and flux_half > flux_bytes / 4  # the 512 T5 tokens do not shrink
    # an unknown family falls back on SD's count scaled by area
    assert image_activation_bytes("other", 64 * 64, torch.float16) == sd


def test_batch_size_and_the_checkpointing_decision_on_a_24gb_card():
    free_full_xl = 12 * GIB  # 24 GB card with an SDXL full pair in float16 loaded
    assert checkpointing_needed(free_full_xl, "stable-diffusion-xl", 128 * 128, torch.float16)
    assert family_batch_size(free_full_xl, "stable-diffusion-xl", 128 * 128, torch.float16) == 1
    with_ckpt = family_batch_size(free_full_xl, "stable-diffusion-xl", 128 * 128, torch.float16,
                                  checkpointing=True)
    assert with_ckpt == int(GPU_MEMORY_SHARE * free_full_xl // image_activation_bytes(
        "stable-diffusion-xl", 128 * 128, torch.float16, True)) and with_ckpt >= 8
    assert not checkpointing_needed(17 * GIB, "stable-diffusion-xl", 128 * 128, torch.float16)
    assert not checkpointing_needed(12 * GIB, "stable-diffusion-xl", 64 * 64, torch.float16)
    assert checkpointing_needed(80 * GIB - 47 * GIB, "flux", 128 * 128, torch.bfloat16)
    assert family_batch_size(130 * GIB, "stable-diffusion", 64 * 64, torch.float16) == \
        MAX_GPU_BATCH
    rows = {(r["family"], r["layout"]): r for r in activations.fits_24gb()}
    assert rows[("stable-diffusion-xl", "full")]["fits"] is False
    assert rows[("stable-diffusion-xl", "full")]["fits_checkpointed"] is True
    assert rows[("stable-diffusion-xl", "lora")]["fits"] is True
    assert rows[("flux", "lora")]["fits_checkpointed"] is False  # 23.8 GB of weights alone


def test_architecture_configs_have_the_released_sizes():
    def params(module):
        return sum(p.numel() for p in module.parameters())

    tokenizer = sd15.build_tokenizer()
    te1, te2 = sdxl.build_text_encoders(tokenizer, device="meta")
    assert {"unet": params(sdxl.build_unet(device="meta")),
            "vae": params(sdxl.build_vae(device="meta")),
            "text_encoder": params(te1), "text_encoder_2": params(te2)} == \
        sdxl.EXPECTED_PARAMETERS
    assert {"transformer": params(flux.build_transformer()),
            "text_encoder_2": params(flux.build_t5()),
            "text_encoder": params(flux.build_clip()),
            "vae": params(flux.build_vae())} == flux.EXPECTED_PARAMETERS
    schnell = flux.build_transformer("schnell")
    assert params(schnell) == 11_891_178_560 and not schnell.config.guidance_embeds


# -- gradient checkpointing on a tiny SDXL pair --------------------------------------------------


@pytest.fixture(scope="module")
def xl_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("xl_ckpt")
    base = tinymodels.make_tiny_sdxl(root / "base")
    return base, tinymodels.make_dreambooth_folder(base, root / "db", ())


def _pictures(n: int) -> list[Path]:
    return sorted((SHARED_DATA / "wikiart-vangogh" / "membership").glob("*.jpg"))[:n]


def _block_calls(unet: torch.nn.Module, run) -> int:
    """How often the UNet's first resnet runs while ``run()`` does a forward and backward."""
    calls = [0]
    resnet = unet.down_blocks[0].resnets[0]
    # a pre-hook: torch stops a recomputation as soon as it has what backward needs, before
    # the module returns, so a forward hook would not see it
    handle = resnet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        run()
    finally:
        handle.remove()
    return calls[0]


def test_gradient_checkpointing_is_enabled_and_changes_no_score(xl_pair):
    base, finetuned = xl_pair
    pair = load_pair_from_paths(base, finetuned, device="cpu")
    config = InversionConfig(steps=3, seed=4)
    pictures = _pictures(2)

    off = authenticate(pair, pictures, prompt=PROMPT, batch_size=2,
                       config=dataclasses.replace(config, gradient_checkpointing="off"))
    assert not pair.gradient_checkpointing
    assert not any(u.is_gradient_checkpointing for u in pair.denoisers())
    on = authenticate(pair, pictures, prompt=PROMPT, batch_size=2,
                      config=dataclasses.replace(config, gradient_checkpointing="on"))
    assert pair.gradient_checkpointing and len(pair.denoisers()) == 2
    assert all(u.is_gradient_checkpointing for u in pair.denoisers())
    assert on.provenance["method"]["inversion"]["gradient_checkpointing"] == "on"
    for a, b in zip(off, on, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-6)
        assert a.metrics == pytest.approx(b.metrics, abs=1e-6)

    # really in effect: with it on, the blocks run again during the backward pass
    cond = pair.conditioning(PROMPT)
    z = torch.randn(1, *pair.latent_shape, generator=torch.Generator().manual_seed(0))

    def step() -> None:
        x = z.clone().requires_grad_(True)
        pair.eps_finetuned(x, torch.tensor([300]), cond).square().sum().backward()

    assert _block_calls(pair.unet_finetuned, step) == 2
    pair.set_gradient_checkpointing("off")
    assert _block_calls(pair.unet_finetuned, step) == 1


def test_checkpointing_a_lora_pair_recomputes_each_pass_with_its_adapter_state(tmp_path):
    """One UNet serves both models: a block recomputed in the backward pass must see the
    adapter state it ran in, not the one the pair switched to afterwards."""
    base = tinymodels.make_tiny_sdxl(tmp_path / "base")
    pair = load_pair_from_paths(base, tinymodels.make_sdxl_lora(base, tmp_path / "lora", seed=5),
                     device="cpu")
    assert len(pair.denoisers()) == 1
    config = InversionConfig(steps=3, seed=1)
    pictures = _pictures(2)
    off = authenticate(pair, pictures, prompt=PROMPT, batch_size=2,
                       config=dataclasses.replace(config, gradient_checkpointing="off"))
    on = authenticate(pair, pictures, prompt=PROMPT, batch_size=2,
                      config=dataclasses.replace(config, gradient_checkpointing="on"))
    assert pair.unet_finetuned.is_gradient_checkpointing
    for a, b in zip(off, on, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-6)


def test_auto_stays_off_on_a_cpu_and_bad_modes_are_refused(xl_pair):
    pair = load_pair_from_paths(*xl_pair, device="cpu")
    assert pair.set_gradient_checkpointing("auto") is False
    with pytest.raises(ConfigError, match="auto, on or off"):
        pair.set_gradient_checkpointing("yes")
    with pytest.raises(ConfigError, match="gradient_checkpointing must be one of"):
        InversionConfig(gradient_checkpointing="always").validate()
    assert pair.describe()["gradient_checkpointing"] is False


def test_the_api_and_the_cli_take_the_option():
    from cgidm.jobs import JobSettings

    settings = JobSettings.model_validate({"pretrained": "a", "finetuned": "b",
                                           "gradient_checkpointing": "on"})
    assert settings.inversion_overrides()["gradient_checkpointing"] == "on"
    with pytest.raises(ValueError):
        JobSettings.model_validate({"pretrained": "a", "finetuned": "b",
                                    "gradient_checkpointing": "sometimes"})
    import argparse

    from cgidm.commands.common import add_method_arguments, inversion_config

    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    args = parser.parse_args(["--gradient-checkpointing", "on"])
    assert inversion_config(args).gradient_checkpointing == "on"
    assert inversion_config(parser.parse_args([])).gradient_checkpointing == "auto"


# -- benchmarks/memory.py for SDXL and Flux (weights counted on the meta device) ---------------


@pytest.mark.slow  # GPU scripts/accounting run on the CPU: seconds to a minute
def test_memory_benchmark_counts_sdxl_and_flux_layouts():
    from benchmarks import memory

    sdxl_rows = {r["layout"]: r for r in memory.run_accounting("sdxl", "bfloat16", [4])["rows"]}
    reference = sdxl_rows["reference-sdxl"]["weight_bytes"]
    assert sdxl_rows["reference-sdxl"]["parameters"] == 2 * sum(sdxl.EXPECTED_PARAMETERS.values())
    # the real pair classes: two UNets + a float32 VAE; one UNet with its adapter + the VAE
    unet, vae = sdxl.EXPECTED_PARAMETERS["unet"], sdxl.EXPECTED_PARAMETERS["vae"]
    assert sdxl_rows["cgidm-sdxl-dreambooth"]["weight_bytes"] == 2 * unet * 2 + vae * 4
    assert sdxl_rows["cgidm-sdxl-dreambooth"]["weight_bytes"] / reference <= 0.85
    assert sdxl_rows["cgidm-sdxl-lora-r4"]["weight_bytes"] / reference <= 0.5
    flux_run = memory.run_accounting("flux", "bfloat16", [4])
    assert len(flux_run["verdicts"]) == 2 and all(v.endswith(": met") for v in flux_run["verdicts"])
    rows = {r["layout"]: r for r in flux_run["rows"]}
    assert rows["reference-flux-dev"]["parameters"] == 2 * sum(
        flux.EXPECTED_PARAMETERS.values())


# -- the GPU scripts' SDXL and Flux paths, run on the CPU so they do not rot -----------------------


@pytest.mark.slow  # GPU scripts/accounting run on the CPU: seconds to a minute
def test_cuda_check_sdxl_layouts_on_the_cpu():
    from benchmarks import cuda_check

    rows = cuda_check.check_layouts("cpu", steps=2, families=("sdxl",))
    assert {r["layout"] for r in rows} == {"sdxl-pipeline", "sdxl-kohya-lora",
                                           "sdxl-single-file", "sdxl-unet-file"}
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    for row in rows:
        if row["dtype"] == "float32":
            assert row["checkpointed_max_diff"] <= cuda_check.CHECKPOINTING_TOLERANCE


@pytest.mark.slow  # GPU scripts/accounting run on the CPU: seconds to a minute
def test_cuda_check_flux_layouts_run_authenticate_in_every_dtype_on_the_cpu(tmp_path):
    """The Flux part of the GPU check: tiny Flux pairs in each layout through load_pair and
    authenticate (not a bare transformer step), every dtype, checkpointing compared. Three of
    its five layouts here, to keep CI short (tests/test_flux.py covers every layout's loading)."""
    from benchmarks import cuda_check

    assert set(cuda_check.build_layouts(tmp_path, ("flux",))) == {
        "flux-pipeline-own-t5", "flux-transformer", "flux-kohya-lora", "flux-single-file",
        "flux-schnell-transformer"}
    layouts = {"flux-pipeline-own-t5", "flux-kohya-lora", "flux-schnell-transformer"}
    rows = cuda_check.check_layouts("cpu", steps=2, families=("flux",), only=tuple(layouts))
    assert {r["layout"] for r in rows} == layouts
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert sorted((r["layout"], r["dtype"]) for r in rows if r["device"] == "cpu") == sorted(
        (layout, dtype) for layout in layouts for dtype in cuda_check.DTYPES)
    for row in rows:
        assert len(row["scores"]) == 2 and row["describe"]["family"] == "flux"
        assert row["text_encoders_loaded_after"] is False
        if row["dtype"] == "float32":
            assert row["checkpointed_max_diff"] <= cuda_check.CHECKPOINTING_TOLERANCE
            assert row["rerun_max_diff"] == 0.0


@pytest.mark.slow  # GPU scripts/accounting run on the CPU: seconds to a minute
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_gpu_benchmark_dry_run_for_sdxl_and_flux(family, tmp_path):
    """benchmarks/gpu.py --family sdxl|flux, at a tiny scale on the CPU: every configuration
    (dtype x checkpointing x batch) runs and gets a step time; no GPU was lent to measure it."""
    import json

    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    assert gpu.main(["--family", family, "--dry-run", "--batches", "1", "2", "--steps", "4",
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    configs = [(r["config"]["dtype"], r["config"]["checkpointing"], r["config"]["batch"])
               for r in report["results"]]
    assert configs == [(d, c, b) for d in ("float32", "bfloat16") for c in (False, True)
                       for b in (1, 2)]
    for row in report["results"]:
        assert row["status"] == "ok", row
        assert row["seconds_per_step"] > 0 and row["images_per_hour"] > 0
        assert row["overhead_seconds"] is not None  # VAE encode/decodes, as invert runs them
    facts = report["machine"]
    assert facts["family"] == family
    if family == "flux":  # the whole FluxPair: T5 + CLIP encoded once, then released
        assert set(facts["encode_seconds"]) == {"float32", "bfloat16"}
        assert all(v > 0 for v in facts["text_encoder_bytes"].values())
        assert facts["image_size"] == 32
        assert "FluxPair" in facts["model"]


def test_the_full_size_flux_benchmark_pair_is_consistent_on_the_meta_device():
    """What ``gpu.py --family flux`` builds on a GPU, built on the meta device (no memory): the
    released FLUX.1-dev parameter counts, T5's 512 x 4096 and CLIP's 768 features reaching a
    full-size transformer, and a velocity of the 16x128x128 latent at 1024 px (shapes only:
    no GPU was lent to run it for real)."""
    from benchmarks import gpu_families

    pair, encoding = gpu_families.build_flux_pair("bfloat16", "meta", tiny=False)

    def params(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert params(pair.unet_pretrained) == params(pair.unet_finetuned) == \
        flux.EXPECTED_PARAMETERS["transformer"]
    assert pair.unet_pretrained is not pair.unet_finetuned
    encoders = pair.text_encoder_pretrained
    assert params(encoders.text_encoder_2) == flux.EXPECTED_PARAMETERS["text_encoder_2"]
    assert params(encoders.text_encoder) == flux.EXPECTED_PARAMETERS["text_encoder"]
    assert params(pair.vae) == flux.EXPECTED_PARAMETERS["vae"]
    assert pair.vae.dtype == torch.float32 and pair.unet_finetuned.dtype == torch.bfloat16
    assert (pair.image_size, pair.latent_shape, pair.guidance) == (1024, (16, 128, 128), 3.5)
    assert pair.shift_for(torch.empty(1, *pair.latent_shape)) == pytest.approx(3.158, abs=1e-3)
    assert encoding["encode_seconds"] >= 0 and not pair.text_encoders_loaded
    cond = pair.conditioning(gpu_families.gpu_measure.PROMPT)  # cached before the release
    assert [c.shape for c in cond.finetuned] == [(1, 512, 4096), (1, 768)]
    z = torch.zeros(2, *pair.latent_shape, device="meta")
    velocity = pair.eps_finetuned(z, torch.tensor([500, 900]), cond)
    assert velocity.shape == (2, 16, 128, 128) and velocity.dtype == torch.float32

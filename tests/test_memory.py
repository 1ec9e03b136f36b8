"""What a loaded Stable Diffusion pair holds in memory, and the text-encoder release.

The issue's memory targets rest on two facts checked here on tiny models: a LoRA pair holds ONE
UNet, and a pair can drop its text encoders once a prompt is encoded and still answer any prompt
(cached ones from memory, new ones by reading the encoders back from disk) with exactly the
embeddings it would have given without the release.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from cgidm_core.errors import ConfigError
from cgidm_core.models import StableDiffusionLoraPair, StableDiffusionPair, load_pair_from_paths
from cgidm_testkit import tinymodels

PROMPT = "sks style"
OTHER_PROMPT = "a photo of a dog"
CPU = {"device": "cpu"}


def _param_bytes(module: torch.nn.Module, skip_lora: bool = False) -> int:
    return sum(
        p.numel() * p.element_size()
        for name, p in module.named_parameters()
        if not (skip_lora and "lora_" in name)
    )


@pytest.fixture(scope="module")
def finetunes(tiny_sd_pair, tmp_path_factory) -> dict[str, Path]:
    base, full = tiny_sd_pair
    root = tmp_path_factory.mktemp("memory")
    # A full pipeline whose text encoder was fine-tuned too, and its single-file checkpoint.
    with_text_encoder = root / "pipeline_te"
    shutil.copytree(base, with_text_encoder)
    tinymodels.make_dreambooth_folder(base, root / "db_parts", seed=7)
    shutil.rmtree(with_text_encoder / "unet")
    shutil.rmtree(with_text_encoder / "text_encoder")
    shutil.copytree(root / "db_parts" / "unet", with_text_encoder / "unet")
    shutil.copytree(root / "db_parts" / "text_encoder", with_text_encoder / "text_encoder")
    return {
        "base": base,
        "pipeline": full,
        "dreambooth": tinymodels.make_dreambooth_folder(base, root / "db"),
        "lora": tinymodels.make_lora(base, root / "lora", rank=4),
        "lora_te": tinymodels.make_lora(
            base, root / "lora_te", as_file=True, with_text_encoder=True
        ),
        "single_file_te": tinymodels.make_single_file(
            base, root / "single_te.safetensors", source=with_text_encoder
        ),
    }


def test_lora_pair_holds_one_unet(finetunes):
    lora = load_pair_from_paths(finetunes["base"], finetunes["lora"], keep_text_encoders=True,
                                **CPU)
    full = load_pair_from_paths(finetunes["base"], finetunes["pipeline"],
                                keep_text_encoders=True, **CPU)
    assert isinstance(lora, StableDiffusionLoraPair)
    unets = [m for m in lora.modules() if isinstance(m, UNet2DConditionModel)]
    assert len(unets) == 1
    unet_bytes = _param_bytes(unets[0], skip_lora=True)
    adapter_bytes = _param_bytes(unets[0]) - unet_bytes
    assert 0 < adapter_bytes < 0.2 * unet_bytes
    # The full pair pays a second UNet; the LoRA pair only its adapter.
    two_unets = full.memory_bytes()
    assert lora.memory_bytes() == pytest.approx(two_unets - unet_bytes + adapter_bytes, rel=0.01)
    assert lora.memory_bytes() < two_unets - 0.8 * unet_bytes


@pytest.mark.parametrize("kind", ["dreambooth", "lora_te", "single_file_te", "pipeline"])
def test_released_text_encoders_give_the_same_embeddings(finetunes, kind):
    kept = load_pair_from_paths(finetunes["base"], finetunes[kind], keep_text_encoders=True, **CPU)
    expected = {p: kept.conditioning(p) for p in (PROMPT, OTHER_PROMPT)}
    encoders = kept._text_encoder_modules()
    text_encoder_bytes = sum(_param_bytes(m) for m in encoders)
    if kind != "pipeline":  # these fine-tunes changed the text encoder: two different embeddings
        assert not torch.equal(expected[PROMPT].finetuned, expected[PROMPT].pretrained)

    pair = load_pair_from_paths(finetunes["base"], finetunes[kind], **CPU)  # the default: release
    assert pair.text_encoders_loaded and pair.memory_bytes() == kept.memory_bytes()
    first = pair.conditioning(PROMPT)
    assert not pair.text_encoders_loaded
    assert pair.memory_bytes() <= kept.memory_bytes() - text_encoder_bytes
    assert all(not isinstance(m, CLIPTextModel) for m in pair.modules())

    # The cached prompt needs no encoder: same object, nothing reloaded.
    assert pair.conditioning(PROMPT) is first
    assert not pair.text_encoders_loaded
    # A new prompt reads the encoders back, encodes, and releases them again.
    other = pair.conditioning(OTHER_PROMPT)
    assert not pair.text_encoders_loaded
    for prompt, cond in ((PROMPT, first), (OTHER_PROMPT, other)):
        torch.testing.assert_close(cond.pretrained, expected[prompt].pretrained, rtol=0, atol=0)
        torch.testing.assert_close(cond.finetuned, expected[prompt].finetuned, rtol=0, atol=0)

    # The noise predictions use the cached embeddings exactly as before.
    z = torch.randn((2, *pair.latent_shape), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 600])
    with torch.no_grad():
        torch.testing.assert_close(
            pair.eps_finetuned(z, t, first), kept.eps_finetuned(z, t, expected[PROMPT])
        )
        torch.testing.assert_close(
            pair.eps_pretrained(z, t, first), kept.eps_pretrained(z, t, expected[PROMPT])
        )


def test_lora_text_encoder_adapter_still_switches_after_reload(finetunes):
    pair = load_pair_from_paths(finetunes["base"], finetunes["lora_te"], **CPU)
    pair.conditioning(PROMPT)
    pair.load_text_encoders()
    assert pair.text_encoders_loaded and len(pair.text_encoder_adapter) > 0
    encoder = pair.text_encoder_pretrained
    assert all(p.device.type == "cpu" and not p.requires_grad for p in encoder.parameters())
    # Embedding directly with the reloaded weights: adapter on and off still differ.
    on = pair._embed_finetuned("x")
    off = pair._embed_pretrained("x")
    assert not torch.equal(on, off)


def test_keep_text_encoders_keeps_them(finetunes):
    pair = load_pair_from_paths(finetunes["base"], finetunes["dreambooth"],
                                keep_text_encoders=True, **CPU)
    before = pair.memory_bytes()
    pair.conditioning(PROMPT)
    assert pair.text_encoders_loaded and pair.memory_bytes() == before
    freed = pair.release_text_encoders()
    assert freed > 0 and pair.memory_bytes() == before - freed
    assert pair.release_text_encoders() == 0  # releasing twice frees nothing more
    pair.conditioning(OTHER_PROMPT)  # reloads, and keeps them, as asked
    assert pair.text_encoders_loaded and pair.memory_bytes() == before


def _in_memory_pair(keep_text_encoders: bool = True) -> StableDiffusionPair:
    parts = tinymodels.tiny_sd_components()
    finetuned_unet = tinymodels.perturb_(tinymodels.tiny_sd_components()["unet"], seed=3)
    return StableDiffusionPair(
        vae=parts["vae"].eval(),
        tokenizer=parts["tokenizer"],
        alphas_cumprod=parts["scheduler"].alphas_cumprod,
        unet_pretrained=parts["unet"].eval().requires_grad_(False),
        unet_finetuned=finetuned_unet.eval().requires_grad_(False),
        text_encoder_pretrained=parts["text_encoder"],
        text_encoder_finetuned=parts["text_encoder"],
        device=torch.device("cpu"),
        dtype=torch.float32,
        keep_text_encoders=keep_text_encoders,
    )


def test_in_memory_pair_without_reloader_explains_itself():
    with pytest.raises(ConfigError, match="text_encoder_reloader"):
        _in_memory_pair(keep_text_encoders=False)
    pair = _in_memory_pair()
    cond = pair.conditioning(PROMPT)
    assert pair.release_text_encoders() > 0
    assert pair.conditioning(PROMPT) is cond  # cached prompts keep working
    with pytest.raises(ConfigError, match="encode every prompt before"):
        pair.conditioning(OTHER_PROMPT)


# -- batch size on a GPU: sized from free memory --------------------------------------------------


def test_gpu_batch_size_follows_free_memory_dtype_and_latent_area():
    from cgidm_core.models.devices import MAX_GPU_BATCH, SD_BYTES_PER_IMAGE, gpu_batch_size

    gib = 2**30
    sd15 = 64 * 64
    # An H200 with a float16 pair loaded (~135 GiB free): the cap, not the memory, decides.
    assert gpu_batch_size(135 * gib, sd15, torch.float16) == MAX_GPU_BATCH
    # A 24 GiB card with a float16 pair (3.6 GiB) loaded: ~20 GiB free -> 10 images of 1.6 GiB.
    assert gpu_batch_size(20 * gib, sd15, torch.float16) == int(0.85 * 20 * gib
                                                                 // SD_BYTES_PER_IMAGE)
    # float32 activations are twice as wide; bfloat16 the same as float16
    assert gpu_batch_size(20 * gib, sd15, torch.float32) == gpu_batch_size(
        10 * gib, sd15, torch.float16)
    assert gpu_batch_size(20 * gib, sd15, torch.bfloat16) == gpu_batch_size(
        20 * gib, sd15, torch.float16)
    # SD 2.x at 768 px has 96x96 latents: 2.25x the activations of 512 px
    assert gpu_batch_size(20 * gib, 96 * 96, torch.float16) < gpu_batch_size(
        20 * gib, sd15, torch.float16)
    # never zero: a nearly full card still runs one image at a time
    assert gpu_batch_size(0, sd15, torch.float16) == 1


def test_sd_pair_keeps_batch_8_on_the_cpu(finetunes):
    pair = load_pair_from_paths(finetunes["base"], finetunes["dreambooth"], device="cpu")
    assert pair.preferred_batch_size == 8


# -- the GPU benchmark's CPU-side logic (benchmarks/gpu.py --dry-run) ------------------------------


def test_gpu_benchmark_dry_run_measures_every_configuration(tmp_path):
    import json

    from benchmarks import gpu

    docs = tmp_path / "PERFORMANCE.md"
    docs.write_text("# Performance\n")
    out = tmp_path / "gpu.json"
    args = ["--dry-run", "--dtypes", "float32", "--batches", "1", "2", "--steps", "4",
            "--budget", "120", "--config-seconds", "60", "--json", str(out), "--docs", str(docs)]
    assert gpu.main(args) == 0
    report = json.loads(out.read_text())
    configs = [(r["config"]["batch"], r["config"]["channels_last"], r["config"]["layout"])
               for r in report["results"]]
    # + the contiguous comparison point, then the reference layout (one image at a time)
    assert configs == [(1, True, "cgidm"), (2, True, "cgidm"), (2, False, "cgidm"),
                       (1, False, "reference")]
    for r in report["results"]:
        assert r["status"] == "ok", r
        assert r["seconds_per_step"] > 0
        assert r["steps_timed"] == (2 if r["config"]["layout"] == "cgidm" else 4)
        # images/hour at the default steps follows from the step time and the overhead
        per_batch = report["machine"]["default_steps"] * r["seconds_per_step"]
        expected = 3600 * r["config"]["batch"] / (per_batch + r["overhead_seconds"])
        assert r["images_per_hour"] == pytest.approx(expected)
    # the ratios against the reference come from the same rows
    summary = report["summary"]
    ref = report["results"][-1]
    best = max(report["results"][:3], key=lambda r: r["images_per_hour"])
    assert summary["best"]["images_per_hour"] == pytest.approx(best["images_per_hour"])
    steps = report["machine"]["default_steps"]
    assert summary["best"][f"vs_reference_at_{steps}_steps"] == pytest.approx(
        best["images_per_hour"] / ref["images_per_hour"])
    assert "Against the reference layout" in docs.read_text()
    # a report saved by an earlier (perhaps interrupted) run renders the same table again
    again = tmp_path / "again.md"
    assert gpu.main(["--from-json", str(out), "--docs", str(again)]) == 0
    assert gpu.render(report) in again.read_text()
    assert report["machine"]["attention_processors"] == ["AttnProcessor2_0"]
    text = docs.read_text()
    assert text.startswith("# Performance\n") and "### CPU (dry run, tiny models)" in text
    assert "| float32 | 2 | contiguous |" in text


def test_gpu_benchmark_respects_its_time_budget(tmp_path):
    import json

    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    # A per-configuration budget far below one step: invert is cancelled, nothing hangs.
    started = __import__("time").perf_counter()
    gpu.main(["--dry-run", "--dtypes", "float32", "--batches", "1", "--steps", "50",
              "--no-reference", "--config-seconds", "0.05", "--min-config-seconds", "0.05",
              "--json", str(out)])
    assert __import__("time").perf_counter() - started < 60
    statuses = [r["status"] for r in json.loads(out.read_text())["results"]]
    assert statuses and all(s == "budget" for s in statuses)
    # No whole-run budget left: every configuration is skipped, none is started.
    gpu.main(["--dry-run", "--dtypes", "float32", "--batches", "1", "--budget", "0",
              "--json", str(out)])
    assert {r["status"] for r in json.loads(out.read_text())["results"]} == {"skipped"}


@pytest.mark.slow  # every loader layout x dtype: ~45 s on 2 cores
def test_cuda_check_runs_every_layout_and_dtype_on_the_cpu(tmp_path):
    """benchmarks/cuda_check.py is run by hand on a GPU machine; here its logic runs on the CPU
    (device "cpu"), so a GPU session does not discover a broken script."""
    from benchmarks import cuda_check

    rows = cuda_check.check_layouts("cpu", steps=2, families=("sd",))
    assert {(r["layout"], r["dtype"]) for r in rows} == {
        (layout, dtype) for layout in ("pipeline", "dreambooth", "lora", "single_file", "ddpm")
        for dtype in cuda_check.DTYPES}
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    for row in rows:
        if row["dtype"] == "float32":
            # the same device twice: CPU kernels are deterministic
            assert row["cpu_max_diff"] == 0 and row["rerun_max_diff"] == 0
        if row["layout"] != "ddpm":
            assert row["text_encoders_loaded_after"] is False
            assert len(row["new_prompt_scores"]) == 2  # the released encoders were read back

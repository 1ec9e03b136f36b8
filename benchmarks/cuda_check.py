#!/usr/bin/env python
"""Runs cgidm's own loading and inversion paths on a CUDA device: the checks CI cannot make.

CI has no GPU, so the code that only runs there (casting the UNets to float16/bfloat16 while the
VAE stays float32, the text-encoder release and lazy reload on the device, LoRA adapters on the
device) is exercised here, on a machine with one, in about a minute:

1. every model layout the loader accepts, as tiny random models written to a temporary folder
   (``cgidm_testkit/tinymodels.py``): a complete pipeline fine-tune, a DreamBooth folder with its
   text encoder, a LoRA file with text-encoder layers, a single-file checkpoint, a pixel DDPM pair;
   each loaded on the GPU in float32, float16 and bfloat16 and run through ``authenticate`` on
   two images. Scores must be finite and in range; the float32 scores are compared with the same
   run on the CPU and with a second GPU run (reproducibility). A new prompt after the release
   checks the lazy reload of the text encoders on the device.
   SDXL layouts too (pipeline, kohya LoRA with ``ss_*`` metadata, single file, bare UNet
   weights file), each also with gradient checkpointing forced on: the float32 scores must
   equal those without it (``CHECKPOINTING_TOLERANCE``) and the UNets must report it enabled.
2. Flux.1 layouts the same way, through ``load_pair`` and ``authenticate`` (the FluxPair: packed
   latents, CLIP + T5 conditioning released after encoding, the float32 VAE, guidance and time
   shift): a dev pipeline fine-tune carrying its own T5, a ``transformer/`` folder, a kohya LoRA
   with ``ss_*`` metadata (CLIP layers too), a single-file transformer and a schnell
   ``transformer/`` folder, in every dtype, the float32 ones also against the CPU, rerun, and
   with gradient checkpointing forced on.
3. the bundled demo pairs scored on the real Van Gogh members and hold-out images with the
   default settings (``--data``: the folder holding ``wikiart-vangogh/``), giving the AUC on the
   GPU next to the time it took.

    python -m benchmarks.cuda_check --data ../shared/data --json cuda-check.json

Exit status 1 if any check failed; the JSON holds every figure either way.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

DTYPES = ("float32", "float16", "bfloat16")
#: How far a float32 score on the GPU may sit from the CPU's: PGD follows normalised gradients,
#: so kernel-level rounding differences grow a little over the steps, but stay far below the
#: spread between members and non-members.
CPU_GPU_TOLERANCE = 0.02
#: Recomputing activations runs the same kernels on the same inputs; on a GPU the backward
#: kernels may still pick another (non-deterministic) algorithm, hence not exactly 0.
CHECKPOINTING_TOLERANCE = 1e-4
FAMILIES = ("sd", "sdxl", "flux")


def synthetic_images(count: int, side: int, seed: int = 0) -> list[Any]:
    """Smooth random pictures (upsampled noise), so SSIM on the recovered half is meaningful."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(count):
        coarse = (rng.random((max(2, side // 4), max(2, side // 4), 3)) * 255).astype(np.uint8)
        pictures.append(Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC))
    return pictures


def build_layouts(root: Path, families: tuple[str, ...] = FAMILIES
                  ) -> dict[str, tuple[Path, Path]]:
    """(pretrained, fine-tuned) paths for every layout the loader accepts, tiny and random."""
    import shutil

    from cgidm_testkit import tinymodels

    layouts: dict[str, tuple[Path, Path]] = {}
    if "sd" in families:
        base = tinymodels.make_tiny_sd(root / "sd_base", sample_size=8)
        layouts.update({
            "pipeline": (base, tinymodels.make_full_finetune(base, root / "sd_full", seed=1)),
            "dreambooth": (base, tinymodels.make_dreambooth_folder(base, root / "sd_db",
                                                                   seed=2)),
            "lora": (base, tinymodels.make_lora(base, root / "sd_lora", as_file=True, seed=3,
                                                with_text_encoder=True)),
            "single_file": (base, tinymodels.make_single_file(
                base, root / "sd_single.safetensors", seed=4)),
        })
        layouts["ddpm"] = tinymodels.make_tiny_ddpm_pair(root / "ddpm", sample_size=16)
    if "sdxl" in families:
        xl = tinymodels.make_tiny_sdxl(root / "xl_base")
        unet_only = tinymodels.make_dreambooth_folder(xl, root / "xl_db", (), seed=6)
        bare = root / "xl_unet.safetensors"
        shutil.copy(unet_only / "unet" / "diffusion_pytorch_model.safetensors", bare)
        layouts.update({
            "sdxl-pipeline": (xl, tinymodels.make_full_finetune(xl, root / "xl_full")),
            "sdxl-kohya-lora": (xl, tinymodels.make_sdxl_kohya_lora(
                xl, root / "xl_kohya.safetensors", seed=5,
                metadata={"ss_output_name": "check", "ss_tag_frequency":
                          json.dumps({"10_sks style": {"sks style": 10}})})),
            "sdxl-single-file": (xl, tinymodels.make_sdxl_single_file(
                xl, root / "xl_single.safetensors", seed=7)),
            "sdxl-unet-file": (xl, bare),
        })
    if "flux" in families:
        dev = tinymodels.make_tiny_flux(root / "flux_base", variant="dev")
        schnell = tinymodels.make_tiny_flux(root / "schnell_base", variant="schnell", seed=10)
        layouts.update({
            "flux-pipeline-own-t5": (dev, tinymodels.make_flux_full_finetune(
                dev, root / "flux_full", seed=1, t5_seed=2)),
            "flux-transformer": (dev, tinymodels.make_flux_transformer_folder(
                dev, root / "flux_db", seed=3)),
            "flux-kohya-lora": (dev, tinymodels.make_flux_kohya_lora(
                dev, root / "flux_kohya" / "check.safetensors", seed=4,
                metadata={"ss_output_name": "check", "ss_guidance_scale": "1.0",
                          "ss_tag_frequency": json.dumps({"10_sks style": {"sks style": 10}})})),
            "flux-single-file": (dev, tinymodels.make_flux_single_file(
                dev, root / "flux_single.safetensors", seed=5)),
            "flux-schnell-transformer": (schnell, tinymodels.make_flux_transformer_folder(
                schnell, root / "schnell_db", seed=11)),
        })
    return layouts


def score(pretrained: Path, finetuned: Path, device: str, dtype: str, steps: int,
          checkpointing: str = "auto", attacks: bool = False) -> dict[str, Any]:
    """One layout scored by ``authenticate``; with ``attacks`` also the verdict's cheap scores
    (the 64-draw contrast among them: in float16 the first place an overflow would show), else
    only the inversion, which is all the comparisons between runs look at (at 2 PGD steps the
    cheap scores are ~90 % of the model passes)."""
    import torch

    from cgidm_core.api import authenticate, load_pair
    from cgidm_core.inversion import InversionConfig

    started = time.perf_counter()
    pair = load_pair(pretrained, finetuned, device=device, dtype=dtype)
    loaded = time.perf_counter() - started
    images = synthetic_images(2, pair.image_size)
    results = authenticate(pair, images, config=InversionConfig(
        steps=steps, gradient_checkpointing=checkpointing), attack_scores=None if attacks else ())
    out: dict[str, Any] = {
        "gradient_checkpointing": pair.gradient_checkpointing,
        "checkpointing_enabled_on_unets": all(
            getattr(u, "is_gradient_checkpointing", False) for u in pair.denoisers()),
        "scores": [float(r.score) for r in results],
        **({"attack_scores": [r.extra["attack_scores"] for r in results]} if attacks else {}),
        "load_seconds": loaded,
        "seconds": time.perf_counter() - started,
        "describe": {k: str(v) for k, v in pair.describe().items()},
    }
    if hasattr(pair, "text_encoders_loaded"):
        out["text_encoders_loaded_after"] = bool(pair.text_encoders_loaded)
        # a prompt the pair has not seen: the released encoders are read back on the device
        again = authenticate(pair, images, config=InversionConfig(steps=2),
                             prompt="a painting of a dog", attack_scores=())
        out["new_prompt_scores"] = [float(r.score) for r in again]
    if device.startswith("cuda"):
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    del pair
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def check_layouts(device: str, steps: int, families: tuple[str, ...] = FAMILIES,
                  only: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Every layout of ``families`` (or the ``only`` ones) scored in every dtype."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cgidm-cuda-check-") as tmp:
        layouts = build_layouts(Path(tmp), families)
        for name, (pre, ft) in layouts.items():
            if only is not None and name not in only:
                continue
            cpu: list[float] | None = None
            try:
                cpu = score(pre, ft, "cpu", "float32", steps)["scores"]
            except Exception:  # noqa: BLE001 - reported in the row; the GPU rows still run
                rows.append({"layout": name, "device": "cpu", "dtype": "float32", "ok": False,
                             "error": traceback.format_exc(limit=3)})
            for dtype in DTYPES:
                row: dict[str, Any] = {"layout": name, "device": device, "dtype": dtype}
                try:
                    row.update(score(pre, ft, device, dtype, steps, attacks=True))
                    scores = row["scores"] + row.get("new_prompt_scores", [])
                    problems = [f"score {s} not finite or outside [-1, 1]"
                                for s in scores if not (math.isfinite(s) and -1 <= s <= 1)]
                    problems += [f"{attack} not finite (null) for an image"
                                 for values in row["attack_scores"]
                                 for attack, value in values.items() if value is None]
                    if dtype == "float32":
                        again = score(pre, ft, device, dtype, steps)["scores"]
                        row["rerun_max_diff"] = max_diff(again, row["scores"])
                        if cpu is not None:
                            row["cpu_scores"] = cpu
                            row["cpu_max_diff"] = max_diff(cpu, row["scores"])
                            if row["cpu_max_diff"] > CPU_GPU_TOLERANCE:
                                problems.append(f"float32 GPU scores differ from the CPU's by "
                                                f"{row['cpu_max_diff']:.4f}")
                        if name.startswith(("sdxl", "flux")):
                            ckpt = score(pre, ft, device, dtype, steps, checkpointing="on")
                            row["checkpointed_max_diff"] = max_diff(ckpt["scores"],
                                                                    row["scores"])
                            if not ckpt["checkpointing_enabled_on_unets"]:
                                problems.append("gradient checkpointing not enabled on the UNets")
                            if row["checkpointed_max_diff"] > CHECKPOINTING_TOLERANCE:
                                problems.append("gradient checkpointing changed the scores by "
                                                f"{row['checkpointed_max_diff']:.2e}")
                    if row.get("text_encoders_loaded_after"):
                        problems.append("text encoders still loaded after the prompt")
                    row["ok"] = not problems
                    row["problems"] = problems
                except Exception:  # noqa: BLE001 - a failing layout must not hide the others
                    row.update(ok=False, error=traceback.format_exc(limit=5))
                rows.append(row)
                print(f"{name:12s} {dtype:9s} {'ok' if row['ok'] else 'FAILED'} "
                      f"{row.get('scores')} {row.get('problems') or row.get('error') or ''}",
                      file=sys.stderr, flush=True)
    return rows


def check_demo(device: str, data: Path) -> list[dict[str, Any]]:
    """AUC of the bundled demo pairs on the Van Gogh set, default settings, on ``device``."""
    from cgidm_core.api import load_pair
    from cgidm_core.evaluation import score_images_detailed
    from cgidm_core.images import load_image_folder
    from cgidm_core.stats import evaluate_scores

    folder = data / "wikiart-vangogh"
    members = load_image_folder(folder / "membership")[1]
    holdout = load_image_folder(folder / "hold_out")[1]
    rows = []
    for finetuned in ("demo-vangogh", "demo-vangogh-light"):
        row: dict[str, Any] = {"pair": f"demo-base / {finetuned}", "device": device}
        try:
            started = time.perf_counter()
            pair = load_pair("demo-base", finetuned, device=device)
            scored = score_images_detailed(pair, members + holdout, "cgidm")
            row["seconds"] = time.perf_counter() - started
            report = evaluate_scores(scored.scores[:len(members)], scored.scores[len(members):])
            row.update(auc=report.auc, auc_interval=[report.auc_ci_low, report.auc_ci_high],
                       batch_size=scored.settings["batch_size"],
                       steps=scored.settings["inversion"]["steps"], ok=True)
        except Exception:  # noqa: BLE001
            row.update(ok=False, error=traceback.format_exc(limit=5))
        rows.append(row)
        print(f"{row['pair']}: {row}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps for the tiny layouts")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="folder holding wikiart-vangogh/membership and hold_out")
    parser.add_argument("--json", default="cuda-check.json")
    args = parser.parse_args(argv)

    import os

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; this script checks the GPU paths")
    torch.manual_seed(0)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "layouts": check_layouts(args.device, args.steps),
    }
    if (args.data / "wikiart-vangogh").is_dir():
        report["demo"] = check_demo(args.device, args.data)
    else:
        report["demo"] = [{"ok": False, "error": f"no wikiart-vangogh under {args.data}"}]
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    failed = [r for r in report["layouts"] + report["demo"] if not r.get("ok")]
    print(f"{len(failed)} check(s) failed" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

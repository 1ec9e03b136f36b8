#!/usr/bin/env python
"""Runs cgidm's own loading and inversion paths on a CUDA device: the checks CI cannot make.

CI has no GPU, so the code that only runs there (casting the UNets to float16/bfloat16 while the
VAE stays float32, the text-encoder release and lazy reload on the device, LoRA adapters on the
device) is exercised here, on a machine with one, in about a minute:

1. every model layout the loader accepts, as tiny random models written to a temporary folder
   (``tests/tinymodels.py``): a complete pipeline fine-tune, a DreamBooth folder with its text
   encoder, a LoRA file with text-encoder layers, a single-file checkpoint, a pixel DDPM pair;
   each loaded on the GPU in float32, float16 and bfloat16 and run through ``authenticate`` on
   two images. Scores must be finite and in range; the float32 scores are compared with the same
   run on the CPU and with a second GPU run (reproducibility). A new prompt after the release
   checks the lazy reload of the text encoders on the device.
2. the bundled demo pairs scored on the real Van Gogh members and hold-out images with the
   default settings (``--data``: the folder holding ``wikiart-vangogh/``), giving the AUC on the
   GPU next to the time it took.

    python benchmarks/cuda_check.py --data ../shared/data --json cuda-check.json

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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DTYPES = ("float32", "float16", "bfloat16")
#: How far a float32 score on the GPU may sit from the CPU's: PGD follows normalised gradients,
#: so kernel-level rounding differences grow a little over the steps, but stay far below the
#: spread between members and non-members.
CPU_GPU_TOLERANCE = 0.02


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


def build_layouts(root: Path) -> dict[str, tuple[Path, Path]]:
    """(pretrained, fine-tuned) paths for every layout the loader accepts, tiny and random."""
    from tests import tinymodels

    base = tinymodels.make_tiny_sd(root / "sd_base", sample_size=8)
    layouts = {
        "pipeline": (base, tinymodels.make_full_finetune(base, root / "sd_full", seed=1)),
        "dreambooth": (base, tinymodels.make_dreambooth_folder(base, root / "sd_db", seed=2)),
        "lora": (base, tinymodels.make_lora(base, root / "sd_lora", as_file=True, seed=3,
                                            with_text_encoder=True)),
        "single_file": (base, tinymodels.make_single_file(base, root / "sd_single.safetensors",
                                                          seed=4)),
    }
    layouts["ddpm"] = tinymodels.make_tiny_ddpm_pair(root / "ddpm", sample_size=16)
    return layouts


def score(pretrained: Path, finetuned: Path, device: str, dtype: str, steps: int) -> dict[str, Any]:
    import torch

    from cgidm_core.api import authenticate, load_pair
    from cgidm_core.inversion import InversionConfig

    started = time.perf_counter()
    pair = load_pair(pretrained, finetuned, device=device, dtype=dtype)
    loaded = time.perf_counter() - started
    images = synthetic_images(2, pair.image_size)
    results = authenticate(pair, images, config=InversionConfig(steps=steps))
    out: dict[str, Any] = {
        "scores": [float(r.score) for r in results],
        "load_seconds": loaded,
        "seconds": time.perf_counter() - started,
        "describe": {k: str(v) for k, v in pair.describe().items()},
    }
    if hasattr(pair, "text_encoders_loaded"):
        out["text_encoders_loaded_after"] = bool(pair.text_encoders_loaded)
        # a prompt the pair has not seen: the released encoders are read back on the device
        again = authenticate(pair, images, config=InversionConfig(steps=2),
                             prompt="a painting of a dog")
        out["new_prompt_scores"] = [float(r.score) for r in again]
    if device.startswith("cuda"):
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    del pair
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def check_layouts(device: str, steps: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cgidm-cuda-check-") as tmp:
        layouts = build_layouts(Path(tmp))
        for name, (pre, ft) in layouts.items():
            cpu: list[float] | None = None
            try:
                cpu = score(pre, ft, "cpu", "float32", steps)["scores"]
            except Exception:  # noqa: BLE001 - reported in the row; the GPU rows still run
                rows.append({"layout": name, "device": "cpu", "dtype": "float32", "ok": False,
                             "error": traceback.format_exc(limit=3)})
            for dtype in DTYPES:
                row: dict[str, Any] = {"layout": name, "device": device, "dtype": dtype}
                try:
                    row.update(score(pre, ft, device, dtype, steps))
                    scores = row["scores"] + row.get("new_prompt_scores", [])
                    problems = [f"score {s} not finite or outside [-1, 1]"
                                for s in scores if not (math.isfinite(s) and -1 <= s <= 1)]
                    if dtype == "float32":
                        again = score(pre, ft, device, dtype, steps)["scores"]
                        row["rerun_max_diff"] = max_diff(again, row["scores"])
                        if cpu is not None:
                            row["cpu_scores"] = cpu
                            row["cpu_max_diff"] = max_diff(cpu, row["scores"])
                            if row["cpu_max_diff"] > CPU_GPU_TOLERANCE:
                                problems.append(f"float32 GPU scores differ from the CPU's by "
                                                f"{row['cpu_max_diff']:.4f}")
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

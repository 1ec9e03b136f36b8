"""Which noise levels should flow-matching CGI-DM draw? Measured on pixel flow pairs.

    .venv/bin/python -m benchmarks.flow_schedule --threads 1 \
        --finetuned demo-flow-vangogh /tmp/demo-flow-vangogh-light --json flow_schedule.json

A flow pair sees ``x_s = (1 - s) x0 + s noise``; the inversion draws an integer t uniform in
``[t_min, t_max]`` and maps it to ``s = t / 1000`` and then through the time shift
``s' = shift s / (1 + (shift - 1) s)`` (``cgidm_core.models.flow``). This script runs the default
inversion (100 steps, common noise) on members vs hold-outs for each candidate distribution of
``s`` and prints the AUC (masked SSIM, the verdict's score, and PSNR) with bootstrap intervals and
d' (mean gap / pooled std of the SSIM scores), per fine-tune. Everything else is the default.
The pixel models are unconditional, so there is no guidance to choose here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from statistics import mean, pstdev

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "wikiart-vangogh"

#: (label, shift, t_min, t_max): uniform s, shifts towards high and low noise, and halves.
CANDIDATES: tuple[tuple[str, float, int, int | None], ...] = (
    ("s uniform in (0, 1) (shift 1, t 1..999)", 1.0, 1, None),
    ("shift 3 (more draws at high noise)", 3.0, 1, None),
    ("shift 1/3 (more draws at low noise)", 1 / 3, 1, None),
    ("s in (0, 0.5] (t 1..500)", 1.0, 1, 500),
    ("s in [0.5, 1) (t 500..999)", 1.0, 500, None),
)


def d_prime(members: list[float], others: list[float]) -> float:
    spread = ((pstdev(members) ** 2 + pstdev(others) ** 2) / 2) ** 0.5
    return (mean(members) - mean(others)) / spread if spread > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="demo-flow-base")
    parser.add_argument("--finetuned", nargs="+", default=["demo-flow-vangogh"])
    parser.add_argument("--members", default=str(DEFAULT_DATA / "membership"))
    parser.add_argument("--holdout", default=str(DEFAULT_DATA / "hold_out"))
    parser.add_argument("--steps", type=int, default=None, help="PGD steps (default: ours)")
    parser.add_argument("--candidates", nargs="+", type=int, default=None,
                        help="indices into the candidate list (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="write every score as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from cgidm_core.api import load_pair
    from cgidm_core.evaluation import load_image_folder, score_images_detailed
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.similarity import score_from_metric
    from cgidm_core.stats import evaluate_scores

    member_names, members = load_image_folder(args.members)
    holdout_names, holdout = load_image_folder(args.holdout)
    names, pictures, n = member_names + holdout_names, members + holdout, len(members)
    chosen = [CANDIDATES[i] for i in args.candidates] if args.candidates else list(CANDIDATES)
    rows = []
    print(f"1-min load average at the start: {os.getloadavg()[0]:.1f}", file=sys.stderr)
    for finetuned in args.finetuned:
        pair = load_pair(args.pretrained, finetuned, device="cpu")
        for label, shift, t_min, t_max in chosen:
            pair.flow_shift = shift
            config = InversionConfig(seed=args.seed, t_min=t_min, t_max=t_max)
            if args.steps:
                config = InversionConfig(seed=args.seed, t_min=t_min, t_max=t_max,
                                         steps=args.steps)
            started = time.perf_counter()
            scored = score_images_detailed(pair, pictures, "cgidm", names=names, config=config,
                                           seed=args.seed, batch_size=len(pictures))
            row = {"finetuned": finetuned, "setting": label, "shift": shift, "t_min": t_min,
                   "t_max": t_max, "seconds": time.perf_counter() - started,
                   "load": os.getloadavg()[0]}
            for metric in ("ssim", "psnr"):
                scores = [score_from_metric(metric, d["metrics"][metric]) for d in scored.details]
                report = evaluate_scores(scores[:n], scores[n:], seed=args.seed)
                row[metric] = {"auc": report.auc,
                               "ci": [report.auc_ci_low, report.auc_ci_high],
                               "scores": scores}
            ssim = row["ssim"]["scores"]
            row["d_prime_ssim"] = d_prime(ssim[:n], ssim[n:])
            rows.append(row)
            print(f"[{finetuned}] {label:<42} SSIM AUC {row['ssim']['auc']:.3f}  "
                  f"PSNR AUC {row['psnr']['auc']:.3f}  d' {row['d_prime_ssim']:.2f}  "
                  f"({row['seconds']:.0f} s, load {row['load']:.1f})", file=sys.stderr,
                  flush=True)
    print("| fine-tune | distribution of s | AUC ssim [95% CI] | AUC psnr [95% CI] | d' ssim |")
    print("|---|---|---|---|---|")
    for row in rows:
        cells = [f"{row[m]['auc']:.2f} [{row[m]['ci'][0]:.2f}, {row[m]['ci'][1]:.2f}]"
                 for m in ("ssim", "psnr")]
        print(f"| `{Path(row['finetuned']).name}` | {row['setting']} | {cells[0]} | {cells[1]} | "
              f"{row['d_prime_ssim']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"names": names, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

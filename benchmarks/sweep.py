"""Choose CGI-DM's defaults by measurement: AUC of every metric against the PGD settings.

Runs the inversion on a member and a hold-out folder once per setting (all metrics are scored in
the same run) and prints a markdown table: setting, steps, AUC per metric, seconds per image.

    python -m benchmarks.sweep --steps 25 50 100 200 --variants default reference-noise
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from cgidm_core.api import authenticate, load_pair
from cgidm_core.images import load_image_folder
from cgidm_core.inversion import InversionConfig
from cgidm_core.names import PIXEL_METRICS
from cgidm_core.similarity import score_from_metric

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikiart-vangogh"

VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "unbounded": {"bounded": False},
    "independent-noise": {"common_random_numbers": False},
    "mc2": {"mc_samples": 2},
    "alpha1": {"alpha": 1.0},
    "alpha2": {"alpha": 2.0},
    "alpha4": {"alpha": 4.0},
    "alpha8": {"alpha": 8.0},
    "alpha4-tlow": {"alpha": 4.0, "t_max": 499},
    "alpha4-tlow-mc2": {"alpha": 4.0, "t_max": 499, "mc_samples": 2},
    "eps35": {"epsilon": 35.0},
    "eps140": {"epsilon": 140.0},
    "cell2": {"cell": 2},
    "cell8": {"cell": 8},
    "t-low": {"t_max": 499},
    "reencode": {"reencode_partial": True},
    "reference": "reference",  # type: ignore[dict-item]
}


def separation(labels: list[int], scores: list[float]) -> float:
    """d' = mean gap over pooled std: still informative once the AUC saturates at 1.0."""
    y, s = np.asarray(labels), np.asarray(scores)
    members, others = s[y == 1], s[y == 0]
    pooled = np.sqrt((members.var(ddof=1) + others.var(ddof=1)) / 2)
    return float((members.mean() - others.mean()) / max(pooled, 1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pretrained", default="demo-base")
    parser.add_argument("--finetuned", default="demo-vangogh")
    parser.add_argument("--members", default=str(DATA / "membership"))
    parser.add_argument("--holdout", default=str(DATA / "hold_out"))
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()

    pair = load_pair(args.pretrained, args.finetuned)
    m_names, members = load_image_folder(args.members)
    h_names, holdouts = load_image_folder(args.holdout)
    images, names = members + holdouts, m_names + h_names
    labels = [1] * len(members) + [0] * len(holdouts)

    rows = []
    header = " | ".join(f"AUC {m}" for m in PIXEL_METRICS)
    print(f"| variant | steps | {header} | d' ssim | s/image |")
    print("|---|---|" + "---|" * len(PIXEL_METRICS) + "---|---|")
    for variant in args.variants:
        for steps in args.steps:
            spec = VARIANTS[variant]
            if spec == "reference":
                config = InversionConfig.reference(steps=steps, seed=args.seed)
            else:
                config = replace(InversionConfig(), steps=steps, seed=args.seed, **spec)
            started = time.perf_counter()
            results = authenticate(
                pair, images, names=names, config=config, batch_size=args.batch_size
            )
            seconds = (time.perf_counter() - started) / len(images)
            aucs = {
                m: roc_auc_score(labels, [score_from_metric(m, r.metrics[m]) for r in results])
                for m in PIXEL_METRICS
            }
            d_prime = separation(labels, [r.metrics["ssim"] for r in results])
            rows.append({"variant": variant, "steps": steps, "auc": aucs, "d_prime_ssim": d_prime,
                         "s_per_image": seconds, "config": config.to_dict()})
            cells = " | ".join(f"{aucs[m]:.3f}" for m in PIXEL_METRICS)
            print(f"| {variant} | {steps} | {cells} | {d_prime:.2f} | {seconds:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

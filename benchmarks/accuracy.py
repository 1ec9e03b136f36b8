"""Accuracy of CGI-DM and the baselines on the demo pair, in one run on this machine.

    .venv/bin/python benchmarks/accuracy.py                       # writes docs/ACCURACY.md
    .venv/bin/python benchmarks/accuracy.py --reference-steps 200 --json acc.json

Every method scores the same images with the same pair (``demo-base`` as the pretrained model,
``demo-vangogh`` as the fine-tune, trained on the 10 Van Gogh "membership" paintings) through
``cgidm_core.evaluation``; members are the 10 membership paintings, non-members the 10 hold-out
paintings of the authors' demo data. With 10 non-members TPR at 5 % FPR cannot be measured (it
needs at least 20), so the table says so instead of printing a number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "wikiart-vangogh"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="demo-base")
    parser.add_argument("--finetuned", default="demo-vangogh")
    parser.add_argument("--members", default=str(DEFAULT_DATA / "membership"))
    parser.add_argument("--holdout", default=str(DEFAULT_DATA / "hold_out"))
    parser.add_argument(
        "--reference-steps", type=int, default=1000,
        help="PGD steps of the reference CGI-DM settings (the authors use 1000)",
    )
    parser.add_argument(
        "--default-steps", type=int, default=None,
        help="PGD steps of our default settings (default: InversionConfig().steps)",
    )
    parser.add_argument(
        "--methods", nargs="+",
        default=["cgidm-reference", "cgidm", "loss", "pia", "secmi", "contrast", "combined"],
        help="rows to run; 'combined' needs 'cgidm' and 'contrast'",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "ACCURACY.md"))
    parser.add_argument("--json", help="also write every score and figure as JSON")
    return parser.parse_args(argv)


def _inversion_settings(config: Any) -> str:
    noise = "common noise" if config.common_random_numbers else "independent noise"
    parts = [f"{config.steps} steps", f"alpha {config.alpha:g} / eps {config.epsilon:g} (SD scale)",
             noise, f"{config.mc_samples} MC sample(s)"]
    if config.reencode_partial:
        parts.append("re-encoded partial")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    from cgidm_core.api import load_pair
    from cgidm_core.baselines import EVALUATIONS_PER_IMAGE
    from cgidm_core.evaluation import combine_scores, load_image_folder, score_images_detailed
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.similarity import DEFAULT_METRIC, score_from_metric
    from cgidm_core.stats import evaluate_scores

    member_names, members = load_image_folder(args.members)
    holdout_names, holdout = load_image_folder(args.holdout)
    names = member_names + holdout_names
    pictures = members + holdout
    n_members = len(members)
    pair = load_pair(args.pretrained, args.finetuned, device=args.device)

    reference = InversionConfig.reference(steps=args.reference_steps, seed=args.seed)
    ours = InversionConfig(seed=args.seed)
    if args.default_steps is not None:
        ours = replace(ours, steps=args.default_steps)

    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}

    def add_row(method: str, settings: str, scores: list[float], seconds: float) -> None:
        report = evaluate_scores(
            scores[:n_members], scores[n_members:], n_bootstrap=args.n_bootstrap, seed=args.seed
        )
        rows.append({
            "method": method,
            "settings": settings,
            "auc": report.auc,
            "auc_ci": [report.auc_ci_low, report.auc_ci_high],
            "oracle_best_accuracy": report.oracle_best_accuracy,
            "tpr_at_5pct_fpr": report.tpr_for(0.05).tpr,
            "tpr_at_5pct_fpr_reason": report.tpr_for(0.05).reason,
            "seconds_per_image": seconds / len(scores),
            "scores": dict(zip(names, scores, strict=True)),
        })
        print(f"{method:<34} AUC {report.auc:.3f}  ({seconds / len(scores):.3f} s/image)",
              file=sys.stderr, flush=True)

    def run_cgidm(label: str, config: Any) -> None:
        scored = score_images_detailed(
            pair, pictures, "cgidm", names=names, config=config, seed=args.seed,
            batch_size=args.batch_size,
        )
        raw[label] = scored
        # psnr is a monotone function of mse, so ranking by mse would repeat the psnr row.
        for metric in [DEFAULT_METRIC, *[m for m in ("ssim", "psnr") if m != DEFAULT_METRIC]]:
            scores = [score_from_metric(metric, d["metrics"][metric]) for d in scored.details]
            add_row(f"{label} ({metric})", _inversion_settings(config), scores, scored.seconds)

    for method in args.methods:
        if method == "cgidm-reference":
            run_cgidm("CGI-DM, reference settings", reference)
        elif method == "cgidm":
            run_cgidm("CGI-DM, our defaults", ours)
        elif method == "combined":
            if "CGI-DM, our defaults" not in raw or "contrast" not in raw:
                print("skipping 'combined': it needs the 'cgidm' and 'contrast' rows first",
                      file=sys.stderr)
                continue
            sim, con = raw["CGI-DM, our defaults"], raw["contrast"]
            add_row("combined", f"z(cgidm {DEFAULT_METRIC}) + z(contrast), pooled",
                    combine_scores(sim.scores, con.scores), sim.seconds + con.seconds)
        else:
            scored = score_images_detailed(
                pair, pictures, method, names=names, seed=args.seed, batch_size=args.batch_size
            )
            raw[method] = scored
            add_row(method, f"{EVALUATIONS_PER_IMAGE[method]} model evaluations per image",
                    scored.scores, scored.seconds)

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
               f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
               f"device {pair.device}; 1-min load average {load_before:.1f} at the start, "
               f"{os.getloadavg()[0]:.1f} at the end")
    table = render_markdown(rows, args, n_members, len(holdout), machine)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"wrote {out}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "pretrained": args.pretrained, "finetuned": args.finetuned,
            "members": args.members, "holdout": args.holdout, "seed": args.seed,
            "machine": machine, "rows": rows,
        }, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def render_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, n_members: int,
                    n_holdout: int, machine: str) -> str:
    lines = [
        "# Accuracy on the demo pair",
        "",
        f"Generated by `benchmarks/accuracy.py` on {time.strftime('%Y-%m-%d')} ({machine}).",
        "",
        f"Pair: `{args.pretrained}` (pretrained) vs `{args.finetuned}` (fine-tuned). "
        f"Members: {n_members} images from `{Path(args.members).name}`; non-members: "
        f"{n_holdout} images from `{Path(args.holdout).name}`. Seed {args.seed}; higher score "
        "= more member-like for every method.",
        "",
        "| method | settings | AUC [95% CI] | oracle best acc. | TPR at 5% FPR | s / image |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lo, hi = row["auc_ci"]
        ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None else ""
        tpr = (f"{row['tpr_at_5pct_fpr']:.2f}" if row["tpr_at_5pct_fpr"] is not None
               else f"n/a (needs >= 20 non-members, have {n_holdout})")
        lines.append(
            f"| {row['method']} | {row['settings']} | {row['auc']:.3f}{ci} | "
            f"{row['oracle_best_accuracy']:.2f} | {tpr} | {row['seconds_per_image']:.3f} |"
        )
    lines += [
        "",
        "How to read it:",
        "",
        "- AUC interval: percentile bootstrap over images (members and non-members resampled "
        f"separately, {args.n_bootstrap} resamples). With 10 + 10 images it is wide and rough.",
        "- Oracle best accuracy: the best threshold chosen on these same 20 scores, so an "
        "optimistic upper bound (the paper's accuracy is of this kind). Use "
        "`cgidm eval --calibrate-split` with more images for a calibrated figure.",
        "- s / image: wall-clock time of the method divided by the number of images, all images "
        f"in batches of {args.batch_size}. CGI-DM rows with different metrics share one run.",
        "- Times are wall-clock on a shared machine: compare them within one table only (the load "
        "average above says how busy it was).",
        "- Each CGI-DM configuration is run once; its metric rows (ssim, psnr) score the same "
        "recoveries differently (mse ranks exactly like psnr). alpha and eps are stated for a "
        "4x64x64 latent and scaled to the latent size.",
        "",
    ]
    lines += observations(rows)
    return "\n".join(lines)


def observations(rows: list[dict[str, Any]]) -> list[str]:
    """Notes that follow from the numbers themselves, so they stay true when the table changes."""
    notes = []
    inverted = [r["method"] for r in rows if r["auc_ci"][1] is not None and r["auc_ci"][1] < 0.5]
    if inverted:
        notes.append(
            f"- {', '.join(inverted)}: the whole AUC interval is below 0.5, i.e. the score ranks "
            "members *lower* than non-members on this pair: the method's premise does not hold "
            "here (flipping its sign after seeing labels would be fitting to the test data)."
        )
    perfect = [r["method"] for r in rows if r["auc"] == 1.0]
    if len(perfect) >= max(2, len(rows) - len(inverted)):
        notes.append(
            "- Almost every method separates the two sets perfectly: this pair memorised its "
            "members so strongly that it cannot tell the methods apart; compare them on a "
            "weaker fine-tune or more images."
        )
    if notes:
        notes = ["Observations:", "", *notes, ""]
    return notes


if __name__ == "__main__":
    sys.exit(main())

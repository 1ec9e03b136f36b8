"""Markdown of the benchmark suite (``benchmarks/suite.py``): ranking, per-pair table, pictures.

Kept apart from the runner so a saved ``--json`` can be re-rendered without recomputing.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

#: Columns of the per-pair table besides the chosen score (the shipped and the cheap ones).
KEY_CANDIDATES = (
    "default:ssim@final", "default:psnr@final", "default:objective-second_half",
    "contrast", "loss", "pia", "secmi",
)


def ranking(summary: dict[str, Any]) -> list[tuple[str, float, float, int]]:
    from cgidm_core.suite_scores import rank_candidates

    aucs: dict[str, list[float]] = {}
    costs: dict[str, int] = {}
    n_pairs = len(summary["pairs"])
    for pair in summary["pairs"]:
        for name, row in pair["rows"].items():
            aucs.setdefault(name, []).append(row["auc"])
            costs[name] = row["cost"]
    # Candidates not measured on every pair (the display variant) are ranked apart.
    complete = {k: v for k, v in aucs.items() if len(v) == n_pairs}
    return rank_candidates(complete, costs)


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    lo, hi = row["ci"]
    tpr = "-" if row["tpr"] is None else f"{row['tpr']:.1f}"
    return f"{row['auc']:.2f} [{lo:.2f}, {hi:.2f}] / {tpr}"


def per_pair_table(summary: dict[str, Any], columns: list[str]) -> list[str]:
    lines = ["| pair | m / h | " + " | ".join(f"`{c}`" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for pair in summary["pairs"]:
        cells = [_cell(pair["rows"].get(c)) for c in columns]
        lines.append(f"| {pair['pair']} | {pair['n_members']} / {pair['n_holdout']} | "
                     + " | ".join(cells) + " |")
    worst, mean = [], []
    for c in columns:
        aucs = [p["rows"][c]["auc"] for p in summary["pairs"] if c in p["rows"]]
        worst.append(f"**{min(aucs):.2f}**" if aucs else "-")
        mean.append(f"**{sum(aucs) / len(aucs):.3f}**" if aucs else "-")
    lines.append("| worst case | | " + " | ".join(worst) + " |")
    lines.append("| mean | | " + " | ".join(mean) + " |")
    return lines


def looks_table(summary: dict[str, Any]) -> list[str]:
    """Recovered-region SSIM and colour distance, members vs controls, averaged over pairs."""
    sums: dict[str, list[list[float]]] = {}
    for pair in summary["pairs"]:
        for key, (m, c) in pair["looks"].items():
            sums.setdefault(key, []).append([m, c])
    if not sums:
        return []
    lines = ["| recovery | pairs | masked SSIM, members | controls | colour distance "
             "(CIEDE2000), members | controls |", "|---|---|---|---|---|---|"]
    for recovery in ("default/final", "default/average", "default/clamped", "palette/final",
                     "palette/average", "palette/clamped"):
        ssim, colour = sums.get(f"{recovery}/ssim"), sums.get(f"{recovery}/colour")
        if not ssim or not colour:
            continue
        n = len(ssim)
        lines.append(
            f"| {recovery} | {n} | {sum(s[0] for s in ssim) / n:.3f} | "
            f"{sum(s[1] for s in ssim) / n:.3f} | {sum(c[0] for c in colour) / n:.1f} | "
            f"{sum(c[1] for c in colour) / n:.1f} |")
    return lines


def cost_lines(summary: dict[str, Any]) -> list[str]:
    runs: dict[str, float] = {}
    evals, loads, images = [], [], 0
    for doc in summary["models"].values():
        training = doc["training"]
        key = f"{training['split']}/s{training['seed']}"
        runs[key] = max(runs.get(key, 0.0), training["seconds"])
        evals.append(doc["seconds_total"])
        loads += [*doc["load_average"], training.get("load_average", 0.0)]
        images += len(doc["files"]) * len(doc.get("variants") or {"default": 0})
    train_total = sum(runs.values())
    return [
        f"- Fine-tuning: {len(runs)} runs (each saves the light, medium and strong checkpoints "
        f"of its split and seed), {train_total / 60:.0f} min in all "
        f"({min(runs.values()) / 60:.1f}-{max(runs.values()) / 60:.1f} min per run, the runs "
        "two at a time).",
        f"- Evaluation: {len(evals)} fine-tunes ({images} image inversions of 100 steps plus the "
        f"cheap scores), {sum(evals) / 60:.0f} min of process time in all "
        f"({min(evals) / 60:.1f}-{max(evals) / 60:.1f} min per fine-tune, two processes at a "
        f"time); this report from the cached values took {summary['run_seconds']:.0f} s.",
        f"- Conditions: one torch thread per process, `nice -n 19`, on 2 cores shared with other "
        f"engineers' jobs (1-min load average {min(loads):.1f}-{max(loads):.1f} at the samples "
        "taken), so these are upper bounds: each process got 12-40 % of a core. On an idle "
        "core an inversion of a 32 px image costs about 2.5 s at 100 steps.",
    ]


def render(summary: dict[str, Any], args: Any) -> str:
    ranked = ranking(summary)
    best = ranked[0][0]
    columns = [best, *[c for c in KEY_CANDIDATES if c != best]]
    lo, hi = summary["load_average"]
    lines = [
        "# Benchmark suite: verdict scores across pairs",
        "",
        f"Generated by `benchmarks/suite.py` on {time.strftime('%Y-%m-%d')} "
        f"({platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs; 1-min load "
        f"average {lo:.1f} at the start of the report run, {hi:.1f} at the end).",
        "",
        "```",
        summary["command"],
        "```",
        "",
        "## Cost",
        "",
        *cost_lines(summary),
        "",
        "## Ranking (worst case, then mean, then cost)",
        "",
        f"{len(summary['pairs'])} pairs. Cost = model evaluations per image (an inversion step "
        "is counted as 6: a forward and a backward pass through each model).",
        "",
        "| rank | score | worst AUC | mean AUC | cost |",
        "|---|---|---|---|---|",
    ]
    for i, (name, worst, mean, cost) in enumerate(ranked, 1):
        lines.append(f"| {i} | `{name}` | {worst:.3f} | {mean:.3f} | {cost} |")
    lines += [
        "",
        "## Per pair",
        "",
        "Cells: AUC [95 % bootstrap interval] / TPR at the lowest FPR the pair supports "
        "(1 / hold-out size: 10 %), threshold chosen on the same scores.",
        "",
        *per_pair_table(summary, columns),
        "",
        "## Pictures: recovered region vs the original",
        "",
        *looks_table(summary),
        "",
    ]
    text = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return text

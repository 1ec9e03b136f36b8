"""Accuracy of CGI-DM and the baselines on the demo fine-tunes, in one run on this machine.

    .venv/bin/python -m benchmarks.accuracy      # both demo fine-tunes; writes
                                                 # docs/DEMO_ACCURACY.md

The defaults are chosen on the many pairs of ``benchmarks/suite.py`` (docs/ACCURACY.md); this
script compares methods, the reference settings included, on the two shipped demo pairs.
    .venv/bin/python -m benchmarks.accuracy --reference-steps 200 --json acc.json
    .venv/bin/python -m benchmarks.accuracy --finetuned demo-vangogh-light --methods loss cgidm
    .venv/bin/python -m benchmarks.accuracy --no-flow      # the DDPM fine-tunes only

Every method scores the same images with the same pairs through ``cgidm_core.evaluation``: the
pretrained model is ``demo-base``; the fine-tunes are ``demo-vangogh`` (1500 steps, memorised its
members so well that every method is perfect) and ``demo-vangogh-light`` (a few hundred steps,
the dose of a usual DreamBooth run, where the methods differ). Members are the 10 membership
paintings both were fine-tuned on, non-members the 10 hold-out paintings of the authors' demo
data. With 10 non-members TPR at 5 % FPR cannot be measured (it needs at least 20), so the
tables say so instead of printing a number.

The flow-matching demo pair (``demo-flow-base`` vs ``demo-flow-vangogh``, ``--flow-pair``) is
scored in the same run as one more column: CGI-DM in its flow form (velocity contrast) against
the baselines that follow the pair's forward process (loss attack and contrast on velocities);
PIA and SecMI are DDIM-based, refuse a flow pair, and are reported as refused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "wikiart-vangogh"

#: Steps of the authors' CGI-DM settings; a smaller ``--reference-steps`` is labelled as such.
AUTHORS_REFERENCE_STEPS = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="demo-base")
    parser.add_argument(
        "--finetuned", nargs="+", default=["demo-vangogh", "demo-vangogh-light"],
        help="one or more fine-tunes of --pretrained (demo names or folders), each scored in turn",
    )
    parser.add_argument(
        "--flow-pair", nargs=2, metavar=("BASE", "FINETUNED"),
        default=["demo-flow-base", "demo-flow-vangogh"],
        help="a flow-matching pair scored as one more column (default: the flow demo pair)",
    )
    parser.add_argument("--no-flow", action="store_true", help="skip --flow-pair")
    parser.add_argument("--members", default=str(DEFAULT_DATA / "membership"))
    parser.add_argument("--holdout", default=str(DEFAULT_DATA / "hold_out"))
    parser.add_argument(
        "--reference-steps", type=int, default=AUTHORS_REFERENCE_STEPS,
        help=f"PGD steps of the reference CGI-DM settings (the authors use "
        f"{AUTHORS_REFERENCE_STEPS}; fewer are labelled in the tables)",
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
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "DEMO_ACCURACY.md"),
                        help="full report (markdown)")
    parser.add_argument("--table-out", default="",
                        help="the main table alone, as a markdown snippet ('' to skip)")
    parser.add_argument("--json", help="also write every score and figure as JSON")
    return parser.parse_args(argv)


def _inversion_settings(config: Any) -> str:
    noise = "common noise" if config.common_random_numbers else "independent noise"
    parts = [f"{config.steps} steps", f"alpha {config.alpha:g} / eps {config.epsilon:g} (SD scale)",
             noise, f"{config.mc_samples} MC sample(s)"]
    if config.reencode_partial:
        parts.append("re-encoded 8-bit partial" if config.quantize_partial
                     else "re-encoded partial")
    if config.sample_latent:
        parts.append("sampled VAE latent")
    return ", ".join(parts)


def reference_label(steps: int) -> str:
    """Name of the reference row; says so when it runs fewer steps than the authors."""
    if steps == AUTHORS_REFERENCE_STEPS:
        return "CGI-DM, reference settings"
    return f"CGI-DM, reference settings cut to {steps} steps"


def describe_finetune(ref: str, pretrained: str | None = None) -> str:
    """A short label of a fine-tune: its name and, where its training.json says, its dose (and
    its base, when it is not the run's ``--pretrained``)."""
    from cgidm_core.demo import resolve_model_reference
    from cgidm_core.errors import CGIDMError

    against = f", vs `{pretrained}`" if pretrained else ""
    try:
        facts = json.loads((resolve_model_reference(ref) / "training.json").read_text())
    except (OSError, ValueError, CGIDMError):  # not a demo-style folder: the name is all we know
        return f"`{ref}`" + (f" (vs `{pretrained}`)" if pretrained else "")
    if "steps" in facts and "member_files" in facts:
        kind = "flow matching, " if facts.get("objective") == "flow_matching" else ""
        return f"`{ref}` ({kind}{facts['steps']} fine-tuning steps{against})"
    return f"`{ref}`" + (f" (vs `{pretrained}`)" if pretrained else "")


def evaluate_finetune(args: argparse.Namespace, finetuned: str, pictures: list[Any],
                      names: list[str], n_members: int,
                      pretrained: str | None = None) -> dict[str, Any]:
    """Every requested method on one pair; returns its rows and the time the pair took.

    ``pretrained`` overrides ``args.pretrained`` (the flow pair has its own base). A baseline
    that refuses the pair (PIA and SecMI on a flow-matching pair) is recorded in ``refused``
    with its message instead of a row.
    """
    from cgidm_core.api import load_pair
    from cgidm_core.baselines import EVALUATIONS_PER_IMAGE
    from cgidm_core.errors import ConfigError
    from cgidm_core.evaluation import combine_scores, score_images_detailed
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.names import DEFAULT_METRIC
    from cgidm_core.similarity import score_from_metric
    from cgidm_core.stats import evaluate_scores

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    base = pretrained or args.pretrained
    pair = load_pair(base, finetuned, device=args.device)
    reference = InversionConfig.reference(steps=args.reference_steps, seed=args.seed)
    ours = InversionConfig(seed=args.seed)
    if args.default_steps is not None:
        ours = replace(ours, steps=args.default_steps)
    ours_label = "CGI-DM, our defaults"

    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    refused: dict[str, str] = {}

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
        print(f"[{finetuned}] {method:<34} AUC {report.auc:.3f}  "
              f"({seconds / len(scores):.3f} s/image)", file=sys.stderr, flush=True)

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
            run_cgidm(reference_label(args.reference_steps), reference)
        elif method == "cgidm":
            run_cgidm(ours_label, ours)
        elif method == "combined":
            if ours_label not in raw or "contrast" not in raw:
                print("skipping 'combined': it needs the 'cgidm' and 'contrast' rows first",
                      file=sys.stderr)
                continue
            sim, con = raw[ours_label], raw["contrast"]
            add_row("combined", f"z(cgidm {DEFAULT_METRIC}) + z(contrast), pooled",
                    combine_scores(sim.scores, con.scores), sim.seconds + con.seconds)
        else:
            try:
                scored = score_images_detailed(
                    pair, pictures, method, names=names, seed=args.seed,
                    batch_size=args.batch_size,
                )
            except ConfigError as exc:  # a method that does not apply to this family
                refused[method] = str(exc)
                print(f"[{finetuned}] {method:<34} refused: {exc}", file=sys.stderr, flush=True)
                continue
            raw[method] = scored
            add_row(method, f"{EVALUATIONS_PER_IMAGE[method]} model evaluations per image",
                    scored.scores, scored.seconds)
    return {
        "finetuned": finetuned,
        "pretrained": base,
        "family": pair.family,
        "label": describe_finetune(finetuned, pretrained if base != args.pretrained else None),
        "device": str(pair.device),
        "seconds": time.perf_counter() - started,
        "load_average": [load_before, os.getloadavg()[0]],
        "rows": rows,
        "refused": refused,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()

    from cgidm_core.images import load_image_folder

    member_names, members = load_image_folder(args.members)
    holdout_names, holdout = load_image_folder(args.holdout)
    names = member_names + holdout_names
    pictures = members + holdout

    runs = [evaluate_finetune(args, ft, pictures, names, len(members)) for ft in args.finetuned]
    if not args.no_flow:
        flow_base, flow_ft = args.flow_pair
        runs.append(evaluate_finetune(args, flow_ft, pictures, names, len(members),
                                      pretrained=flow_base))
    seconds = time.perf_counter() - started
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
               f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
               f"device {runs[0]['device']}; 1-min load average {load_before:.1f} at the start, "
               f"{os.getloadavg()[0]:.1f} at the end; {seconds / 60:.1f} min in all")
    command = "python -m benchmarks.accuracy " + shlex.join(argv if argv is not None
                                                            else sys.argv[1:])
    report = render_markdown(runs, args, len(members), len(holdout), machine, command.strip())
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"wrote {out}", file=sys.stderr)
    if args.table_out:
        snippet = Path(args.table_out)
        snippet.write_text(render_snippet(runs, args, command.strip()))
        print(f"wrote {snippet}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "pretrained": args.pretrained, "members": args.members, "holdout": args.holdout,
            "seed": args.seed, "reference_steps": args.reference_steps, "machine": machine,
            "command": command, "seconds": seconds, "finetunes": runs,
        }, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _auc_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    lo, hi = row["auc_ci"]
    return f"{row['auc']:.3f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "")


def main_table(runs: list[dict[str, Any]]) -> list[str]:
    """One row per method, one AUC column per fine-tune: the comparison the README shows."""
    methods: list[str] = []
    settings: dict[str, str] = {}
    times: dict[str, list[float]] = {}
    for run in runs:
        for row in run["rows"]:
            if row["method"] not in settings:
                methods.append(row["method"])
                settings[row["method"]] = row["settings"]
            times.setdefault(row["method"], []).append(row["seconds_per_image"])
    header = "| method | settings | " + " | ".join(
        f"AUC [95% CI], {run['label']}" for run in runs
    ) + " | s / image |"
    lines = [header, "|---|---|" + "---|" * len(runs) + "---|"]
    for run in runs:
        for method in run.get("refused", {}):
            if method not in settings:
                methods.append(method)
                settings[method] = "-"
                times.setdefault(method, [])
    for method in methods:
        cells = []
        for run in runs:
            match = next((r for r in run["rows"] if r["method"] == method), None)
            refused = method in run.get("refused", {})
            cells.append("refused (DDPM-only)" if refused and match is None else _auc_cell(match))
        mean_time = (f"{sum(times[method]) / len(times[method]):.3f}" if times[method]
                     else "-")
        lines.append(f"| {method} | {settings[method]} | " + " | ".join(cells)
                     + f" | {mean_time} |")
    return lines


def render_snippet(runs: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    """The main table and the command that produced it, for pasting into the README."""
    return "\n".join([
        *main_table(runs),
        "",
        f"Members: the 10 paintings every fine-tune was trained on; non-members: 10 hold-out "
        f"paintings by the same artist; pretrained model `{args.pretrained}` unless the column "
        "names another. AUC with a "
        "percentile-bootstrap 95 % interval over images; s / image is CPU wall clock, mean over "
        "the fine-tunes. Details and caveats: [docs/DEMO_ACCURACY.md](docs/DEMO_ACCURACY.md). "
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
    ])


def render_markdown(runs: list[dict[str, Any]], args: argparse.Namespace, n_members: int,
                    n_holdout: int, machine: str, command: str) -> str:
    lines = [
        "# Accuracy on the demo pairs",
        "",
        f"Generated by `benchmarks/accuracy.py` on {time.strftime('%Y-%m-%d')} ({machine}).",
        "",
        f"Pretrained model `{args.pretrained}`; fine-tunes "
        + ", ".join(run["label"] for run in runs)
        + f". Members: {n_members} images from `{Path(args.members).name}` (what every fine-tune "
        f"was trained on); non-members: {n_holdout} images from `{Path(args.holdout).name}`. "
        f"Seed {args.seed}; higher score = more member-like for every method.",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
    ]
    if args.reference_steps != AUTHORS_REFERENCE_STEPS:
        lines += [
            f"The reference settings run {args.reference_steps} PGD steps instead of the "
            f"authors' {AUTHORS_REFERENCE_STEPS} to fit the CPU; everything else (alpha, eps, "
            "independent noise, re-encoded partial) is theirs.",
            "",
        ]
    lines += ["## All fine-tunes, AUC", "", *main_table(runs), "", *across_finetunes(runs)]
    for run in runs:
        lo, hi = run["load_average"]
        lines += [
            f"## {run['label']}",
            "",
            f"{run['seconds'] / 60:.1f} min for this pair; 1-min load average {lo:.1f} at the "
            f"start, {hi:.1f} at the end.",
            "",
            "| method | settings | AUC [95% CI] | oracle best acc. | TPR at 5% FPR | s / image |",
            "|---|---|---|---|---|---|",
        ]
        for row in run["rows"]:
            tpr = (f"{row['tpr_at_5pct_fpr']:.2f}" if row["tpr_at_5pct_fpr"] is not None
                   else f"n/a (needs >= 20 non-members, have {n_holdout})")
            lines.append(
                f"| {row['method']} | {row['settings']} | {_auc_cell(row)} | "
                f"{row['oracle_best_accuracy']:.2f} | {tpr} | {row['seconds_per_image']:.3f} |"
            )
        for method, reason in run.get("refused", {}).items():
            lines.append(f"| {method} | refused: {reason} | - | - | - | - |")
        lines.append("")
        lines += observations(run["rows"])
    lines += [
        "## How to read it",
        "",
        "- AUC interval: percentile bootstrap over images (members and non-members resampled "
        f"separately, {args.n_bootstrap} resamples). With 10 + 10 images it is wide and rough, "
        "and it says nothing about the randomness of the method itself (one seed).",
        "- Oracle best accuracy: the best threshold chosen on these same 20 scores, so an "
        "optimistic upper bound (the paper's accuracy is of this kind). Use "
        "`cgidm eval --calibrate-split` with more images for a calibrated figure.",
        "- s / image: wall-clock time of the method divided by the number of images, all images "
        f"in batches of {args.batch_size}. CGI-DM rows with different metrics share one run.",
        "- Times are wall-clock on a shared machine: compare them within one table only (the load "
        "averages say how busy it was).",
        "- Each CGI-DM configuration is run once per pair; its metric rows (ssim, psnr) score the "
        "same recoveries differently (mse ranks exactly like psnr). alpha and eps are stated for "
        "a 4x64x64 latent and scaled to the latent size.",
        "- The fine-tunes differ only in the number of fine-tuning steps (same base, members, "
        "learning rate and seed; see their model cards in `cgidm_core/demo_models/`). The light "
        "fine-tune's step count was picked from a sweep of 50-800 steps, given in its model card.",
        "",
    ]
    return "\n".join(lines)


def across_finetunes(runs: list[dict[str, Any]]) -> list[str]:
    """Methods whose evidence points one way on one fine-tune and the other way on another."""
    def side(row: dict[str, Any]) -> int:
        lo, hi = row["auc_ci"]
        if lo is None:
            return 0
        return 1 if lo > 0.5 else -1 if hi < 0.5 else 0

    flipped = []
    for method in dict.fromkeys(r["method"] for run in runs for r in run["rows"]):
        sides = {side(r) for run in runs for r in run["rows"] if r["method"] == method}
        if {1, -1} <= sides:
            flipped.append(method)
    if not flipped:
        return []
    return [
        "Across the fine-tunes:",
        "",
        f"- {', '.join(flipped)}: clearly above chance on one fine-tune and clearly below on "
        "another, so the direction of its score depends on how strongly the model memorised; "
        "a threshold or sign fitted on one model does not transfer.",
        "",
    ]


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
    chance = [r["method"] for r in rows
              if r["auc_ci"][0] is not None and r["auc_ci"][0] <= 0.5 <= r["auc_ci"][1]]
    if chance:
        notes.append(
            f"- {', '.join(chance)}: the AUC interval includes 0.5, so on these 20 images the "
            "method is not distinguishable from guessing."
        )
    if notes:
        notes = ["Observations:", "", *notes, ""]
    return notes


if __name__ == "__main__":
    sys.exit(main())

"""``cgidm eval``: measure how well a method separates known members from a hold-out set.

A rights holder (or a reviewer) with images known to be in the fine-tuning set and images known
not to be can see, before trusting a verdict, how well the method works on this very pair. The
report avoids the usual flattering shortcuts: the AUC comes with a bootstrap interval, the
best-threshold accuracy is labelled as chosen on the test data, TPR at a low FPR is only shown
when there are enough hold-out images to measure it, and ``--calibrate-split`` gives the CopyMark
figures (threshold chosen on one half, applied to the other).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .common import (
    add_method_arguments,
    add_model_arguments,
    inversion_config,
    load_pair_from_args,
    progress_bar,
)

#: The methods of ``cgidm_core.evaluation.METHODS``, spelled out here so that building the parser
#: never imports torch (``cgidm --help`` stays instant); a test keeps the two lists equal.
METHODS = ("cgidm", "loss", "pia", "secmi", "contrast", "combined", "fused")
METHOD_HELP = {
    "cgidm": "contrasting gradient inversion + similarity of the recovery (the paper)",
    "loss": "fine-tuned model's denoising error at t in {50, 100, 200}",
    "pia": "Proximal Initialization Attack, t=200, l4 (Kong et al. 2024)",
    "secmi": "SecMI_stat, t_sec=100, interval 10 (Duan et al. 2023)",
    "contrast": "CGI-DM's objective at the original image, no inversion",
    "combined": "z-scored cgidm similarity + z-scored contrast score",
    "fused": "z-scored cgidm similarity + z-scored loss attack (best worst case of the suite)",
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="measure a method on known members vs hold-out images (AUC, TPR at FPR, ...)",
        description="Score known members and known non-members (hold-out) with one method and "
        "report how well the scores separate them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n" + "\n".join(f"  {m:<9} {d}" for m, d in METHOD_HELP.items()),
    )
    add_model_arguments(parser, required=False)
    add_method_arguments(parser)
    data = parser.add_argument_group("data and report")
    data.add_argument("--members", help="folder of images known to be members")
    data.add_argument("--holdout", help="folder of images known NOT to be members")
    data.add_argument(
        "--suite-pair",
        help="run one pair of the benchmark suite instead (e.g. vangogh-a/strong/s0 or "
        "dreambooth/medium/s1/hard; list: python benchmarks/suite.py --list): its models and "
        "images, fine-tuning it first (cached) when missing; needs ../shared/data",
    )
    data.add_argument("--suite-cache", help="suite cache folder (default ~/.cache/cgidm/suite)")
    data.add_argument("--method", choices=METHODS, default="cgidm")
    data.add_argument(
        "--controls",
        help="folder of further known non-members: per-image p-values and a Mann-Whitney U "
        "test of members (and of the hold-out, as a sanity check) against them",
    )
    data.add_argument("--alpha", type=float, default=0.05, help="significance level (controls)")
    data.add_argument(
        "--calibrate-split",
        action="store_true",
        help="CopyMark protocol: choose the threshold for --target-fpr on one half, measure the "
        "TPR and the FPR reached on the other half (repeated random splits, both ways)",
    )
    data.add_argument("--target-fpr", type=float, default=0.05)
    data.add_argument("--repeats", type=int, default=100, help="random splits (--calibrate-split)")
    data.add_argument("--n-bootstrap", type=int, default=2000, help="bootstrap resamples for AUC")
    data.add_argument("--json", help="write every per-image score and every figure to this file")
    data.add_argument("--plot", help="write the ROC curve and score histograms to this PNG")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cgidm_core.evaluation import load_image_folder, score_images_detailed
    from cgidm_core.stats import calibrated_split, controls_test, evaluate_scores, plot_report

    # Read every folder before loading models: a typo should fail in a second, not a minute.
    if args.suite_pair:
        sets = _suite_pair_sets(args)
    else:
        _require_folders(args)
        sets = [
            ("member", *load_image_folder(args.members)),
            ("holdout", *load_image_folder(args.holdout)),
        ]
    if args.controls:
        sets.append(("control", *load_image_folder(args.controls)))
    _check_settings(args, n_members=len(sets[0][1]), n_holdout=len(sets[1][1]))
    config = inversion_config(args)
    if args.method in ("cgidm", "combined", "fused"):
        config.validate()
    pair = load_pair_from_args(args)

    names = [n for _, ns, _ in sets for n in ns]
    pictures = [p for _, _, ps in sets for p in ps]
    labels = [label for label, ns, _ in sets for _ in ns]
    started = time.perf_counter()
    with progress_bar(f"cgidm eval ({args.method})") as update:
        scored = score_images_detailed(
            pair,
            pictures,
            args.method,
            names=names,
            prompt=args.prompt,
            config=config,
            metric=args.metric,
            feature_model=args.feature_model,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=update,
        )
    elapsed = time.perf_counter() - started

    by_set: dict[str, list[float]] = {"member": [], "holdout": [], "control": []}
    for label, score in zip(labels, scored.scores, strict=True):
        by_set[label].append(score)
    report = evaluate_scores(
        by_set["member"], by_set["holdout"], n_bootstrap=args.n_bootstrap, seed=args.seed
    )
    split = (
        calibrated_split(
            by_set["member"], by_set["holdout"], target_fpr=args.target_fpr, seed=args.seed,
            repeats=args.repeats,
        )
        if args.calibrate_split
        else None
    )
    controls: dict[str, Any] | None = None
    if args.controls:
        controls = {
            "members_vs_controls": controls_test(
                by_set["member"], by_set["control"], alpha=args.alpha
            ),
            "holdout_vs_controls": controls_test(
                by_set["holdout"], by_set["control"], alpha=args.alpha
            ),
        }

    records = []
    p_lookup: dict[tuple[str, int], tuple[float, str]] = {}
    if controls:
        for label, key in (("member", "members_vs_controls"), ("holdout", "holdout_vs_controls")):
            test = controls[key]
            for i, (p, v) in enumerate(zip(test.p_values, test.verdicts, strict=True)):
                p_lookup[(label, i)] = (p, v)
    counters = {"member": 0, "holdout": 0, "control": 0}
    for label, detail in zip(labels, scored.details, strict=True):
        record = {"set": label, **detail}
        index = counters[label]
        counters[label] += 1
        if (label, index) in p_lookup:
            record["p_value"], record["verdict"] = p_lookup[(label, index)]
        records.append(record)

    settings = {
        "pretrained": str(args.pretrained),
        "finetuned": str(args.finetuned),
        "members": str(args.members),
        "holdout": str(args.holdout),
        "controls": args.controls,
        **scored.settings,
        "pair": pair.describe(),
    }
    if args.method not in ("cgidm", "combined", "fused"):
        settings.pop("inversion", None)

    _print_report(args, scored, report, split, controls, records, elapsed)

    if args.json:
        document = {
            "auc": report.auc,
            "auc_ci": [report.auc_ci_low, report.auc_ci_high],
            "method": args.method,
            "n_members": report.n_members,
            "n_holdout": report.n_nonmembers,
            "seconds": round(elapsed, 3),
            "seconds_per_image": round(elapsed / max(1, len(records)), 4),
            "report": report.to_dict(),
            "calibrated_split": split.to_dict() if split else None,
            "controls_test": {k: v.to_dict() for k, v in controls.items()} if controls else None,
            "settings": settings,
            "images": records,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2))
        print(f"wrote {path}")
    if args.plot:
        title = f"{args.method}: {Path(args.finetuned).name} vs {Path(args.pretrained).name}"
        plot_report(report, by_set["member"], by_set["holdout"], args.plot, title=title)
        print(f"wrote {args.plot}")
    return 0


def _require_folders(args: argparse.Namespace) -> None:
    from cgidm_core.errors import ConfigError

    missing = [f"--{n}" for n in ("pretrained", "finetuned", "members", "holdout")
               if not getattr(args, n)]
    if missing:
        raise ConfigError(
            f"missing {', '.join(missing)}: give the two models and the member and hold-out "
            "folders, or --suite-pair to run one pair of the benchmark suite"
        )


def _suite_pair_sets(args: argparse.Namespace) -> list[tuple[str, list[str], list[Any]]]:
    """Models and images of one suite pair; fine-tunes it (cached) when it is missing."""
    from cgidm_core.errors import ConfigError
    from cgidm_core.images import load_image
    from cgidm_core.suite_pairs import RECIPE, default_cache, find_pair, train_run

    if args.pretrained or args.finetuned or args.members or args.holdout:
        raise ConfigError("--suite-pair names its own models and images; drop --pretrained, "
                          "--finetuned, --members and --holdout")
    pair = find_pair(args.suite_pair)
    cache = Path(args.suite_cache) if args.suite_cache else default_cache()
    model = pair.model_dir(cache)
    if not (model / "training.json").is_file():
        print(f"fine-tuning {pair.pair_id} into {model.parent} (cached for next time)")
        train_run(pair.split, pair.seed, model.parent, log=print)
    args.pretrained, args.finetuned = str(RECIPE["base"]), str(model)
    args.members = f"suite:{pair.pair_id}:members"
    args.holdout = f"suite:{pair.pair_id}:{pair.holdout}"
    return [
        ("member", [p.name for p in pair.split.members],
         [load_image(p) for p in pair.split.members]),
        ("holdout", [p.name for p in pair.holdout_files],
         [load_image(p) for p in pair.holdout_files]),
    ]


def _check_settings(args: argparse.Namespace, *, n_members: int, n_holdout: int) -> None:
    """Reject settings that would only fail after all the scoring work."""
    from cgidm_core.errors import ConfigError

    for name in ("alpha", "target_fpr"):
        value = getattr(args, name)
        if not 0 < value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be between 0 and 1, got {value}")
    if args.n_bootstrap < 0:
        raise ConfigError(f"--n-bootstrap must be >= 0, got {args.n_bootstrap}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.calibrate_split:
        if args.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
        if min(n_members, n_holdout) < 2:
            raise ConfigError(
                "--calibrate-split needs at least 2 member and 2 hold-out images (one per half)"
            )


def _method_label(args: argparse.Namespace, scored: Any) -> str:
    if args.method in ("cgidm", "combined", "fused"):
        inv = scored.settings.get("inversion", {})
        return f"{args.method} (metric {scored.settings.get('metric')}, {inv.get('steps')} steps)"
    return args.method


def _print_report(args, scored, report, split, controls, records, elapsed) -> None:
    width = max(len("image"), *(len(r["name"]) for r in records))
    with_p = any("p_value" in r for r in records)
    header = f"{'image':<{width}}  {'set':<7}  {'score':>10}" + ("  p-value  verdict" if with_p
                                                                   else "")
    print(header)
    print("-" * len(header))
    for r in records:
        line = f"{r['name']:<{width}}  {r['set']:<7}  {r['score']:>10.5g}"
        if "p_value" in r:
            line += f"  {r['p_value']:>7.3f}  {r['verdict']}"
        print(line)

    rows: list[tuple[str, str]] = []
    ci = (
        f"  95% CI [{report.auc_ci_low:.3f}, {report.auc_ci_high:.3f}] "
        f"(stratified bootstrap, {report.n_bootstrap} resamples)"
        if report.auc_ci_low is not None
        else f"  ({report.ci_note})"
    )
    rows.append(("AUC", f"{report.auc:.3f}{ci}"))
    rows.append((
        "oracle best accuracy",
        f"{report.oracle_best_accuracy:.3f}  (threshold chosen on these same scores: optimistic, "
        "not a calibrated accuracy)",
    ))
    for item in report.tpr_at_fpr:
        key = f"TPR at {item.target_fpr:.0%} FPR"
        if item.tpr is None:
            rows.append((key, f"n/a: {item.reason}"))
        else:
            rows.append((key, f"{item.tpr:.3f}  (FPR reached {item.achieved_fpr:.3f})"))
    if split is not None:
        rows.append((
            "calibrated split",
            f"TPR {split.tpr_mean:.3f} +- {split.tpr_std:.3f}, FPR reached {split.fpr_mean:.3f} "
            f"+- {split.fpr_std:.3f} (target {split.target_fpr:.0%}; threshold chosen on one half, "
            f"measured on the other; {split.repeats} random splits, both ways)",
        ))
        if split.note:
            rows.append(("", f"note: {split.note}"))
    if controls:
        for key, label in (("members_vs_controls", "members vs controls"),
                           ("holdout_vs_controls", "hold-out vs controls")):
            test = controls[key]
            hits = test.verdicts.count("member_evidence")
            rows.append((
                label,
                f"Mann-Whitney U={test.u_statistic:.1f}, one-sided p={test.p_value:.4g} "
                f"({test.test_method}), AUC={test.auc:.3f}; {hits}/{test.n_suspect} images with "
                f"p <= {test.alpha:g}",
            ))
        rows.append(("", controls["members_vs_controls"].explanation))

    print()
    print(f"method: {_method_label(args, scored)}; members: {report.n_members}, "
          f"hold-out: {report.n_nonmembers}; {elapsed:.1f} s "
          f"({elapsed / max(1, len(records)):.2f} s per image)")
    key_width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{key_width}}  {value}")

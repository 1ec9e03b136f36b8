"""``cgidm eval``: measure how well a method separates known members from a hold-out set.

A rights holder (or a reviewer) with images known to be in the fine-tuning set and images known
not to be can see, before trusting a verdict, how well the method works on this very pair. The
report avoids the usual flattering shortcuts: the AUC comes with a bootstrap interval, the
best-threshold accuracy is labelled as chosen on the test data, TPR at a low FPR is only shown
when there are enough hold-out images to measure it, and ``--calibrate-split`` gives the CopyMark
figures (threshold chosen on one half, applied to the other). ``--protocol paper`` adds, side by
side, the figures as the paper's evaluation code computes them (best match over all recoveries
of a split, threshold chosen on the test data), so that a number can be set beside the
publication's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cgidm_core.names import INVERSION_METHODS, METHOD_DESCRIPTIONS, METHODS

from .common import (
    add_method_arguments,
    add_model_arguments,
    inversion_config,
    load_pair_from_args,
    progress_bar,
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="measure a method on known members vs hold-out images (AUC, TPR at FPR, ...)",
        description="Score known members and known non-members (hold-out) with one method and "
        "report how well the scores separate them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n" + "\n".join(f"  {m:<9} {d}" for m, d in METHOD_DESCRIPTIONS.items()),
    )
    add_model_arguments(parser, required=False)
    add_method_arguments(parser)
    data = parser.add_argument_group("data and report")
    data.add_argument("--members", help="folder of images known to be members")
    data.add_argument("--holdout", help="folder of images known NOT to be members")
    data.add_argument(
        "--suite-pair",
        help="run one pair of the benchmark suite instead (e.g. vangogh-a/strong/s0 or "
        "dreambooth/medium/s1/hard; list: python -m benchmarks.suite --list): its models and "
        "images, fine-tuning it first (cached) when missing; needs ../shared/data",
    )
    data.add_argument("--suite-cache", help="suite cache folder (default ~/.cache/cgidm/suite)")
    data.add_argument(
        "--method", choices=METHODS, default=None,
        help="default: evidence, the verdict's score that cgidm check and the service decide "
        "by (cgidm_core.evidence); with --protocol paper: cgidm (the recovery's similarity, the "
        "paper's score)",
    )
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
    data.add_argument(
        "--protocol",
        choices=["ours", "paper"],
        default="ours",
        help="'paper' also reports the paper's protocol next to ours (cgidm method only): each "
        "original scored by its best match over ALL recoveries of its split, accuracy at a "
        "threshold chosen on the test scores themselves; ours scores each image against its own "
        "recovery and calibrates the threshold on held-apart data (use --metric clip or dino "
        "with --feature-model for the paper's scores)",
    )
    data.add_argument("--repeats", type=int, default=100, help="random splits (--calibrate-split)")
    data.add_argument("--n-bootstrap", type=int, default=2000, help="bootstrap resamples for AUC")
    data.add_argument("--json", help="write every per-image score and every figure to this file")
    data.add_argument("--plot", help="write the ROC curve and score histograms to this PNG")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Read the images, score them all in one call, measure how the scores separate the sets,
    print the report and write what was asked for."""
    args.method = default_method(args)
    sets = _read_sets(args)
    config = inversion_config(args)
    if args.method in INVERSION_METHODS:
        config.validate()
    pair = load_pair_from_args(args)
    scored, elapsed = _score(args, pair, config, sets)
    labels = [label for label, ns, _ in sets for _ in ns]
    by_set: dict[str, list[float]] = {"member": [], "holdout": [], "control": []}
    for label, score in zip(labels, scored.scores, strict=True):
        by_set[label].append(score)

    report, split = _measure(args, by_set)
    paper = args.protocol == "paper"
    comparison = (
        _paper_comparison(args, pair, config, sets, scored, report, split) if paper else None
    )
    controls = _controls_tests(args, by_set) if args.controls else None
    records = _records(labels, scored, controls, comparison)

    _print_report(args, scored, report, split, controls, records, elapsed)
    if comparison is not None:
        _print_comparison(comparison)
    if args.json:
        _write_json(args, pair, scored, report, split, controls, comparison, records, elapsed)
    if args.plot:
        from cgidm_core.stats import plot_report

        title = f"{args.method}: {Path(args.finetuned).name} vs {Path(args.pretrained).name}"
        plot_report(report, by_set["member"], by_set["holdout"], args.plot, title=title)
        print(f"wrote {args.plot}")
    return 0


def default_method(args: argparse.Namespace) -> str:
    """The method asked for, else the verdict's score (``evidence``): what ``cgidm eval``
    measures unasked is what ``cgidm check`` decides by. The paper's protocol compares the
    recoveries' similarity, so there the default is ``cgidm``."""
    if args.method:
        return str(args.method)
    return "cgidm" if args.protocol == "paper" else "evidence"


def _read_sets(args: argparse.Namespace) -> list[tuple[str, list[str], list[Any]]]:
    """(label, names, pictures) of the members, the hold-out and the controls, checked.

    Every folder is read before models load: a typo should fail in a second, not a minute.
    """
    from cgidm_core.images import load_image_folder

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
    return sets


def _score(args: argparse.Namespace, pair: Any, config: Any,
           sets: list[tuple[str, list[str], list[Any]]]) -> tuple[Any, float]:
    """Every image of every set scored in ONE call (fusions standardise over the call), with a
    progress bar; returns the scores and the seconds they took."""
    from cgidm_core.evaluation import score_images_detailed

    started = time.perf_counter()
    with progress_bar(f"cgidm eval ({args.method})") as update:
        scored = score_images_detailed(
            pair,
            [p for _, _, ps in sets for p in ps],
            args.method,
            names=[n for _, ns, _ in sets for n in ns],
            prompt=args.prompt,
            config=config,
            metric=args.metric,
            feature_model=args.feature_model,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=update,
        )
    return scored, time.perf_counter() - started


def _measure(args: argparse.Namespace, by_set: dict[str, list[float]]) -> tuple[Any, Any]:
    """AUC with its interval, TPR at low FPR, and (when asked, or for the paper comparison) the
    calibrated split of members vs hold-out."""
    from cgidm_core.stats import calibrated_split, evaluate_scores

    report = evaluate_scores(
        by_set["member"], by_set["holdout"], n_bootstrap=args.n_bootstrap, seed=args.seed
    )
    # The paper comparison sets our calibrated figures beside theirs whenever they can be made.
    want_split = args.calibrate_split or (
        args.protocol == "paper" and min(len(by_set["member"]), len(by_set["holdout"])) >= 2
    )
    split = (
        calibrated_split(
            by_set["member"], by_set["holdout"], target_fpr=args.target_fpr, seed=args.seed,
            repeats=args.repeats,
        )
        if want_split
        else None
    )
    return report, split


def _records(labels: list[str], scored: Any, controls: dict[str, dict[str, Any]] | None,
             comparison: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One record per image: its set, the method's evidence, and its p-value and verdict
    against the controls (and its paper-protocol best match) when there are any."""
    best_matches = comparison["best_matches"] if comparison else None
    p_lookup: dict[tuple[str, int], tuple[float, str]] = {}
    if controls:
        for label, key in (("member", "members_vs_controls"), ("holdout", "holdout_vs_controls")):
            test = controls[key]
            for i, (p, v) in enumerate(zip(test["p_values"], test["verdicts"], strict=True)):
                p_lookup[(label, i)] = (p, v)
    records = []
    counters = {"member": 0, "holdout": 0, "control": 0}
    for label, detail in zip(labels, scored.details, strict=True):
        record = {"set": label, **detail}
        index = counters[label]
        counters[label] += 1
        if (label, index) in p_lookup:
            record["p_value"], record["verdict"] = p_lookup[(label, index)]
        if best_matches is not None:
            record["paper_best_match_score"], record["paper_best_match"] = best_matches[
                (label, index)]
        records.append(record)
    return records


def _write_json(args: argparse.Namespace, pair: Any, scored: Any, report: Any, split: Any,
                controls: dict[str, dict[str, Any]] | None, comparison: dict[str, Any] | None,
                records: list[dict[str, Any]], elapsed: float) -> None:
    """Every per-image score and every figure, with the settings that produced them."""
    settings = {
        "pretrained": str(args.pretrained),
        "finetuned": str(getattr(args, "finetuned_reference", None) or args.finetuned),
        **({"finetuned_hub": args.suspect_source} if getattr(args, "suspect_source", None)
           else {}),
        "members": str(args.members),
        "holdout": str(args.holdout),
        "controls": args.controls,
        **scored.settings,
        "pair": pair.describe(),
    }
    if args.method not in INVERSION_METHODS:
        settings.pop("inversion", None)
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
        "controls_test": controls,
        "protocol": args.protocol,
        "protocol_comparison": (
            {k: v for k, v in comparison.items() if k != "best_matches"}
            if comparison else None
        ),
        "settings": settings,
        "images": records,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    print(f"wrote {path}")


def _controls_tests(args: argparse.Namespace,
                    by_set: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Members, and the hold-out as a sanity check, against the controls: each is the set test
    of the evidence document ``cgidm check`` and the service write (cgidm_core.evidence), on the
    scores of the method asked for (already pooled over every image scored)."""
    from cgidm_core.evidence import build_evidence

    control_records = [{"score": s} for s in by_set["control"]]
    return {
        key: build_evidence([{"score": s} for s in by_set[label]], control_records,
                            alpha=args.alpha, evidence="given")["set_test"]
        for label, key in (("member", "members_vs_controls"), ("holdout", "holdout_vs_controls"))
    }


def _require_folders(args: argparse.Namespace) -> None:
    from cgidm.model_refs import looks_like_reference
    from cgidm_core.errors import ConfigError

    needed: tuple[str, ...] = ("finetuned", "members", "holdout")
    if not (args.finetuned and looks_like_reference(args.finetuned)):
        needed = ("pretrained", *needed)  # a hub reference's base can come from its page
    missing = [f"--{n}" for n in needed if not getattr(args, n)]
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
    if args.protocol == "paper" and args.method != "cgidm":
        raise ConfigError(
            "--protocol paper scores each original against the recoveries of its split, which "
            f"only the cgidm method makes; got --method {args.method}"
        )
    if args.calibrate_split:
        if args.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
        if min(n_members, n_holdout) < 2:
            raise ConfigError(
                "--calibrate-split needs at least 2 member and 2 hold-out images (one per half)"
            )


def _method_label(args: argparse.Namespace, scored: Any) -> str:
    if args.method in INVERSION_METHODS:
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
            hits = test["verdicts"].count("member_evidence")
            rows.append((
                label,
                f"Mann-Whitney U={test['u_statistic']:.1f}, one-sided p={test['p_value']:.4g} "
                f"({test['test_method']}), AUC={test['auc']:.3f}; {hits}/{test['n_suspect']} "
                f"images with p <= {test['alpha']:g}",
            ))
        rows.append(("", controls["members_vs_controls"]["explanation"]))

    print()
    print(f"method: {_method_label(args, scored)}; members: {report.n_members}, "
          f"hold-out: {report.n_nonmembers}; {elapsed:.1f} s "
          f"({elapsed / max(1, len(records)):.2f} s per image)")
    key_width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{key_width}}  {value}")


def _paper_comparison(args, pair, config, sets, scored, report, split) -> dict[str, Any]:
    """The paper's protocol on the same recoveries, and ours, as one comparable record."""
    from cgidm_core.masks import checkerboard_mask, default_cell, upsample_mask
    from cgidm_core.names import DEFAULT_METRIC, FEATURE_METRICS
    from cgidm_core.paper_protocol import best_match_scores, paper_protocol
    from cgidm_core.similarity import load_feature_model

    metric = scored.settings.get("metric") or DEFAULT_METRIC
    feature_model = None
    keep = None
    size = pair.run_size(config.resolution)
    if metric in FEATURE_METRICS:
        feature_model = load_feature_model(str(args.feature_model))
    else:
        side = size // pair.pixels_per_latent
        shape = (pair.latent_shape[0], side, side)
        cell = config.cell or default_cell(shape, pair.pixels_per_latent)
        keep = upsample_mask(checkerboard_mask(shape, cell), pair.pixels_per_latent)
    best: dict[str, list[float]] = {}
    best_matches: dict[tuple[str, int], tuple[float, str]] = {}
    offset = 0
    for label, names, pictures in sets:
        results = scored.results[offset:offset + len(names)]
        offset += len(names)
        if label == "control":
            continue
        values, index = best_match_scores(
            pictures, [r.recovered for r in results], metric, feature_model=feature_model,
            keep=keep, size=size,
        )
        best[label] = values
        for i, (value, j) in enumerate(zip(values, index, strict=True)):
            best_matches[(label, i)] = (value, names[j])
    theirs = paper_protocol(best["member"], best["holdout"], metric)
    if feature_model is not None:
        theirs["feature_model"] = feature_model.describe()
    ours = {
        "protocol": "cgidm",
        "metric": metric,
        "score": "each image against its own recovery",
        "auc": report.auc,
        "auc_ci": [report.auc_ci_low, report.auc_ci_high],
        "calibrated_split": split.to_dict() if split else None,
        "calibrated_note": None if split else "needs at least 2 members and 2 hold-out images",
    }
    return {"paper": theirs, "ours": ours, "best_matches": best_matches}


def _print_comparison(comparison: dict[str, Any]) -> None:
    theirs, ours = comparison["paper"], comparison["ours"]
    split = ours["calibrated_split"]
    ours_acc = (
        f"TPR {split['tpr_mean']:.3f}, FPR reached {split['fpr_mean']:.3f} (target "
        f"{split['target_fpr']:.0%}; threshold calibrated on held-apart halves)"
        if split else f"n/a: {ours['calibrated_note']}"
    )
    their_auc = "n/a (all scores equal)" if theirs["auc"] is None else f"{theirs['auc']:.3f}"
    rows = [
        ("", "paper's protocol (Revelio Validator.py)", "ours"),
        ("score of an image", "best match over all recoveries of its split", "its own recovery"),
        ("AUC", f"{their_auc} (1001-threshold grid)", f"{ours['auc']:.3f}"),
        ("accuracy / rates", f"{theirs['accuracy']:.3f} (threshold chosen on these test scores: "
         "oracle)", ours_acc),
    ]
    print()
    print(f"protocol comparison, metric {theirs['metric']}:")
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  " + "  ".join(f"{cell:<{widths[i]}}" for i, cell in enumerate(row)).rstrip())
    if theirs["note"]:
        print(f"  note: {theirs['note']}")

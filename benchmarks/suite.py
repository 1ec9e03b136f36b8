"""The accuracy benchmark suite: many pixel pairs, every verdict score, worst case and mean.

    .venv/bin/python benchmarks/suite.py                 # train what is missing, evaluate what is
                                                         # missing, write docs/SUITE.md
    .venv/bin/python benchmarks/suite.py --list          # the pairs and where they are cached
    .venv/bin/python benchmarks/suite.py --train-only    # just make the fine-tunes
    .venv/bin/python benchmarks/suite.py --datasets vangogh-a --strengths strong --seeds 0

Pairs (``cgidm_core/suite_pairs.py``): ``demo-base`` fully fine-tuned with one recipe the defaults
were not tuned on (lr 2e-4 constant, random flips, batch 10) on

- Van Gogh split A (the authors' 10 members / 10 hold-out) and split B (swapped);
- DreamBooth photos: 2 photos each of 5 subjects; hard hold-out = the other photos of those
  subjects (18), easy hold-out = 2 photos each of 5 other subjects (10);

at three strengths (200 / 500 / 1000 steps, checkpoints of one run) and two seeds. Fine-tunes
and per-pair results are cached under ``--cache`` (default ``~/.cache/cgidm/suite``), keyed by
a hash of recipe, data and evaluation settings: a rerun computes only what is missing.

Every pair is scored by every candidate verdict score (CGI-DM's similarity metrics at several
PGD step counts, the CGI-DM objective's own values, the contrast loss, the loss attack, PIA,
SecMI and fusions); the table gives per pair AUC with a bootstrap 95 % interval and TPR at the
lowest FPR the pair's hold-out supports (1 / number of non-members), then the worst case and the
mean over pairs. Scores are ranked worst case first, then mean, then cost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from cgidm_core.suite_pairs import SEEDS, STRENGTHS, default_cache

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="fine-tunes and per-pair results (default ~/.cache/cgidm/suite)")
    parser.add_argument("--data", type=Path, default=None, help="default: ../shared/data")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="vangogh-a vangogh-b dreambooth (default: all)")
    parser.add_argument("--strengths", nargs="+", default=None, choices=list(STRENGTHS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help=f"default: {' '.join(map(str, SEEDS))}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--list", action="store_true", help="list the pairs and exit")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--no-train", action="store_true",
                        help="evaluate only pairs whose fine-tune is already cached")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "SUITE.md")
    parser.add_argument("--json", type=Path, default=None, help="also write every number as JSON")
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    return parser.parse_args(argv)


def selected_pairs(args: argparse.Namespace):
    from cgidm_core.suite_pairs import suite_pairs

    return suite_pairs(
        args.data,
        datasets=tuple(args.datasets) if args.datasets else None,
        strengths=tuple(args.strengths) if args.strengths else None,
        seeds=tuple(args.seeds) if args.seeds else None,
    )


def train_missing(args: argparse.Namespace, pairs) -> dict[str, float]:
    """Make every missing fine-tune; returns seconds per training run made now."""
    from cgidm_core.suite_pairs import STRENGTHS, train_run

    runs: dict[tuple[str, int], object] = {}
    for pair in pairs:
        runs.setdefault((pair.split.name, pair.seed), pair)
    made: dict[str, float] = {}
    for (split_name, seed), pair in runs.items():
        out_root = pair.model_dir(args.cache).parent  # type: ignore[attr-defined]
        # One run saves every strength up to the largest one asked for.
        top = max(STRENGTHS[s] for s in (args.strengths or STRENGTHS))
        wanted = {s: n for s, n in STRENGTHS.items() if n <= top}
        if all((out_root / s / "training.json").is_file() for s in wanted):
            continue
        log(f"fine-tuning {split_name} seed {seed} -> {out_root}")
        started = time.perf_counter()
        train_run(pair.split, seed, out_root, strengths=wanted, threads=args.threads, log=log)  # type: ignore[attr-defined]
        made[f"{split_name}/s{seed}"] = time.perf_counter() - started
        log(f"fine-tuned {split_name} seed {seed} in {made[f'{split_name}/s{seed}']:.0f} s")
    return made


# ------------------------------------------------------------------------------ evaluation


def eval_key(pair) -> str:
    """Hash of what a model's cached raw values depend on (settings, candidates, images)."""
    import hashlib

    from cgidm_core.inversion import InversionConfig
    from cgidm_core.suite_scores import CHEAP_METHODS, RECORD_STEPS

    files = [f"{p.parent.name}/{p.name}:{p.stat().st_size}" for p in model_images(pair)]
    blob = json.dumps({"config": InversionConfig().to_dict(), "variants": variants_for(pair),
                       "record": RECORD_STEPS, "cheap": CHEAP_METHODS, "files": files,
                       "version": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def variants_for(pair) -> dict[str, dict[str, object]]:
    """Inversions run on a pair: the default everywhere; the display variant (palette bounds) on
    the strong pairs only, where the pictures matter most, to fit the CPU budget."""
    from cgidm_core.suite_scores import VARIANTS

    return dict(VARIANTS) if pair.strength == "strong" else {"default": VARIANTS["default"]}


def model_images(pair) -> list[Path]:
    """Every image scored with a fine-tune: its members, then each hold-out set in turn."""
    files = list(pair.split.members)
    for holdout in pair.split.holdouts.values():
        files += list(holdout)
    return files


def model_results(args: argparse.Namespace, pair) -> dict:
    """Raw values of every image of a fine-tune, from the cache or computed now (and cached)."""
    import torch

    from cgidm_core.api import load_pair
    from cgidm_core.images import load_image
    from cgidm_core.suite_scores import raw_values

    model = pair.model_dir(args.cache)
    out = args.cache / "results" / f"{model.parent.name}-{model.name}-{eval_key(pair)}.json"
    if out.is_file():
        return json.loads(out.read_text())
    files = model_images(pair)
    log(f"evaluating {model.parent.name}/{model.name}: {len(files)} images")
    load = os.getloadavg()[0]
    started = time.perf_counter()
    loaded = load_pair(str(RECIPE_BASE), str(model))
    raw = raw_values(loaded, [load_image(p) for p in files], variants=variants_for(pair),
                     keep_pictures=True, log=log)
    document = {
        "model": str(model), "files": [f"{p.parent.name}/{p.name}" for p in files],
        "n_members": len(pair.split.members),
        "holdouts": {k: len(v) for k, v in pair.split.holdouts.items()},
        "values": raw["values"], "seconds": raw["seconds"],
        "seconds_total": time.perf_counter() - started,
        "load_average": [load, os.getloadavg()[0]], "torch_threads": torch.get_num_threads(),
        "inversion": raw["inversion"], "variants": raw["variants"],
        "training": json.loads((model / "training.json").read_text()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(raw["pictures"], out.with_suffix(".pt"))
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(out)
    log(f"  done in {document['seconds_total']:.0f} s")
    return document


RECIPE_BASE = "demo-base"


def pair_slice(document: dict, holdout: str) -> tuple[dict[str, list[float]], int, int]:
    """Raw values of the members and one hold-out set, and the two counts."""
    n1 = document["n_members"]
    start = n1
    for name, count in document["holdouts"].items():
        if name == holdout:
            break
        start += count
    n0 = document["holdouts"][holdout]
    idx = list(range(n1)) + list(range(start, start + n0))
    return {k: [v[i] for i in idx] for k, v in document["values"].items()}, n1, n0


def evaluate_pair(document: dict, pair, n_bootstrap: int) -> dict:
    """AUC [CI] and TPR at FPR = 1/n_holdout of every candidate on one pair."""
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.stats import evaluate_scores
    from cgidm_core.suite_scores import candidate_scores

    values, n1, n0 = pair_slice(document, pair.holdout)
    fpr = 1.0 / n0
    rows = {}
    for name, (cand, scores) in candidate_scores(values, InversionConfig().steps).items():
        report = evaluate_scores(scores[:n1], scores[n1:], n_bootstrap=n_bootstrap, seed=0,
                                 target_fprs=(fpr,))
        tpr = report.tpr_at_fpr[0]
        rows[name] = {"auc": report.auc, "ci": [report.auc_ci_low, report.auc_ci_high],
                      "tpr": tpr.tpr, "fpr": tpr.achieved_fpr, "target_fpr": fpr,
                      "cost": cand.evaluations, "description": cand.description}
    looks = {}
    for key in ("default/final", "default/average", "palette/final", "palette/average"):
        for metric in ("ssim", "colour"):
            vals = values.get(f"{key}/{metric}")
            if vals:
                looks[f"{key}/{metric}"] = [float(sum(vals[:n1]) / n1),
                                            float(sum(vals[n1:]) / n0)]
    return {"pair": pair.pair_id, "n_members": n1, "n_holdout": n0, "rows": rows,
            "looks": looks}


def run_suite(args: argparse.Namespace, pairs) -> int:
    from render_suite import render  # benchmarks/ is on sys.path when this runs as a script

    started = time.perf_counter()
    load = os.getloadavg()[0]
    documents: dict[str, dict] = {}
    results = []
    for pair in pairs:
        model = pair.model_dir(args.cache)
        if not (model / "training.json").is_file():
            log(f"skipping {pair.pair_id}: no fine-tune (run without --no-train)")
            continue
        if str(model) not in documents:
            documents[str(model)] = model_results(args, pair)
        results.append(evaluate_pair(documents[str(model)], pair, args.n_bootstrap))
    if not results:
        log("nothing to report")
        return 1
    summary = {
        "pairs": results,
        "models": {k: {"seconds": v["seconds"], "seconds_total": v["seconds_total"],
                       "load_average": v["load_average"], "training": v["training"],
                       "files": v["files"]}
                   for k, v in documents.items()},
        "run_seconds": time.perf_counter() - started,
        "load_average": [load, os.getloadavg()[0]],
        "command": "python benchmarks/suite.py " + " ".join(sys.argv[1:]),
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    render(summary, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    pairs = selected_pairs(args)
    if args.list:
        for pair in pairs:
            model = pair.model_dir(args.cache)
            state = "cached" if (model / "training.json").is_file() else "missing"
            print(f"{pair.pair_id:<36} {len(pair.split.members)} members / "
                  f"{len(pair.holdout_files)} hold-out  {state}  {model}")
        return 0
    if not args.no_train:
        train_missing(args, pairs)
    if args.train_only:
        return 0
    return run_suite(args, pairs)


if __name__ == "__main__":
    sys.exit(main())

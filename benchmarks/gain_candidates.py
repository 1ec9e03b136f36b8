"""Similarity scores corrected for the image, compared on cached suite pairs: what passes the null
controls by construction and what keeps the former fusion's power on light fine-tunes.

    .venv/bin/python -m benchmarks.gain_candidates --datasets vangogh-a vangogh-b --seeds 0

Why: the recovery's raw similarity (the former verdict's SSIM and PSNR) scores how easy an image's
masked half is to fill in as well as membership, and fails the null controls; minus CGI-DM's
objective (the shipped ``paired`` score) passes them but loses power on light pixel full
fine-tunes (0.65-0.76 against the former's 0.93-0.99). Every candidate here is a function of
the recovery and of the PGD's starting point (``cgidm_core.null_values``, ``start/<metric>``)
that takes one value for every image when the recovery IS the start, which is what a pair whose
fine-tune is its base gives (zero contrast, zero gradient): they pass the exact null controls by
construction. Two families:

- from the cached raw values and null values (what the suite can score:
  ``cgidm_core.suite_scores.start_relative_values``): PSNR gain (= 10 log10 of the MSE ratio),
  SSIM gain, the log ratio of SSIM's residuals, the fraction of the achievable SSIM gain, the
  same at earlier PGD steps, and their fusions with the ``paired`` score's parts;
- from the recovered pictures (``cgidm_core.suite_scores.displacement_values``; recorded by
  ``raw_values`` since it keeps the start, derived from the saved pictures of older pixel
  results): how well the PGD's displacement points at the original (cosine over the free
  pixels) and how far along that direction it went, alone and fused with ``paired``.

Prints, per pair, every candidate's AUC with its 95 % bootstrap interval, then the worst and the
mean per strength; nothing is written to the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Candidates shown first, in this order (the rest follow alphabetically).
REFERENCES: tuple[str, ...] = (
    "fuse:objective+contrast", "contrast", "fuse:ssim+psnr+loss+contrast",
    "default:psnr@final", "default:ssim@final", "gain-start:psnr", "gain-start:ssim",
    "default:progress@final", "default:cosine@final", "fuse:objective+contrast+progress",
    "fuse:objective+contrast+cosine")


def pair_candidates(values: dict[str, list[float]], null: dict[str, list[float]] | None,
                    steps: int) -> dict[str, np.ndarray]:
    """Every candidate's scores of one pair's images (members first), as the suite scores them
    (``candidate_scores``: start-relative and displacement candidates included)."""
    from cgidm_core.suite_scores import candidate_scores

    return {name: scores for name, (_c, scores) in candidate_scores(values, steps, null).items()}


def perturbed_null(cache: Path, scale: float, seed: int = 0) -> dict[str, Any]:
    """Raw values of ``demo-base`` against a copy of itself with Gaussian weight noise of
    ``scale`` (``benchmarks.null_controls.noise_null_document``, cached there), cut to Van Gogh
    split A's members and hold-out as the suite's pairs are."""
    from benchmarks.null_controls import _null_splits, _split_document, noise_null_document

    document = noise_null_document(cache, "pixel", seed, scale=scale, compute=True)
    assert document is not None
    name, files, n_members = _null_splits("pixel")[0]
    assert name == "vangogh-a/holdout"
    return _split_document(document, files, n_members)


def main(argv: list[str] | None = None) -> int:
    from benchmarks import suite
    from benchmarks.null_controls import aligned, null_lookup
    from benchmarks.pair_evaluation import null_slice, pair_slice
    from cgidm_core.stats import evaluate_scores

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["vangogh-a", "vangogh-b"])
    parser.add_argument("--seeds", nargs="+", default=["0"])
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None, help="every AUC as JSON")
    parser.add_argument("--show", nargs="*", default=None,
                        help="candidates to print (default: all)")
    parser.add_argument("--perturbed-null", type=float, nargs="*", default=[],
                        metavar="SCALE", help="also score demo-base against itself with "
                        "Gaussian weight noise of SCALE x each tensor's std (Van Gogh A)")
    parser.add_argument("--perturbed-seed", type=int, default=0,
                        help="seed of the weight noise (another seed = another direction)")
    args = parser.parse_args(argv)
    suite_args = suite.parse_args(["--datasets", *args.datasets, "--seeds", *args.seeds,
                                   "--no-latent", "--lora"])
    lookup = null_lookup(suite_args.cache, "pixel")
    results: list[dict[str, Any]] = []
    for pair in suite.selected_pairs(suite_args):
        path = suite.results_path(suite_args, pair)
        if not path.is_file():
            print(f"missing (not evaluated yet): {pair.pair_id}", file=sys.stderr)
            continue
        # the displacement values come from the saved pictures (suite.with_derived)
        document = suite.with_derived(json.loads(path.read_text()), path.with_suffix(".pt"))
        document["null"] = aligned(lookup, document["files"])
        values, n1, _n0 = pair_slice(document, pair.holdout)
        null = null_slice(document, pair.holdout)
        steps = int(document["inversion"]["steps"])
        rows = {}
        for name, scores in pair_candidates(values, null, steps).items():
            if args.show is not None and name not in args.show and name not in REFERENCES:
                continue
            report = evaluate_scores(scores[:n1], scores[n1:], n_bootstrap=args.n_bootstrap,
                                     seed=0, target_fprs=())
            rows[name] = (report.auc, report.auc_ci_low, report.auc_ci_high)
        results.append({"pair": pair.pair_id, "strength": pair.strength, "rows": rows,
                        "null_values": null is not None})
    for scale in args.perturbed_null:
        import torch

        torch.set_num_threads(1)
        document = perturbed_null(suite_args.cache, scale, args.perturbed_seed)
        document["null"] = aligned(lookup, document["files"])
        values, n1, _n0 = pair_slice(document, "holdout")
        rows = {}
        for name, scores in pair_candidates(values, null_slice(document, "holdout"),
                                            int(document["inversion"]["steps"])).items():
            if args.show is not None and name not in args.show and name not in REFERENCES:
                continue
            report = evaluate_scores(scores[:n1], scores[n1:], n_bootstrap=args.n_bootstrap,
                                     seed=0, target_fprs=())
            rows[name] = (report.auc, report.auc_ci_low, report.auc_ci_high)
        results.append({"pair": f"null/pixel/vangogh-a/noise-{scale:g}-s{args.perturbed_seed}",
                        "strength": "0",
                        "rows": rows, "null_values": True})
    names = sorted({n for r in results for n in r["rows"]},
                   key=lambda n: (REFERENCES.index(n) if n in REFERENCES else len(REFERENCES), n))
    print("| candidate | " + " | ".join(r["pair"] for r in results)
          + " | light worst / mean | all worst / mean |")
    print("|---|" + "---|" * (len(results) + 2))
    for name in names:
        cells, light, every = [], [], []
        for r in results:
            row = r["rows"].get(name)
            cells.append("-" if row is None else f"{row[0]:.2f} [{row[1]:.2f}, {row[2]:.2f}]")
            if row is not None:
                every.append(row[0])
                if r["strength"] == "light":
                    light.append(row[0])

        def summary(aucs: list[float]) -> str:
            return f"{min(aucs):.2f} / {np.mean(aucs):.3f}" if aucs else "-"

        print(f"| {name} | " + " | ".join(cells) + f" | {summary(light)} | {summary(every)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

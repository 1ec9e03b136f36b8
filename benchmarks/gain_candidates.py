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
- from the saved pictures (``<results>.pt``; pixel pairs, whose start is the kept half with the
  free cells at zero): how well the PGD's displacement points at the original (cosine over the
  free pixels) and how far along that direction it went.

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
    "default:psnr@final", "default:ssim@final", "gain-start:psnr", "gain-start:ssim")


def picture_values(pictures: dict[str, Any]) -> dict[str, list[float]]:
    """Per image, from the saved pictures of a pixel pair: the cosine between the PGD's
    displacement (recovery minus start) and the way to the original (original minus start), and
    the displacement's projection on that way as a fraction of its length (1 = arrived), over
    the free pixels; for the final recovery and the iterate mean. 0 where the recovery did not
    move (the start of a pixel pair is the kept half with the free cells at 0)."""
    import torch

    out: dict[str, list[float]] = {}
    n = pictures["default/final"].shape[0]
    original, keep = pictures["original"][:n].double(), pictures["mask"][:n].double()
    free = (1.0 - keep).expand_as(original)
    start = original * keep
    target = ((original - start) * free).flatten(1)
    for key in ("default/final", "default/average", "default/step25", "default/step50"):
        if key not in pictures:
            continue
        moved = ((pictures[key].double() - start) * free).flatten(1)
        dot = (moved * target).sum(1)
        norms = moved.norm(dim=1) * target.norm(dim=1)
        cosine = torch.where(norms > 1e-6, dot / norms.clamp_min(1e-12), torch.zeros_like(dot))
        progress = dot / (target * target).sum(1).clamp_min(1e-12)
        name = key.split("/")[1]
        out[f"pictures:cosine@{name}"] = [round(float(v), 4) for v in cosine]
        out[f"pictures:progress@{name}"] = [round(float(v), 4) for v in progress]
    return out


def _z(values: np.ndarray) -> np.ndarray:
    std = values.std()
    return np.zeros_like(values) if std == 0 else (values - values.mean()) / std


#: Fusions of picture values with the paired score's parts (z-scores over the pair's images).
PICTURE_FUSIONS: dict[str, tuple[str, ...]] = {
    "fuse:objective+contrast+cosine": ("-default/objective/second_half", "contrast",
                                       "pictures:cosine@final"),
    "fuse:objective+contrast+progress": ("-default/objective/second_half", "contrast",
                                         "pictures:progress@final"),
    "fuse:contrast+cosine": ("contrast", "pictures:cosine@final"),
}


def pair_candidates(values: dict[str, list[float]], null: dict[str, list[float]] | None,
                    pictures: dict[str, list[float]], steps: int) -> dict[str, np.ndarray]:
    """Every candidate's scores of one pair's images (members first): the suite's own
    (``candidate_scores``, start-relative ones included) and the picture-based ones."""
    from cgidm_core.suite_scores import candidate_scores

    out = {name: scores for name, (_c, scores) in candidate_scores(values, steps, null).items()}
    merged = {**{k: np.asarray(v, dtype=float) for k, v in values.items()},
              **{k: np.asarray(v, dtype=float) for k, v in pictures.items()}}
    for name, arr in pictures.items():
        out[name] = np.asarray(arr, dtype=float)
    for name, parts in PICTURE_FUSIONS.items():
        if all(p.lstrip("-") in merged for p in parts):
            out[name] = np.sum([_z(-merged[p[1:]] if p.startswith("-") else merged[p])
                                for p in parts], axis=0)
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

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
        document = json.loads(path.read_text())
        document["null"] = aligned(lookup, document["files"])
        values, n1, _n0 = pair_slice(document, pair.holdout)
        null = null_slice(document, pair.holdout)
        pictures: dict[str, list[float]] = {}
        if path.with_suffix(".pt").is_file():
            every = picture_values(torch.load(path.with_suffix(".pt")))
            pictures, _, _ = pair_slice({**document, "values": every}, pair.holdout)
        steps = int(document["inversion"]["steps"])
        rows = {}
        for name, scores in pair_candidates(values, null, pictures, steps).items():
            if args.show is not None and name not in args.show and name not in REFERENCES:
                continue
            report = evaluate_scores(scores[:n1], scores[n1:], n_bootstrap=args.n_bootstrap,
                                     seed=0, target_fprs=())
            rows[name] = (report.auc, report.auc_ci_low, report.auc_ci_high)
        results.append({"pair": pair.pair_id, "strength": pair.strength, "rows": rows,
                        "null_values": null is not None})
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

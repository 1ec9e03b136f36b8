"""The latent family's recipe pairs: fine-tune (cached) and measure members vs hold-out.

    python -m benchmarks.latent_suite --list
    python -m benchmarks.latent_suite --recipes lora-attn-r16 --steps 1000 --seeds 0 \\
        --pgd-steps 30

Each pair (``cgidm_core.latent_suite_pairs``) is fine-tuned once into
``~/.cache/cgidm/suite/latent/<recipe>-s<seed>-<hash>/<steps>/`` and scored once, loaded as a
user's file is (``load_pair``: the LoRA unmerged, its prompt read from its own metadata), with
the raw values ``benchmarks.suite`` records per image (``cgidm_core.suite_scores.raw_values``:
one inversion, the loss attack, the 8- and the 64-draw contrasts), saved as
``values-<pgd steps>.json`` with the recovered pictures (``.pt``). From them: the AUC of the
verdict's score (``evidence``, the fusion ``cgidm eval --method evidence`` and ``cgidm check``
compute), of CGI-DM's similarity
alone (``cgidm``: masked SSIM of the recovery) and of the cheap scores (``loss``: the loss
attack; ``contrast``: CGI-DM's objective at the original), each with a stratified bootstrap
95 % interval. The table also gives each pair's recipe group
(for leave-one-group-out selection), its training steps and the drop of the members' loss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cgidm_core import latent_suite_pairs as lsp
from cgidm_core.names import VERDICT_CANDIDATE
from cgidm_core.stats import evaluate_scores

#: Table column -> the candidate of ``cgidm_core.suite_scores.candidate_scores`` it shows.
COLUMNS = {
    "evidence": VERDICT_CANDIDATE,  # the verdict's score (cgidm check, eval)
    "previous evidence": "fuse:objective+contrast",  # the verdict's score to 2026-12-08
    "old evidence": "fuse:ssim+psnr+loss+contrast",  # the verdict's score before #22's nulls
    "cgidm": "default:ssim@final",  # CGI-DM's similarity of the recovery alone
    "loss": "loss",
    "contrast": "contrast",
}
#: Model evaluations per image of each column (100 PGD steps: 600; loss attack 3; contrast 16;
#: the shared-draw contrast 128), the tie-break of the selection rule.
COSTS = {"evidence": 728, "previous evidence": 616, "old evidence": 619, "cgidm": 600, "loss": 3,
         "contrast": 16}


def null_of(doc: dict, cache: Path) -> dict[str, list[float]] | None:
    """The null values of a results document's images (``benchmarks.null_controls``; None
    where they are not cached yet): the paired candidates, the verdict's among them, need them."""
    from benchmarks.null_controls import aligned, null_lookup

    return aligned(null_lookup(cache, "latent", int(doc["inversion"]["steps"])), doc["files"])


def results_file(pair: lsp.LatentSuitePair, cache: Path, pgd_steps: int) -> Path:
    return pair.values_file(cache, pgd_steps)


def evaluate(pair: lsp.LatentSuitePair, cache: Path, pgd_steps: int) -> Path:
    """Raw values of members then hold-out, as ``benchmarks.suite`` records them (one default
    inversion, the loss attack and the contrast), cached by PGD steps; pictures beside them."""
    import functools
    import time

    import torch

    from benchmarks.cheap_values import add_missing_cheap
    from cgidm_core.api import load_pair
    from cgidm_core.images import load_image
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.suite_scores import LATENT_CHEAP_METHODS, raw_values

    out = results_file(pair, cache, pgd_steps)
    if out.is_file():
        if pair.model_dir(cache).exists():
            # one load for whatever the cached values lack (none when they lack nothing)
            load = functools.cache(lambda: load_pair(pair.base, str(pair.model_dir(cache)),
                                                     device="cpu"))
            add_missing_cheap(out, LATENT_CHEAP_METHODS, load,
                              [*pair.members, *pair.holdout_files])
            with_memorisation(pair, out, load)
        return out
    files = [*pair.members, *pair.holdout_files]
    started = time.perf_counter()
    loaded = load_pair(pair.base, str(pair.model_dir(cache)), device="cpu")
    raw = raw_values(loaded, [load_image(p) for p in files],
                     config=InversionConfig(steps=pgd_steps), variants={"default": {}},
                     cheap=LATENT_CHEAP_METHODS, keep_pictures=True)
    document = {"model": str(pair.model_dir(cache)), "pair": pair.pair_id, "group": pair.group,
                "files": [f"{p.parent.name}/{p.name}" for p in files],
                "n_members": len(pair.members), "holdouts": {"holdout": len(pair.holdout_files)},
                "prompt": loaded.default_prompt, "values": raw["values"],
                "seconds": raw["seconds"], "seconds_total": time.perf_counter() - started,
                "load_average": os.getloadavg()[0], "torch_threads": torch.get_num_threads(),
                "inversion": raw["inversion"],
                "training": json.loads(pair.facts_file(cache).read_text())}
    torch.save(raw["pictures"], out.with_suffix(".pt"))
    out.write_text(json.dumps(document, indent=2) + "\n")
    return out


def with_memorisation(pair: lsp.LatentSuitePair, out: Path, load: Callable[[], Any]) -> None:
    """Write the pair's memorisation gap (``cgidm_core.memorisation.pair_loss_drops``: the
    members' minus the hold-outs' relative loss drop, through the pair API, the pair from
    ``load()``) into its cached values, where ``benchmarks.suite``'s report reads it as the
    latent strength axis."""
    from benchmarks.cheap_values import write_document
    from cgidm_core.memorisation import pair_loss_drops

    document = json.loads(out.read_text())
    if document.get("memorisation"):
        return
    document["memorisation"] = pair_loss_drops(load(), list(pair.members),
                                               list(pair.holdout_files))
    write_document(out, document)


def summarise(pair: lsp.LatentSuitePair, cache: Path, results: Path) -> dict:
    """One table row: group, strength, and AUC [CI] of each column."""
    from cgidm_core.suite_scores import candidate_scores

    doc = json.loads(results.read_text())
    facts = doc["training"]
    scores = candidate_scores(doc["values"], doc["inversion"]["steps"], null_of(doc, cache))
    n1 = doc["n_members"]
    row = {"pair": pair.pair_id, "group": pair.group, "steps": pair.steps,
           "members_loss_drop": facts["members_loss_drop"],
           "members_loss_drop_relative": facts["members_loss_drop_relative"],
           "pgd_steps": doc["inversion"]["steps"], "seconds": doc["seconds_total"], "auc": {}}
    for column, candidate in COLUMNS.items():
        if candidate not in scores:  # a paired score whose null values are not cached yet
            row["auc"][column] = [float("nan"), float("nan"), float("nan")]
            continue
        values = scores[candidate][1]
        report = evaluate_scores(values[:n1], values[n1:], n_bootstrap=2000, seed=0)
        row["auc"][column] = ([round(report.auc, 3), round(report.auc_ci_low, 3),
                               round(report.auc_ci_high, 3)]
                              if report.auc_ci_low is not None else [round(report.auc, 3)])
    return row


def write_pictures(pictures_file: Path, n_members: int, out: Path, columns: int = 5,
                   scale: int = 4) -> Path:
    """Members' and hold-out's originals and recoveries (the masked half recovered, the kept
    half the original's) side by side: the evidence a person sees, at ``scale`` x."""
    import torch
    from PIL import Image, ImageDraw

    pictures = torch.load(pictures_file)
    original, recovered = pictures["original"], pictures["default/final"]
    side = original.shape[-1] * scale
    rows = [("members", range(columns)), ("hold-out", range(n_members, n_members + columns))]
    label_w = 120
    sheet = Image.new("RGB", (label_w + columns * side, 4 * side + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, indices) in enumerate(rows):
        for kind, images in ((0, original), (1, recovered)):
            y = (2 * r + kind) * side + 8 * r
            draw.text((4, y + side // 2 - 6),
                      f"{label}: {'original' if kind == 0 else 'recovered'}", fill="black")
            for c, i in enumerate(indices):
                array = ((images[i].permute(1, 2, 0).float() + 1) * 127.5).round().clamp(0, 255)
                tile = Image.fromarray(array.to(torch.uint8).numpy()).resize(
                    (side, side), Image.Resampling.NEAREST)
                sheet.paste(tile, (label_w + c * side, y))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def table(rows: list[dict]) -> str:
    head = ("| pair | group | steps | members' loss drop | " + " | ".join(COLUMNS) + " |\n|"
            + "---|" * (4 + len(COLUMNS)) + "\n")
    lines = []
    for r in rows:
        cells = [f"{a[0]:.2f} [{a[1]:.2f}, {a[2]:.2f}]" if len(a) == 3 else f"{a[0]:.2f}"
                 for a in (r["auc"][c] for c in COLUMNS)]
        lines.append(f"| {r['pair']} | {r['group']} | {r['steps']} | "
                     f"{r['members_loss_drop']:.4f} ({100 * r['members_loss_drop_relative']:.1f} %)"
                     f" | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def pair_scores(results: Path, cache: Path | None = None
                ) -> tuple[dict[str, tuple[list[float], list[float]]], dict[str, int]]:
    """Every candidate score of one evaluated pair (``cgidm_core.suite_scores.
    candidate_scores``: the inversion's similarities at each step, its objective, the cheap
    scores and their fusions) as (members' scores, hold-out's scores), and each one's cost in
    model evaluations per image."""
    from cgidm_core.suite_scores import candidate_scores

    doc = json.loads(results.read_text())
    n1 = doc["n_members"]
    scores = candidate_scores(doc["values"], doc["inversion"]["steps"],
                              null_of(doc, cache or lsp.default_cache()))
    return ({name: (list(map(float, v[:n1])), list(map(float, v[n1:])))
             for name, (_c, v) in scores.items()},
            {name: c.evaluations for name, (c, _v) in scores.items()})


def _auc(members: list[float], others: list[float]) -> float:
    import numpy as np

    from cgidm_core.held_out import _auc as auc

    return auc(np.asarray(members), np.asarray(others))


#: Which candidates a selection may choose from: the table's columns, every candidate, or only
#: those that need no inversion (is CGI-DM's inversion worth its 600 evaluations per image?).
POOLS = ("columns", "all", "no-inversion")


def held_out(rows: list[dict], scores: dict[str, dict] | None = None,
             pool: str = "columns", n_bootstrap: int = 1000) -> str:
    """Leave one recipe group out (``cgidm_core.held_out``): the score chosen among the pool on
    all groups but one, measured on the group left out; the headline, with in-sample beside it.

    ``scores[pair_id]`` (from :func:`pair_scores`) gives the held-out worst and mean their
    bootstrap intervals and, for pools other than ``columns``, the candidates to choose from.
    """
    from cgidm_core.held_out import leave_one_group_out

    groups = {r["pair"]: r["group"] for r in rows}
    if pool == "columns":
        aucs = {c: {r["pair"]: r["auc"][c][0] for r in rows} for c in COLUMNS}
        costs = COSTS
        per_image = ({c: {p: scores[p][0][cand] for p in groups}
                      for c, cand in COLUMNS.items()} if scores else None)
    else:
        if not scores:
            raise ValueError(f"pool {pool!r} needs the per-image scores")
        names = set.intersection(*(set(scores[p][0]) for p in groups))
        if pool == "no-inversion":
            names = {n for n in names
                     if ("/" not in n and ":" not in n) or n == "fuse:loss+contrast"}
        names = sorted(names)
        per_image = {n: {p: scores[p][0][n] for p in groups} for n in names}
        aucs = {n: {p: _auc(*per_image[n][p]) for p in groups} for n in names}
        costs = {n: scores[next(iter(groups))][1][n] for n in names}
    report = leave_one_group_out(aucs, groups, costs=costs, scores=per_image,
                                 n_bootstrap=n_bootstrap if per_image else 0)
    lines = [f"choosing among {len(report.candidates)} candidate(s) ({pool}):", "",
             "| group left out | chosen on the others | held-out worst | held-out mean |",
             "|---|---|---|---|"]
    lines += [f"| {f.group} | {f.chosen} | {f.worst:.2f} | {f.mean:.3f} |" for f in report.folds]

    def ci(interval: tuple[float, float] | None) -> str:
        return f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""

    lines.append(f"\nheld-out worst / mean {report.held_out_worst:.2f}"
                 f"{ci(report.held_out_worst_ci)} / {report.held_out_mean:.3f}"
                 f"{ci(report.held_out_mean_ci)}; in-sample ({report.in_sample_choice}) "
                 f"{report.in_sample_worst:.2f} / {report.in_sample_mean:.3f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=None, choices=list(lsp.RECIPES))
    parser.add_argument("--steps", nargs="*", type=int, default=None)
    parser.add_argument("--seeds", nargs="*", type=int, default=None)
    parser.add_argument("--pgd-steps", type=int, default=100,
                        help="CGI-DM inversion steps (the default preset's 100 unless CPU-bound)")
    parser.add_argument("--cache", type=Path, default=lsp.default_cache())
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--no-eval", action="store_true", help="only fine-tune")
    parser.add_argument("--report-only", action="store_true",
                        help="tabulate the pairs already evaluated at --pgd-steps; train nothing")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--pictures", type=Path, default=None,
                        help="PNG of the first pair's members' and hold-out's recoveries")
    args = parser.parse_args(argv)
    pairs = lsp.latent_suite_pairs(recipes=tuple(args.recipes or ()) or None,
                                   steps=tuple(args.steps or ()) or None,
                                   seeds=tuple(args.seeds or ()) or None)
    if args.list:
        for pair in pairs:
            state = "trained" if pair.facts_file(args.cache).is_file() else "not trained"
            print(f"{pair.pair_id:<40} {pair.group:<18} {state}  {pair.model_dir(args.cache)}")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    if args.report_only:
        pairs = [p for p in pairs if results_file(p, args.cache, args.pgd_steps).is_file()]
    for pair in pairs:
        if not pair.facts_file(args.cache).is_file():
            lsp.train_run(pair, args.cache)
        if args.no_eval:
            continue
        rows.append(summarise(pair, args.cache,
                              evaluate(pair, args.cache, args.pgd_steps)))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    if rows:
        print(table(rows))
        if len({r["group"] for r in rows}) > 1:
            scores = {pair.pair_id: pair_scores(results_file(pair, args.cache, args.pgd_steps),
                                                args.cache)
                      for pair in pairs if pair.pair_id in {r["pair"] for r in rows}}
            for pool in POOLS:
                print(held_out(rows, scores, pool))
    if args.pictures and rows:
        first = results_file(pairs[0], args.cache, args.pgd_steps).with_suffix(".pt")
        print("wrote", write_pictures(first, len(pairs[0].members), args.pictures))
    if args.json and rows:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The power table: how many images and controls a set-level p < 0.01 needs, per strength.

    .venv/bin/cgidm eval --pretrained demo-base --finetuned demo-vangogh \\
        --members ../shared/data/wikiart-vangogh/membership \\
        --holdout ../shared/data/wikiart-vangogh/hold_out --method evidence --json strong.json
    (the same with demo-vangogh-light -> light.json)
    .venv/bin/python -m benchmarks.power --eval strong=strong.json --eval light=light.json
    .venv/bin/python -m benchmarks.power --render-only      # docs snippet from the stored table

For each strength: draw n images from the members and m controls from the hold-out (with
replacement), score them as the verdict does (the values of the verdict's default score z-scored
over the n + m images and summed, ``cgidm_core.evidence``) and run the set test of
``build_evidence`` (one-sided Mann-Whitney U, ``cgidm_core.stats.controls_test``); the power of
a cell is the share of draws with p < 0.01. Resampling 10 + 10 measured images repeats the same
values, which would tie and push the test onto its normal approximation; a smoothed bootstrap
breaks the ties (each drawn image's values get Gaussian noise of ``JITTER`` of that value's
standard deviation over the pair), so the exact test runs as it does on a user's images. With
``--suite-json`` (a ``python -m benchmarks.suite --json`` summary) the verdict's per-image
scores of every suite pair are pooled per strength and resampled as they are (already fused).

Writes ``cgidm_core/power_table.json`` (what ``cgidm check`` reads) and
``docs/power_table.md`` (the snippet the README and docs/ACCURACY.md show).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = (3, 5, 10, 20, 40)
CONTROLS = (5, 10, 20, 40, 80)
ALPHA = 0.01
POWER_TARGET = 0.8
JITTER = 0.1


def _components() -> tuple[str, ...]:
    """The values the verdict's default score fuses (``cgidm_core.evidence``), read from there so
    the table follows a change of the default instead of keeping its own copy."""
    from cgidm_core.evidence import DEFAULT_EVIDENCE, EVIDENCE_COMPONENTS

    return EVIDENCE_COMPONENTS[DEFAULT_EVIDENCE]


def _values(record: dict[str, Any]) -> list[float]:
    from cgidm_core.evidence import DEFAULT_EVIDENCE, component_values

    return component_values(record, DEFAULT_EVIDENCE)


def from_eval(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """Members' and hold-out images' verdict values (rows) from a ``cgidm eval --method
    evidence --json`` file, and its AUC."""
    document = json.loads(path.read_text())
    rows = {"member": [], "holdout": []}
    for record in document["images"]:
        if record["set"] in rows:
            rows[record["set"]].append(_values(record))
    return np.array(rows["member"]), np.array(rows["holdout"]), float(document["auc"])


def _fused(values: np.ndarray) -> np.ndarray:
    """The verdict's score of these images (z-scores over exactly them, summed)."""
    std = values.std(axis=0)
    std[std == 0] = 1.0
    return ((values - values.mean(axis=0)) / std).sum(axis=1)


def power_grid(members: np.ndarray, controls: np.ndarray, *, fuse: bool, reps: int,
               seed: int, images: tuple[int, ...] = IMAGES,
               control_counts: tuple[int, ...] = CONTROLS) -> list[dict[str, Any]]:
    """Share of draws with set-level p < ALPHA for every (images, controls) cell."""
    from cgidm_core.stats import controls_test

    rng = np.random.default_rng(seed)
    pooled = np.concatenate([members, controls])
    scale = JITTER * pooled.std(axis=0)
    grid = []
    for n in images:
        for m in control_counts:
            hits = 0
            for _ in range(reps):
                a = members[rng.integers(0, len(members), n)]
                b = controls[rng.integers(0, len(controls), m)]
                a = a + rng.normal(0, 1, a.shape) * scale
                b = b + rng.normal(0, 1, b.shape) * scale
                if fuse:
                    scores = _fused(np.concatenate([a, b]))
                    a_s, b_s = scores[:n], scores[n:]
                else:
                    a_s, b_s = a, b
                hits += controls_test(a_s, b_s, alpha=0.05).p_value < ALPHA
            grid.append({"images": n, "controls": m, "power": round(hits / reps, 3)})
    return grid


def smallest(grid: list[dict[str, Any]]) -> dict[str, int] | None:
    """The cell with the fewest images + controls reaching the power target (fewer images
    first on a tie): what a rights holder is told to bring."""
    ok = [c for c in grid if c["power"] >= POWER_TARGET]
    if not ok:
        return None
    best = min(ok, key=lambda c: (c["images"] + c["controls"], c["images"]))
    return {"images": best["images"], "controls": best["controls"]}


def render(table: dict[str, Any]) -> str:
    """The markdown snippet (docs/power_table.md) from the stored table."""
    lines = [
        f"Power of the set test (one-sided Mann-Whitney U of `build_evidence`, p < "
        f"{table['alpha']:g}) by number of images (rows) and controls (columns), "
        f"{table['reps']} resampled sets per cell; measured on {table['measured_on']}. "
        f"Needed = fewest images + controls reaching {round(100 * table['power_target'])} % "
        "power (what `cgidm check` prints when a set is too small to decide).",
        "",
    ]
    for row in table["strengths"]:
        need = row["needed"]
        lines += [
            f"**{row['name']}** ({row['source']}; AUC of the verdict's score on its "
            f"{row['n_members']} + {row['n_holdout']} images {row['auc']:.2f}): needed "
            + (f"**{need['images']} images and {need['controls']} controls**" if need else
               "**more than the table's largest cell**") + ".",
            "",
            "| images \\ controls | " + " | ".join(str(m) for m in table["controls"]) + " |",
            "|---|" + "---|" * len(table["controls"]),
        ]
        for n in table["images"]:
            cells = [next(c["power"] for c in row["grid"] if c["images"] == n
                          and c["controls"] == m) for m in table["controls"]]
            lines.append(f"| {n} | " + " | ".join(f"{p:.2f}" for p in cells) + " |")
        lines.append("")
    lines.append(table["method"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from cgidm_core.power_table import TABLE_FILE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", action="append", default=[],
                        help="NAME=cgidm-eval-evidence.json (a strength and its eval file)")
    parser.add_argument("--source", action="append", default=[],
                        help="NAME=what the fine-tune is (for the table)")
    parser.add_argument("--suite-json", type=Path, help="a benchmarks.suite --json summary")
    parser.add_argument("--reps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", type=Path, default=TABLE_FILE)
    parser.add_argument("--snippet", type=Path, default=REPO_ROOT / "docs" / "power_table.md")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--update", action="store_true",
                        help="keep the stored table's rows and add (or replace, by name) the "
                        "rows measured now: a row needs only its own pair's values, so adding "
                        "one does not rebuild the others' (e.g. the suite's) caches")
    args = parser.parse_args(argv)
    if not args.render_only:
        sources = dict(s.split("=", 1) for s in args.source)
        strengths = []
        started = time.perf_counter()
        for item in args.eval:
            name, path = item.split("=", 1)
            members, holdout, auc = from_eval(Path(path))
            grid = power_grid(members, holdout, fuse=True, reps=args.reps, seed=args.seed)
            strengths.append({"name": name, "source": sources.get(name, Path(path).name),
                              "auc": auc, "n_members": len(members), "n_holdout": len(holdout),
                              "grid": grid, "needed": smallest(grid)})
        if args.suite_json:
            strengths += suite_strengths(args.suite_json, args.reps, args.seed)
        seconds = time.perf_counter() - started
        if args.update:
            strengths = merged_strengths(json.loads(args.table.read_text()), strengths,
                                         args.reps)
        measured = ", ".join(f"{s['source'].split(' (')[0]} ({s['name']})" for s in strengths)
        table = {
            "alpha": ALPHA, "power_target": POWER_TARGET, "reps": args.reps,
            "images": list(IMAGES), "controls": list(CONTROLS), "strengths": strengths,
            "measured_on": measured,
            "method": (
                "How: for every cell, n images drawn from the pair's members and m controls "
                "from its hold-out, with replacement, each drawn image's values of the "
                f"verdict's score ({', '.join(_components())}) jittered by Gaussian noise of "
                f"{JITTER:g} of their standard deviation (a smoothed bootstrap: no repeated "
                "values), fused as the verdict fuses them (z-scores over the n + m images) and "
                "tested as `build_evidence` tests them. What it does not show: 10 + 10 "
                "measured images stand for every painting a rights holder might bring; a "
                "user's controls may differ more (or less) from the members than a "
                "held-out painting of the same artist does; other models and recipes than "
                "these fine-tunes of the 32 px demo models (the pixel model's, and one LoRA of the "
                "latent text-conditioned model) are not measured. "
                f"Seconds to compute: {seconds:.0f}"
                + (" (the rows added by this update)." if args.update else ".")),
        }
        args.table.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {args.table}")
    table = json.loads(args.table.read_text())
    text = render(table)
    args.snippet.write_text(text)
    print(text)
    return 0


def merged_strengths(stored: dict[str, Any], new: list[dict[str, Any]], reps: int
                     ) -> list[dict[str, Any]]:
    """The stored table's rows with ``new`` added, a stored row of the same name replaced in
    place. Refuses to mix tables whose cells were measured differently (grid or reps), which
    would make their rows incomparable."""
    if stored["reps"] != reps or stored["images"] != list(IMAGES) or \
            stored["controls"] != list(CONTROLS):
        raise SystemExit(f"the stored table was measured with {stored['reps']} reps on images "
                         f"{stored['images']} x controls {stored['controls']}; rerun every row "
                         "(without --update) or use the same settings")
    out = list(stored["strengths"])
    names = [row["name"] for row in out]
    for row in new:
        if row["name"] in names:
            out[names.index(row["name"])] = row
        else:
            out.append(row)
    return out


def suite_strengths(path: Path, reps: int, seed: int) -> list[dict[str, Any]]:
    """Per strength of the suite: the verdict's per-image scores of every pair, pooled."""
    from cgidm_core.names import VERDICT_CANDIDATE

    summary = json.loads(path.read_text())
    by_strength: dict[str, tuple[list[float], list[float], list[float]]] = {}
    for pair in summary["pairs"]:
        scores = (pair.get("scores") or {}).get(VERDICT_CANDIDATE)
        if not scores:
            continue
        strength = pair.get("strength") or pair["pair"].split("/")[1]
        members, others, aucs = by_strength.setdefault(strength, ([], [], []))
        members += scores[0]
        others += scores[1]
        aucs.append(pair["rows"][VERDICT_CANDIDATE]["auc"])
    out = []
    for strength, (members, others, aucs) in by_strength.items():
        grid = power_grid(np.array(members)[:, None], np.array(others)[:, None], fuse=False,
                          reps=reps, seed=seed)
        out.append({"name": f"suite {strength}", "source": f"{len(aucs)} suite pairs "
                    "(scores fused per pair, pooled)", "auc": float(np.mean(aucs)),
                    "n_members": len(members), "n_holdout": len(others), "grid": grid,
                    "needed": smallest(grid)})
    return out


if __name__ == "__main__":
    raise SystemExit(main())

"""How many images and controls a set-level p < 0.01 needs: the power table, and the advice
``cgidm check`` prints from it.

Why one module, torch- and numpy-free: the table is measured once by ``benchmarks/power.py``
(resampling per-image evidence of members and controls of fine-tunes of known strength) and
written to ``power_table.json`` next to this file; ``cgidm check`` and ``cgidm submit`` print
advice from it when a set is too small to decide, and the docs generator renders the same file,
so the numbers a user reads in the terminal and in the README are one set of numbers.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

#: The measured table (written by ``python -m benchmarks.power``).
TABLE_FILE = Path(__file__).with_name("power_table.json")


@lru_cache(maxsize=1)
def load_table(path: str | None = None) -> dict[str, Any]:
    """The power table: ``{"alpha", "power_target", "strengths": [{"name", "source",
    "auc", "grid": [{"images", "controls", "power"}], "needed": {"images", "controls"} | None}],
    "method"}``."""
    return cast("dict[str, Any]", json.loads(Path(path or TABLE_FILE).read_text()))


def needed(table: dict[str, Any]) -> list[tuple[str, int | None, int | None]]:
    """(strength, images, controls) the table says reach its power target, per strength."""
    out = []
    for row in table["strengths"]:
        need = row.get("needed") or {}
        out.append((row["name"], need.get("images"), need.get("controls")))
    return out


def advice(n_images: int, n_controls: int, set_p: float | None,
           table: dict[str, Any] | None = None) -> str | None:
    """A sentence for a set too small to decide, else None.

    "Too small to decide": the set-level p is not below the table's alpha (0.01) and the set
    has fewer images or fewer controls than the weakest fine-tune of the table needs. A set
    that already reached p < alpha, or that is as large as the table asks for, gets no advice:
    more images would not change what the table can say.
    """
    table = table or load_table()
    alpha = float(table["alpha"])
    if set_p is not None and set_p < alpha:
        return None
    rows = [(name, i, c) for name, i, c in needed(table) if i is not None and c is not None]
    if not rows:
        return None
    most_images = max(i for _, i, _ in rows)
    most_controls = max(c for _, _, c in rows)
    if n_images >= most_images and n_controls >= most_controls:
        return None
    power = round(100 * float(table["power_target"]))
    parts = [f"{name} fine-tune: {i} images and {c} controls" for name, i, c in rows]
    unreached = [row["name"] for row in table["strengths"] if not row.get("needed")]
    tail = (f"; for a {', '.join(unreached)} fine-tune no size in the table reached it"
            if unreached else "")
    shown = "no set test" if set_p is None else f"set-level p = {set_p:.3g}"
    images = f"{n_images} image" + ("" if n_images == 1 else "s")
    controls = f"{n_controls} control" + ("" if n_controls == 1 else "s")
    return (f"too few to decide ({images}, {controls}, {shown}): "
            f"for a set-level p < {alpha:g} with {power} % power the power table "
            f"(docs/ACCURACY.md, measured on {table['measured_on']}) needs, for a "
            + "; ".join(parts) + tail + ".")

"""Cheap scores added since a raw-values document was cached, computed into it in place.

Why: a suite pair's or a null's raw values hold hours of inversions; a cheap score that joins
the candidates later (PIAN, the shared-draw contrast) costs seconds per model. Recomputing the
document would throw the inversions away; this scores the same images, in the document's order,
with the missing methods only and writes them beside the cached values (atomically). One place
for it, because the pixel suite, the latent suite and the null controls all keep such documents
(and the benchmark modules must not import each other).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def missing_methods(document: dict[str, Any], methods: Sequence[str]) -> list[str]:
    """The methods of ``methods`` that ``document["values"]`` does not hold yet."""
    return [m for m in methods if m not in document["values"]]


def add_missing_cheap(path: Path, methods: Sequence[str], load: Callable[[], Any],
                      files: Sequence[Path], log: Callable[[str], None] = print
                      ) -> dict[str, Any]:
    """The document at ``path`` with every method of ``methods`` it lacks scored on ``files``
    (its images in its order) with the pair ``load()`` returns; written back when anything was
    added. ``load`` is called only when something is missing."""
    from cgidm_core.evaluation import score_images_detailed
    from cgidm_core.images import load_image
    from cgidm_core.inversion import InversionConfig

    document: dict[str, Any] = json.loads(path.read_text())
    missing = missing_methods(document, methods)
    if not missing:
        return document
    recorded = document.get("files")
    names = [f"{p.parent.name}/{p.name}" for p in files]
    if recorded and list(recorded) != names:
        raise ValueError(f"{path} was scored on other images than the {len(files)} given: "
                         "its cached values would not line up")
    log(f"cheap scores {', '.join(missing)} for {path.name} ({len(files)} images)")
    pair = load()
    pictures = [load_image(p) for p in files]
    for method in missing:
        scored = score_images_detailed(pair, pictures, method, seed=InversionConfig().seed,
                                       batch_size=20)
        document["values"][method] = [float(v) for v in scored.scores]
        document.setdefault("seconds", {})[method] = scored.seconds
    write_document(path, document)
    return document


def write_document(path: Path, document: dict[str, Any]) -> None:
    """Replace the cached document at ``path`` atomically (a reader never sees half of it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(path)


__all__ = ["add_missing_cheap", "missing_methods", "write_document"]

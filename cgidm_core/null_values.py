"""What an image scores with NO fine-tune: the null values paired scores subtract.

Why: a 0-step LoRA (the fine-tune is the base itself) still got verdict AUC 0.84 on the Van Gogh
split, because with zero contrast the recovery never leaves its starting point and the members'
masked halves happened to be closer to that start than the hold-outs'. A score that separates
members from hold-outs with no fine-tune measures the images, not the training. Subtracting the
same image's value under a *null* recovery removes what the image itself contributes:

- ``start/<metric>``: the starting point of the PGD (``pair.decode(z_start)``, the kept half and
  the free cells at their start). Depends only on the image, the mask and the VAE; it is exactly
  the recovery of a pair whose fine-tune is the base (zero contrast, zero gradient), so a
  "gain over the start" is exactly 0 for every image of such a pair.
- ``base/<metric>``: the base model's own recovery (``cgidm_core.base_recovery``): the same PGD
  with the same seeds on the base's denoising loss alone. ``cgidm check`` and the service
  compute it by default.

Both depend only on (base, image, prompt, inversion settings), never on the fine-tune, so they
are computed once per base and image and cached apart from the per-pair results
(``<suite cache>/null/<base>-<key>/<image>.json``): the per-pair caches and their keys stay as
they were. The per-image seeds are those of the pairs' inversions (``images.image_seed`` of the
image tensor at the pair's size), so a difference is not noise of other draws.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .inversion import InversionConfig

#: The similarity metrics recorded for each null recovery (those the verdict's candidates use).
NULL_METRICS: tuple[str, ...] = ("ssim", "psnr")
#: The null recoveries: the PGD's starting point and the base model's own recovery.
NULL_KINDS: tuple[str, ...] = ("start", "base")


def _file_id(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def null_dir(cache: Path, base: str, base_fingerprint: str, prompt: str,
             config: InversionConfig) -> Path:
    """The cache folder of one base, prompt and inversion setting (the fine-tune plays no part)."""
    settings = {k: v for k, v in config.to_dict().items() if k != "base_recovery"}
    blob = json.dumps({"base": base_fingerprint, "prompt": prompt, "config": settings,
                       "metrics": NULL_METRICS, "version": 1}, sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return cache / "null" / f"{Path(base).name}-{key}"


def cached_null_values(folder: Path, files: Sequence[Path]) -> dict[str, list[float]] | None:
    """``{"start/ssim": [...], "base/psnr": [...], ...}`` for ``files`` in order, or None when
    any image has not been computed yet."""
    rows = []
    for path in files:
        entry = folder / f"{path.parent.name}__{path.stem}-{_file_id(path)}.json"
        if not entry.is_file():
            return None
        rows.append(json.loads(entry.read_text())["values"])
    return {k: [float(r[k]) for r in rows] for k in rows[0]} if rows else {}


def compute_null_values(pair: Any, files: Sequence[Path], folder: Path,
                        config: InversionConfig, *, batch_size: int = 10,
                        log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Each image's null values, computed where missing (written per image as each batch
    finishes, so a stopped run keeps what it made) and read from ``folder`` otherwise.

    ``pair``'s base and prompt (``pair.default_prompt``) are the ones the suite's pairs use; its
    fine-tune is not used. Seeds: ``image_seed`` of each image tensor, as ``raw_values`` and
    ``authenticate`` seed their inversions.
    """
    from .base_recovery import base_denoising_loss
    from .images import image_seed, load_image, to_tensor
    from .inversion import invert
    from .similarity import compute_metrics

    folder.mkdir(parents=True, exist_ok=True)
    entries = [folder / f"{p.parent.name}__{p.stem}-{_file_id(p)}.json" for p in files]
    todo = [i for i, e in enumerate(entries) if not e.is_file()]
    cond = pair.conditioning(pair.default_prompt)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        tensor = to_tensor([load_image(files[i]) for i in chunk], pair.image_size)
        seeds = [image_seed(img, config.seed) for img in tensor]
        out = invert(pair, tensor, cond, config, seeds=seeds, objective=base_denoising_loss)
        assert out.start is not None
        start_vals = compute_metrics(out.original, out.start, out.mask, list(NULL_METRICS))
        base_vals = compute_metrics(out.original, out.recovered, out.mask, list(NULL_METRICS))
        for j, i in enumerate(chunk):
            values = {**{f"start/{m}": float(start_vals[m][j]) for m in NULL_METRICS},
                      **{f"base/{m}": float(base_vals[m][j]) for m in NULL_METRICS}}
            entries[i].write_text(json.dumps({
                "file": f"{files[i].parent.name}/{files[i].name}", "seed": seeds[j],
                "prompt": pair.default_prompt, "values": values}, indent=1))
        if log:
            log(f"  null values: {min(start + batch_size, len(todo))}/{len(todo)} images")
    result = cached_null_values(folder, files)
    assert result is not None
    return result

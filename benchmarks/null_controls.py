"""Null controls of the verdict's candidate scores: what they give with NO fine-tune.

    python -m benchmarks.null_controls            # compute what is missing (cached), then print
    python -m benchmarks.null_controls --report-only

Two things per family, both cached under ``<suite cache>/null`` (the per-pair caches and their
keys are left as they are):

- the *null pairs*: the base against itself, scored by every candidate on the suite's own
  splits. Pixel: ``demo-base`` vs ``demo-base`` on Van Gogh split A and the DreamBooth
  easy / hard splits (one evaluation of the 50 images, as ``benchmarks.suite`` evaluates a
  pair); latent: the 0-step checkpoint of ``benchmarks.latent_continuum`` (a LoRA still zero,
  already evaluated there). A candidate that separates members from hold-outs here is biased.
- the *null values* of every suite image (``cgidm_core.null_values``: the PGD's starting point
  and the base model's own recovery), which the paired candidates subtract.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PIXEL_BASE = "demo-base"
#: The pixel null pair's splits: (split, hold-out set) as the suite names them.
PIXEL_NULL_SPLITS: tuple[tuple[str, str], ...] = (
    ("vangogh-a", "holdout"), ("dreambooth", "easy"), ("dreambooth", "hard"))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pixel_files(data: Path | None) -> list[Path]:
    """Every image of the pixel null splits, each once, in a fixed order."""
    from cgidm_core.suite_pairs import splits

    out: list[Path] = []
    for name, _holdout in PIXEL_NULL_SPLITS:
        split = splits(data)[name]
        for p in [*split.members, *(q for h in split.holdouts.values() for q in h)]:
            if p not in out:
                out.append(p)
    return out


def _base_fingerprint(reference: str) -> str:
    import hashlib

    from cgidm_core.demo import resolve_model_reference

    root = resolve_model_reference(reference)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".txt", ".bin"):
            h.update(f"{p.relative_to(root)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:12]


def pixel_base_against_itself():
    """``demo-base`` as both models of a pair. ``load_pair`` refuses two identical models (a
    user's mistake), so the pair is loaded with the shipped fine-tune ``demo-vangogh`` and its
    fine-tuned UNet is then replaced by a copy of the base's."""
    import copy

    from cgidm_core.api import load_pair

    pair = load_pair(PIXEL_BASE, "demo-vangogh")
    pair.unet_finetuned = copy.deepcopy(pair.unet_pretrained)
    pair.prediction_type_finetuned = pair.prediction_type
    return pair


def pixel_null_pair_path(cache: Path) -> Path:
    """The pixel null pair's raw values (keyed like a suite pair: settings and images)."""
    import hashlib

    from cgidm_core.inversion import InversionConfig

    blob = json.dumps({"config": InversionConfig().to_dict(), "base": _base_fingerprint(
        PIXEL_BASE), "files": [p.name for p in pixel_files(None)], "version": 1},
        sort_keys=True, default=str)
    return cache / "null" / f"pixel-null-pair-{hashlib.sha256(blob.encode()).hexdigest()[:10]}.json"


def pixel_null_pair(cache: Path, compute: bool) -> dict | None:
    """Raw values (``suite_scores.raw_values``) of ``demo-base`` vs itself on every pixel
    null-split image, computed once and cached."""
    out = pixel_null_pair_path(cache)
    if out.is_file():
        return json.loads(out.read_text())
    if not compute:
        return None
    from cgidm_core.images import load_image
    from cgidm_core.suite_scores import raw_values

    files = pixel_files(None)
    log(f"pixel null pair: {PIXEL_BASE} vs itself, {len(files)} images")
    started = time.perf_counter()
    pair = pixel_base_against_itself()
    raw = raw_values(pair, [load_image(p) for p in files], variants={"default": {}}, log=log)
    document = {"model": f"{PIXEL_BASE} (the base itself)",
                "files": [f"{p.parent.name}/{p.name}" for p in files],
                "values": raw["values"], "seconds": raw["seconds"],
                "seconds_total": time.perf_counter() - started,
                "inversion": raw["inversion"], "load_average": os.getloadavg()[0]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document))
    return document


def pixel_null_folder(cache: Path) -> Path:
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.null_values import null_dir

    return null_dir(cache, PIXEL_BASE, _base_fingerprint(PIXEL_BASE), "", InversionConfig())


def latent_control(cache: Path):
    """The latent 0-step pair (``latent_suite_pairs.continuum_pairs``, 0 steps)."""
    from cgidm_core import latent_suite_pairs as lsp

    return lsp.continuum_pairs(steps=(0,))[0]


def latent_null_folder(cache: Path, pgd_steps: int, prompt: str) -> Path:
    from cgidm_core import latent_suite_pairs as lsp
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.null_values import null_dir

    return null_dir(cache, lsp.LATENT_BASE, _base_fingerprint(lsp.LATENT_BASE), prompt,
                    InversionConfig(steps=pgd_steps))


#: The prompt every latent suite pair's fine-tune carries in its metadata (read by load_pair);
#: the base recovery is conditioned on it, as in the pairs' inversions.
LATENT_PROMPT = "a painting in sks style"


def compute(args: argparse.Namespace) -> None:
    from cgidm_core.api import load_pair
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.null_values import compute_null_values

    if "latent" in args.families:
        control = latent_control(args.cache)
        pair = load_pair(control.base, str(control.model_dir(args.cache)), device="cpu")
        if pair.default_prompt != LATENT_PROMPT:
            raise SystemExit(f"the latent control's prompt is {pair.default_prompt!r}, not "
                             f"{LATENT_PROMPT!r}: update LATENT_PROMPT")
        files = [*control.members, *control.holdout_files]
        log(f"latent null values: {len(files)} images")
        compute_null_values(pair, files, latent_null_folder(args.cache, args.latent_pgd_steps,
                                                            LATENT_PROMPT),
                            InversionConfig(steps=args.latent_pgd_steps), log=log)
    if "pixel" in args.families:
        files = pixel_files(None)
        pair = pixel_base_against_itself()
        log(f"pixel null values: {len(files)} images")
        compute_null_values(pair, files, pixel_null_folder(args.cache), InversionConfig(),
                            log=log)
        pixel_null_pair(args.cache, compute=True)


def _entries(folder: Path) -> dict[str, dict[str, float]]:
    """Every cached image of one null folder: ``"parent/name" -> its null values``."""
    out: dict[str, dict[str, float]] = {}
    for entry in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        document = json.loads(entry.read_text())
        out[document["file"]] = dict(document["values"])
    return out


def latent_control_document(cache: Path, pgd_steps: int) -> dict | None:
    from benchmarks import latent_suite as ls

    path = ls.results_file(latent_control(cache), cache, pgd_steps)
    return json.loads(path.read_text()) if path.is_file() else None


def null_lookup(cache: Path, family: str, pgd_steps: int = 100) -> dict[str, dict[str, float]]:
    """``"parent/name" -> {"start/ssim", "start/psnr", "base/ssim", "base/psnr", "base/loss"}``
    for every image of ``family`` whose null values are cached (``base/loss``: the loss attack
    of the base itself, from the family's null pair)."""
    if family == "pixel":
        lookup = _entries(pixel_null_folder(cache))
        null_pair = pixel_null_pair(cache, compute=False)
    else:
        lookup = _entries(latent_null_folder(cache, pgd_steps, LATENT_PROMPT))
        null_pair = latent_control_document(cache, pgd_steps)
    if null_pair:
        for i, name in enumerate(null_pair["files"]):
            lookup.setdefault(name, {})["base/loss"] = float(null_pair["values"]["loss"][i])
    return lookup


def aligned(lookup: dict[str, dict[str, float]], files: list[str]
            ) -> dict[str, list[float]] | None:
    """The null values of ``files`` in order, keys every one of them has; None if any image has
    none."""
    rows = [lookup.get(f) for f in files]
    if not rows or any(not r for r in rows):
        return None
    keys = set.intersection(*(set(r) for r in rows))  # type: ignore[arg-type]
    return {k: [r[k] for r in rows] for k in sorted(keys)}  # type: ignore[index]


@dataclass(frozen=True)
class NullView:
    """A null pair as ``benchmarks.suite.evaluate_pair`` reads a pair."""

    pair_id: str
    family: str
    holdout: str = "holdout"
    recipe_group: str = "null"
    strength: str = "0"


def _split_document(document: dict, files: list[str], n_members: int) -> dict:
    index = [document["files"].index(f) for f in files]
    out = {"files": files, "n_members": n_members,
           "holdouts": {"holdout": len(files) - n_members},
           "inversion": document.get("inversion") or {},
           "values": {k: [v[i] for i in index] for k, v in document["values"].items()}}
    if document.get("null"):
        out["null"] = {k: [v[i] for i in index] for k, v in document["null"].items()}
    return out


def null_pair_results(cache: Path, n_bootstrap: int, pgd_steps: int = 100) -> list[dict]:
    """Every candidate's AUC on the null pairs of both families (those cached)."""
    from benchmarks.suite import evaluate_pair
    from cgidm_core.suite_pairs import splits

    results = []
    pixel = pixel_null_pair(cache, compute=False)
    if pixel:
        pixel = {**pixel, "null": aligned(null_lookup(cache, "pixel"), pixel["files"])}
        for name, holdout in PIXEL_NULL_SPLITS:
            split = splits(None)[name]
            files = [f"{p.parent.name}/{p.name}" for p in
                     (*split.members, *split.holdouts[holdout])]
            document = _split_document(pixel, files, len(split.members))
            results.append(evaluate_pair(document, NullView(
                f"null/pixel/{name}/{holdout}", "pixel"), n_bootstrap))
    latent = latent_control_document(cache, pgd_steps)
    if latent:
        latent = {**latent, "null": aligned(null_lookup(cache, "latent", pgd_steps),
                                            latent["files"])}
        results.append(evaluate_pair(latent, NullView("null/latent/lora-attn-r16/0", "latent"),
                                     n_bootstrap))
    return results


#: The eligibility rule (docs/ACCURACY.md, "Null controls"): on every null pair it was measured
#: on, a candidate's AUC must lie in this band AND its 95 % interval must contain 0.5.
NULL_BAND: tuple[float, float] = (0.35, 0.65)


def eligibility(null_results: list[dict]) -> dict[str, str]:
    """candidate -> "" when eligible, else why not (the first null pair it fails on)."""
    verdict: dict[str, str] = {}
    names = {n for r in null_results for n in r["rows"]}
    for name in sorted(names):
        reason = ""
        for result in null_results:
            row = result["rows"].get(name)
            if row is None:
                continue
            lo, hi = row["ci"]
            if not (NULL_BAND[0] <= row["auc"] <= NULL_BAND[1]) or not lo <= 0.5 <= hi:
                reason = (f"AUC {row['auc']:.2f} [{lo:.2f}, {hi:.2f}] on {result['pair']} "
                          "with no fine-tune")
                break
        verdict[name] = reason
    return verdict


def main(argv: list[str] | None = None) -> int:
    from cgidm_core.suite_pairs import default_cache

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--families", nargs="+", default=["latent", "pixel"])
    parser.add_argument("--latent-pgd-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if not args.report_only:
        compute(args)
    results = null_pair_results(args.cache, 1000, args.latent_pgd_steps)
    why = eligibility(results)
    names = sorted({n for r in results for n in r["rows"]})
    print("| candidate | " + " | ".join(r["pair"] for r in results) + " | eligible |")
    for name in names:
        cells = []
        for r in results:
            row = r["rows"].get(name)
            cells.append("-" if row is None else
                         f"{row['auc']:.2f} [{row['ci'][0]:.2f}, {row['ci'][1]:.2f}]")
        print(f"| {name} | " + " | ".join(cells) + f" | {'yes' if not why[name] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

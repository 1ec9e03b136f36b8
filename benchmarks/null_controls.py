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
- the *weight-noise nulls*: the base against a copy of itself whose denoiser weights got
  Gaussian noise (``NOISE_SCALE`` x each tensor's standard deviation), one per seed in
  ``NOISE_SEEDS``, on the same images. The exact null cannot test a paired score (its contrast
  and gradient are zero, so every paired score is the same constant for every image); under
  weight noise the PGD moves as far as under a real fine-tune while nothing about these images
  was learned. A score whose value follows the images' content under ANY change of the weights
  separates members from hold-outs here, consistently over the seeds: the seeds are pooled
  (each seed's scores ranked, the ranks averaged per image) and tested (``noise_p_value``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


#: The shipped LoRA whose loading gives the latent family's base with its prompt (its fine-tuned
#: side is replaced: only the base and the pipeline's prompt encoding are used).
LATENT_LOADER_FINETUNE = "demo-latent-vangogh-lora"
#: Weight-noise nulls: noise of this many times each weight tensor's standard deviation (1 %: the
#: PGD moves as under the suite's fine-tunes, measured on Van Gogh A with seeds 0 and 1).
NOISE_SCALE = 0.01
#: One weight-noise null per seed; pooled by ``noise_null_results``.
NOISE_SEEDS: tuple[int, ...] = (0, 1, 2, 3)
#: Family-wise level of the weight-noise test over a candidate's pooled nulls (Bonferroni).
NOISE_ALPHA = 0.05


def base_against_itself(family: str):
    """The family's base as both models of a pair (the pixel or the latent suite's base)."""
    if family == "pixel":
        return pixel_base_against_itself()
    import torch

    from cgidm_core.api import load_pair
    from cgidm_core.latent_suite_pairs import LATENT_BASE

    pair = load_pair(LATENT_BASE, LATENT_LOADER_FINETUNE, device="cpu")
    if pair.default_prompt != LATENT_PROMPT:
        raise SystemExit(f"{LATENT_LOADER_FINETUNE}'s prompt is {pair.default_prompt!r}, not "
                         f"{LATENT_PROMPT!r}: update LATENT_PROMPT")
    # A LoRA pair is ONE UNet (and text encoder) whose adapter is switched on for the fine-tune:
    # with every B matrix zero the adapter adds exactly 0, which is the continuum's 0-step LoRA.
    zeroed = 0
    with torch.no_grad():
        for module in {id(m): m for m in (pair.unet_pretrained, pair.unet_finetuned,
                                          pair.text_encoder_pretrained,
                                          pair.text_encoder_finetuned)}.values():
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.zero_()
                    zeroed += 1
    if not zeroed:
        raise SystemExit(f"{LATENT_LOADER_FINETUNE} loaded with no LoRA layer: the latent null "
                         "pair cannot be made from it")
    pair.prediction_type_finetuned = pair.prediction_type
    return pair


def add_weight_noise(module, scale: float, seed: int) -> None:
    """Add Gaussian noise of ``scale`` x each parameter tensor's standard deviation (a scalar's
    magnitude), drawn from one generator seeded ``seed`` in parameter order: reproducible."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            spread = float(param.std()) if param.numel() > 1 else float(param.abs().mean())
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * scale * spread)


def null_files(family: str) -> list[Path]:
    """The images every null of ``family`` is scored on, members first."""
    if family == "pixel":
        return pixel_files(None)
    control = latent_control(None)
    return [*control.members, *control.holdout_files]


def _cached_document(cache: Path, name: str, key: dict, compute: bool,
                     make: Callable[[], dict], fill: _Fill | None = None) -> dict | None:
    """The JSON document ``<cache>/null/<name>-<key digest>.json``: read if there, else made by
    ``make`` (when ``compute``), stamped with its wall time and load, and written. With
    ``compute`` and ``fill``, a cached document gains the cheap scores added since it was made."""
    import hashlib

    blob = json.dumps(key, sort_keys=True, default=str)
    out = cache / "null" / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}.json"
    if out.is_file():
        if compute and fill is not None:
            return _filled(out, fill)
        return dict(json.loads(out.read_text()))
    if not compute:
        return None
    started = time.perf_counter()
    document = {**make(), "seconds_total": time.perf_counter() - started,
                "load_average": os.getloadavg()[0]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document))
    return document


@dataclass(frozen=True)
class _Fill:
    """What a cached null document's missing cheap scores are computed with."""

    family: str
    load: Callable[[], object]
    files: list[Path]


def _filled(path: Path, fill: _Fill) -> dict:
    from benchmarks.cheap_values import add_missing_cheap

    return add_missing_cheap(path, _cheap_methods(fill.family), fill.load, fill.files, log=log)


def _cheap_methods(family: str) -> tuple[str, ...]:
    from cgidm_core.suite_scores import CHEAP_METHODS, LATENT_CHEAP_METHODS

    return CHEAP_METHODS if family == "pixel" else LATENT_CHEAP_METHODS


def _null_raw_values(pair, files: list[Path], config, family: str) -> dict:
    """``raw_values`` of a null pair with the settings the family's suite pairs are scored with
    (pixel: every cheap method; latent: the loss attack and the contrast, as
    ``benchmarks.latent_suite``)."""
    from cgidm_core.images import load_image
    from cgidm_core.suite_scores import raw_values

    raw = raw_values(pair, [load_image(p) for p in files], config=config,
                     variants={"default": {}}, cheap=_cheap_methods(family), log=log)
    return {"files": [f"{p.parent.name}/{p.name}" for p in files], "values": raw["values"],
            "seconds": raw["seconds"], "inversion": raw["inversion"]}


def noise_null_document(cache: Path, family: str, seed: int, *, scale: float = NOISE_SCALE,
                        pgd_steps: int = 100, compute: bool = False) -> dict | None:
    """Raw values (``suite_scores.raw_values``) of the base against itself plus weight noise of
    ``seed``, on every image of ``null_files(family)``; computed once and cached."""
    from cgidm_core.inversion import InversionConfig

    reference = PIXEL_BASE if family == "pixel" else _latent_base()
    config = InversionConfig() if family == "pixel" else InversionConfig(steps=pgd_steps)
    files = null_files(family)

    def make() -> dict:
        log(f"{family} weight-noise null: scale {scale:g}, seed {seed}, {len(files)} images")
        return {"model": f"{reference} + weight noise {scale:g} (seed {seed})", "scale": scale,
                "seed": seed, **_null_raw_values(noisy_pair(family, scale, seed), files, config,
                                                 family)}

    return _cached_document(cache, f"{family}-noise", {
        "config": config.to_dict(), "base": _base_fingerprint(reference),
        "files": [p.name for p in files], "scale": scale, "seed": seed, "version": 1},
        compute, make, _Fill(family, lambda: noisy_pair(family, scale, seed), files))


def noisy_pair(family: str, scale: float, seed: int):
    """The family's base against itself with weight noise of ``seed`` on the fine-tuned side."""
    import copy

    pair = base_against_itself(family)
    # a denoiser of its own for the fine-tuned side (a LoRA pair shares one between the two)
    pair.unet_finetuned = copy.deepcopy(pair.unet_pretrained)
    add_weight_noise(pair.unet_finetuned, scale, seed)
    return pair


def _latent_base() -> str:
    from cgidm_core.latent_suite_pairs import LATENT_BASE

    return LATENT_BASE


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
        if compute:
            return _filled(out, _Fill("pixel", pixel_base_against_itself, pixel_files(None)))
        return dict(json.loads(out.read_text()))
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


def latent_control(cache: Path | None = None):
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
    from cgidm_core.inversion import InversionConfig
    from cgidm_core.null_values import compute_null_values

    if "latent" in args.families:
        # the base and prompt of every latent pair (only the base side is used)
        pair = base_against_itself("latent")
        files = null_files("latent")
        log(f"latent null values: {len(files)} images")
        compute_null_values(pair, files, latent_null_folder(args.cache, args.latent_pgd_steps,
                                                            LATENT_PROMPT),
                            InversionConfig(steps=args.latent_pgd_steps), log=log)
        latent_exact_null(args.cache, args.latent_pgd_steps, compute=True)
    if "pixel" in args.families:
        files = pixel_files(None)
        pair = pixel_base_against_itself()
        log(f"pixel null values: {len(files)} images")
        compute_null_values(pair, files, pixel_null_folder(args.cache), InversionConfig(),
                            log=log)
        pixel_null_pair(args.cache, compute=True)
    for family in args.families:
        for seed in args.noise_seeds:
            noise_null_document(args.cache, family, seed, pgd_steps=args.latent_pgd_steps,
                                compute=True)


def _entries(folder: Path) -> dict[str, dict[str, float]]:
    """Every cached image of one null folder: ``"parent/name" -> its null values``."""
    out: dict[str, dict[str, float]] = {}
    for entry in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        document = json.loads(entry.read_text())
        out[document["file"]] = dict(document["values"])
    return out


def latent_control_document(cache: Path, pgd_steps: int) -> dict | None:
    """The latent exact null's raw values: the continuum's 0-step pair where
    ``benchmarks.latent_continuum`` evaluated it (a LoRA still zero), else the base against
    itself evaluated here (``latent_exact_null``); the two are the same model."""
    path = latent_control(cache).values_file(cache, pgd_steps)
    if path.is_file():
        return dict(json.loads(path.read_text()))
    return latent_exact_null(cache, pgd_steps, compute=False)


def latent_exact_null(cache: Path, pgd_steps: int, compute: bool) -> dict | None:
    """Raw values of the latent base against itself on the latent null images, with the
    settings ``benchmarks.latent_suite`` evaluates its pairs with; computed once and cached."""
    from cgidm_core.inversion import InversionConfig

    config = InversionConfig(steps=pgd_steps)
    files = null_files("latent")
    control = latent_control(cache)

    def make() -> dict:
        log(f"latent null pair: {_latent_base()} vs itself, {len(files)} images")
        return {"model": f"{_latent_base()} (the base itself)",
                "n_members": len(control.members),
                "holdouts": {"holdout": len(control.holdout_files)},
                **_null_raw_values(base_against_itself("latent"), files, config, "latent")}

    return _cached_document(cache, "latent-null-pair", {
        "config": config.to_dict(), "base": _base_fingerprint(_latent_base()),
        "files": [p.name for p in files], "version": 1}, compute, make,
        _Fill("latent", lambda: base_against_itself("latent"), files))


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
    """A null pair as ``benchmarks.pair_evaluation.evaluate_pair`` reads a pair."""

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


def _null_splits(family: str) -> list[tuple[str, list[str], int]]:
    """``(name, files, members)`` of each members / hold-out split a null of ``family`` is
    scored on (the pixel nulls: the suite's Van Gogh A and DreamBooth easy / hard splits; the
    latent: its Van Gogh members and hold-out)."""
    if family == "latent":
        control = latent_control(None)
        files = [f"{p.parent.name}/{p.name}" for p in (*control.members, *control.holdout_files)]
        return [("vangogh-a/holdout", files, len(control.members))]
    from cgidm_core.suite_pairs import splits

    out = []
    for name, holdout in PIXEL_NULL_SPLITS:
        split = splits(None)[name]
        out.append((f"{name}/{holdout}", [f"{p.parent.name}/{p.name}" for p in
                                          (*split.members, *split.holdouts[holdout])],
                    len(split.members)))
    return out


def null_pair_results(cache: Path, n_bootstrap: int, pgd_steps: int = 100,
                      noise_seeds: tuple[int, ...] = NOISE_SEEDS) -> list[dict]:
    """Every candidate's AUC on the null pairs of both families (those cached): the exact nulls
    (``"rule": "exact"``), then the weight-noise nulls pooled over ``noise_seeds``
    (``"rule": "noise"``, see ``noise_null_results``)."""
    from benchmarks.pair_evaluation import evaluate_pair

    results = []
    pixel = pixel_null_pair(cache, compute=False)
    if pixel:
        pixel = {**pixel, "null": aligned(null_lookup(cache, "pixel"), pixel["files"])}
        for name, files, n_members in _null_splits("pixel"):
            document = _split_document(pixel, files, n_members)
            results.append({**evaluate_pair(document, NullView(f"null/pixel/{name}", "pixel"),
                                            n_bootstrap), "rule": "exact"})
    latent = latent_control_document(cache, pgd_steps)
    if latent:
        latent = {**latent, "null": aligned(null_lookup(cache, "latent", pgd_steps),
                                            latent["files"])}
        results.append({**evaluate_pair(latent, NullView("null/latent/lora-attn-r16/0",
                                                         "latent"), n_bootstrap),
                        "rule": "exact"})
    for family in ("pixel", "latent"):
        results += [r for r in noise_null_results(cache, family, n_bootstrap, pgd_steps,
                                                  noise_seeds) if r["rule"] == "noise"]
    return results


def pooled_ranks(per_seed: list[list[float]]) -> list[float]:
    """Each image's rank under every seed (scipy's average ranks over the split's images),
    averaged over the seeds: what stays is what the images do under any weight change, what
    goes is each noise draw's own direction."""
    from scipy.stats import rankdata

    return [float(v) for v in np.mean([rankdata(scores) for scores in per_seed], axis=0)]


def noise_p_value(members: list[float], holdouts: list[float]) -> float:
    """Two-sided Mann-Whitney p-value of members vs hold-outs (exact where scipy can be)."""
    from scipy.stats import mannwhitneyu

    if len(set(members) | set(holdouts)) == 1:
        return 1.0  # one value for every image: nothing to separate (the exact-null case)
    return float(mannwhitneyu(members, holdouts, alternative="two-sided").pvalue)


def noise_null_results(cache: Path, family: str, n_bootstrap: int, pgd_steps: int = 100,
                       seeds: tuple[int, ...] = NOISE_SEEDS) -> list[dict]:
    """Every candidate on ``family``'s weight-noise nulls that are cached: per split, one result
    per seed (``"rule": "seed"``, shown, not used by the rule: at 10 + 10 images a single
    unbiased AUC leaves [0.35, 0.65] about a quarter of the time) and the seeds pooled
    (``"rule": "noise"``: AUC and interval of the pooled ranks, and their p-value).
    Nothing when fewer than two seeds are cached."""
    from benchmarks.pair_evaluation import evaluate_pair
    from cgidm_core.stats import evaluate_scores

    documents = [d for seed in seeds if (d := noise_null_document(
        cache, family, seed, pgd_steps=pgd_steps)) is not None]
    if len(documents) < 2:
        return []
    lookup = null_lookup(cache, family, pgd_steps)
    results = []
    for name, files, n_members in _null_splits(family):
        per_seed = []
        for document in documents:
            split = _split_document({**document, "null": aligned(lookup, document["files"])},
                                    files, n_members)
            result = evaluate_pair(split, NullView(
                f"noise/{family}/{name}/s{document['seed']}", family), n_bootstrap)
            per_seed.append(result)
            results.append({**result, "rule": "seed"})
        rows = {}
        for candidate in set.intersection(*(set(r["scores"]) for r in per_seed)):
            ranks = pooled_ranks([[*r["scores"][candidate][0], *r["scores"][candidate][1]]
                                  for r in per_seed])
            members, holdouts = ranks[:n_members], ranks[n_members:]
            report = evaluate_scores(members, holdouts, n_bootstrap=n_bootstrap, seed=0,
                                     target_fprs=())
            rows[candidate] = {"auc": report.auc, "ci": [report.auc_ci_low, report.auc_ci_high],
                               "p": noise_p_value(members, holdouts)}
        seeds_used = ",".join(str(d["seed"]) for d in documents)
        results.append({"pair": f"noise/{family}/{name}/pooled", "family": family,
                        "rows": rows, "rule": "noise", "seeds": seeds_used})
    return results


#: The eligibility rule (docs/ACCURACY.md, "Null controls"): on every null pair it was measured
#: on, a candidate's AUC must lie in this band AND its 95 % interval must contain 0.5.
NULL_BAND: tuple[float, float] = (0.35, 0.65)


def eligibility(null_results: list[dict]) -> dict[str, str]:
    """candidate -> "" when eligible, else why not (the first null pair it fails on).

    Exact nulls (``"rule"`` absent or ``"exact"``): the AUC in ``NULL_BAND`` and its interval
    containing 0.5. Pooled weight-noise nulls (``"rule": "noise"``): the pooled ranks'
    p-value at least ``NOISE_ALPHA`` divided by the number of pooled nulls the candidate was
    measured on (Bonferroni: an unbiased score fails one of them 5 % of the time at most). Not
    the band there: under weight noise an unbiased score's AUC varies as any 10 + 10 AUC does,
    while under the exact null a paired score is exactly 0.5. Per-seed results are not used.
    """
    verdict: dict[str, str] = {}
    names = {n for r in null_results for n in r["rows"]}
    for name in sorted(names):
        reason = ""
        measured = [r for r in null_results if name in r["rows"]]
        n_noise = sum(1 for r in measured if r.get("rule") == "noise")
        for result in measured:
            row = result["rows"][name]
            lo, hi = row["ci"]
            rule = result.get("rule", "exact")
            if rule == "noise" and row["p"] < NOISE_ALPHA / n_noise:
                reason = (f"AUC {row['auc']:.2f} [{lo:.2f}, {hi:.2f}], p = {row['p']:.3g} < "
                          f"{NOISE_ALPHA / n_noise:.3g} on {result['pair']} (weight noise, "
                          "nothing learned)")
                break
            if rule == "exact" and (not (NULL_BAND[0] <= row["auc"] <= NULL_BAND[1])
                                    or not lo <= 0.5 <= hi):
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
    parser.add_argument("--noise-seeds", type=int, nargs="*", default=list(NOISE_SEEDS),
                        help="weight-noise nulls to compute and pool (none: skip them)")
    parser.add_argument("--per-seed", action="store_true",
                        help="also print each weight-noise seed's own AUCs")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if not args.report_only:
        compute(args)
    seeds = tuple(args.noise_seeds)
    results = null_pair_results(args.cache, 1000, args.latent_pgd_steps, seeds)
    why = eligibility(results)
    shown = list(results)
    if args.per_seed:
        shown += [r for f in ("pixel", "latent") for r in noise_null_results(
            args.cache, f, 1000, args.latent_pgd_steps, seeds) if r["rule"] == "seed"]
    print(render_table(shown, why))
    return 0


def render_table(results: list[dict], why: dict[str, str]) -> str:
    """Markdown: every candidate's AUC [interval] on each null (pooled nulls: and p), eligible
    ones first."""
    names = sorted({n for r in results for n in r["rows"]}, key=lambda n: (bool(why.get(n)), n))
    lines = ["| candidate | " + " | ".join(f"`{r['pair']}`" for r in results) + " | eligible |",
             "|---|" + "---|" * (len(results) + 1)]
    for name in names:
        cells = []
        for r in results:
            row = r["rows"].get(name)
            cell = "-" if row is None else (f"{row['auc']:.2f} [{row['ci'][0]:.2f}, "
                                            f"{row['ci'][1]:.2f}]")
            if row is not None and "p" in row:
                cell += f", p {row['p']:.2g}"
            cells.append(cell)
        eligible = "yes" if not why.get(name) else "**no**"
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {eligible} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

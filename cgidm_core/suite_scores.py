"""Every candidate verdict score of one fine-tuned pair, from one pass of work, and their ranking.

Why one module: the defaults are chosen by comparing candidate scores across many pairs, so each
pair must be scored by all of them on the same images, with the same inversions, and the choice
rule (worst case first, then mean, then cost) must be one function that the benchmark, the docs
and the tests share.

Per image, :func:`raw_values` records

- for each inversion variant (``default``: the shipped settings; ``palette``: the same with the
  recovery bounded to each channel's range in the kept cells): masked SSIM and PSNR of the
  recovery after 25, 50 and 100 PGD steps and of the mean of the iterates after step 50, the
  CIEDE2000 colour distance of the recovered region, and the CGI-DM objective along the way
  (mean over all steps and over the second half);
- the cheap scores: loss attack, PIA, PIAN, SecMI, and the contrast loss at the original.

:func:`candidate_scores` turns those into scores (higher = member) for one set of images, fusions
included; fusions z-score over the images scored together (no labels enter).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from .images import image_seed, palette_clamp, to_tensor
from .inversion import InversionConfig, invert
from .pair import ModelPair
from .similarity import displacement_values, masked_psnr, masked_ssim

#: Values of the PGD's displacement recorded per recovery (:func:`displacement_values`).
DISPLACEMENT_METRICS: tuple[str, ...] = ("cosine", "progress")
#: Inversion variants run per pair (each costs one full inversion).
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "palette": {"palette_bounds": True},
}
#: Recoveries scored per variant: after n steps, and the iterate mean after half the steps.
RECORD_STEPS: tuple[int, ...] = (25, 50)
CHEAP_METHODS: tuple[str, ...] = ("loss", "pia", "pian", "secmi", "contrast", "contrast64")
#: The cheap scores of the latent family's pairs and nulls (PIA and SecMI step a DDIM sampler
#: through the VAE's latents; measured on the pixel family only, to fit the CPU budget).
LATENT_CHEAP_METHODS: tuple[str, ...] = ("loss", "contrast", "contrast64")

#: Model evaluations per image of each family of candidate, for "ties go to the cheaper".
#: An inversion step is one forward+backward through each model (counted as 2 x 3 = 6
#: forward-equivalents); the cheap ones are taken from ``baselines.EVALUATIONS_PER_IMAGE``.
INVERSION_STEP_COST = 6


def colour_distance(original: torch.Tensor, recovered: torch.Tensor,
                    keep: torch.Tensor) -> list[float]:
    """Mean CIEDE2000 distance (CIELAB) over the recovered region, per image.

    Images are ``(N, 3, H, W)`` in [-1, 1]; ``keep`` is 1 on kept pixels. 2.3 is a "just
    noticeable difference"; saturated primaries on a muted painting are 30 and more.
    """
    from skimage.color import deltaE_ciede2000, rgb2lab

    def lab(x: torch.Tensor) -> np.ndarray:
        return cast(np.ndarray, rgb2lab(  # skimage's annotations return Any
            ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()))

    # (N, H, W); skimage leaves deltaE_ciede2000 unannotated
    dist = deltaE_ciede2000(lab(original), lab(recovered))  # type: ignore[no-untyped-call]
    free = (1.0 - keep.float()).expand(original.shape[0], 1, *original.shape[-2:])[:, 0].numpy()
    return [float((d * f).sum() / max(f.sum(), 1.0)) for d, f in zip(dist, free, strict=True)]


def saturated_fraction(recovered: torch.Tensor, keep: torch.Tensor,
                       margin: float = 0.02) -> list[float]:
    """Share of the recovered region's channel values pinned at the ends of the pixel range
    (within ``margin`` of -1 or 1): how much of the recovery sits on the box's corners."""
    free = (1.0 - keep.float()).expand_as(recovered)
    pinned = (recovered.abs() >= 1.0 - margin).float()
    return [float(v) for v in (pinned * free).flatten(1).sum(1) / free.flatten(1).sum(1)]


def derived_values(pictures: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Values of recoveries derived after the fact from saved pictures (no model pass):
    ``<variant>/clamped/<metric>`` = the final recovery passed through :func:`palette_clamp`;
    where the pictures hold the PGD's ``start``, ``default/<recovery>/<cosine|progress>``
    (:func:`displacement_values`)."""
    out: dict[str, list[float]] = {}
    n = pictures["default/final"].shape[0]
    # Files written before originals were saved once per run hold one copy per variant.
    original, keep = pictures["original"][:n], pictures["mask"][:n]
    start = pictures["start"][:n] if "start" in pictures else None
    for key in list(pictures):
        if "/" in key:
            out[f"{key}/saturated"] = saturated_fraction(pictures[key], keep)
            if start is not None and key.startswith("default/"):
                for metric, vals in displacement_values(original, pictures[key], start,
                                                        keep).items():
                    out[f"{key}/{metric}"] = vals
        if key.endswith("/final"):
            variant = key.split("/")[0]
            clamped = palette_clamp(original, pictures[key], keep)
            for metric, vals in _recovery_values(original, clamped, keep).items():
                out[f"{variant}/clamped/{metric}"] = vals
            out[f"{variant}/clamped/saturated"] = saturated_fraction(clamped, keep)
    return out


def _recovery_values(original: torch.Tensor, recovered: torch.Tensor,
                     keep: torch.Tensor) -> dict[str, list[float]]:
    return {
        "ssim": [float(v) for v in masked_ssim(original, recovered, keep)],
        "psnr": [float(v) for v in masked_psnr(original, recovered, keep)],
        "colour": colour_distance(original, recovered, keep),
    }


def raw_values(
    pair: ModelPair,
    pictures: Sequence[Image.Image],
    *,
    config: InversionConfig | None = None,
    variants: dict[str, dict[str, object]] | None = None,
    cheap: Sequence[str] = CHEAP_METHODS,
    batch_size: int = 20,
    keep_pictures: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Everything the candidates need, per image, plus the seconds each part took.

    Returns ``{"values": {key: [per image]}, "seconds": {part: s}, "pictures": {...}}``; keys are
    ``<variant>/<recovery>/<metric>`` (recovery ``step25``, ``step50``, ``final``, ``average``),
    ``<variant>/objective/<mean|second_half>`` and the cheap methods' names.
    ``pictures`` (only with ``keep_pictures``) holds originals and recoveries as tensors.
    """
    from .evaluation import score_images_detailed

    config = config or InversionConfig()
    variants = variants if variants is not None else VARIANTS
    values: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    kept_pictures: dict[str, list[torch.Tensor]] = {}
    cond = pair.conditioning(pair.default_prompt)
    half = config.steps // 2
    for name, overrides in variants.items():
        variant = replace(config, **overrides)  # type: ignore[arg-type]  # field names: variants
        started = time.perf_counter()
        for start in range(0, len(pictures), batch_size):
            tensor = to_tensor(list(pictures[start:start + batch_size]), pair.image_size)
            seeds = [image_seed(img, variant.seed) for img in tensor]
            out = invert(pair, tensor, cond, variant, seeds=seeds,
                         record_steps=[s for s in RECORD_STEPS if s < variant.steps],
                         average_from=half)
            recoveries = {**out.recovered_at, "final": out.recovered}
            for recovery, images in recoveries.items():
                for metric, vals in _recovery_values(out.original, images, out.mask).items():
                    values.setdefault(f"{name}/{recovery}/{metric}", []).extend(vals)
                if out.start is not None:
                    for metric, vals in displacement_values(out.original, images, out.start,
                                                            out.mask).items():
                        values.setdefault(f"{name}/{recovery}/{metric}", []).extend(vals)
                if keep_pictures:
                    kept_pictures.setdefault(f"{name}/{recovery}", []).append(images)
            if keep_pictures and name == next(iter(variants)):  # originals once, not per variant
                kept_pictures.setdefault("original", []).append(out.original)
                if out.start is not None:
                    kept_pictures.setdefault("start", []).append(out.start)
                masks = out.mask.expand(len(tensor), -1, -1, -1)
                kept_pictures.setdefault("mask", []).append(masks)
            values.setdefault(f"{name}/objective/mean", []).extend(
                out.losses.mean(1).tolist())
            values.setdefault(f"{name}/objective/second_half", []).extend(
                out.losses[:, half:].mean(1).tolist())
        seconds[f"inversion:{name}"] = time.perf_counter() - started
        if log:
            log(f"  inversion {name}: {seconds[f'inversion:{name}']:.0f} s")
    for method in cheap:
        scored = score_images_detailed(pair, list(pictures), method, seed=config.seed,
                                       batch_size=batch_size)
        values[method] = [float(v) for v in scored.scores]
        seconds[method] = scored.seconds
    result: dict[str, Any] = {"values": values, "seconds": seconds,
                              "inversion": config.to_dict(), "variants": variants}
    if keep_pictures:
        result["pictures"] = {k: torch.cat(v) for k, v in kept_pictures.items()}
    return result


def _z(values: np.ndarray) -> np.ndarray:
    std = values.std()
    return np.zeros_like(values) if std == 0 or not np.isfinite(std) else (
        values - values.mean()) / std


@dataclass(frozen=True)
class Candidate:
    """A verdict score: how to compute it from raw values and what it costs per image."""

    name: str
    description: str
    evaluations: int  # model evaluations (forward-equivalents) per image


#: Paired (null-corrected) candidates: each image's value minus the same image's value under a
#: null recovery (``cgidm_core.null_values``; ``start`` = the PGD's starting point, ``base`` = the
#: base model's own recovery) or, for the loss attack, minus the base model's loss attack.
#: name -> parts; a part ``a-b`` is raw value a minus null value b.
PAIRED_FUSIONS: dict[str, tuple[str, ...]] = {
    "fuse:gain-start+contrast": ("default/final/ssim-start/ssim",
                                 "default/final/psnr-start/psnr", "contrast"),
    "fuse:gain-base+contrast": ("default/final/ssim-base/ssim", "default/final/psnr-base/psnr",
                                "contrast"),
    "fuse:gain-start+loss-paired+contrast": ("default/final/ssim-start/ssim",
                                             "default/final/psnr-start/psnr", "loss-base/loss",
                                             "contrast"),
    "fuse:gain-base+loss-paired+contrast": ("default/final/ssim-base/ssim",
                                            "default/final/psnr-base/psnr", "loss-base/loss",
                                            "contrast"),
    "fuse:gain-start": ("default/final/ssim-start/ssim", "default/final/psnr-start/psnr"),
}


def _paired(v: dict[str, np.ndarray], null: dict[str, np.ndarray], part: str
            ) -> np.ndarray | None:
    """The values of one part of a paired candidate, or None when something is missing."""
    if part in v:
        return v[part]
    raw, _, subtract = part.rpartition("-")
    if "/" not in subtract:  # "loss-base/loss" splits at the last '-' too
        return None
    if raw not in v or subtract not in null:
        return None
    # Rounded: a difference below 1e-4 is the float32 decoder's noise between batch sizes (a
    # recovery that never left its start differs from a separately decoded start by ~1e-6),
    # and z-scoring would blow that noise up to a full-size score.
    return np.asarray(np.round(v[raw] - null[subtract], 4))


#: Floor of SSIM's residual (1 - SSIM) in the ratios below: a recovery that is the original.
_RESIDUAL_FLOOR = 1e-4


def start_relative_values(v: dict[str, np.ndarray], null: dict[str, np.ndarray]
                          ) -> dict[str, tuple[str, np.ndarray]]:
    """Recovery similarities relative to the PGD's starting point, per image: name ->
    (description, values; higher = member).

    Why: the raw similarity of a recovery also scores how easy the image's masked half is to
    fill in, which is the image, not the training (the null controls). Each value here is a
    function f(similarity of the recovery, similarity of the start) with f(x, x) = 0, so when the
    recovery IS its start, as on a pair whose fine-tune is its base (zero contrast, zero
    gradient), every image scores 0: the exact null controls pass by construction. They differ
    in how the start's similarity is removed: a difference (``gain-start:<metric>@<recovery>``),
    the log ratio of SSIM's residuals 1 - SSIM (``gain-start:ssim-logratio``; for PSNR the
    difference already is the log ratio of the MSEs), or the share of the SSIM gain that was
    achievable from the start (``gain-start:ssim-fraction``). Rounded to 1e-4, as
    :func:`_paired` rounds, so decoder noise between batch sizes cannot become a score.
    """
    out: dict[str, tuple[str, np.ndarray]] = {}
    for metric in ("ssim", "psnr"):
        if f"start/{metric}" not in null:
            continue
        start = null[f"start/{metric}"]
        for recovery in ("step25", "step50", "average"):
            key = f"default/{recovery}/{metric}"
            if key in v:
                out[f"gain-start:{metric}@{recovery}"] = (
                    f"masked {metric} of the recovery ({recovery}) minus that of the PGD's "
                    "start", np.round(v[key] - start, 4))
    final = v.get("default/final/ssim")
    if final is not None and "start/ssim" in null:
        start_residual = np.maximum(1.0 - null["start/ssim"], _RESIDUAL_FLOOR)
        final_residual = np.maximum(1.0 - final, _RESIDUAL_FLOOR)
        out["gain-start:ssim-logratio"] = (
            "log((1 - SSIM of the start) / (1 - SSIM of the recovery)): the relative fall of "
            "SSIM's residual", np.round(np.log(start_residual / final_residual), 4))
        out["gain-start:ssim-fraction"] = (
            "(SSIM of the recovery - SSIM of the start) / (1 - SSIM of the start): the share "
            "of the achievable SSIM gain", np.round((start_residual - final_residual)
                                                    / start_residual, 4))
    return out


#: Fusions of the start-relative values (and the paired score's parts): name -> parts, each a
#: key of :func:`start_relative_values`, ``gain-start:<metric>`` (the final recovery's gain),
#: ``contrast`` or ``objective`` (minus CGI-DM's objective over the PGD's second half).
START_RELATIVE_FUSIONS: dict[str, tuple[str, ...]] = {
    "fuse:objective+contrast+gain-start:psnr": ("objective", "contrast", "gain-start:psnr"),
    "fuse:objective+contrast+gain-start:ssim-logratio": ("objective", "contrast",
                                                         "gain-start:ssim-logratio"),
    "fuse:objective+contrast+gain-start": ("objective", "contrast", "gain-start:ssim",
                                           "gain-start:psnr"),
    "fuse:contrast+gain-start:psnr": ("contrast", "gain-start:psnr"),
    "fuse:gain-start:psnr+ssim-logratio": ("gain-start:psnr", "gain-start:ssim-logratio"),
}


def _add_start_relative(add: Callable[..., None], v: dict[str, np.ndarray],
                        null: dict[str, np.ndarray], steps: int) -> None:
    """The candidates of :func:`start_relative_values` and :data:`START_RELATIVE_FUSIONS`."""
    from .baselines import EVALUATIONS_PER_IMAGE

    inversion = steps * INVERSION_STEP_COST
    parts = {name: values for name, (_d, values) in start_relative_values(v, null).items()}
    for name, (description, values) in start_relative_values(v, null).items():
        step = name.rpartition("@step")[2]
        add(name, description, (int(step) if step.isdigit() else steps) * INVERSION_STEP_COST,
            values)
    for metric in ("ssim", "psnr"):
        gain = _paired(v, null, f"default/final/{metric}-start/{metric}")
        if gain is not None:
            parts[f"gain-start:{metric}"] = gain
    if "default/objective/second_half" in v:
        parts["objective"] = -v["default/objective/second_half"]
    if "contrast" in v:
        parts["contrast"] = v["contrast"]
    for name, fused in START_RELATIVE_FUSIONS.items():
        if not all(p in parts for p in fused):
            continue
        cost = inversion + (EVALUATIONS_PER_IMAGE["contrast"] if "contrast" in fused else 0)
        add(name, " + ".join(f"z({p})" for p in fused) + ", pooled over the images compared",
            cost, np.sum([_z(parts[p]) for p in fused], axis=0))


def _add_paired(add: Callable[..., None], v: dict[str, np.ndarray],
                null: dict[str, np.ndarray], steps: int) -> None:
    """The paired candidates where the null values are at hand (see PAIRED_FUSIONS)."""
    from .baselines import EVALUATIONS_PER_IMAGE

    _add_start_relative(add, v, null, steps)
    inversion = steps * INVERSION_STEP_COST
    base_recovery = steps * INVERSION_STEP_COST // 2  # one model's forward + backward per step
    for metric in ("ssim", "psnr"):
        for kind, extra in (("start", 0), ("base", base_recovery)):
            values = _paired(v, null, f"default/final/{metric}-{kind}/{metric}")
            if values is not None:
                add(f"gain-{kind}:{metric}", f"masked {metric} of the recovery minus that of "
                    f"the {kind} null recovery", inversion + extra, values)
    loss = _paired(v, null, "loss-base/loss")
    if loss is not None:
        add("loss-paired", "loss attack minus the base model's loss attack on the same image",
            2 * EVALUATIONS_PER_IMAGE["loss"], loss)
    for name, parts in PAIRED_FUSIONS.items():
        maybe = [_paired(v, null, p) for p in parts]
        columns = [c for c in maybe if c is not None]
        if len(columns) < len(parts):
            continue
        cost = (inversion if any(p.startswith("default/") for p in parts) else 0)
        cost += base_recovery if any(p.endswith("-base/ssim") for p in parts) else 0
        cost += sum(EVALUATIONS_PER_IMAGE[p] for p in parts if "/" not in p)
        cost += 2 * EVALUATIONS_PER_IMAGE["loss"] if "loss-base/loss" in parts else 0
        add(name, " + ".join(f"z({p})" for p in parts) + ", pooled over the images compared",
            cost, np.sum([_z(c) for c in columns], axis=0))


#: The fusions every pair is scored with: name -> raw values whose z-scores over the images
#: compared are summed (an objective enters negated: lower objective = member).
FUSIONS: dict[str, tuple[str, ...]] = {
    "fuse:ssim+contrast": ("default/final/ssim", "contrast"),
    "fuse:psnr+contrast": ("default/final/psnr", "contrast"),
    "fuse:objective+contrast": ("default/objective/second_half", "contrast"),
    "fuse:loss+contrast": ("loss", "contrast"),
    "fuse:psnr+loss": ("default/final/psnr", "loss"),
    "fuse:ssim+loss": ("default/final/ssim", "loss"),
    "fuse:objective+loss": ("default/objective/second_half", "loss"),
    "fuse:psnr+loss+contrast": ("default/final/psnr", "loss", "contrast"),
    "fuse:ssim+psnr+loss": ("default/final/ssim", "default/final/psnr", "loss"),
    # the verdict's score (cgidm_core.evidence.EVIDENCE_COMPONENTS["fused"])
    "fuse:ssim+psnr+loss+contrast": ("default/final/ssim", "default/final/psnr", "loss",
                                     "contrast"),
    # the paired score with the direction of the PGD's displacement (all 0 for a fine-tune
    # equal to its base: objective, contrast and displacement alike)
    "fuse:objective+contrast+progress": ("default/objective/second_half", "contrast",
                                         "default/final/progress"),
    "fuse:objective+contrast+cosine": ("default/objective/second_half", "contrast",
                                       "default/final/cosine"),
    "fuse:contrast+progress": ("contrast", "default/final/progress"),
    # the same with the contrast's draws shared by every image (64 of them: no draw noise
    # between images, ``baselines.contrast_shared``)
    "fuse:objective+contrast64": ("default/objective/second_half", "contrast64"),
    "fuse:objective+contrast64+progress": ("default/objective/second_half", "contrast64",
                                           "default/final/progress"),
    "fuse:objective+contrast64+cosine": ("default/objective/second_half", "contrast64",
                                         "default/final/cosine"),
    "fuse:contrast64+progress": ("contrast64", "default/final/progress"),
    "fuse:progress+cosine": ("default/final/progress", "default/final/cosine"),
    # the same on the palette-bounded inversion (only where that variant was run)
    "palette-fuse:ssim+psnr+loss+contrast": ("palette/final/ssim", "palette/final/psnr",
                                             "loss", "contrast"),
}


def candidate_scores(values: dict[str, Sequence[float]], steps: int,
                     null: dict[str, Sequence[float]] | None = None,
                     ) -> dict[str, tuple[Candidate, np.ndarray]]:
    """Candidate name -> (candidate, scores for the given images; higher = member).

    ``values`` holds the raw values of exactly the images to compare (members and one hold-out
    set): fusions standardise over them. ``null`` (same images, same order): their null values
    (``start/<metric>``, ``base/<metric>``, ``base/loss``), which add the paired candidates.
    """
    from .baselines import EVALUATIONS_PER_IMAGE

    v = {k: np.asarray(x, dtype=np.float64) for k, x in values.items()}
    out: dict[str, tuple[Candidate, np.ndarray]] = {}

    def add(name: str, description: str, cost: int, scores: np.ndarray) -> None:
        out[name] = (Candidate(name, description, cost), scores)

    for method in CHEAP_METHODS:
        if method in v:
            add(method, f"{method} (no inversion)", EVALUATIONS_PER_IMAGE[method], v[method])
    for key in v:
        parts: Sequence[str] = key.split("/")  # a list here, a tuple in the fusions below
        if len(parts) != 3:
            continue
        variant, what, metric = parts
        if what == "objective":
            cost = steps * INVERSION_STEP_COST
            add(f"{variant}:objective-{metric}",
                f"minus the CGI-DM objective, {metric.replace('_', ' ')} of the steps "
                f"({variant} inversion)", cost, -v[key])
        elif metric in ("ssim", "psnr"):
            n = int(what[4:]) if what.startswith("step") else steps
            add(f"{variant}:{metric}@{what}", f"masked {metric} of the recovery ({what}, "
                f"{variant} inversion)", n * INVERSION_STEP_COST, v[key])
        elif metric in DISPLACEMENT_METRICS and what != "clamped":
            n = int(what[4:]) if what.startswith("step") else steps
            add(f"{variant}:{metric}@{what}", f"{metric} of the PGD's displacement towards the "
                f"original ({what}, {variant} inversion; 0 when the recovery is its start)",
                n * INVERSION_STEP_COST, v[key])
    for name, parts in FUSIONS.items():
        if not all(p in v for p in parts):
            continue
        total = np.zeros(len(v[parts[0]]))
        # values of one inversion (the default one) cost its steps once, however many are used
        cost = steps * INVERSION_STEP_COST if any("/" in p for p in parts) else 0
        for p in parts:
            total += _z(-v[p] if "objective" in p else v[p])
            cost += 0 if "/" in p else EVALUATIONS_PER_IMAGE[p]
        add(name, " + ".join(f"z({p})" for p in parts) + ", pooled over the images compared",
            cost, total)
        if name == "fuse:ssim+psnr+loss+contrast":  # the same parts fused by mean rank instead
            ranks = cast(np.ndarray, sum(_ranks(-v[p] if "objective" in p else v[p])
                                         for p in parts))  # parts is never empty: not 0
            add("rank:ssim+psnr+loss+contrast", "mean rank of " + ", ".join(parts), cost, ranks)
    if "default/final/ssim" in v and "contrast" in v and "default/final/psnr" in v:
        # the verdict's fusion without its image-biased loss attack (no null values needed)
        add("fuse:ssim+psnr+contrast", "z(ssim) + z(psnr) + z(contrast), pooled",
            steps * INVERSION_STEP_COST + EVALUATIONS_PER_IMAGE["contrast"],
            _z(v["default/final/ssim"]) + _z(v["default/final/psnr"]) + _z(v["contrast"]))
    if null:
        _add_paired(add, v, {k: np.asarray(x, dtype=np.float64) for k, x in null.items()}, steps)
    return out


def _ranks(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return cast(np.ndarray, rankdata(values) / len(values))  # scipy is untyped here


def rank_candidates(per_pair_auc: dict[str, list[float]],
                    costs: dict[str, int]) -> list[tuple[str, float, float, int]]:
    """(name, worst AUC, mean AUC, cost), best first: worst case, then mean, then cheaper.

    AUCs are rounded to 3 decimals before comparing, so differences below the resolution of a
    10 + 10 pair (1/100) do not decide a tie against the cheaper score.
    """
    rows = [(name, round(min(aucs), 3), round(float(np.mean(aucs)), 3), costs[name])
            for name, aucs in per_pair_auc.items() if aucs]
    return sorted(rows, key=lambda r: (-r[1], -r[2], r[3]))

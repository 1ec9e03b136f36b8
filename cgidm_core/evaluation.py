"""Score a list of images with any membership method, by name: CGI-DM or a baseline.

One entry point for every method keeps comparisons honest: the same images, preprocessing
(``images.to_tensor`` at the pair's size), encoding, conditioning and per-image seeds reach each
method. ``cgidm eval`` and ``benchmarks/accuracy.py`` both go through :func:`score_images`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from .api import checked_batch_size, image_names
from .baselines import BASELINES, EVALUATIONS_PER_IMAGE
from .errors import ConfigError
from .images import ImageSource, image_seed, load_image, to_tensor
from .inversion import InversionConfig
from .names import DEFAULT_METRIC, METHODS
from .pair import ModelPair
from .prompts import choose_prompt

#: The cheap score each fusion adds to CGI-DM's similarity. "fused" (similarity + loss attack)
#: had the best worst-case AUC of the benchmark suite's single scores and fusions
#: (docs/ACCURACY.md) for 3 model evaluations per image on top of the inversion.
FUSIONS: dict[str, str] = {"combined": "contrast", "fused": "loss"}
#: The similarity metric a fusion uses when none is given (else the verdict's DEFAULT_METRIC):
#: chosen on the suite by the same rule as the default (worst case, then mean).
FUSION_METRICS: dict[str, str] = {"fused": "ssim"}

ProgressFn = Callable[[int, int], None]


@dataclass
class ScoredImages:
    """Scores (higher = more member-like) and what produced them."""

    method: str
    scores: list[float]
    #: One dict per image: its name and method-specific evidence (cgidm: every metric and the
    #: final contrast loss; combined: both component scores).
    details: list[dict[str, Any]]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    #: CGI-DM's full results (pictures included) when the method ran the inversion.
    results: list[Any] | None = None

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, len(self.scores))


def zscores(values: Sequence[float]) -> np.ndarray:
    """Standardise with the mean and standard deviation of the values themselves.

    No label enters, so standardising the pooled scores of members and hold-out together does not
    leak membership; it only puts two scores on one scale. A constant list maps to zeros.
    """
    arr = np.asarray(values, dtype=np.float64)
    std = arr.std()
    if arr.size < 2 or std == 0 or not np.isfinite(std):
        return np.zeros_like(arr)
    return cast(np.ndarray, (arr - arr.mean()) / std)  # numpy types std() as Any


def combine_scores(similarity: Sequence[float], contrast: Sequence[float]) -> list[float]:
    """A fusion ("combined", "fused"): z(similarity) + z(cheap score) over the images scored
    together.

    It is a *relative* score: an image's value depends on the other images in the call, so it is
    meant for ranking a set (AUC, controls tests on one pooled call), not as an absolute number.
    """
    if len(similarity) != len(contrast):
        raise ConfigError("combine_scores needs one similarity and one contrast score per image")
    return [float(v) for v in zscores(similarity) + zscores(contrast)]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _baseline_scores(
    pair: ModelPair,
    pictures: list[Image.Image],
    method: str,
    *,
    prompt: str | None,
    seed: int,
    batch_size: int,
    progress: ProgressFn | None,
    progress_offset: int = 0,
    progress_total: int | None = None,
    size: int | None = None,
) -> list[float]:
    """Encode and score in batches; the baseline gets per-image seeds taken from the pixels.

    ``size`` is the pixel side to run at (default: the pair's native size)."""
    fn = BASELINES[method]
    size = size or pair.image_size
    cond = pair.conditioning(choose_prompt(prompt, pair).text)
    total = progress_total if progress_total is not None else len(pictures)
    out: list[float] = []
    for start in range(0, len(pictures), batch_size):
        chunk = pictures[start : start + batch_size]
        tensor = to_tensor(chunk, size)
        seeds = [image_seed(img, seed) for img in tensor]
        with torch.no_grad():
            z0 = pair.encode(tensor.to(pair.device)).float()
        values = fn(pair, z0, cond, seed=seed, seeds=seeds, batch_size=batch_size)
        out.extend(float(v) for v in values)
        if progress is not None:
            progress(progress_offset + start + len(chunk), total)
    return out


def score_images_detailed(
    pair: ModelPair,
    images: Sequence[ImageSource],
    method: str,
    *,
    names: Sequence[str] | None = None,
    prompt: str | None = None,
    config: InversionConfig | None = None,
    metric: str | None = None,
    feature_model: Any = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: ProgressFn | None = None,
) -> ScoredImages:
    """Score every image with ``method``; see :func:`score_images`. Also returns the evidence."""
    _check_method(method)
    batch_size = checked_batch_size(pair, images, batch_size)
    labels = image_names(images, names)
    pictures = [load_image(src, name=label) for src, label in zip(images, labels, strict=True)]
    started = time.perf_counter()
    settings: dict[str, Any] = {"method": method, "seed": seed, "batch_size": batch_size,
                                **choose_prompt(prompt, pair).to_settings()}
    size = pair.run_size(config.resolution if config is not None else None)

    if method in BASELINES:
        scores = _baseline_scores(pair, pictures, method, prompt=prompt, seed=seed,
                                  batch_size=batch_size, progress=progress, size=size)
        settings["model_evaluations_per_image"] = EVALUATIONS_PER_IMAGE[method]
        return ScoredImages(
            method=method,
            scores=scores,
            details=[{"name": n, "score": s} for n, s in zip(labels, scores, strict=True)],
            seconds=time.perf_counter() - started,
            settings=settings,
        )

    from .api import authenticate

    config = config or InversionConfig(seed=seed)
    metric = metric or FUSION_METRICS.get(method) or DEFAULT_METRIC
    n_batches = -(-len(pictures) // batch_size)
    inversion_units = config.steps * n_batches
    extra_units = len(pictures) if method in FUSIONS else 0
    total_units = inversion_units + extra_units

    def inversion_progress(done: int, _total: int) -> None:
        if progress is not None:
            progress(done, total_units)

    results = authenticate(
        pair, pictures, names=labels, prompt=prompt, config=config, score_metric=metric,
        feature_model=feature_model, batch_size=batch_size, progress=inversion_progress,
        attack_scores=None if method == "evidence" else (),
    )
    settings.update({"metric": metric, "inversion": config.to_dict()})
    scores, details = _scores_from_recoveries(
        pair, pictures, method, results, settings, prompt=prompt, seed=config.seed,
        batch_size=batch_size, progress=progress, progress_offset=inversion_units,
        progress_total=total_units, size=size)
    return ScoredImages(
        method=method,
        scores=scores,
        details=details,
        seconds=time.perf_counter() - started,
        settings=settings,
        results=results,
    )


def _scores_from_recoveries(pair: ModelPair, pictures: list[Any], method: str, results: Any,
                            settings: dict[str, Any], *, prompt: str | None, seed: int,
                            batch_size: int, progress: ProgressFn | None, progress_offset: int,
                            progress_total: int, size: int
                            ) -> tuple[list[float], list[dict[str, Any]]]:
    """The scores of an inversion method from its results: the recovery's similarity
    (``cgidm``), the verdict's fused evidence (``evidence``), or the similarity z-scored with a
    cheap attack run now (``combined``, ``fused``). Returns the scores and per-image details and
    records how they were made in ``settings``."""
    similarity = [float(r.score) for r in results]
    details = [r.to_dict() for r in results]
    if method == "cgidm":
        return similarity, details
    if method == "evidence":
        from .evidence import evidence_scores, evidence_settings
        from .names import DEFAULT_EVIDENCE

        scores = evidence_scores(details, DEFAULT_EVIDENCE)
        for record, sim, score in zip(details, similarity, scores, strict=True):
            record.update({"score": score, "cgidm_score": sim})
        settings["evidence"] = evidence_settings(DEFAULT_EVIDENCE)
        return scores, details
    other = FUSIONS[method]
    cheap = _baseline_scores(
        pair, pictures, other, prompt=prompt, seed=seed, batch_size=batch_size,
        progress=progress, progress_offset=progress_offset, progress_total=progress_total,
        size=size,
    )
    scores = combine_scores(similarity, cheap)
    for record, sim, con, score in zip(details, similarity, cheap, scores, strict=True):
        record.update({"score": score, "cgidm_score": sim, f"{other}_score": con})
    settings["combination"] = f"zscore(cgidm) + zscore({other}), pooled over scored images"
    return scores, details


def score_images(
    pair: ModelPair,
    images: Sequence[ImageSource],
    method: str,
    *,
    prompt: str | None = None,
    config: InversionConfig | None = None,
    metric: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: ProgressFn | None = None,
) -> list[float]:
    """One membership score per image (higher = more likely in the fine-tuning set).

    ``method`` is one of :data:`METHODS`. ``config`` and ``metric`` apply to "cgidm" and
    "combined" (the inversion settings and the similarity metric); ``seed`` seeds the baselines'
    noise (the inversion's seed is ``config.seed``). ``progress(done, total)`` is called as work
    completes; ``batch_size`` defaults to the pair's ``preferred_batch_size``. For "combined"
    score all images to be compared in ONE call (members and hold-out together): the z-scores
    are taken over the images of the call.
    """
    return score_images_detailed(
        pair, images, method, prompt=prompt, config=config, metric=metric, seed=seed,
        batch_size=batch_size, progress=progress,
    ).scores

"""The five-lines-of-Python entry points: load a pair, authenticate images.

    from cgidm_core import load_pair, authenticate
    pair = load_pair("demo-base", "demo-vangogh")
    for r in authenticate(pair, ["painting.jpg"]):
        print(r.name, r.score)
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import provenance
from .base_recovery import base_recovery_evidence
from .errors import ConfigError, OutOfMemory
from .images import (
    DISPLAY_MODES,
    ImageSource,
    image_seed,
    load_image,
    palette_clamp,
    to_pil,
    to_tensor,
)
from .inversion import CancelFn, InversionConfig, invert
from .names import DEFAULT_DISPLAY, DEFAULT_METRIC, PIXEL_METRICS
from .pair import Conditioning, ModelPair
from .prompts import EmptyPromptWarning, choose_prompt
from .results import ImageResult
from .similarity import (
    FeatureModel,
    compute_metrics,
    displacement_values,
    score_from_metric,
    validate_metrics,
)


def load_pair(
    pretrained: str | Path,
    finetuned: str | Path,
    *,
    finetuned_kind: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    allow_network: bool = False,
    keep_text_encoders: bool = False,
    pretrained_config: str | Path | None = None,
) -> ModelPair:
    """Load a pretrained model and its suspected fine-tune; demo names are accepted.

    ``pretrained_config`` is the Flux.1 pipeline folder that completes a pretrained Flux
    transformer given as one ``.safetensors`` file (``cgidm_core.models.load_pair``).

    Stable Diffusion pairs free their text encoders once a new prompt is encoded (they are read
    back from disk for the next new prompt); ``keep_text_encoders=True`` keeps them in memory.
    """
    from .demo import resolve_model_reference
    from .models import load_pair_from_paths
    from .models.loading import resolve_model_path
    from .provenance import describe_model

    pre_path = resolve_model_reference(pretrained)
    ft_path = resolve_model_reference(finetuned)
    pair = load_pair_from_paths(
        pre_path,
        ft_path,
        finetuned_kind=finetuned_kind,
        device=device,
        dtype=dtype,
        allow_network=allow_network,
        keep_text_encoders=keep_text_encoders,
        pretrained_config=pretrained_config,
    )
    # What was loaded, file by file, for the provenance of every result of this pair.
    pair.sources = {
        "pretrained": describe_model(pretrained, resolve_model_path(pre_path, allow_network)),
        "finetuned": describe_model(finetuned, resolve_model_path(ft_path, allow_network)),
    }
    if pretrained_config is not None:
        pair.sources["pretrained_config"] = describe_model(
            pretrained_config, resolve_model_path(pretrained_config, allow_network)
        )
    return pair


class AuthenticationResults(list[ImageResult]):
    """The per-image results (a plain list of :class:`ImageResult`), plus ``provenance``: what
    they were computed from (``cgidm_core.provenance``)."""

    def __init__(self, results: Sequence[ImageResult], provenance: dict[str, Any]):
        super().__init__(results)
        self.provenance = provenance


def image_names(images: Sequence[ImageSource], names: Sequence[str] | None) -> list[str]:
    """Names to report images by: the caller's, else file names, else ``image-<i>``."""
    if names is not None:
        if len(names) != len(images):
            raise ConfigError(f"got {len(names)} names for {len(images)} images")
        return list(names)
    out = []
    for i, source in enumerate(images):
        out.append(Path(source).name if isinstance(source, str | Path) else f"image-{i}")
    return out


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the device running out of memory raised as an exception (not a process kill):
    ``torch.cuda.OutOfMemoryError``, or the plain RuntimeError other backends raise."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_device_memory() -> None:
    """Give the allocator's cached blocks back after an out-of-memory error."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def checked_batch_size(
    pair: ModelPair, images: Sequence[ImageSource], batch_size: int | None,
    side: int | None = None,
) -> int:
    """The batch size to use (the pair's preferred one at ``side`` pixels by default), after
    checking the inputs."""
    if not images:
        raise ConfigError("no images given; pass at least one image")
    if batch_size is None:
        batch_size = pair.preferred_batch_size if side is None else pair.batch_size_at(side)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size


def authenticate(
    pair: ModelPair,
    images: Sequence[ImageSource],
    *,
    names: Sequence[str] | None = None,
    prompt: str | None = None,
    config: InversionConfig | None = None,
    metrics: Sequence[str] | None = None,
    score_metric: str | None = None,
    feature_model: FeatureModel | str | Path | None = None,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: CancelFn | None = None,
    prompt_source: str | None = None,
    on_batch_halved: Callable[[int], None] | None = None,
    attack_scores: Sequence[str] | None = None,
    display: str = DEFAULT_DISPLAY,
) -> AuthenticationResults:
    """Recover every image's removed half and score the recovery against the original.

    Returns the results in input order, with ``.provenance``: the sha256 of every image as
    given and of every model file, the prompt and where it came from, all settings, versions,
    device and dtype.

    ``prompt`` defaults to the fine-tune's instance prompt found in its metadata at loading
    (:func:`cgidm_core.prompts.choose_prompt`); with none, the empty prompt is used and an
    :class:`~cgidm_core.prompts.EmptyPromptWarning` is issued. ``prompt_source`` overrides the
    recorded source when the caller knows better (the service: ``registry``, ``upload``).
    ``config.resolution`` overrides the pair's native image size.

    Images run in batches of ``batch_size`` (default: the pair's ``preferred_batch_size``) as one
    computation each. ``progress(done, total)`` counts PGD steps over all batches;
    ``should_cancel()`` is polled every few steps.

    If the device runs out of memory inside a batch (``torch.cuda.OutOfMemoryError``, raised as
    an exception), that batch and the rest are split into batches of half its size and the
    batch is run again; ``on_batch_halved(new_size)`` is told. Each image has its own seeds, so
    its result does not depend on the batch it ran in. A single image that does not fit raises
    :class:`OutOfMemory`.

    ``attack_scores`` (default :data:`cgidm_core.evidence.ATTACK_SCORES`: the loss attack and
    the 8- and 64-draw contrasts at the original, 147 model evaluations per image next to the
    inversion's 600) are computed on the same image and recorded as ``extra["attack_scores"]``:
    the verdict's score (:mod:`cgidm_core.evidence`) fuses the shared-draw contrast with the
    inversion's progress towards the original (``extra["inversion_scores"]``). ``()`` skips
    them.

    ``display`` makes the recovered picture a person looks at (``ImageResult.recovered``):
    ``"palette_clamp"`` (default) cuts its off-palette colours back into each channel's range in
    the kept half (:func:`cgidm_core.images.palette_clamp`, no model pass), ``"raw"`` shows the
    recovery as is. Every score is measured on the raw recovery (``ImageResult.recovered_raw``
    when the two differ); the choice is recorded as ``provenance["method"]["display"]``.
    """
    # 1. Check every setting and read every image before any model pass.
    run = _prepare_run(pair, images, names=names, config=config, metrics=metrics,
                       score_metric=score_metric, feature_model=feature_model,
                       batch_size=batch_size, attack_scores=attack_scores, display=display)
    # 2. The prompt both models are conditioned on; with none, the empty prompt and a warning.
    choice = choose_prompt(prompt, pair)
    if choice.warning:
        warnings.warn(choice.warning, EmptyPromptWarning, stacklevel=2)
    # 3. What the results are computed from (hashes, settings, versions), recorded up front.
    record = provenance.build(pair, images, run.labels, prompt=choice.text,
                              prompt_source=prompt_source or choice.source, config=run.config,
                              score_metric=run.score_metric, metrics=run.wanted,
                              batch_size=run.batch_size)
    record["method"]["display"] = display
    cond = pair.conditioning(choice.text)
    # 4. Invert batch by batch (halving a batch the device has no memory for), then score each
    #    batch's recoveries and attacks into one result per image, in input order.
    results: list[ImageResult] = []
    for batch in _inverted_batches(pair, run, cond, progress, should_cancel, on_batch_halved):
        results.extend(_batch_results(pair, run, record, cond, batch, should_cancel))
    return AuthenticationResults(results, record)


@dataclass
class _Run:
    """What :func:`authenticate` checked and read before its first model pass."""

    config: InversionConfig
    size: int  # pixel side the images run at
    batch_size: int
    score_metric: str
    wanted: list[str]  # every metric computed, the score's included
    feature_model: FeatureModel | str | Path | None
    labels: list[str]
    pictures: list[Any]  # the images as read (PIL)
    attacks: tuple[str, ...]
    display: str


@dataclass
class _Batch:
    """One inverted batch: the images' indices, their tensor, seeds and the inversion's output."""

    indices: list[int]
    tensor: torch.Tensor
    seeds: list[int]
    out: Any  # cgidm_core.inversion.InversionOutput


def _prepare_run(pair: ModelPair, images: Sequence[ImageSource], *,
                 names: Sequence[str] | None, config: InversionConfig | None,
                 metrics: Sequence[str] | None, score_metric: str | None,
                 feature_model: FeatureModel | str | Path | None, batch_size: int | None,
                 attack_scores: Sequence[str] | None, display: str) -> _Run:
    """Check the settings against the pair and read the images (a bad one fails here, in
    seconds); decides gradient checkpointing before the batch size, which is planned with or
    without it."""
    from .evidence import ATTACK_SCORES

    attacks = tuple(ATTACK_SCORES if attack_scores is None else attack_scores)
    if display not in DISPLAY_MODES:
        raise ConfigError(f"display must be one of {', '.join(DISPLAY_MODES)}, got {display!r}")
    config = config or InversionConfig()
    config.validate(pair.num_train_timesteps)
    size = pair.run_size(config.resolution)
    pair.set_gradient_checkpointing(config.gradient_checkpointing, size)
    batch_size = checked_batch_size(pair, images, batch_size, side=size)
    score_metric = score_metric or DEFAULT_METRIC
    wanted = list(dict.fromkeys([*(metrics or PIXEL_METRICS), score_metric]))
    validate_metrics(wanted, feature_model)
    labels = image_names(images, names)
    pictures = [load_image(src, name=label) for src, label in zip(images, labels, strict=True)]
    return _Run(config=config, size=size, batch_size=batch_size, score_metric=score_metric,
                wanted=wanted, feature_model=feature_model, labels=labels, pictures=pictures,
                attacks=attacks, display=display)


def _inverted_batches(pair: ModelPair, run: _Run, cond: Conditioning,
                      progress: Callable[[int, int], None] | None,
                      should_cancel: CancelFn | None,
                      on_batch_halved: Callable[[int], None] | None) -> Iterator[_Batch]:
    """Invert the images batch by batch, in order. ``progress`` counts PGD steps over all
    batches. A batch the device runs out of memory on is retried: a single image once more with
    gradient checkpointing (where "auto" had left it off), else it and every batch after it are
    split in half; a single image that still does not fit raises :class:`OutOfMemory`."""
    config, pictures = run.config, run.pictures
    pending = deque(
        list(range(start, min(start + run.batch_size, len(pictures))))
        for start in range(0, len(pictures), run.batch_size)
    )
    offset = 0  # PGD steps of the batches already done
    while pending:
        indices = pending.popleft()
        total = offset + config.steps * (1 + len(pending))
        tensor = to_tensor([pictures[i] for i in indices], run.size)
        seeds = [image_seed(img, config.seed) for img in tensor]

        def report(done: int, _steps: int, start: int = offset, total: int = total) -> None:
            if progress is not None:
                progress(start + done, total)

        out = None
        try:
            out = invert(pair, tensor, cond, config, seeds=seeds, progress=report,
                         should_cancel=should_cancel)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            _after_out_of_memory(pair, config, indices, run.labels, exc)
        if out is None:  # out of memory; outside the except block, whose traceback holds tensors
            del tensor
            release_device_memory()
            if len(indices) == 1:  # one image again, now with gradient checkpointing
                pending.appendleft(indices)
                continue
            half = len(indices) // 2
            rest = indices + [i for chunk in pending for i in chunk]
            pending = deque(rest[start : start + half] for start in range(0, len(rest), half))
            if on_batch_halved is not None:
                on_batch_halved(half)
            continue
        offset += config.steps
        yield _Batch(indices=indices, tensor=tensor, seeds=seeds, out=out)


def _after_out_of_memory(pair: ModelPair, config: InversionConfig, indices: list[int],
                         labels: list[str], exc: BaseException) -> None:
    """Decide what a batch that ran out of memory does next: one image with checkpointing left
    off by "auto" turns it on (the estimate was optimistic: recompute instead of keeping); one
    image that cannot be helped raises :class:`OutOfMemory`; a larger batch is split later."""
    retry_checkpointed = (len(indices) == 1 and not pair.gradient_checkpointing
                          and config.gradient_checkpointing == "auto"
                          and bool(pair.denoisers()))
    if retry_checkpointed:
        pair.set_gradient_checkpointing("on")
    elif len(indices) == 1:
        raise OutOfMemory(
            f"the device ran out of memory on one image ({labels[indices[0]]}) at "
            "batch size 1; use smaller images or a device with more memory"
        ) from exc


def _batch_results(pair: ModelPair, run: _Run, record: dict[str, Any], cond: Conditioning,
                   batch: _Batch, should_cancel: CancelFn | None) -> list[ImageResult]:
    """Score one inverted batch: the recovery's similarity metrics, the attacks on the same
    images, and the pictures (the shown recovery clamped to the palette unless ``raw``)."""
    out, indices, config = batch.out, batch.indices, run.config
    values = compute_metrics(out.original, out.recovered, out.mask, run.wanted,
                             run.feature_model)
    # Minus CGI-DM's objective along the PGD (fine-tune's loss minus base's: 0 for every image
    # when the fine-tune is its base): one part of the verdict's paired score. A step skipped
    # for a non-finite gradient has a non-finite loss; the mean is over the other steps.
    half = config.steps // 2
    objective = {"objective_mean": (-out.losses.nanmean(1)).tolist(),
                 "objective_second_half": (-out.losses[:, half:].nanmean(1)).tolist()}
    # Where the PGD went against where it should have gone (0 for every image when the recovery
    # never left its start, e.g. a fine-tune equal to its base): the verdict's third part.
    if out.start is not None:
        objective.update(displacement_values(out.original, out.recovered, out.start, out.mask))
    # The inversion already encoded the batch; its deterministic latent (the posterior mean)
    # is what the attacks score, so it is reused rather than encoded a second time.
    z0 = None if config.sample_latent else out.latent_original
    attack_values = _attack_scores(pair, batch.tensor, cond, run.attacks, batch.seeds,
                                   config.seed, len(indices), z0=z0)
    # The base model's own recovery of the same masked images, when the config asks (unscored).
    base = base_recovery_evidence(pair, batch.tensor, cond, config, batch.seeds, out, run.wanted,
                                  run.feature_model, should_cancel, run.display)
    originals, partials, raw = to_pil(out.original), to_pil(out.partial), to_pil(out.recovered)
    shown = (to_pil(palette_clamp(out.original, out.recovered, out.mask))
             if run.display == "palette_clamp" else raw)
    results = []
    for j, i in enumerate(indices):
        image_metrics = {name: values[name][j] for name in run.wanted}
        results.append(
            ImageResult(
                name=run.labels[i],
                score=score_from_metric(run.score_metric, image_metrics[run.score_metric]),
                metrics=image_metrics,
                original=originals[j],
                partial=partials[j],
                recovered=shown[j],
                recovered_raw=raw[j] if shown is not raw else None,
                base_recovered=base[0][j] if base else None,
                extra={
                    "final_loss": _finite_or_none(float(out.losses[j, -1])),
                    "nonfinite_gradient_steps": _count(out.nonfinite_steps, j),
                    "input_sha256": record["inputs"][i]["sha256"],
                    "inversion_scores": {name: _finite_or_none(float(vals[j]))
                                         for name, vals in objective.items()},
                    **({"base_recovery": base[1][j]} if base else {}),
                    **({"attack_scores": {name: vals[j] for name, vals in
                                          attack_values.items()}} if attack_values else {}),
                },
            )
        )
    return results


def _attack_scores(pair: ModelPair, tensor: torch.Tensor, cond: Conditioning,
                   attacks: Sequence[str],
                   seeds: Sequence[int], seed: int, batch_size: int,
                   z0: torch.Tensor | None = None) -> dict[str, list[float | None]]:
    """The cheap membership scores of one batch (``cgidm_core.baselines``), seeded per image
    exactly as ``cgidm eval`` and the benchmark suite seed them, so the values agree."""
    from .baselines import BASELINES

    # Every attack here goes through the pair's own forward process (pair.add_noise and
    # pair.loss_target), so flow-matching families get the velocity versions.
    if not attacks:
        return {}

    if z0 is None:  # the inversion sampled its latent (reference preset): the attacks take the mean
        with torch.no_grad():
            z0 = pair.encode(tensor.to(pair.device)).float()
    out: dict[str, list[float | None]] = {}  # None: a non-finite score
    for name in attacks:
        values = BASELINES[name](pair, z0, cond, seed=seed, seeds=list(seeds),
                                 batch_size=batch_size)
        out[name] = [_finite_or_none(float(v)) for v in values]
    return out


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a step whose loss was not finite reports ``None`` (null)."""
    return value if math.isfinite(value) else None


def _count(counts: torch.Tensor | None, index: int) -> int:
    return 0 if counts is None else int(counts[index])

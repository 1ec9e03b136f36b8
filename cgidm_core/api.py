"""The five-lines-of-Python entry points: load a pair, authenticate images.

    from cgidm_core import load_pair, authenticate
    pair = load_pair("demo-base", "demo-vangogh")
    for r in authenticate(pair, ["painting.jpg"]):
        print(r.name, r.score)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .errors import ConfigError
from .images import ImageSource, image_seed, load_image, to_pil, to_tensor
from .inversion import CancelFn, InversionConfig, invert
from .pair import ModelPair
from .prompts import EmptyPromptWarning, choose_prompt
from .results import ImageResult
from .similarity import (
    DEFAULT_METRIC,
    PIXEL_METRICS,
    FeatureModel,
    compute_metrics,
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
) -> ModelPair:
    """Load a pretrained model and its suspected fine-tune; demo names are accepted.

    Stable Diffusion pairs free their text encoders once a new prompt is encoded (they are read
    back from disk for the next new prompt); ``keep_text_encoders=True`` keeps them in memory.
    """
    from .demo import resolve_model_reference
    from .models import load_pair as load_model_pair

    return load_model_pair(
        resolve_model_reference(pretrained),
        resolve_model_reference(finetuned),
        finetuned_kind=finetuned_kind,
        device=device,
        dtype=dtype,
        allow_network=allow_network,
        keep_text_encoders=keep_text_encoders,
    )


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


def checked_batch_size(
    pair: ModelPair, images: Sequence[ImageSource], batch_size: int | None
) -> int:
    """The batch size to use (the pair's preferred one by default), after checking the inputs."""
    if not images:
        raise ConfigError("no images given; pass at least one image")
    if batch_size is None:
        batch_size = pair.preferred_batch_size
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
) -> list[ImageResult]:
    """Recover every image's removed half and score the recovery against the original.

    ``prompt`` defaults to the fine-tune's instance prompt found in its metadata at loading
    (:func:`cgidm_core.prompts.choose_prompt`); with none, the empty prompt is used and an
    :class:`~cgidm_core.prompts.EmptyPromptWarning` is issued. ``config.resolution`` overrides the
    pair's native image size. Images run in batches of ``batch_size`` (default: the pair's
    ``preferred_batch_size``) as one computation each. ``progress(done, total)`` counts PGD
    steps over all batches; ``should_cancel()`` is polled every few steps.
    """
    batch_size = checked_batch_size(pair, images, batch_size)
    config = config or InversionConfig()
    config.validate(pair.num_train_timesteps)
    score_metric = score_metric or DEFAULT_METRIC
    wanted = list(dict.fromkeys([*(metrics or PIXEL_METRICS), score_metric]))
    validate_metrics(wanted, feature_model)
    size = pair.run_size(config.resolution)
    labels = image_names(images, names)
    pictures = [load_image(src, name=label) for src, label in zip(images, labels, strict=True)]
    choice = choose_prompt(prompt, pair)
    if choice.warning:
        warnings.warn(choice.warning, EmptyPromptWarning, stacklevel=2)
    cond = pair.conditioning(choice.text)

    batches = [
        list(range(start, min(start + batch_size, len(pictures))))
        for start in range(0, len(pictures), batch_size)
    ]
    total = config.steps * len(batches)
    results: list[ImageResult] = []
    for b, indices in enumerate(batches):
        tensor = to_tensor([pictures[i] for i in indices], size)
        seeds = [image_seed(img, config.seed) for img in tensor]

        def report(done: int, _steps: int, offset: int = b * config.steps) -> None:
            if progress is not None:
                progress(offset + done, total)

        out = invert(
            pair, tensor, cond, config, seeds=seeds, progress=report, should_cancel=should_cancel
        )
        values = compute_metrics(out.original, out.recovered, out.mask, wanted, feature_model)
        originals, partials, recovered = to_pil(out.original), to_pil(out.partial), to_pil(
            out.recovered
        )
        for j, i in enumerate(indices):
            image_metrics = {name: values[name][j] for name in wanted}
            results.append(
                ImageResult(
                    name=labels[i],
                    score=score_from_metric(score_metric, image_metrics[score_metric]),
                    metrics=image_metrics,
                    original=originals[j],
                    partial=partials[j],
                    recovered=recovered[j],
                    extra={
                        "final_loss": _finite_or_none(float(out.losses[j, -1])),
                        "nonfinite_gradient_steps": _count(out.nonfinite_steps, j),
                    },
                )
            )
    return results


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a step whose loss was not finite reports ``None`` (null)."""
    return value if math.isfinite(value) else None


def _count(counts: torch.Tensor | None, index: int) -> int:
    return 0 if counts is None else int(counts[index])

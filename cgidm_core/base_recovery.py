"""The base model's own recovery: what the pretrained model alone fills into the removed half.

CGI-DM recovers an image by gradient descent on the *difference* of the two models' denoising
losses (``inversion.contrast_loss``): the picture shows what the fine-tune knows beyond its base.
A reader judging that picture needs the other half of the comparison: what the base model alone
recovers from the same masked input. That is the same projected gradient descent (same mask, start
point, step, radius, bounds, timesteps and noise draws, from the same per-image seeds) on the base
model's denoising loss alone,

    L_base(z) = E_{t,eps} || eps_pre(z_t, t, c_pre) - eps ||^2,

so the only difference between the two pictures is the objective. If the base alone already
recovers the image well (a famous painting in the base's own training data), the suspect's
recovery proves little about the fine-tune; if only the contrast recovers it, the fine-tune does.

It costs one model's forward and backward pass per step (the contrast costs two) and changes no
score: the verdicts rest on the contrast recovery and the attack scores only. The similarity of
the base recovery to the original is recorded beside them for the reader
(``ImageResult.extra["base_recovery"]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from .images import palette_clamp, to_pil
from .inversion import CancelFn, InversionConfig, InversionOutput, invert
from .pair import Conditioning, ModelPair
from .similarity import compute_metrics


def base_denoising_loss(
    pair: ModelPair,
    z: torch.Tensor,
    cond: Conditioning,
    t: torch.Tensor,
    noise_ft: torch.Tensor,
    noise_pre: torch.Tensor | None,
    samples: int,
) -> torch.Tensor:
    """Per-image denoising loss of the pretrained model alone ``(N,)``; the signature of
    ``inversion.contrast_loss``, so ``invert`` runs it as its objective. It uses the noise the
    contrast gives the pretrained model (``noise_pre``, or the common draw)."""
    n = z.shape[0]
    noise = (noise_ft if noise_pre is None else noise_pre).to(pair.device)
    z_rep = z.repeat_interleave(samples, dim=0)
    t_dev = t.to(pair.device)
    z_t = pair.add_noise(z_rep, noise, t_dev)
    target = pair.loss_target(z_rep, noise, t_dev)
    pred = pair.eps_pretrained(z_t, t_dev, cond)
    return (pred.float() - target).pow(2).flatten(1).mean(1).view(n, samples).mean(1)


def recover_with_base(
    pair: ModelPair,
    images: torch.Tensor,
    cond: Conditioning,
    config: InversionConfig,
    *,
    seeds: list[int],
    progress: Callable[[int, int], None] | None = None,
    should_cancel: CancelFn | None = None,
) -> torch.Tensor:
    """The base model's recovery of each image ``(N, 3, S, S)`` in [-1, 1], on the CPU.

    The same PGD as the contrast recovery of ``images`` with ``config`` and ``seeds`` (the
    base-recovery switch itself plays no part in it), with :func:`base_denoising_loss` as the
    objective."""
    out = invert(pair, images, cond, replace(config, base_recovery=False), seeds=seeds,
                 progress=progress, should_cancel=should_cancel, objective=base_denoising_loss)
    return out.recovered


def base_recovery_evidence(
    pair: ModelPair,
    images: torch.Tensor,
    cond: Conditioning,
    config: InversionConfig,
    seeds: list[int],
    contrast: InversionOutput,
    metrics: Sequence[str],
    feature_model: Any = None,
    should_cancel: CancelFn | None = None,
    display: str = "palette_clamp",
) -> tuple[list[Image.Image], list[dict[str, float]]] | None:
    """For ``authenticate``: each image's base recovery as a picture (made for display as the
    contrast recovery's is, so the two are shown alike) and its similarity to the original on
    ``metrics`` (measured on the raw recovery, as the contrast's are), or ``None`` when
    ``config.base_recovery`` is off."""
    if not config.base_recovery:
        return None
    recovered = recover_with_base(pair, images, cond, config, seeds=seeds,
                                  should_cancel=should_cancel)
    values = compute_metrics(contrast.original, recovered, contrast.mask, metrics, feature_model)
    rows = [{name: values[name][j] for name in metrics} for j in range(recovered.shape[0])]
    if display == "palette_clamp":
        recovered = palette_clamp(contrast.original, recovered, contrast.mask)
    return to_pil(recovered), rows

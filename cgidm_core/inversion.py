"""Contrasting gradient inversion: recover the removed half of an image by projected gradient
descent on the difference between the fine-tuned and the pretrained model's denoising losses.

    L(z) = E_{t,eps} ||eps_ft(z_t, t) - eps||^2 - E_{t,eps'} ||eps_pre(z_t, t) - eps'||^2

The whole batch is one computation: each image's loss is summed, so the gradient of an image's
free latent depends only on its own loss, and every normalisation and projection is per image.
Randomness comes from one generator per image (seeded from its content), so an image's result
does not depend on the other images in its batch.

A step whose gradient for an image is not finite (a float16 overflow on a GPU) is skipped for that
image only, as the authors' PGD skips it (it zeroes the whole gradient when any entry is NaN), and
counted in ``InversionOutput.nonfinite_steps``: one bad step must not turn the image's recovery
into NaN for good.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from .errors import Cancelled, ConfigError
from .images import quantize_8bit
from .inversion_config import InversionConfig as InversionConfig
from .inversion_config import preset_config as preset_config
from .masks import checkerboard_mask, default_cell, upsample_mask
from .names import GRADIENT_CHECKPOINTING_MODES as GRADIENT_CHECKPOINTING_MODES
from .pair import Conditioning, ModelPair

#: The reference step size and radius are stated for a 4x64x64 SD latent with half of it free.
REFERENCE_FREE_ENTRIES = 4 * 64 * 64 // 2

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


@dataclass
class InversionOutput:
    """Images in [-1, 1] and the pixel-space mask (1 = kept), all on the CPU in float32."""

    original: torch.Tensor
    partial: torch.Tensor
    recovered: torch.Tensor
    mask: torch.Tensor
    losses: torch.Tensor  # (N, steps): each image's contrast loss at each step
    delta_norm: torch.Tensor  # (N,): final L2 norm of the perturbation
    latent_original: torch.Tensor  # z0: evidence that kept cells are never changed
    latent_recovered: torch.Tensor
    latent_mask: torch.Tensor  # (1, 1, h, w), 1 = kept
    epsilon: float  # the radius actually used (after scaling to the latent size)
    #: (N,) int: steps at which the image's gradient was not finite and its step was skipped.
    nonfinite_steps: torch.Tensor | None = None
    #: Extra recoveries asked for with ``record_steps`` / ``average_from`` (decoded, like
    #: ``recovered``): ``"step<n>"`` after n steps, ``"average"`` the mean of the iterates.
    recovered_at: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The recovery before any step (``z0 * keep + z_start * free``, decoded): what a pair whose
    #: fine-tune is its base returns (zero contrast, zero gradient), so a recovery's similarity
    #: minus this one's says what the PGD added (``cgidm_core.null_values``). The same tensor
    #: as ``partial`` unless the partial image is re-encoded (the reference preset).
    start: torch.Tensor | None = None


def scaled_radius(config: InversionConfig, free_entries: int) -> tuple[float, float]:
    """Step size and L2 radius for a latent with ``free_entries`` free values."""
    scale = math.sqrt(free_entries / REFERENCE_FREE_ENTRIES)
    return config.alpha * scale, config.epsilon * scale


class _NoiseSource:
    """Per-image generators: image i's draws never depend on how many images share the batch."""

    def __init__(self, seeds: list[int], shape: tuple[int, int, int], t_range: tuple[int, int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape = shape
        self.t_min, self.t_max = t_range

    def draw(self, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps ``(N*samples,)`` and noise ``(N*samples, C, H, W)``, image-major."""
        ts, noises = [], []
        for gen in self.generators:
            ts.append(torch.randint(self.t_min, self.t_max + 1, (samples,), generator=gen))
            noises.append(torch.randn((samples, *self.shape), generator=gen))
        return torch.cat(ts), torch.cat(noises)

    def draw_noise(self, samples: int) -> torch.Tensor:
        draws = [torch.randn((samples, *self.shape), generator=g) for g in self.generators]
        return torch.cat(draws)


def contrast_loss(
    pair: ModelPair,
    z: torch.Tensor,
    cond: Conditioning,
    t: torch.Tensor,
    noise_ft: torch.Tensor,
    noise_pre: torch.Tensor | None,
    samples: int,
) -> torch.Tensor:
    """Per-image contrast loss ``(N,)``, averaged over ``samples`` draws per image.

    ``t`` and the noises are image-major ``(N*samples, ...)``. ``noise_pre=None`` means common
    random numbers: both models see the same noisy latent, built once. Passing the very tensor
    given as ``noise_ft`` means the same; that is decided here, before the tensors move to the
    pair's device (two ``.to(device)`` calls make two tensors, so identity after the move would
    say "independent" and build the noisy latent twice). Shared by the inversion and by the
    ``contrast`` baseline, which evaluates the same objective at the original image.
    """
    n = z.shape[0]
    shared = noise_pre is None or noise_pre is noise_ft
    z_rep = z.repeat_interleave(samples, dim=0)
    noise_ft = noise_ft.to(pair.device)
    t_dev = t.to(pair.device)
    z_t_ft = pair.add_noise(z_rep, noise_ft, t_dev)
    target_ft = pair.loss_target(z_rep, noise_ft, t_dev)
    if shared:
        z_t_pre, target_pre = z_t_ft, target_ft
    else:
        assert noise_pre is not None
        noise_pre = noise_pre.to(pair.device)
        z_t_pre = pair.add_noise(z_rep, noise_pre, t_dev)
        target_pre = pair.loss_target(z_rep, noise_pre, t_dev)
    pred_ft = pair.eps_finetuned(z_t_ft, t_dev, cond)  # adapters expand cond
    pred_pre = pair.eps_pretrained(z_t_pre, t_dev, cond)
    err_ft = (pred_ft.float() - target_ft).pow(2).flatten(1).mean(1)
    err_pre = (pred_pre.float() - target_pre).pow(2).flatten(1).mean(1)
    return (err_ft - err_pre).view(n, samples).mean(1)


def _per_image_norm(x: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, x.flatten(1).norm(dim=1).view(  # torch types norm() as Any
        -1, *([1] * (x.dim() - 1))))


def invert(
    pair: ModelPair,
    images: torch.Tensor,
    cond: Conditioning,
    config: InversionConfig,
    *,
    seeds: list[int],
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    cancel_every: int = 5,
    record_steps: Sequence[int] = (),
    average_from: int | None = None,
    objective: Callable[..., torch.Tensor] | None = None,
) -> InversionOutput:
    """Run the L2 PGD for a batch of images; see the module docstring for the objective.

    ``seeds`` holds one seed per image (``images.image_seed``). ``should_cancel`` is polled every
    ``cancel_every`` steps and raises :class:`Cancelled` so a service can stop a job promptly.
    ``record_steps`` and ``average_from`` cost no model passes: the recovery after each listed
    step count, and the mean of the iterates after step ``average_from`` (benchmarks use them to
    compare step counts and an averaged recovery within one run). ``objective`` replaces
    :func:`contrast_loss` (same signature): ``cgidm_core.base_recovery`` runs the base alone.
    """
    # 1. Check the settings; one seeded noise source per image.
    config.validate(pair.num_train_timesteps)
    if len(seeds) != images.shape[0]:
        raise ConfigError(f"need one seed per image: {len(seeds)} seeds for {images.shape[0]}")
    t_range = (config.t_min, config.resolved_t_max(pair.num_train_timesteps))
    source = _NoiseSource(seeds, pair.latent_shape, t_range)
    # 2. Encode the images, split each latent into kept and free cells, start from the kept half.
    start = _starting_point(pair, images, config, source)
    z0, keep, free, z_start = start.z0, start.keep, start.free, start.z_start
    alpha, epsilon = scaled_radius(config, int(free.sum().item()) * z0.shape[1])
    bounds = _latent_box(pair, config, z0, keep)
    # 3. Projected gradient descent on the contrast loss, over the free cells only.
    delta = torch.zeros_like(z0)
    recorded: dict[str, torch.Tensor] = {}
    delta_sum = torch.zeros_like(z0) if average_from is not None else None
    losses = torch.zeros(z0.shape[0], config.steps)
    nonfinite = torch.zeros(z0.shape[0], dtype=torch.long, device=pair.device)
    for step in range(config.steps):
        if should_cancel is not None and step % cancel_every == 0 and should_cancel():
            raise Cancelled(f"cancelled after {step} of {config.steps} steps")
        delta, loss, skipped = _pgd_step(pair, cond, config, source, start, delta, alpha,
                                         epsilon, bounds, objective or contrast_loss)
        nonfinite += skipped
        with torch.no_grad():
            # delta_sum is kept only when average_from is set, so average_from is an int here
            if delta_sum is not None and step + 1 > average_from:  # type: ignore[operator]
                delta_sum += delta
            if step + 1 in record_steps:
                recorded[f"step{step + 1}"] = pair.decode(z0 * keep + (z_start + delta) * free)
        losses[:, step] = loss.detach().float().cpu()
        if progress is not None:
            progress(step + 1, config.steps)
    # 4. Decode the recovery (and the extras asked for); everything goes back on the CPU.
    with torch.no_grad():
        recovered_latent = z0 * keep + (z_start + delta) * free
        recovered = pair.decode(recovered_latent).float().cpu()
        partial = pair.decode(z_start).float().cpu()
        start_point = (pair.decode(z0 * keep + z_start * free).float().cpu()
                       if config.reencode_partial else partial)
        if delta_sum is not None and config.steps > average_from:  # type: ignore[operator]
            # delta_sum is kept only when average_from is set, so average_from is an int here
            mean_delta = delta_sum / (config.steps - average_from)  # type: ignore[operator]
            recorded["average"] = pair.decode(z0 * keep + (z_start + mean_delta) * free)
    return InversionOutput(
        original=images.float().cpu(),
        partial=partial,
        recovered=recovered,
        mask=upsample_mask(keep, pair.pixels_per_latent).cpu(),
        losses=losses,
        delta_norm=_per_image_norm(delta).flatten().cpu(),
        latent_original=z0.cpu(),
        latent_recovered=recovered_latent.float().cpu(),
        latent_mask=keep.cpu(),
        epsilon=epsilon,
        nonfinite_steps=nonfinite.cpu(),
        recovered_at={k: v.float().cpu() for k, v in recorded.items()},
        start=start_point,
    )


@dataclass
class _Start:
    """The encoded images (``z0``), the kept/free cell masks (1 = kept) and the latent the PGD
    starts from (``z_start``: the kept half, re-encoded when the config asks)."""

    z0: torch.Tensor
    keep: torch.Tensor
    free: torch.Tensor
    z_start: torch.Tensor


def _starting_point(pair: ModelPair, images: torch.Tensor, config: InversionConfig,
                    source: _NoiseSource) -> _Start:
    """Encode the batch (the posterior mean, or a draw from it as the reference does), mask it
    with the checkerboard and build the starting latent."""
    device = pair.device
    with torch.no_grad():
        if config.sample_latent:
            # The posterior draws come first from each image's generator, then the PGD's.
            z0 = pair.encode_sampled(images.to(device), source.generators).float()
        else:
            z0 = pair.encode(images.to(device)).float()
    source.shape = tuple(z0.shape[1:])  # type: ignore[assignment]  # torch.Size of ints
    latent_shape = tuple(z0.shape[1:])
    # tuple(z0.shape[1:]) of a 4-d latent is its (C, H, W)
    cell = config.cell or default_cell(latent_shape, pair.pixels_per_latent)  # type: ignore[arg-type]
    # tuple(z0.shape[1:]) of a 4-d latent is its (C, H, W)
    keep = checkerboard_mask(latent_shape, cell).to(device)  # type: ignore[arg-type]
    with torch.no_grad():
        z_start = z0 * keep
        if config.reencode_partial:
            partial_pixels = pair.decode(z_start)
            if config.quantize_partial:
                partial_pixels = quantize_8bit(partial_pixels)
            if config.sample_latent:
                z_start = pair.encode_sampled(partial_pixels, source.generators).float()
            else:
                z_start = pair.encode(partial_pixels).float()
    return _Start(z0=z0, keep=keep, free=1.0 - keep, z_start=z_start)


def _latent_box(pair: ModelPair, config: InversionConfig, z0: torch.Tensor,
                keep: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float] | None:
    """The box the recovery is kept in: the latent space's valid range (``bounded``), narrowed
    per image and channel to the kept cells' range (``palette_bounds``); ``None``: no box."""
    bounds: tuple[torch.Tensor | float, torch.Tensor | float] | None = (
        pair.latent_bounds if config.bounded else None)
    if config.palette_bounds:
        big = torch.finfo(z0.dtype).max
        kept = keep.bool().expand_as(z0)
        low = torch.where(kept, z0, big).amin(dim=(2, 3), keepdim=True)
        high = torch.where(kept, z0, -big).amax(dim=(2, 3), keepdim=True)
        if bounds is not None:
            # torch's overloads take both bounds as tensors or both as numbers: a box is one
            low, high = low.clamp(*bounds), high.clamp(*bounds)  # type: ignore[arg-type]
        bounds = (low, high)  # per image and channel
    return bounds


def _pgd_step(pair: ModelPair, cond: Conditioning, config: InversionConfig,
              source: _NoiseSource, start: _Start, delta: torch.Tensor, alpha: float,
              epsilon: float, bounds: tuple[torch.Tensor | float, torch.Tensor | float] | None,
              objective: Callable[..., torch.Tensor],
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One L2 PGD step: draw the timesteps and noise, take the objective's gradient (the contrast
    loss, or the base model's own loss for its recovery) with
    respect to the free cells' perturbation, step along its per-image normalised direction,
    project onto the L2 ball and the box. Returns the new perturbation, the loss and the 0/1
    per image whose gradient was not finite (its step skipped)."""
    samples = config.mc_samples
    t, noise_ft = source.draw(samples)
    noise_pre = None if config.common_random_numbers else source.draw_noise(samples)
    delta.requires_grad_(True)
    z_in = start.z0 * start.keep + (start.z_start + delta) * start.free
    loss = objective(pair, z_in, cond, t, noise_ft, noise_pre, samples)
    (grad,) = torch.autograd.grad(loss.sum(), delta)
    with torch.no_grad():
        grad, skipped = _skip_nonfinite(grad)
        delta = delta.detach() - alpha * grad / _per_image_norm(grad).clamp_min(1e-12)
        norm = _per_image_norm(delta)
        delta = delta * (epsilon / norm.clamp_min(1e-12)).clamp(max=1.0)
        if bounds is not None:
            # Projecting onto the box after the ball keeps delta inside both: the box only
            # shrinks entries towards z_start, which lowers the norm.
            # torch's overloads take both bounds as tensors or both as numbers: a box is one
            delta = (start.z_start + delta).clamp(*bounds) - start.z_start  # type: ignore[arg-type]
    return delta, loss, skipped


def _skip_nonfinite(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the gradient of every image that has a non-finite entry; returns it and a 0/1 mask.

    The authors' PGD (``PGD.py``, L2 branch) replaces the whole normalised gradient by zeros when
    it holds any NaN (an infinite entry becomes NaN in their normalisation), so the step leaves
    delta where it was. Per image is the batched equivalent: only the poisoned image skips.
    """
    bad = ~torch.isfinite(grad).flatten(1).all(dim=1)
    mask = bad.view(-1, *([1] * (grad.dim() - 1)))
    # Always the same ops (no data-dependent branch): no extra device synchronisation per step.
    return torch.where(mask, torch.zeros_like(grad), grad), bad.long()

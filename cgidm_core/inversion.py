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
from dataclasses import asdict, dataclass, field, replace

import torch

from .errors import Cancelled, ConfigError
from .images import quantize_8bit
from .masks import checkerboard_mask, default_cell, upsample_mask
from .pair import Conditioning, ModelPair

#: The reference step size and radius are stated for a 4x64x64 SD latent with half of it free.
REFERENCE_FREE_ENTRIES = 4 * 64 * 64 // 2

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


#: ``InversionConfig.gradient_checkpointing`` values.
GRADIENT_CHECKPOINTING_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class InversionConfig:
    """Settings of the PGD; ``alpha`` and ``epsilon`` are given for a 4x64x64 latent.

    For other latent sizes both are scaled by sqrt(free entries / 8192), which keeps the per-entry
    step and radius of the reference, so one setting means the same thing for SD and pixel models.

    Our defaults were chosen by measurement (``benchmarks/sweep.py``, Van Gogh 10 members vs 10
    hold-outs; table in README "Defaults"). On the strongly fine-tuned demo pair a step of 4.0
    reaches AUC 1.0 on every pixel metric by 25 steps where the reference step 2.0 needs ~50.
    On the lightly fine-tuned pair (demo-vangogh-light) SSIM AUC rises from 0.86 at 50 steps to
    0.90 at 100, equal to the reference settings cut to 100 steps and above the full 1000-step
    reference (0.84), so the default is 100 steps: 10x fewer than the reference. Common random
    numbers beat independent noise at every step count measured; a second Monte Carlo sample
    helped less than it cost.
    """

    steps: int = 100
    alpha: float = 4.0
    epsilon: float = 70.0
    t_min: int = 1
    t_max: int | None = None  # None: the last training timestep - 1 (999 for 1000 steps)
    mc_samples: int = 1
    common_random_numbers: bool = True
    reencode_partial: bool = False
    #: Sample the VAE latent from its posterior (``latent_dist.sample()``, from the image's
    #: seeded generator) as the reference does, instead of taking the mean. No effect on pixel
    #: models.
    sample_latent: bool = False
    #: Round the decoded partial image to 8-bit pixels before re-encoding it, as the reference's
    #: PIL round trip does. Needs ``reencode_partial``.
    quantize_partial: bool = False
    cell: int | None = None  # latent pixels per mask square; None: see masks.default_cell
    seed: int = 0
    #: Keep the recovery inside the latent space's valid range (pixel pairs: [-1, 1]) after each
    #: step, so the PGD cannot "recover" values no image has. No effect on unbounded latents.
    bounded: bool = True
    #: Pixel side the images are resized and centre-cropped to; ``None``: the model's native size
    #: (SD 1.x 512, SD 2.x-768 768, SDXL 1024, read from the model). A smaller side makes a
    #: cheaper check; the mask cells and the PGD step and radius scale with the latent size as
    #: they do for every model (``masks.default_cell``, :func:`scaled_radius`).
    resolution: int | None = None
    #: Keep each channel of the recovered cells inside the range that channel takes in the kept
    #: cells of the same image (its "palette"): recoveries for looking at. Off by default: on the
    #: suite's strong Van Gogh pair it made members' recoveries much closer to the originals
    #: (SSIM AUC stayed 1.00, PSNR's fell to 0.88); weaker pairs were not measured with it
    #: (docs/ACCURACY.md, "Pictures").
    palette_bounds: bool = False
    #: Recompute the denoisers' activations in the backward pass instead of keeping them:
    #: "auto" switches it on only where one image would not fit the GPU's free memory without it
    #: (``devices.checkpointing_needed``: an SDXL full pair at 1024 px in float16 on a 24 GB
    #: card; a Flux pair everywhere but the largest cards), "on"/"off" force it. It trades about
    #: a third more denoiser compute for ~10x less activation memory and changes no number
    #: (tests/test_family_memory.py).
    gradient_checkpointing: str = "auto"
    #: Also recover each image with the base model alone (``cgidm_core.base_recovery``): the
    #: same PGD on the pretrained model's denoising loss, shown beside the contrast recovery in
    #: the report. Changes no score; costs about half the contrast's time again. Off in the
    #: library; ``cgidm check`` and the service switch it on.
    base_recovery: bool = False

    @classmethod
    def reference(cls, **overrides: object) -> InversionConfig:
        """The authors' path wherever it is a choice: 1000 steps, alpha 2, epsilon 70, independent
        noise per model, one Monte Carlo sample, latents sampled from the VAE posterior, the
        partial image decoded, rounded to 8-bit pixels and re-encoded, no box constraint.

        What still differs from their code (README, on ``InversionConfig.reference()``): every
        draw comes from a per-image seeded generator (theirs are unseeded), the networks run in
        the pair's dtype (they run float16 on a GPU), and the score is computed per image (theirs
        is each original's best match over all recoveries of its split; ``cgidm eval --protocol
        paper`` reports that too).
        """
        base = cls(
            steps=1000,
            alpha=2.0,
            epsilon=70.0,
            t_min=1,
            t_max=None,
            mc_samples=1,
            common_random_numbers=False,
            reencode_partial=True,
            sample_latent=True,
            quantize_partial=True,
            bounded=False,
        )
        return replace(base, **overrides)  # type: ignore[arg-type]

    def validate(self, num_train_timesteps: int | None = None) -> None:
        if not 1 <= self.steps <= 100_000:
            raise ConfigError(f"steps must be between 1 and 100000, got {self.steps}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha must be a positive number, got {self.alpha}")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"epsilon must be a positive number, got {self.epsilon}")
        if not 1 <= self.mc_samples <= 64:
            raise ConfigError(f"mc_samples must be between 1 and 64, got {self.mc_samples}")
        if self.quantize_partial and not self.reencode_partial:
            raise ConfigError(
                "quantize_partial rounds the partial image before it is re-encoded; it needs "
                "reencode_partial=True"
            )
        if self.gradient_checkpointing not in GRADIENT_CHECKPOINTING_MODES:
            raise ConfigError(
                f"gradient_checkpointing must be one of {', '.join(GRADIENT_CHECKPOINTING_MODES)}"
                f", got {self.gradient_checkpointing!r}"
            )
        if self.cell is not None and self.cell < 1:
            raise ConfigError(f"cell must be >= 1, got {self.cell}")
        if self.resolution is not None and not 8 <= self.resolution <= 4096:
            raise ConfigError(f"resolution must be between 8 and 4096 pixels, got "
                              f"{self.resolution}")
        t_max = self.resolved_t_max(num_train_timesteps or 1000)
        if not 0 <= self.t_min <= t_max:
            raise ConfigError(
                f"timestep range [{self.t_min}, {t_max}] is empty; need 0 <= t_min <= t_max"
            )
        if num_train_timesteps is not None and t_max >= num_train_timesteps:
            raise ConfigError(
                f"t_max {t_max} is beyond the model's {num_train_timesteps} training timesteps"
            )

    def resolved_t_max(self, num_train_timesteps: int) -> int:
        return self.t_max if self.t_max is not None else num_train_timesteps - 1

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


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
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


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
    config.validate(pair.num_train_timesteps)
    if len(seeds) != images.shape[0]:
        raise ConfigError(f"need one seed per image: {len(seeds)} seeds for {images.shape[0]}")
    device = pair.device
    t_range = (config.t_min, config.resolved_t_max(pair.num_train_timesteps))
    source = _NoiseSource(seeds, pair.latent_shape, t_range)
    with torch.no_grad():
        if config.sample_latent:
            # The posterior draws come first from each image's generator, then the PGD's.
            z0 = pair.encode_sampled(images.to(device), source.generators).float()
        else:
            z0 = pair.encode(images.to(device)).float()
    source.shape = tuple(z0.shape[1:])  # type: ignore[assignment]
    latent_shape = tuple(z0.shape[1:])
    cell = config.cell or default_cell(latent_shape, pair.pixels_per_latent)  # type: ignore[arg-type]
    keep = checkerboard_mask(latent_shape, cell).to(device)  # type: ignore[arg-type]
    free = 1.0 - keep
    free_entries = int(free.sum().item()) * latent_shape[0]
    alpha, epsilon = scaled_radius(config, free_entries)

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

    delta = torch.zeros_like(z0)
    bounds = pair.latent_bounds if config.bounded else None
    if config.palette_bounds:
        big = torch.finfo(z0.dtype).max
        kept = keep.bool().expand_as(z0)
        low = torch.where(kept, z0, big).amin(dim=(2, 3), keepdim=True)
        high = torch.where(kept, z0, -big).amax(dim=(2, 3), keepdim=True)
        if bounds is not None:
            low, high = low.clamp(*bounds), high.clamp(*bounds)
        bounds = (low, high)  # per image and channel
    recorded: dict[str, torch.Tensor] = {}
    delta_sum = torch.zeros_like(z0) if average_from is not None else None
    losses = torch.zeros(z0.shape[0], config.steps)
    samples = config.mc_samples
    nonfinite = torch.zeros(z0.shape[0], dtype=torch.long, device=device)

    for step in range(config.steps):
        if should_cancel is not None and step % cancel_every == 0 and should_cancel():
            raise Cancelled(f"cancelled after {step} of {config.steps} steps")
        t, noise_ft = source.draw(samples)
        noise_pre = None if config.common_random_numbers else source.draw_noise(samples)
        delta.requires_grad_(True)
        z_in = z0 * keep + (z_start + delta) * free
        loss = (objective or contrast_loss)(pair, z_in, cond, t, noise_ft, noise_pre, samples)
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        with torch.no_grad():
            grad, skipped = _skip_nonfinite(grad)
            nonfinite += skipped
            delta = delta.detach() - alpha * grad / _per_image_norm(grad).clamp_min(1e-12)
            norm = _per_image_norm(delta)
            delta = delta * (epsilon / norm.clamp_min(1e-12)).clamp(max=1.0)
            if bounds is not None:
                # Projecting onto the box after the ball keeps delta inside both: the box only
                # shrinks entries towards z_start, which lowers the norm.
                delta = (z_start + delta).clamp(*bounds) - z_start
            if delta_sum is not None and step + 1 > average_from:  # type: ignore[operator]
                delta_sum += delta
            if step + 1 in record_steps:
                recorded[f"step{step + 1}"] = pair.decode(z0 * keep + (z_start + delta) * free)
        losses[:, step] = loss.detach().float().cpu()
        if progress is not None:
            progress(step + 1, config.steps)

    with torch.no_grad():
        recovered_latent = z0 * keep + (z_start + delta) * free
        recovered = pair.decode(recovered_latent).float().cpu()
        partial = pair.decode(z_start).float().cpu()
        if delta_sum is not None and config.steps > average_from:  # type: ignore[operator]
            mean_delta = delta_sum / (config.steps - average_from)  # type: ignore[operator]
            recorded["average"] = pair.decode(z0 * keep + (z_start + mean_delta) * free)
    pixel_keep = upsample_mask(keep, pair.pixels_per_latent).cpu()
    return InversionOutput(
        original=images.float().cpu(),
        partial=partial,
        recovered=recovered,
        mask=pixel_keep,
        losses=losses,
        delta_norm=_per_image_norm(delta).flatten().cpu(),
        latent_original=z0.cpu(),
        latent_recovered=recovered_latent.float().cpu(),
        latent_mask=keep.cpu(),
        epsilon=epsilon,
        nonfinite_steps=nonfinite.cpu(),
        recovered_at={k: v.float().cpu() for k, v in recorded.items()},
    )


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

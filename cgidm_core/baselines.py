"""Cheap membership scores for any :class:`~cgidm_core.pair.ModelPair`: baselines and pre-screens.

CGI-DM spends thousands of network passes per image. The literature's single-model attacks spend
1 to about 12, and on a strongly fine-tuned model they can be as good. They run here on the same
pair interface as the method (pixel DDPM and Stable Diffusion alike), so every number in a
comparison is measured on the same models, images and preprocessing.

Conventions (shared by every function):

- input: latents ``z0`` ``(N, C, H, W)`` float32 from ``pair.encode`` and the conditioning;
- output: a float32 CPU tensor ``(N,)`` where HIGHER means "more likely a member";
- timesteps are stated for a 1000-step schedule, as in the papers, and scaled to the pair's
  schedule length;
- randomness (noise, timesteps) comes from one generator per image, seeded from the image's
  content and the global seed (:func:`cgidm_core.images.image_seed`), so an image scores the same
  alone or in any batch, in any position;
- errors are means over latent entries (a monotone rescaling of the papers' sums, so rankings and
  AUCs are identical, but values are comparable across image sizes);
- the forward process and the regression target are the pair's (``pair.add_noise``,
  ``pair.loss_target``): noise for DDPM-style pairs, the velocity ``noise - x0`` at
  ``x_s = (1 - s) x0 + s noise`` for flow-matching pairs (``s = t / 1000``). ``loss`` and
  ``contrast`` therefore run on both; ``pia`` and ``secmi`` step a deterministic DDIM sampler on
  the DDPM schedule and refuse a flow-matching pair (:func:`require_ddpm_schedule`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import ConfigError
from .images import image_seed
from .inversion import contrast_loss
from .pair import Conditioning, ModelPair

#: Default timesteps of the loss attack (for a 1000-step schedule): see :func:`loss_attack`.
LOSS_TIMESTEPS: tuple[int, ...] = (50, 100, 200)
#: PIA's attack timestep and norm (Kong et al. 2024, DDPM setting).
PIA_TIMESTEP = 200
PIA_NORM = 4
#: SecMI_stat's t_SEC and step interval (Duan et al. 2023).
SECMI_TIMESTEP = 100
SECMI_INTERVAL = 10
#: Monte Carlo samples of the contrast score.
CONTRAST_SAMPLES = 8
#: Samples of the shared-draw contrast (:func:`contrast_shared`): the memorisation measure's.
SHARED_CONTRAST_SAMPLES = 64


# --------------------------------------------------------------------------------------------
# helpers


def scale_timestep(t: int, num_train_timesteps: int) -> int:
    """Map a timestep stated for a 1000-step schedule onto this pair's schedule length."""
    scaled = round(t * num_train_timesteps / 1000)
    return int(min(max(scaled, 0), num_train_timesteps - 1))


def _check_inputs(pair: ModelPair, z0: torch.Tensor, batch_size: int) -> None:
    if z0.dim() != 4 or z0.shape[0] == 0:
        raise ConfigError(f"latents must be a non-empty (N, C, H, W) batch, got {tuple(z0.shape)}")
    # Any side the denoiser can halve is fine: a check may run below the native size.
    multiple = getattr(pair, "latent_multiple", 1)
    if z0.shape[1] != pair.latent_shape[0] or z0.shape[2] % multiple or z0.shape[3] % multiple:
        raise ConfigError(
            f"latents of shape {tuple(z0.shape[1:])} do not fit the pair's latent shape "
            f"{tuple(pair.latent_shape)}; encode the images with pair.encode first"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")


def _seeds_for(z0: torch.Tensor, seed: int, seeds: Sequence[int] | None) -> list[int]:
    """Per-image seeds: given ones (from the images, preferred) or derived from the latents."""
    if seeds is not None:
        if len(seeds) != z0.shape[0]:
            raise ConfigError(f"need one seed per image: {len(seeds)} seeds for {z0.shape[0]}")
        return [int(s) for s in seeds]
    return [image_seed(z, seed) for z in z0]


def _eps_ft(pair: ModelPair, z: torch.Tensor, t: int | torch.Tensor, cond: Conditioning
           ) -> torch.Tensor:
    """Fine-tuned model's noise prediction for a batch, at one timestep or per-row timesteps."""
    if not isinstance(t, torch.Tensor):
        t = torch.full((z.shape[0],), int(t), dtype=torch.long)
    return pair.eps_finetuned(z, t.to(pair.device), cond).float()  # adapters expand cond


def _in_chunks(
    z0: torch.Tensor, batch_size: int, fn: Callable[[torch.Tensor, slice], torch.Tensor]
) -> torch.Tensor:
    """Apply ``fn(chunk_on_device, index_slice)`` to slices of at most ``batch_size`` images."""
    out = []
    for start in range(0, z0.shape[0], batch_size):
        idx = slice(start, min(start + batch_size, z0.shape[0]))
        out.append(fn(z0[idx], idx).float().cpu())
    return torch.cat(out)


def require_ddpm_schedule(pair: ModelPair, method: str) -> None:
    """Refuse a flow-matching pair for a method defined on the DDPM noise schedule."""
    if pair.alphas_cumprod is None:
        raise ConfigError(
            f"{method} is defined on a DDPM noise schedule (it runs deterministic DDIM steps "
            f"with alphas_cumprod) and this {pair.family} pair is flow-matching (velocity "
            "prediction, no alphas); use the loss attack or the contrast score, which follow the "
            "pair's own forward process"
        )


def _abar(pair: ModelPair, t: int) -> torch.Tensor:
    assert pair.alphas_cumprod is not None, "require_ddpm_schedule first"
    return pair.alphas_cumprod[t].float()


def _ddim_step(
    pair: ModelPair, x: torch.Tensor, t_from: int, t_to: int, cond: Conditioning
) -> torch.Tensor:
    """Deterministic DDIM move from ``t_from`` to ``t_to`` (up or down), fine-tuned model."""
    eps = _eps_ft(pair, x, t_from, cond)
    a_from, a_to = _abar(pair, t_from), _abar(pair, t_to)
    x0_pred = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0_pred + (1 - a_to).sqrt() * eps


# --------------------------------------------------------------------------------------------
# the attacks


@torch.no_grad()
def loss_attack(
    pair: ModelPair,
    z0: torch.Tensor,
    cond: Conditioning,
    *,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    timesteps: Sequence[int] = LOSS_TIMESTEPS,
    batch_size: int = 8,
) -> torch.Tensor:
    """The loss attack (Matsumoto et al. 2023; Carlini et al. 2023): minus the fine-tuned model's
    denoising error, averaged over a few fixed timesteps with fixed, seeded noise.

    On a flow-matching pair the error is the velocity error at ``x_s`` with ``s = t / 1000``
    (0.05, 0.1, 0.2 by default: the same low-noise end of the process).

    Why t in {50, 100, 200}: the denoising error separates members best at small-to-moderate
    noise (Carlini et al. found t around 100 the most discriminative for DDPMs); at t near 0 the
    task is trivial for every image, at large t the noise swamps the image. One noise draw per
    timestep, so it costs ``len(timesteps)`` model evaluations per image.
    """
    _check_inputs(pair, z0, batch_size)
    if not timesteps:
        raise ConfigError("loss_attack needs at least one timestep")
    ts = [scale_timestep(t, pair.num_train_timesteps) for t in timesteps]
    per_image = _seeds_for(z0, seed, seeds)
    k = len(ts)
    shape = tuple(z0.shape[1:])

    def run(chunk: torch.Tensor, idx: slice) -> torch.Tensor:
        n = chunk.shape[0]
        noise = torch.cat([
            torch.randn((k, *shape), generator=torch.Generator().manual_seed(s))
            for s in per_image[idx]
        ]).to(pair.device)
        t = torch.tensor(ts * n, dtype=torch.long, device=pair.device)
        z = chunk.to(pair.device).float().repeat_interleave(k, dim=0)
        z_t = pair.add_noise(z, noise, t)
        target = pair.loss_target(z, noise, t)
        err = (_eps_ft(pair, z_t, t, cond) - target).pow(2).flatten(1).mean(1)
        return -err.view(n, k).mean(1)

    return _in_chunks(z0, batch_size, run)


@torch.no_grad()
def pia(
    pair: ModelPair,
    z0: torch.Tensor,
    cond: Conditioning,
    *,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    t: int = PIA_TIMESTEP,
    p: int = PIA_NORM,
    normalize: bool = False,
    batch_size: int = 8,
) -> torch.Tensor:
    """Proximal Initialization Attack (Kong et al., ICLR 2024), two model evaluations per image.

    ``eps0 = eps_ft(z0, 0)`` is the model's own guess of the noise at the clean image; noising z0
    with *that* instead of random noise gives ``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps0``,
    and a member's prediction at z_t returns close to eps0. Score: minus the mean ``|.|^p`` of
    ``eps_ft(z_t, t) - eps0``, with p = 4 and t = 200 (of 1000) as in the authors' DDPM setting
    (their code: ``lp=4``; the paper picks t = 200 as the best single timestep). Deterministic:
    ``seed`` and ``seeds`` are accepted for a uniform signature and unused.

    Known failure, not a sign error (measured, docs/ACCURACY.md "Baselines' directions"): on a
    fine-tune that has memorised its members, ``eps0`` is smaller for members than for anything
    else (demo-vangogh: mean ``|eps0|`` 0.30 vs 0.56 for the hold-out, and ``-|eps0|`` alone
    separates them perfectly), so a member's ``z_t`` carries far less noise than the model saw
    at t = 200 and its prediction error there is the larger one: AUC 0.02 on demo-vangogh,
    0.79 on demo-vangogh-light. PIA assumes ``eps0`` looks like noise, as it does for models
    trained on large sets. ``normalize=True`` is the authors' PIAN (``eps0`` rescaled to the
    mean absolute value of a standard normal, Kong et al. Eq. 10), the ``pian`` baseline, which
    removes exactly that: 0.91 and 0.98 on the two demo pairs.
    """
    del seed, seeds
    _check_inputs(pair, z0, batch_size)
    require_ddpm_schedule(pair, "PIA")
    if p < 1:
        raise ConfigError(f"PIA's norm p must be >= 1, got {p}")
    t_att = scale_timestep(t, pair.num_train_timesteps)
    if t_att < 1:
        raise ConfigError(f"PIA's timestep {t} is below one step of this schedule")
    abar = _abar(pair, t_att)

    def run(chunk: torch.Tensor, idx: slice) -> torch.Tensor:
        z = chunk.to(pair.device).float()
        eps0 = _eps_ft(pair, z, 0, cond)
        if normalize:  # PIAN: eps0 rescaled so that its mean |value| is a standard normal's
            scale = eps0.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *[1] * (z.dim() - 1))
            eps0 = eps0 / scale * math.sqrt(2 / math.pi)
        z_t = abar.sqrt() * z + (1 - abar).sqrt() * eps0
        diff = _eps_ft(pair, z_t, t_att, cond) - eps0
        return -diff.abs().pow(p).flatten(1).mean(1)

    return _in_chunks(z0, batch_size, run)


@torch.no_grad()
def secmi(
    pair: ModelPair,
    z0: torch.Tensor,
    cond: Conditioning,
    *,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    t_sec: int = SECMI_TIMESTEP,
    interval: int = SECMI_INTERVAL,
    batch_size: int = 8,
) -> torch.Tensor:
    """SecMI_stat (Duan et al., ICML 2023): the error of one step-wise DDIM round trip.

    As in the authors' ``secmia.py``: invert z0 deterministically with DDIM in steps of
    ``interval`` up to ``t_sec - interval`` (x_s), take one more inversion step to ``t_sec`` and
    one denoising step back to ``t_sec - interval`` (x_s'), score minus ``||x_s - x_s'||^2``.
    Defaults t_sec = 100, interval = 10 (of 1000): 11 model evaluations per image. Members, whose
    posterior the model estimates well, come back closer. Deterministic: ``seed``/``seeds``
    unused.
    """
    del seed, seeds
    _check_inputs(pair, z0, batch_size)
    require_ddpm_schedule(pair, "SecMI")
    big_t = pair.num_train_timesteps
    k = max(1, scale_timestep(interval, big_t))
    top = scale_timestep(t_sec, big_t)
    if top - k < k:
        raise ConfigError(
            f"SecMI needs t_sec >= 2 * interval on this schedule (t_sec={top}, interval={k})"
        )
    steps = list(range(0, top, k))  # 0, k, 2k, ..., the last below t_sec
    x_s_t = steps[-1]
    x_up_t = min(x_s_t + k, big_t - 1)

    def run(chunk: torch.Tensor, idx: slice) -> torch.Tensor:
        x = chunk.to(pair.device).float()
        for t_from, t_to in zip(steps[:-1], steps[1:], strict=True):
            x = _ddim_step(pair, x, t_from, t_to, cond)
        up = _ddim_step(pair, x, x_s_t, x_up_t, cond)
        back = _ddim_step(pair, up, x_up_t, x_s_t, cond)
        return -(back - x).pow(2).flatten(1).mean(1)

    return _in_chunks(z0, batch_size, run)


@torch.no_grad()
def contrast(
    pair: ModelPair,
    z0: torch.Tensor,
    cond: Conditioning,
    *,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    samples: int = CONTRAST_SAMPLES,
    t_min: int = 1,
    t_max: int | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """CGI-DM's own objective at the original image, with no inversion: 2 * ``samples`` passes.

    ``-(1/K) sum_k [ ||eps_ft(z_t, t_k) - eps_k||^2 - ||eps_pre(z_t, t_k) - eps_k||^2 ]`` with
    common random numbers (the same t_k and eps_k for both models). A member has a lower
    fine-tuned error *relative to the base*, so subtracting the base's error removes how easy
    the image is in general, which the plain loss attack cannot. Timesteps are stratified: t_k is
    uniform within the k-th of K equal slices of [t_min, t_max], which covers the schedule evenly
    and lowers the variance over plain uniform draws. Exactly 0 when both models are the same.
    """
    _check_inputs(pair, z0, batch_size)
    per_image = _seeds_for(z0, seed, seeds)
    shape = tuple(z0.shape[1:])
    lo, hi = _timestep_range(pair, samples, t_min, t_max)

    def run(chunk: torch.Tensor, idx: slice) -> torch.Tensor:
        drawn = [_stratified_draws(s, samples, lo, hi, shape) for s in per_image[idx]]
        t = torch.cat([d[0] for d in drawn])
        noise = torch.cat([d[1] for d in drawn]).to(pair.device)
        loss = contrast_loss(pair, chunk.to(pair.device).float(), cond, t, noise, None, samples)
        return -loss

    return _in_chunks(z0, batch_size, run)


def _timestep_range(pair: ModelPair, samples: int, t_min: int, t_max: int | None
                    ) -> tuple[int, int]:
    """The contrast's checked ``[t_min, t_max]`` (default: the whole schedule but t = 0)."""
    if samples < 1:
        raise ConfigError(f"contrast needs samples >= 1, got {samples}")
    big_t = pair.num_train_timesteps
    hi = big_t - 1 if t_max is None else int(t_max)
    if not 0 <= t_min <= hi < big_t:
        raise ConfigError(f"timestep range [{t_min}, {hi}] is not inside [0, {big_t - 1}]")
    return t_min, hi


def _stratified_draws(seed: int, samples: int, lo: int, hi: int, shape: tuple[int, ...]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` timesteps, the k-th uniform in the k-th of ``samples`` equal slices of
    ``[lo, hi]``, and as many standard normal noises of ``shape``, from one generator."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(samples, generator=gen, dtype=torch.float64)
    width = (hi - lo + 1) / samples
    t = lo + torch.floor((torch.arange(samples, dtype=torch.float64) + u) * width)
    noise = torch.randn((samples, *shape), generator=gen)
    return t.long().clamp(lo, hi), noise


@torch.no_grad()
def contrast_shared(
    pair: ModelPair,
    z0: torch.Tensor,
    cond: Conditioning,
    *,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    samples: int = SHARED_CONTRAST_SAMPLES,
    batch_size: int = 8,
    latents_per_pass: int | None = None,
) -> torch.Tensor:
    """The contrast with ``samples`` stratified (t, noise) draws that are the SAME for every image
    (seeded by ``seed`` alone; per-image ``seeds`` are ignored): 2 * ``samples`` passes.

    Why a second contrast: with draws of its own per image, part of the spread between two
    images' contrasts is the draws' Monte Carlo noise (the 8-draw contrast's draw noise was
    measured as large as the member / hold-out differences on the pixel suite). With common
    draws every image is scored on the same noise levels and noises, so that part is gone, and
    the per-image value is the memorisation measure's per-image loss drop
    (``cgidm_core.memorisation``, which draws its own 64), the quantity whose member / hold-out
    gap says how much a fine-tune learned. Still exactly 0 for every image when both models are
    the same. An image scores the same alone or in any batch (the draws do not depend on it).
    The (image, draw) evaluations go through the models ``latents_per_pass`` at a time (default:
    :func:`shared_contrast_pass`); the values do not depend on it.
    """
    del seeds  # the point of this score: one set of draws for every image
    _check_inputs(pair, z0, batch_size)
    lo, hi = _timestep_range(pair, samples, 1, None)
    t, noise = _stratified_draws(int(seed), samples, lo, hi, tuple(z0.shape[1:]))
    n = z0.shape[0]
    per_pass = latents_per_pass or shared_contrast_pass(batch_size, samples, pair.device)
    image = torch.arange(n).repeat_interleave(samples)
    draw = torch.arange(samples).repeat(n)
    sums = torch.zeros(n, dtype=torch.float64)
    for start in range(0, n * samples, per_pass):
        rows = slice(start, min(start + per_pass, n * samples))
        z = z0[image[rows].to(z0.device)].to(pair.device).float()
        differences = contrast_loss(pair, z, cond, t[draw[rows]],
                                    noise[draw[rows]].to(pair.device), None, 1)
        sums.index_add_(0, image[rows], differences.double().cpu())
    return (-(sums / samples)).float()


def shared_contrast_pass(batch_size: int, samples: int, device: torch.device | str) -> int:
    """Noisy latents per forward pass of :func:`contrast_shared`. On an accelerator, as many as
    the 8-draw contrast puts there at this batch size: 64 draws of one image never need more
    memory than 8 draws of 8 images (a real UNet's activations bound it). On the CPU memory is
    not the bound, a pass's fixed cost is: at least one image's draws go through at once."""
    per_pass = batch_size * CONTRAST_SAMPLES
    return max(per_pass, samples) if torch.device(device).type == "cpu" else per_pass


@torch.no_grad()
def pian(pair: ModelPair, z0: torch.Tensor, cond: Conditioning, **kwargs: Any) -> torch.Tensor:
    """PIAN (Kong et al., ICLR 2024): PIA with ``eps0`` normalised to look like Gaussian noise
    (mean ``|value|`` sqrt(2/pi)); two model evaluations per image. Why it is offered next to
    PIA: on fine-tunes that memorise their members PIA's ``eps0`` is small for members and PIA
    ranks them below the hold-out (see :func:`pia`); the normalisation removes that. Measured
    here on pixel fine-tunes only; the authors report PIAN weaker than PIA on latent diffusion
    models, where the latent noise guess is not Gaussian-like."""
    return pia(pair, z0, cond, normalize=True, **kwargs)


#: Name -> scoring function, all with the signature ``(pair, z0, cond, *, seed, seeds,
#: batch_size, ...)``.
BASELINES: dict[str, Callable[..., torch.Tensor]] = {
    "loss": loss_attack,
    "pia": pia,
    "pian": pian,
    "secmi": secmi,
    "contrast": contrast,
    "contrast64": contrast_shared,
}

#: Model evaluations per image with the default settings (for cost tables).
EVALUATIONS_PER_IMAGE: dict[str, int] = {
    "loss": len(LOSS_TIMESTEPS),
    "pia": 2,
    "pian": 2,
    "secmi": math.ceil(SECMI_TIMESTEP / SECMI_INTERVAL) - 1 + 2,
    "contrast": 2 * CONTRAST_SAMPLES,
    "contrast64": 2 * SHARED_CONTRAST_SAMPLES,
}

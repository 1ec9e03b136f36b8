"""Turning a network's raw output into the noise prediction the method works with.

The contrast ``||eps_ft - eps||^2 - ||eps_pre - eps||^2`` is defined on noise predictions, but
models are trained to predict other targets too (SD 2.x 768 predicts ``v``). Converting every
output to ``eps`` here keeps the algorithm unaware of what the networks were trained on.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from cgidm_core.errors import ModelFormatError

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: Any, where: object) -> str:
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise ModelFormatError(
            f"{where}: prediction_type {prediction_type!r} is not supported; "
            f"cgidm handles {', '.join(SUPPORTED_PREDICTION_TYPES)}"
        )
    return cast(str, prediction_type)  # one of SUPPORTED_PREDICTION_TYPES


def build_scheduler(config: dict[str, Any]) -> Any:
    """The saved scheduler, rebuilt from its config (no weights, no code from the model folder).

    The class saved with a pipeline only chooses how to *sample*; the training schedule is in its
    betas settings. Building the saved class honours every option it knows (zero-SNR rescaling,
    trained betas); a class diffusers cannot build, or one without ``alphas_cumprod``, falls back
    to the DDPM scheduler, which computes the same schedule from the same settings.
    """
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    scheduler = None
    if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin):
        try:
            # diffusers is Any to mypy (pyproject), so issubclass does not narrow cls
            scheduler = cls.from_config(config)  # type: ignore[attr-defined]
        except Exception:  # an exotic sampler that cannot be built; DDPM's formula still applies
            scheduler = None
    if scheduler is None or not hasattr(scheduler, "alphas_cumprod"):
        scheduler = diffusers.DDPMScheduler.from_config(config)
    return scheduler


def alphas_cumprod_of(scheduler: Any) -> torch.Tensor:
    """The training schedule's cumulative alphas, float32 on the CPU."""
    alphas = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32).clone()
    if alphas.ndim != 1 or alphas.numel() < 2 or not torch.isfinite(alphas).all():
        raise ModelFormatError("the scheduler config does not define a usable noise schedule")
    return alphas


def output_to_eps(
    output: torch.Tensor,
    z_t: torch.Tensor,
    t: torch.Tensor,
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Convert a float32 network output to a noise prediction (float32, same shape as ``z_t``).

    Outputs with twice the channels (learned variance, as in improved DDPM) keep the first half,
    which is the mean/eps part.
    """
    channels = z_t.shape[1]
    if output.shape[1] == 2 * channels:
        output = output[:, :channels]
    if prediction_type == "epsilon":
        return output
    abar = alphas_cumprod.to(z_t.device)[t].float().view(-1, *([1] * (z_t.ndim - 1)))
    if prediction_type == "v_prediction":
        # v = sqrt(abar) eps - sqrt(1 - abar) x0 and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        return abar.sqrt() * output + (1.0 - abar).sqrt() * z_t
    if prediction_type == "sample":
        return (z_t - abar.sqrt() * output) / (1.0 - abar).sqrt().clamp_min(1e-8)
    raise ModelFormatError(f"unsupported prediction_type {prediction_type!r}")


def expand_timesteps(t: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """Integer timesteps ``(batch,)`` on ``device`` from a scalar, ``(1,)`` or ``(batch,)``."""
    t = torch.as_tensor(t, device=device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"got {t.numel()} timesteps for a batch of {batch}")
    return t

"""The settings of the inversion and its presets, without torch.

The gateway (which never imports torch) validates and shows these settings, the command line
builds them before any model is loaded, and the library runs them: all three use this one
definition (:class:`InversionConfig`) and this one way of applying a preset and the caller's
overrides (:func:`preset_config`). :mod:`cgidm_core.inversion` re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from .errors import ConfigError
from .names import GRADIENT_CHECKPOINTING_MODES, PRESETS


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
        # overrides hold InversionConfig field values; mypy cannot match ** to the fields
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


def preset_config(preset: str | None, overrides: Mapping[str, Any] | None = None
                  ) -> InversionConfig:
    """The settings of ``preset`` (``None`` or ``"default"``: our defaults; ``"reference"``: the
    authors' path, :meth:`InversionConfig.reference`) with the caller's ``overrides`` on top:
    the command line's flags and the API's job settings both arrive here."""
    preset = preset or "default"
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    base = InversionConfig.reference() if preset == "reference" else InversionConfig()
    return replace(base, **dict(overrides or {}))

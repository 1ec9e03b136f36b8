"""Pixel-space flow-matching pairs: two ``UNet2DModel`` trained on ``(1 - s) x0 + s noise``.

The flow demo pair (``demo-flow-base`` / ``demo-flow-vangogh``) is this family: it proves the
flow-matching form of CGI-DM (the one Flux.1 needs) on real paintings on a CPU. A folder is of
this family when its scheduler is a ``FlowMatchEulerDiscreteScheduler``; the UNet then predicts
the velocity ``noise - x0`` and takes ``s * num_train_timesteps`` as its timestep (the diffusers
convention, as Flux's transformer does).
"""

from __future__ import annotations

from typing import Any

import torch

from cgidm_core.models.flow import FlowMatchingPair
from cgidm_core.models.pixel import PixelSpaceMixin
from cgidm_core.models.predictions import expand_timesteps
from cgidm_core.names import PIXEL_FLOW_FAMILY
from cgidm_core.pair import Conditioning

#: Time shift of the inversion's draws of ``s`` for pixel flow pairs, chosen by measurement on
#: the flow demo pairs (README, "Flow matching"): ``s`` uniform, as the models were trained.
PIXEL_FLOW_INVERSION_SHIFT = 1.0


class PixelFlowPair(PixelSpaceMixin, FlowMatchingPair):
    """Two unconditional pixel-space UNets trained by flow matching (velocity predictions)."""

    family = PIXEL_FLOW_FAMILY

    def __init__(
        self,
        unet_pretrained: torch.nn.Module,
        unet_finetuned: torch.nn.Module,
        *,
        num_train_timesteps: int = 1000,
        flow_shift: float = PIXEL_FLOW_INVERSION_SHIFT,
        device: torch.device,
        dtype: torch.dtype,
        finetuned_kind: str = "ddpm",
    ) -> None:
        super().__init__(
            denoiser_config=unet_pretrained.config,
            pixels_per_latent=1,
            alphas_cumprod=None,
            prediction_type="flow",
            prediction_type_finetuned=None,
            device=device,
            dtype=dtype,
            finetuned_kind=finetuned_kind,
            num_train_timesteps=num_train_timesteps,
        )
        self.flow_shift = float(flow_shift)
        self.unet_pretrained = unet_pretrained
        self.unet_finetuned = unet_finetuned

    def _velocity(self, unet: torch.nn.Module, z_t: torch.Tensor, t: torch.Tensor
                  ) -> torch.Tensor:
        z_t = z_t.to(self.device, torch.float32)
        steps = expand_timesteps(t, z_t.shape[0], self.device)
        # The network was trained on the noise level itself (s * N), so a shifted s is what it
        # must be told, not the integer draw.
        model_t = self.sigmas(steps) * self.num_train_timesteps
        return unet(z_t.to(self.dtype), model_t).sample.float()

    def eps_finetuned(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self._velocity(self.unet_finetuned, z_t, t)

    def eps_pretrained(
        self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        return self._velocity(self.unet_pretrained, z_t, t)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "prediction": "velocity", "flow_shift": self.flow_shift}

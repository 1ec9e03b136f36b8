"""Pixel-space DDPM pairs: two ``UNet2DModel`` on images directly.

The codec is the identity and there is no text, so this family is what runs fast on a CPU: the
demo and the accuracy benchmarks use it.
"""

from __future__ import annotations

import torch

from cgidm_core.models.pixel import PixelSpaceMixin
from cgidm_core.models.predictions import expand_timesteps, output_to_eps
from cgidm_core.names import DDPM_FAMILY
from cgidm_core.pair import Conditioning, ModelPair


class DDPMPair(PixelSpaceMixin, ModelPair):
    """Two unconditional pixel-space UNets sharing one noise schedule."""

    family = DDPM_FAMILY

    def __init__(
        self,
        unet_pretrained: torch.nn.Module,
        unet_finetuned: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        *,
        prediction_type: str = "epsilon",
        prediction_type_finetuned: str | None = None,
        device: torch.device,
        dtype: torch.dtype,
        finetuned_kind: str = "ddpm",
    ) -> None:
        super().__init__(
            denoiser_config=unet_pretrained.config,
            pixels_per_latent=1,
            alphas_cumprod=alphas_cumprod,
            prediction_type=prediction_type,
            prediction_type_finetuned=prediction_type_finetuned,
            device=device,
            dtype=dtype,
            finetuned_kind=finetuned_kind,
        )
        self.unet_pretrained = unet_pretrained
        self.unet_finetuned = unet_finetuned

    def _predict(self, unet: torch.nn.Module, z_t: torch.Tensor, t: torch.Tensor,
                 prediction_type: str) -> torch.Tensor:
        z_t = z_t.to(self.device, torch.float32)
        steps = expand_timesteps(t, z_t.shape[0], self.device)
        output = unet(z_t.to(self.dtype), steps).sample.float()
        # a DDPM pair is always built with its schedule's alphas_cumprod
        return output_to_eps(output, z_t, steps, prediction_type,
                             self.alphas_cumprod)  # type: ignore[arg-type]

    def eps_finetuned(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self._predict(self.unet_finetuned, z_t, t, self.prediction_type_finetuned)

    def eps_pretrained(
        self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        return self._predict(self.unet_pretrained, z_t, t, self.prediction_type)


"""What every pixel-space family shares: identity codec, no text, two ``UNet2DModel``.

The DDPM demo pair (``ddpm``) and the flow-matching demo pair (``pixel_flow``) differ only in
their forward process and what the UNet predicts; the codec, the (absent) conditioning and the
bookkeeping are these few methods, held once.
"""

from __future__ import annotations

from typing import Any

import torch

from cgidm_core.models.devices import unique_modules
from cgidm_core.pair import Conditioning


class PixelSpaceMixin:
    """Identity codec on ``[-1, 1]`` pixels and unconditional models; mixed into a ModelPair."""

    conditional = False
    preferred_batch_size = 32
    latent_bounds: tuple[float, float] | None = (-1.0, 1.0)
    device: torch.device
    finetuned_kind: str
    unet_pretrained: torch.nn.Module
    unet_finetuned: torch.nn.Module
    _unconditional = Conditioning()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, torch.float32)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(self.device, torch.float32).clamp(-1.0, 1.0)

    def conditioning(self, prompt: str | None) -> Conditioning:
        # Unconditional models: every prompt gets the same (empty) conditioning.
        return self._unconditional

    def denoisers(self) -> list[torch.nn.Module]:
        return unique_modules([self.unet_pretrained, self.unet_finetuned])

    def modules(self) -> list[torch.nn.Module]:
        return unique_modules([self.unet_pretrained, self.unet_finetuned])

    def describe(self) -> dict[str, Any]:
        # super() is the pair class the mixin is combined with; mypy sees object
        return {**super().describe(), "finetuned_kind": self.finetuned_kind}  # type: ignore[misc]

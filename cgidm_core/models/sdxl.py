"""Stable Diffusion XL pairs: the SD adapter with SDXL's conditioning.

SDXL differs from SD 1.x/2.x only in what the UNet is conditioned on, so the pair reuses the SD
pair (one float32 VAE, cached embeddings, text encoders released after encoding, one UNet with a
switchable adapter for a LoRA) and changes two things, as SDXL was trained:

- the text: both CLIP encoders run on the prompt; their penultimate hidden states are
  concatenated along the feature axis (768 + 1280 = 2048 at full size), and the projected pooled
  output of the second encoder is the extra ``text_embeds`` input;
- the added time ids: (original height, width, crop top, left, target height, width). cgidm
  centre-crops every image to the side it runs at, so it conditions on (S, S, 0, 0, S, S) with S
  the pixel side of the latents it is given: a smaller ``resolution`` conditions on that size.

The two text encoders of each model are held in one :class:`SDXLTextEncoders` module, so that
release, reload, adapter switching and memory accounting treat them like SD's one encoder.

GPU memory: the batch size comes from SDXL's own activation memory per image
(``devices.ACTIVATION_COUNTS``, counted on the meta device by ``benchmarks/activations.py``:
~10.9 GiB per image at 1024 px in float16, ~1 GiB with gradient checkpointing, which
``InversionConfig.gradient_checkpointing="auto"`` turns on where one image would not fit, e.g.
a full pair on a 24 GB card). Not yet measured on a GPU (none was lent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from cgidm_core.models.predictions import expand_timesteps, output_to_eps
from cgidm_core.models.stable_diffusion import StableDiffusionLoraPair, StableDiffusionPair
from cgidm_core.models.text_encoders import TwoTextEncoders, tokenize
from cgidm_core.names import SDXL_FAMILY

if TYPE_CHECKING:  # annotations only; mypy reads transformers as Any (pyproject.toml)
    from transformers import PreTrainedTokenizerBase


class SDXLTextEncoders(TwoTextEncoders):
    """A model's two text encoders: ``text_encoder`` (CLIP ViT-L) and ``text_encoder_2``
    (OpenCLIP ViT-bigG with projection)."""

    def encode(
        self, ids: torch.Tensor, ids_2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden (1, L, d1 + d2), pooled (1, p2))`` as SDXL's training encodes a prompt."""
        first = self.text_encoder(ids, output_hidden_states=True)
        second = self.text_encoder_2(ids_2, output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return hidden, second.text_embeds


class _SDXLConditioning:
    """What an SDXL pair does differently from an SD pair: text embedding and UNet inputs.

    A mixin placed before the SD pair classes, so that the full and the LoRA pair share it.
    """

    family = SDXL_FAMILY
    tokenizer: PreTrainedTokenizerBase
    tokenizer_2: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    pixels_per_latent: int
    alphas_cumprod: torch.Tensor

    def __init__(self, *, tokenizer_2: PreTrainedTokenizerBase, **kwargs: Any) -> None:
        self.tokenizer_2 = tokenizer_2
        super().__init__(**kwargs)

    def _tokens(self, tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
        return tokenize(tokenizer, prompt).input_ids.to(self.device)

    def _embed(
        self, tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module, prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Both models tokenize with the base's two tokenizers (the loader refuses a fine-tune
        # that grew a vocabulary); ``tokenizer`` is that first one.
        del tokenizer
        with torch.no_grad():
            # the pair's text-encoder module defines encode(); Module.__getattr__ hides it
            hidden, pooled = text_encoder.encode(  # type: ignore[operator]
                self._tokens(self.tokenizer, prompt), self._tokens(self.tokenizer_2, prompt)
            )
        return hidden.to(self.dtype), pooled.to(self.dtype)

    def time_ids(self, z_t: torch.Tensor) -> torch.Tensor:
        """``(N, 6)``: original size, crop (0, 0), target size, all the pixel side of ``z_t``."""
        height = z_t.shape[-2] * self.pixels_per_latent
        width = z_t.shape[-1] * self.pixels_per_latent
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=self.dtype)
        return ids.to(self.device).expand(z_t.shape[0], 6)

    def _predict(
        self,
        unet: torch.nn.Module,
        z_t: torch.Tensor,
        t: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor],
        prediction_type: str,
    ) -> torch.Tensor:
        z_t = z_t.to(self.device, torch.float32)
        batch = z_t.shape[0]
        steps = expand_timesteps(t, batch, self.device)
        hidden, pooled = (c.to(self.device, self.dtype) for c in context)
        if hidden.shape[0] != batch:
            hidden = hidden.expand(batch, *hidden.shape[1:])
            pooled = pooled.expand(batch, *pooled.shape[1:])
        output = unet(
            z_t.to(self.dtype),
            steps,
            encoder_hidden_states=hidden,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": self.time_ids(z_t)},
        ).sample.float()
        return output_to_eps(output, z_t, steps, prediction_type, self.alphas_cumprod)


# the conditioning mixin replaces the SD pair's _embed/_predict with its family's own
# signatures (LSP by design: only the pair itself calls them)
class StableDiffusionXLPair(_SDXLConditioning, StableDiffusionPair):  # type: ignore[misc]
    """An SDXL base and a fine-tune of it (full pipeline, DreamBooth folder or single file)."""


# the conditioning mixin replaces the SD pair's _embed/_predict with its family's own
# signatures (LSP by design: only the pair itself calls them)
class StableDiffusionXLLoraPair(_SDXLConditioning, StableDiffusionLoraPair):  # type: ignore[misc]
    """An SDXL base and a LoRA of it: ONE UNet and one pair of text encoders, adapter on/off."""

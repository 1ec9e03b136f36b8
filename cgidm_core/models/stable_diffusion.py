"""Stable Diffusion 1.x/2.x pairs in the VAE's latent space.

What the reference code loads twice is held once here: one VAE, one tokenizer, one noise
schedule; the fine-tuned text encoder only when the fine-tune changed it; and for a LoRA
fine-tune a single UNet whose adapter is switched on for the fine-tuned model and off for the
pretrained one.
"""

from __future__ import annotations

from typing import Any

import torch

from cgidm_core.models.devices import unique_modules
from cgidm_core.models.predictions import expand_timesteps, output_to_eps
from cgidm_core.pair import Conditioning, ModelPair


class StableDiffusionPair(ModelPair):
    """A Stable Diffusion base and a fine-tune of it (full, DreamBooth or single-file).

    The VAE runs in float32 whatever the networks' dtype: it is used twice per image, and the SD
    decoder can overflow in float16. A pair is not meant for concurrent use from several threads.
    """

    family = "stable-diffusion"

    def __init__(
        self,
        *,
        vae: torch.nn.Module,
        tokenizer: Any,
        alphas_cumprod: torch.Tensor,
        unet_pretrained: torch.nn.Module,
        unet_finetuned: torch.nn.Module,
        text_encoder_pretrained: torch.nn.Module,
        text_encoder_finetuned: torch.nn.Module,
        tokenizer_finetuned: Any | None = None,
        prediction_type: str = "epsilon",
        prediction_type_finetuned: str | None = None,
        device: torch.device,
        dtype: torch.dtype,
        finetuned_kind: str = "pipeline",
        default_prompt: str | None = None,
    ) -> None:
        self.vae = vae
        self.tokenizer = tokenizer
        self.tokenizer_finetuned = tokenizer if tokenizer_finetuned is None else tokenizer_finetuned
        self.unet_pretrained = unet_pretrained
        self.unet_finetuned = unet_finetuned
        self.text_encoder_pretrained = text_encoder_pretrained
        self.text_encoder_finetuned = text_encoder_finetuned
        self.device = device
        self.dtype = dtype
        self.alphas_cumprod = alphas_cumprod.to(device=device, dtype=torch.float32)
        self.prediction_type = prediction_type
        self.prediction_type_finetuned = prediction_type_finetuned or prediction_type
        self.finetuned_kind = finetuned_kind
        self.default_prompt = default_prompt

        self.pixels_per_latent = 2 ** (len(vae.config.block_out_channels) - 1)
        size = unet_pretrained.config.sample_size
        size = int(size if isinstance(size, int) else size[0])
        self.latent_shape = (int(unet_pretrained.config.in_channels), size, size)
        self.image_size = size * self.pixels_per_latent
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self._cache: dict[str, Conditioning] = {}

    # -- codec ---------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic latents: the posterior mean, shifted and scaled as the UNet expects."""
        x = images.to(self.device, self.vae.dtype)
        mean = self.vae.encode(x).latent_dist.mean
        return ((mean.float() - self.shift_factor) * self.scaling_factor).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1.0, 1.0)

    # -- conditioning --------------------------------------------------------------------------

    def _embed(self, tokenizer: Any, text_encoder: torch.nn.Module, prompt: str) -> torch.Tensor:
        tokens = tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            hidden = text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(self.dtype)

    def _embed_finetuned(self, prompt: str) -> torch.Tensor:
        return self._embed(self.tokenizer_finetuned, self.text_encoder_finetuned, prompt)

    def _embed_pretrained(self, prompt: str) -> torch.Tensor:
        return self._embed(self.tokenizer, self.text_encoder_pretrained, prompt)

    def _shares_text_encoder(self) -> bool:
        return (
            self.text_encoder_finetuned is self.text_encoder_pretrained
            and self.tokenizer_finetuned is self.tokenizer
        )

    def conditioning(self, prompt: str | None) -> Conditioning:
        """Text embeddings of ``prompt`` for each model (no classifier-free guidance), cached."""
        text = prompt if prompt is not None else (self.default_prompt or "")
        cached = self._cache.get(text)
        if cached is None:
            pretrained = self._embed_pretrained(text)
            finetuned = pretrained if self._shares_text_encoder() else self._embed_finetuned(text)
            cached = Conditioning(finetuned=finetuned, pretrained=pretrained)
            self._cache[text] = cached
        return cached

    # -- noise predictions ---------------------------------------------------------------------

    def _predict(
        self,
        unet: torch.nn.Module,
        z_t: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        prediction_type: str,
    ) -> torch.Tensor:
        z_t = z_t.to(self.device, torch.float32)
        batch = z_t.shape[0]
        steps = expand_timesteps(t, batch, self.device)
        context = context.to(self.device, self.dtype)
        if context.shape[0] != batch:
            context = context.expand(batch, *context.shape[1:])
        output = unet(z_t.to(self.dtype), steps, encoder_hidden_states=context).sample.float()
        return output_to_eps(output, z_t, steps, prediction_type, self.alphas_cumprod)

    def eps_finetuned(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self._predict(
            self.unet_finetuned, z_t, t, cond.finetuned, self.prediction_type_finetuned
        )

    def eps_pretrained(
        self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        return self._predict(self.unet_pretrained, z_t, t, cond.pretrained, self.prediction_type)

    # -- bookkeeping ---------------------------------------------------------------------------

    def modules(self) -> list[torch.nn.Module]:
        return unique_modules(
            [
                self.unet_pretrained,
                self.unet_finetuned,
                self.vae,
                self.text_encoder_pretrained,
                self.text_encoder_finetuned,
            ]
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "finetuned_kind": self.finetuned_kind,
            "prediction_type": self.prediction_type,
            "shared_text_encoder": self._shares_text_encoder(),
        }


class AdapterSwitch:
    """Turns every peft adapter layer of some networks on or off.

    Each call sets the state it needs (instead of trusting the previous call to have restored
    it), so an exception in one forward pass cannot leave the other model running with the wrong
    weights. peft's ``enable_adapters`` makes adapter weights trainable again; they are frozen
    right after, because the inversion differentiates only with respect to its input.
    """

    def __init__(self, networks: list[torch.nn.Module]) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [
            module
            for network in networks
            for module in network.modules()
            if isinstance(module, BaseTunerLayer)
        ]
        self.parameters = [
            param
            for layer in self.layers
            for name, param in layer.named_parameters()
            if "lora_" in name
        ]

    def __len__(self) -> int:
        return len(self.layers)

    def is_enabled(self) -> bool:
        return bool(self.layers) and not any(layer.disable_adapters for layer in self.layers)

    def set(self, enabled: bool) -> None:
        # Reading every layer's flag is cheap and catches anyone else having toggled them.
        if all(bool(layer.disable_adapters) != enabled for layer in self.layers):
            return
        for layer in self.layers:
            layer.enable_adapters(enabled)
        for param in self.parameters:
            param.requires_grad_(False)


class StableDiffusionLoraPair(StableDiffusionPair):
    """A base and a LoRA fine-tune of it: ONE UNet (and text encoder) with a switchable adapter."""

    def __init__(self, *, unet: torch.nn.Module, text_encoder: torch.nn.Module, **kwargs: Any):
        super().__init__(
            unet_pretrained=unet,
            unet_finetuned=unet,
            text_encoder_pretrained=text_encoder,
            text_encoder_finetuned=text_encoder,
            finetuned_kind="lora",
            **kwargs,
        )
        self.unet_adapter = AdapterSwitch([unet])
        self.text_encoder_adapter = AdapterSwitch([text_encoder])

    def _shares_text_encoder(self) -> bool:
        # Same module, but with a text-encoder LoRA it computes two different things.
        return len(self.text_encoder_adapter) == 0

    def _embed_finetuned(self, prompt: str) -> torch.Tensor:
        self.text_encoder_adapter.set(True)
        return super()._embed_finetuned(prompt)

    def _embed_pretrained(self, prompt: str) -> torch.Tensor:
        self.text_encoder_adapter.set(False)
        return super()._embed_pretrained(prompt)

    def eps_finetuned(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self.unet_adapter.set(True)
        return super().eps_finetuned(z_t, t, cond)

    def eps_pretrained(
        self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        self.unet_adapter.set(False)
        return super().eps_pretrained(z_t, t, cond)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "lora_unet_layers": len(self.unet_adapter),
            "lora_text_encoder_layers": len(self.text_encoder_adapter),
        }

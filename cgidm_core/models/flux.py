"""Flux.1 pairs (dev and schnell): CGI-DM on velocity errors in Flux's packed latent space.

Flux.1 is a rectified-flow transformer, so the forward process and the loss target are
:class:`~cgidm_core.models.flow.FlowMatchingPair`'s (``x_s = (1 - s) x0 + s noise``, target
``noise - x0``). Everything else a pair needs is what the Stable Diffusion adapter already holds,
so the Flux pair reuses it (one float32 VAE with Flux's scaling *and shift* factors, prompt
embeddings cached per prompt, text encoders released after encoding and read back for a new
prompt, ONE transformer with a switchable adapter for a LoRA) and changes, as Flux is trained
and sampled by diffusers' ``FluxPipeline``:

- the text: CLIP's pooled output (``pooled_projections``) and T5's last hidden states
  (``encoder_hidden_states``), with all-zero text position ids; T5 reads 512 tokens for dev and
  256 for schnell, as Black Forest Labs' reference code does;
- the latent: the inversion works on the unpacked ``(16, H, W)`` VAE latent (so the mask, the
  PGD and the scores stay shared); each prediction packs it into 2x2 patches, ``(H/2 * W/2,
  64)`` tokens with image position ids ``(0, row, col)``, and unpacks the velocity;
- the time: the transformer takes ``s`` in ``[0, 1]`` (diffusers multiplies it by 1000 inside);
  ``s`` comes from the drawn integer timestep through the time shift of the model's scheduler
  config at the side being run (:meth:`_FluxConditioning.shift_for`);
- the guidance embedding: Flux.1-dev is guidance-distilled and takes a guidance value
  (``guidance_embeds`` in its config), schnell takes none.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from cgidm_core.models.flow import FlowMatchingPair
from cgidm_core.models.stable_diffusion import StableDiffusionLoraPair, StableDiffusionPair
from cgidm_core.models.text_encoders import TwoTextEncoders, tokenize
from cgidm_core.names import FLUX_FAMILY

if TYPE_CHECKING:  # annotations only; mypy reads diffusers as Any (pyproject.toml)
    from diffusers import FluxTransformer2DModel
    from transformers import PreTrainedTokenizerBase

#: Guidance value for Flux.1-dev when the fine-tune does not say what it was trained with: the
#: default of diffusers' ``FluxPipeline``, of its Flux DreamBooth/LoRA training scripts and of
#: kohya-ss' ``flux_train_network.py`` (which records its own in ``ss_guidance_scale``).
DEFAULT_FLUX_GUIDANCE = 3.5
#: T5 tokens per prompt, as Black Forest Labs' reference code encodes them.
T5_TOKENS_DEV = 512
T5_TOKENS_SCHNELL = 256
#: Native side when the VAE config does not state one: Flux.1 is trained and sampled at 1024 px.
FLUX_NATIVE_SIZE = 1024


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, H/2 * W/2, 4C)``: 2x2 patches, row-major, as FluxPipeline packs."""
    n, c, h, w = latents.shape
    patches = latents.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a latent of ``height`` x ``width``."""
    n, _, features = tokens.shape
    c = features // 4
    patches = tokens.reshape(n, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, c, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids ``(H/2 * W/2, 3)`` of the packed tokens: ``(0, row, column)``."""
    rows = torch.arange(height // 2).view(-1, 1).expand(height // 2, width // 2)
    cols = torch.arange(width // 2).view(1, -1).expand(height // 2, width // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxTextEncoders(TwoTextEncoders):
    """A Flux model's two text encoders: ``text_encoder`` (CLIP ViT-L, pooled output) and
    ``text_encoder_2`` (T5-XXL encoder, 4.7B parameters at full size)."""

    def encode(
        self, clip_ids: torch.Tensor, t5_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T5 hidden states (1, L, d), CLIP pooled output (1, p))`` as FluxPipeline encodes."""
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        hidden = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return hidden, pooled


def time_shift(config: dict[str, Any], image_tokens: int) -> float:
    """The shift ``s' = shift s / (1 + (shift - 1) s)`` the scheduler config gives a latent of
    ``image_tokens`` packed tokens.

    With ``use_dynamic_shifting`` (Flux.1-dev: base 0.5 at 256 tokens, max 1.15 at 4096) ``mu``
    is interpolated linearly in the token count, as ``FluxPipeline`` computes it, and the shift
    is ``exp(mu)`` (3.16 at 1024 px, 1.88 at 512 px); otherwise it is the config's ``shift``
    (1.0 for schnell: uniform ``s``).
    """
    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", 1.0))
    base_len = float(config.get("base_image_seq_len", 256))
    max_len = float(config.get("max_image_seq_len", 4096))
    base_shift = float(config.get("base_shift", 0.5))
    max_shift = float(config.get("max_shift", 1.15))
    mu = base_shift + (max_shift - base_shift) * (image_tokens - base_len) / (max_len - base_len)
    if config.get("time_shift_type", "exponential") == "linear":
        return float(mu)
    return math.exp(mu)


def flux_latent_config(vae_config: Any) -> SimpleNamespace:
    """The latent a Flux pair works on, for :class:`~cgidm_core.pair.ModelPair`: 16 channels of
    side ``native / 8`` at full size, the native side from the VAE config (1024 when it does not
    say); the packing's 2x2 patches make the side a multiple of 2 latent pixels (16 px)."""
    scale = 2 ** (len(vae_config.block_out_channels) - 1)
    native = int(getattr(vae_config, "sample_size", None) or FLUX_NATIVE_SIZE)
    return SimpleNamespace(sample_size=native // scale,
                           in_channels=int(vae_config.latent_channels),
                           block_out_channels=(0, 0))


class _FluxConditioning:
    """What a Flux pair does differently from an SD pair: text embedding and transformer inputs.

    A mixin placed before :class:`FlowMatchingPair` and the SD pair classes, so that the full and
    the LoRA pair share it (``unet_*`` attributes hold the transformers: the names are the SD
    pair's).
    """

    family = FLUX_FAMILY
    tokenizer: PreTrainedTokenizerBase
    tokenizer_2: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    unet_pretrained: FluxTransformer2DModel
    unet_finetuned: torch.nn.Module

    def __init__(
        self,
        *,
        tokenizer_2: PreTrainedTokenizerBase,
        scheduler_config: dict[str, Any],
        guidance: float | None,
        guidance_source: str = "default",
        max_sequence_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        """``guidance`` is used only when the transformers take a guidance embedding (dev).

        Nothing here reads weights, so a pair of full-size networks built on the meta device
        (parameter accounting) is built the same way as a loaded one.
        """
        kwargs.setdefault("denoiser_config", flux_latent_config(kwargs["vae"].config))
        self.tokenizer_2 = tokenizer_2
        self.scheduler_config = dict(scheduler_config)
        super().__init__(**kwargs)
        self.guidance_embeds = bool(self.unet_pretrained.config.guidance_embeds)
        self.guidance = (
            float(DEFAULT_FLUX_GUIDANCE if guidance is None else guidance)
            if self.guidance_embeds else None
        )
        self.guidance_source = guidance_source if self.guidance_embeds else None
        default_length = T5_TOKENS_DEV if self.guidance_embeds else T5_TOKENS_SCHNELL
        self.max_sequence_length = int(max_sequence_length or default_length)
        #: ``None``: the scheduler config's shift at the side being run; a number fixes it (the
        #: loader sets the one a kohya-ss fine-tune recorded, see ``flux_loading``).
        self.flow_shift_override: float | None = None
        self.time_shift_source = "scheduler_config"

    @property
    def transformer_pretrained(self) -> torch.nn.Module:
        return self.unet_pretrained

    @property
    def transformer_finetuned(self) -> torch.nn.Module:
        return self.unet_finetuned

    # -- time ----------------------------------------------------------------------------------

    def shift_for(self, latent: torch.Tensor) -> float:
        if self.flow_shift_override is not None:
            return float(self.flow_shift_override)
        tokens = (latent.shape[-2] // 2) * (latent.shape[-1] // 2)
        return time_shift(self.scheduler_config, tokens)

    # -- text ----------------------------------------------------------------------------------

    def _tokens(self, tokenizer: PreTrainedTokenizerBase, prompt: str, length: int) -> torch.Tensor:
        return tokenize(tokenizer, prompt, length).input_ids.to(self.device)

    def _embed(
        self, tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module, prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Both models tokenize with the base's tokenizers; ``tokenizer`` is the CLIP one.
        del tokenizer
        clip_ids = self._tokens(self.tokenizer, prompt, self.tokenizer.model_max_length)
        t5_ids = self._tokens(self.tokenizer_2, prompt, self.max_sequence_length)
        with torch.no_grad():
            # the pair's text-encoder module defines encode(); Module.__getattr__ hides it
            hidden, pooled = text_encoder.encode(clip_ids, t5_ids)  # type: ignore[operator]
        return hidden.to(self.dtype), pooled.to(self.dtype)

    # -- the velocity ----------------------------------------------------------------------------

    def _predict(
        self,
        unet: torch.nn.Module,
        z_t: torch.Tensor,
        t: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor],
        prediction_type: str,
    ) -> torch.Tensor:
        """The velocity ``noise - x0`` the transformer predicts at ``z_t``, unpacked, float32."""
        del prediction_type  # always "flow"
        z_t = z_t.to(self.device, torch.float32)
        batch, _, height, width = z_t.shape
        steps = torch.as_tensor(t, device=self.device).long().reshape(-1)
        if steps.numel() == 1:
            steps = steps.expand(batch)
        # defined by the pair class this mixin is combined with (below)
        s = self.sigmas(steps, z_t)  # type: ignore[attr-defined]
        hidden, pooled = (c.to(self.device, self.dtype) for c in context)
        if hidden.shape[0] != batch:
            hidden = hidden.expand(batch, *hidden.shape[1:])
            pooled = pooled.expand(batch, *pooled.shape[1:])
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((batch,), self.guidance, device=self.device,
                                  dtype=torch.float32)
        output = unet(
            hidden_states=pack_latents(z_t).to(self.dtype),
            timestep=s.to(self.dtype),
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=self.device, dtype=self.dtype),
            img_ids=image_ids(height, width, self.device, self.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(output.float(), height, width)

    def describe(self) -> dict[str, Any]:
        return {
            # super() is the pair class the mixin is combined with; mypy sees object
            **super().describe(),  # type: ignore[misc]
            "variant": "dev" if self.guidance_embeds else "schnell",
            "guidance": self.guidance,
            "guidance_source": self.guidance_source,
            "time_shift": (
                "fixed" if self.flow_shift_override is not None
                else "dynamic" if self.scheduler_config.get("use_dynamic_shifting") else "fixed"
            ),
            "time_shift_source": self.time_shift_source,
            "time_shift_at_native_size": self.shift_for(
                # defined by the pair class this mixin is combined with (below)
                torch.empty(0, 0, *self.latent_shape[1:])  # type: ignore[attr-defined]
            ),
            "t5_tokens": self.max_sequence_length,
            "finetuned_own_text_encoders": self.own_text_encoders(),
        }

    def own_text_encoders(self) -> list[str]:
        """Which text encoders the fine-tuned model has of its own (a pipeline fine-tune's
        ``text_encoder`` CLIP and/or ``text_encoder_2`` T5 that differ from the base's)."""
        # defined by the pair class this mixin is combined with (below)
        pre, ft = self.text_encoder_pretrained, self.text_encoder_finetuned  # type: ignore[attr-defined]
        if ft is pre:
            return []
        return [name for name in ("text_encoder", "text_encoder_2")
                if getattr(ft, name) is not getattr(pre, name)]


# the conditioning mixin replaces the SD pair's _embed/_predict with its family's own
# signatures (LSP by design: only the pair itself calls them)
class FluxPair(_FluxConditioning, FlowMatchingPair, StableDiffusionPair):  # type: ignore[misc]
    """A Flux.1 base and a fine-tune of it (pipeline folder, ``transformer/`` or single file)."""


# the conditioning mixin replaces the SD pair's _embed/_predict with its family's own
# signatures (LSP by design: only the pair itself calls them)
class FluxLoraPair(_FluxConditioning, FlowMatchingPair, StableDiffusionLoraPair):  # type: ignore[misc]
    """A Flux.1 base and a LoRA of it: ONE transformer (and CLIP encoder), adapter on and off."""

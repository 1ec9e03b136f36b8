"""Chroma (lodestones' Chroma1, a de-distilled, pruned Flux.1-schnell): one adapter module,
recognition to pair.

Chroma keeps Flux.1's latent (16-channel VAE with scaling and shift, packed 2x2 into tokens with
``(0, row, col)`` position ids), its double/single-stream blocks and its rectified-flow objective,
so the pair reuses :mod:`cgidm_core.models.flux`'s packing and time shift and the SD adapter's
machinery (one float32 VAE, cached prompts, text encoder released and read back, ONE transformer
with a switchable adapter for a LoRA). What differs, as diffusers' ``ChromaPipeline`` runs it:

- the text: T5 alone (no CLIP, no pooled feature), encoded WITH its attention mask; the
  transformer's attention mask keeps the prompt's tokens and the first padding token and masks
  the rest, then all image tokens;
- no guidance embedding (Chroma is de-distilled: it is sampled with real classifier-free
  guidance, which the inversion does not use, as for every family);
- the modulation comes from a small "distilled guidance" MLP on the timestep (inside the
  transformer; nothing to feed);
- the time: ``s`` in ``[0, 1]``, shifted by ``calculate_shift``'s ``mu`` at the run's token
  count (``time_shift`` of the scheduler config).

Layouts: ``ChromaPipeline`` folder (pretrained and fine-tuned), ``transformer/`` folder, single
file (lodestones publish Chroma as one file in Black Forest Labs' naming with the
``distilled_guidance_layer.*`` tensors that tell it from Flux.1; converted offline by diffusers'
``ChromaTransformer2DModel.from_single_file`` with the base folder as config, also as the
pretrained model with ``pretrained_config``), LoRAs through diffusers' Flux LoRA loader (which
``ChromaPipeline`` uses): diffusers/peft ``transformer.*`` and kohya-style ``lora_unet_*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cgidm_core.errors import IncompatiblePairError, UnsupportedModelFamilyError
from cgidm_core.models.flow import FlowMatchingPair
from cgidm_core.models.flux import (
    flux_latent_config,
    image_ids,
    pack_latents,
    time_shift,
    unpack_latents,
)
from cgidm_core.models.formats import (
    SUPPORTED_HINT,
    lora_weights_file,
    read_json,
    transformer_family,
)
from cgidm_core.models.sd_loading import (
    LORA_ADAPTER_NAME,
    LoadOptions,
    count_adapted_layers,
    load_text_encoder,
    load_vae,
    loading_errors,
    read_lora_state_dict,
)
from cgidm_core.models.stable_diffusion import (
    StableDiffusionLoraPair,
    StableDiffusionPair,
)
from cgidm_core.models.text_encoders import tokenize
from cgidm_core.models.transformer_adapter import (
    TransformerAdapter,
    TransformerBase,
    TransformerFamily,
    auto_tokenizer,
    base_transformer,
    flow_scheduler_config,
    load_single_file_transformer,
    require_pipeline_parts,
)
from cgidm_core.names import CHROMA_FAMILY

if TYPE_CHECKING:  # annotations only; mypy reads transformers as Any (pyproject.toml)
    from transformers import PreTrainedTokenizerBase

# -- recognition (no weights read) ---------------------------------------------------------------

PIPELINE_CLASS = "ChromaPipeline"
TRANSFORMER_CLASS = "ChromaTransformer2DModel"
#: T5 tokens per prompt: ``ChromaPipeline``'s default ``max_sequence_length``.
T5_TOKENS = 512
_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


def is_chroma_single_file(keys: list[str]) -> bool:
    """A Chroma transformer as one file (``distilled_guidance_layer.*``, BFL or diffusers
    naming, optionally under ``model.diffusion_model.``)."""
    return transformer_family(keys) == CHROMA_FAMILY


def chroma_pipeline_family(folder: Path, name: str, index: dict[str, Any]) -> str:
    """``chroma`` for a ``ChromaPipeline`` folder; img2img/inpainting variants are refused."""
    config_file = folder / "transformer" / "config.json"
    transformer = read_json(config_file) if config_file.is_file() else {}
    if name != PIPELINE_CLASS or transformer.get("_class_name", TRANSFORMER_CLASS) != (
            TRANSFORMER_CLASS):
        raise UnsupportedModelFamilyError(
            f"{folder} is a {name} model: of Chroma cgidm supports the text-to-image "
            f"{PIPELINE_CLASS}. " + SUPPORTED_HINT)
    require_pipeline_parts(folder, name, index)
    return CHROMA_FAMILY


# -- the pair ------------------------------------------------------------------------------------


def text_attention_mask(tokens_mask: torch.Tensor) -> torch.Tensor:
    """The prompt tokens and the FIRST padding token, as ``ChromaPipeline`` masks the text."""
    lengths = tokens_mask.sum(dim=1)
    positions = torch.arange(tokens_mask.shape[1], device=tokens_mask.device).unsqueeze(0)
    return positions <= lengths.unsqueeze(1)


class _ChromaConditioning:
    """What a Chroma pair does differently from an SD pair (mixin before FlowMatchingPair)."""

    family = CHROMA_FAMILY
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    unet_pretrained: torch.nn.Module

    def __init__(self, *, scheduler_config: dict[str, Any],
                 max_sequence_length: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("denoiser_config", flux_latent_config(kwargs["vae"].config))
        self.scheduler_config = dict(scheduler_config)
        self.max_sequence_length = int(max_sequence_length or T5_TOKENS)
        super().__init__(**kwargs)

    def shift_for(self, latent: torch.Tensor) -> float:
        return time_shift(self.scheduler_config, (latent.shape[-2] // 2) * (latent.shape[-1] // 2))

    def _embed(self, tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module, prompt: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
        del tokenizer  # both models read the base's tokenizer
        tokens = tokenize(self.tokenizer, prompt, self.max_sequence_length)
        mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            hidden = text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(self.dtype), text_attention_mask(mask)

    def _predict(self, unet: torch.nn.Module, z_t: torch.Tensor, t: torch.Tensor,
                 context: tuple[torch.Tensor, torch.Tensor], prediction_type: str
                 ) -> torch.Tensor:
        """The velocity ``noise - x0`` at ``z_t``, unpacked, float32."""
        del prediction_type
        z_t = z_t.to(self.device, torch.float32)
        batch, _, height, width = z_t.shape
        # defined by the pair class this mixin is combined with (below)
        s = self.batch_sigmas(t, z_t)  # type: ignore[attr-defined]
        hidden, text_mask = context
        hidden = hidden.to(self.device, self.dtype)
        text_mask = text_mask.to(self.device)
        if hidden.shape[0] != batch:
            hidden = hidden.expand(batch, *hidden.shape[1:])
            text_mask = text_mask.expand(batch, *text_mask.shape[1:])
        image_tokens = (height // 2) * (width // 2)
        mask = torch.cat([text_mask.to(self.dtype),
                          torch.ones(batch, image_tokens, device=self.device, dtype=self.dtype)],
                         dim=1)
        output = unet(hidden_states=pack_latents(z_t).to(self.dtype), timestep=s.to(self.dtype),
                      encoder_hidden_states=hidden,
                      txt_ids=torch.zeros(hidden.shape[1], 3, device=self.device,
                                          dtype=self.dtype),
                      img_ids=image_ids(height, width, self.device, self.dtype),
                      attention_mask=mask, return_dict=False)[0]
        return unpack_latents(output.float(), height, width)

    def describe(self) -> dict[str, Any]:
        # super() is the pair class the mixin is combined with; mypy sees object
        return {**super().describe(),  # type: ignore[misc]
                "t5_tokens": self.max_sequence_length,
                # defined by the pair class this mixin is combined with (below)
                "time_shift_at_native_size": self.native_time_shift()}  # type: ignore[attr-defined]


# the conditioning mixin replaces the SD pair's _embed/_predict with its family's own
# signatures (LSP by design: only the pair itself calls them)
class ChromaPair(_ChromaConditioning, FlowMatchingPair, StableDiffusionPair):  # type: ignore[misc]
    """A Chroma base and a fine-tune (pipeline folder, ``transformer/`` folder or single file)."""


# the conditioning mixin replaces the SD pair's _embed/_predict with its family's own
# signatures (LSP by design: only the pair itself calls them)
class ChromaLoraPair(_ChromaConditioning, FlowMatchingPair, StableDiffusionLoraPair):  # type: ignore[misc]
    """A Chroma base and a LoRA of it: ONE transformer, adapter on and off."""


# -- loading -------------------------------------------------------------------------------------


def load_chroma_single_file_transformer(file: Path, config_folder: Path, opts: LoadOptions
                                        ) -> Any:
    return load_single_file_transformer(
        SPEC, file, config_folder, opts, recognised=is_chroma_single_file,
        missing="Chroma transformer (no distilled_guidance_layer.* tensors); the base is Chroma")


def load_t5(folder: Path, opts: LoadOptions) -> Any:
    return load_text_encoder(folder, opts, "text_encoder", "T5EncoderModel", "Chroma")


SPEC = TransformerFamily(
    family=CHROMA_FAMILY, title="Chroma", pipeline_class=PIPELINE_CLASS,
    transformer_class=TRANSFORMER_CLASS, text_encoder=load_t5,
    single_file=load_chroma_single_file_transformer,
    no_own_encoder="this Chroma fine-tune has no T5 of its own to reload",
    architecture=("in_channels", "num_layers", "num_single_layers", "attention_head_dim",
                  "num_attention_heads", "joint_attention_dim", "patch_size"))


def load_chroma_base(folder: Path, opts: LoadOptions, transformer_file: Path | None = None
                     ) -> TransformerBase:
    transformer = base_transformer(SPEC, folder, opts, transformer_file)
    tokenizer = auto_tokenizer(folder, opts)
    base = TransformerBase(
        folder=folder, transformer=transformer, vae=load_vae(folder, opts),
        text_encoder=load_t5(folder, opts), tokenizer=tokenizer,
        scheduler_config=flow_scheduler_config(folder, "Chroma"))
    config = base.transformer.config
    t5, latent = base.text_encoder.config.d_model, 4 * int(base.vae.config.latent_channels)
    if (config.joint_attention_dim, config.in_channels) != (t5, latent):
        raise UnsupportedModelFamilyError(
            f"{folder}: the transformer expects {config.joint_attention_dim}-dim T5 features and "
            f"{config.in_channels} packed latent features, but T5 gives {t5} and the VAE "
            f"{latent}: not a Chroma layout")
    return base


def attach_chroma_lora(path: Path, base: TransformerBase) -> int:
    """A LoRA through diffusers' Flux LoRA loader (``ChromaPipeline``'s): diffusers/peft and
    kohya names; attached to the transformer as one named adapter."""
    from diffusers import ChromaPipeline

    weights = lora_weights_file(path)
    state_dict, network_alphas, metadata = read_lora_state_dict(
        ChromaPipeline, weights, return_alphas=True,
        not_a_lora="is not a Chroma/Flux LoRA that diffusers can load")
    transformer_keys = {k: v for k, v in state_dict.items() if k.startswith("transformer.")}
    if not transformer_keys:
        raise IncompatiblePairError(f"{weights} holds no transformer LoRA layers for Chroma")
    with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
        ChromaPipeline.load_lora_into_transformer(
            transformer_keys, network_alphas, transformer=base.transformer,
            adapter_name=LORA_ADAPTER_NAME, metadata=metadata)
    return count_adapted_layers(weights, "Chroma base model", base.transformer)


ADAPTER = TransformerAdapter(
    SPEC, pipeline_family=chroma_pipeline_family, load_base=load_chroma_base, pair=ChromaPair,
    lora_pair=ChromaLoraPair, attach=attach_chroma_lora)


# -- the family registry's adapter interface (``cgidm_core.families.FamilyAdapter``, #23) ---------


check_pipeline_folder = ADAPTER.check_pipeline_folder
load_pair = ADAPTER.load_pair
load_lora_base = ADAPTER.load_lora_base

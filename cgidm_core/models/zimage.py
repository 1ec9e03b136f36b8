"""Z-Image (Tongyi-MAI's Z-Image / Z-Image-Turbo, a single-stream S3-DiT): one adapter module,
recognition to pair.

A rectified-flow transformer on Flux.1's 16-channel latent (VAE scaling and shift factors), so
the forward process and the target are :class:`~cgidm_core.models.flow.FlowMatchingPair`'s and
the pair reuses the SD adapter's machinery (one float32 VAE, cached prompts, the text encoder
released and read back, ONE transformer with a switchable adapter for a LoRA). As diffusers'
``ZImagePipeline`` runs it:

- the text: the prompt is wrapped in the tokenizer's chat template (a user turn, generation
  prompt, ``enable_thinking=True``), padded to 512 tokens, run through the Qwen3 encoder with its
  attention mask; the features are the second-to-last hidden states of the prompt's tokens only
  (padding dropped: each prompt is a variable-length sequence);
- the transformer takes lists (one ``(16, 1, H, W)`` latent and one caption per image), patchifies
  itself, and is conditioned on ``1 - s`` (computed as the pipeline does, ``(1000 - 1000 s) /
  1000``); its output is the NEGATIVE velocity (the pipeline negates it before the Euler step),
  so the pair returns ``-output``;
- the time shift is the scheduler config's (fixed 3.0 for Z-Image-Turbo; ``mu`` from the token
  count where the config asks for dynamic shifting).

Layouts: ``ZImagePipeline`` folders, ``transformer/`` folders, single files (ComfyUI's naming,
``layers.N.attention.qkv`` fused, optionally under ``model.diffusion_model.``, converted offline
by diffusers' ``ZImageTransformer2DModel.from_single_file`` with the base's config; also as the
pretrained model with ``pretrained_config``), and LoRAs through diffusers' Z-Image loader and its
converter: diffusers/peft ``transformer.*``, ``diffusion_model.*`` (ComfyUI / ai-toolkit) and
``lora_unet_*`` (musubi-tuner / kohya).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from cgidm_core.errors import ModelFormatError, UnsupportedModelFamilyError
from cgidm_core.models.flow import FlowMatchingPair
from cgidm_core.models.flux import time_shift
from cgidm_core.models.formats import (
    SUPPORTED_HINT,
    read_json,
    transformer_family,
)
from cgidm_core.models.sd_loading import (
    LoadOptions,
    load_vae,
)
from cgidm_core.models.stable_diffusion import (
    StableDiffusionLoraPair,
    StableDiffusionPair,
)
from cgidm_core.models.transformer_adapter import (
    TransformerAdapter,
    TransformerBase,
    TransformerFamily,
    auto_tokenizer,
    base_transformer,
    flow_scheduler_config,
    load_model_type_encoder,
    load_single_file_transformer,
    require_pipeline_parts,
)
from cgidm_core.names import ZIMAGE_FAMILY

if TYPE_CHECKING:  # annotations only; mypy reads these packages as Any (pyproject.toml)
    from diffusers import ZImageTransformer2DModel
    from transformers import PreTrainedTokenizerBase

# -- recognition (no weights read) ---------------------------------------------------------------

PIPELINE_CLASS = "ZImagePipeline"
TRANSFORMER_CLASS = "ZImageTransformer2DModel"
#: Tokens per prompt (chat template included): ``ZImagePipeline``'s ``max_sequence_length``.
TEXT_TOKENS = 512
#: Native side when the VAE config does not give one (Z-Image samples at 1024 px).
ZIMAGE_NATIVE_SIZE = 1024
_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


def is_zimage_single_file(keys: list[str]) -> bool:
    """A Z-Image transformer as one file: the NextDiT layout's ``noise_refiner.*`` /
    ``context_refiner.*`` / ``cap_embedder.*`` in ComfyUI's naming (``layers.N.attention.qkv``,
    optionally under ``model.diffusion_model.``) or diffusers' (``key_signatures``). Lumina-Image
    2.0 shares the layout; its files fail against a Z-Image base on their shapes."""
    return transformer_family(keys) == ZIMAGE_FAMILY


def zimage_pipeline_family(folder: Path, name: str, index: dict[str, Any]) -> str:
    """``z-image`` for a ``ZImagePipeline`` folder; control/inpaint/img2img/omni are refused."""
    config_file = folder / "transformer" / "config.json"
    transformer = read_json(config_file) if config_file.is_file() else {}
    if name != PIPELINE_CLASS or transformer.get("_class_name", TRANSFORMER_CLASS) != (
            TRANSFORMER_CLASS):
        raise UnsupportedModelFamilyError(
            f"{folder} is a {name} model: of Z-Image cgidm supports the text-to-image "
            f"{PIPELINE_CLASS}. " + SUPPORTED_HINT)
    require_pipeline_parts(folder, name, index)
    return ZIMAGE_FAMILY


# -- the pair ------------------------------------------------------------------------------------


def zimage_latent_config(transformer_config: Any, vae_config: Any) -> SimpleNamespace:
    scale = 2 ** (len(vae_config.block_out_channels) - 1)
    native = int(getattr(vae_config, "sample_size", None) or ZIMAGE_NATIVE_SIZE)
    patch = int(tuple(transformer_config.all_patch_size)[0])
    return SimpleNamespace(sample_size=native // scale,
                           in_channels=int(transformer_config.in_channels),
                           block_out_channels=(0,) * max(1, patch.bit_length()))


class _ZImageConditioning:
    """What a Z-Image pair does differently from an SD pair (mixin before FlowMatchingPair)."""

    family = ZIMAGE_FAMILY
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    unet_pretrained: ZImageTransformer2DModel

    def __init__(self, *, scheduler_config: dict[str, Any],
                 max_sequence_length: int | None = None, **kwargs: Any) -> None:
        transformer: ZImageTransformer2DModel = kwargs.get("unet_pretrained", kwargs.get("unet"))
        kwargs.setdefault("denoiser_config",
                          zimage_latent_config(transformer.config, kwargs["vae"].config))
        self.scheduler_config = dict(scheduler_config)
        self.max_sequence_length = int(max_sequence_length or TEXT_TOKENS)
        super().__init__(**kwargs)
        self.patch_size = int(tuple(self.unet_pretrained.config.all_patch_size)[0])

    def shift_for(self, latent: torch.Tensor) -> float:
        tokens = (latent.shape[-2] // self.patch_size) * (latent.shape[-1] // self.patch_size)
        return time_shift(self.scheduler_config, tokens)

    def _embed(self, tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module,
               prompt: str) -> torch.Tensor:
        del tokenizer  # both models read the base's tokenizer
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
            enable_thinking=True)
        tokens = self.tokenizer([text], padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device).bool()
        with torch.no_grad():
            hidden = text_encoder(input_ids=tokens.input_ids.to(self.device), attention_mask=mask,
                                  output_hidden_states=True).hidden_states[-2]
        return hidden[0][mask[0]].to(self.dtype)

    def _predict(self, unet: torch.nn.Module, z_t: torch.Tensor, t: torch.Tensor,
                 context: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """The velocity ``noise - x0`` at ``z_t`` (the transformer's output negated), float32."""
        del prediction_type
        z_t = z_t.to(self.device, torch.float32)
        batch = z_t.shape[0]
        # defined by the pair class this mixin is combined with (below)
        s = self.batch_sigmas(t, z_t)  # type: ignore[attr-defined]
        timestep = (1000 - s * 1000) / 1000  # the pipeline's arithmetic, to the last bit
        caption = context.to(self.device, self.dtype)
        latents = list(z_t.to(self.dtype).unsqueeze(2).unbind(dim=0))
        out = unet(latents, timestep.to(self.dtype), [caption] * batch, return_dict=False)[0]
        return -torch.stack([o.float() for o in out], dim=0).squeeze(2)

    def describe(self) -> dict[str, Any]:
        # super() is the pair class the mixin is combined with; mypy sees object
        return {**super().describe(),  # type: ignore[misc]
                "text_tokens": self.max_sequence_length,
                # defined by the pair class this mixin is combined with (below)
                "time_shift_at_native_size": self.native_time_shift()}  # type: ignore[attr-defined]


class ZImagePair(_ZImageConditioning, FlowMatchingPair, StableDiffusionPair):
    """A Z-Image base and a fine-tune (pipeline, ``transformer/`` folder or single file)."""


class ZImageLoraPair(_ZImageConditioning, FlowMatchingPair, StableDiffusionLoraPair):
    """A Z-Image base and a LoRA of it: ONE transformer, adapter on and off."""


# -- loading -------------------------------------------------------------------------------------


def load_zimage_single_file_transformer(file: Path, config_folder: Path, opts: LoadOptions
                                        ) -> Any:
    return load_single_file_transformer(
        SPEC, file, config_folder, opts, recognised=is_zimage_single_file,
        missing="Z-Image transformer (no noise_refiner.*, context_refiner.*, cap_embedder.* "
                "tensors)")


def load_qwen3(folder: Path, opts: LoadOptions) -> Any:
    """The Qwen3 text encoder (``Qwen3Model``, or a ``Qwen3ForCausalLM`` checkpoint's body)."""
    return load_model_type_encoder(folder, opts, model_type="qwen3", class_name="Qwen3Model",
                                   expected="the Qwen3 encoder Z-Image uses")


SPEC = TransformerFamily(
    family=ZIMAGE_FAMILY, title="Z-Image", pipeline_class=PIPELINE_CLASS,
    transformer_class=TRANSFORMER_CLASS, text_encoder=load_qwen3,
    single_file=load_zimage_single_file_transformer,
    no_own_encoder="this Z-Image fine-tune has no text encoder of its own",
    architecture=("in_channels", "dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads",
                  "cap_feat_dim", "all_patch_size"))


def load_zimage_base(folder: Path, opts: LoadOptions, transformer_file: Path | None = None
                     ) -> TransformerBase:
    transformer = base_transformer(SPEC, folder, opts, transformer_file)
    tokenizer = auto_tokenizer(folder, opts)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelFormatError(f"{folder / 'tokenizer'} has no chat template; Z-Image wraps "
                               "every prompt in the Qwen3 chat template")
    base = TransformerBase(
        folder=folder, transformer=transformer, vae=load_vae(folder, opts),
        text_encoder=load_qwen3(folder, opts), tokenizer=tokenizer,
        scheduler_config=flow_scheduler_config(folder, "Z-Image"))
    config = base.transformer.config
    width, latent = base.text_encoder.config.hidden_size, int(base.vae.config.latent_channels)
    if (config.cap_feat_dim, config.in_channels) != (width, latent):
        raise UnsupportedModelFamilyError(
            f"{folder}: the transformer expects {config.cap_feat_dim}-dim caption features and "
            f"{config.in_channels} latent channels, but Qwen3 gives {width} and the VAE "
            f"{latent}: not a Z-Image layout")
    return base


ADAPTER = TransformerAdapter(
    SPEC, pipeline_family=zimage_pipeline_family, load_base=load_zimage_base, pair=ZImagePair,
    lora_pair=ZImageLoraPair)


# -- the family registry's adapter interface (``cgidm_core.families.FamilyAdapter``, #23) ---------


check_pipeline_folder = ADAPTER.check_pipeline_folder
load_pair = ADAPTER.load_pair
load_lora_base = ADAPTER.load_lora_base

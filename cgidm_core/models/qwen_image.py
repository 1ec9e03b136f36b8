"""Qwen-Image (Alibaba's 20B MMDiT with a Qwen2.5-VL text encoder): one adapter module,
recognition to pair.

A rectified-flow transformer, so the forward process and the target are
:class:`~cgidm_core.models.flow.FlowMatchingPair`'s; the pair reuses the SD adapter's machinery
(cached prompts, text encoder released and read back, ONE transformer with a switchable adapter
for a LoRA). As diffusers' ``QwenImagePipeline`` runs it:

- the latent: Qwen-Image's VAE (``AutoencoderKLQwenImage``, Wan-style, 3-D with one frame) gives
  ``(16, 1, H, W)`` latents normalised PER CHANNEL by the config's ``latents_mean`` /
  ``latents_std``. :class:`QwenImageVAE2D` presents it as a 2-D VAE whose latent distribution is
  already normalised (an affine map of the Gaussian: mean ``(m - mu) / sigma``, std
  ``s / sigma``), so the inversion, the mask and the SD codec run unchanged with scaling 1 and
  shift 0; predictions pack 2x2 patches as Flux.1 does (``img_shapes`` tell the transformer the
  grid);
- the text: the prompt in the pipeline's fixed system template, Qwen2.5-VL's last hidden states
  of the non-padding tokens with the template's first 34 tokens dropped (at most 1024 tokens);
  the mask is all ones for one prompt, so none is passed, as the pipeline does;
- the time: ``s`` (the pipeline passes ``timestep / 1000``), shifted by the scheduler config
  (dynamic, ``mu`` from the token count, base 0.5 / max 0.9 for Qwen-Image); no guidance
  embedding (``guidance_embeds`` false in every released Qwen-Image).

Layouts: ``QwenImagePipeline`` folders, ``transformer/`` folders, single files (the transformer's
own names, optionally under ``model.diffusion_model.``, as ComfyUI shares them; loaded into a
transformer built from the base's config, every tensor must fit), LoRAs through diffusers'
Qwen-Image loader and its converter (diffusers/peft ``transformer.*``, ``diffusion_model.*``,
``lora_unet_*`` with alphas).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from cgidm_core.errors import IncompatiblePairError, UnsupportedModelFamilyError
from cgidm_core.models.flow import FlowMatchingPair
from cgidm_core.models.flux import pack_latents, time_shift, unpack_latents
from cgidm_core.models.formats import (
    SUPPORTED_HINT,
    read_json,
    safetensors_keys,
    transformer_family,
)
from cgidm_core.models.sd_loading import (
    LoadOptions,
    loading_errors,
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
    require_pipeline_parts,
)
from cgidm_core.names import QWEN_IMAGE_FAMILY

if TYPE_CHECKING:  # annotations only; mypy reads these packages as Any (pyproject.toml)
    from diffusers import AutoencoderKLQwenImage
    from transformers import PreTrainedTokenizerBase

# -- recognition (no weights read) ---------------------------------------------------------------

PIPELINE_CLASS = "QwenImagePipeline"
TRANSFORMER_CLASS = "QwenImageTransformer2DModel"
#: ``QwenImagePipeline``'s prompt template and the number of its leading tokens it drops.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 34
TEXT_TOKENS = 1024
#: Native side (``QwenImagePipeline.default_sample_size`` 128 x 8).
QWEN_IMAGE_NATIVE_SIZE = 1024
_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
_PREFIX = "model.diffusion_model."


def is_qwen_image_single_file(keys: list[str]) -> bool:
    """A Qwen-Image transformer as one file (``img_in.*``, ``txt_norm.*``, ``txt_in.*``)."""
    return transformer_family(keys) == QWEN_IMAGE_FAMILY


def qwen_image_pipeline_family(folder: Path, name: str, index: dict[str, Any]) -> str:
    """``qwen-image`` for a ``QwenImagePipeline`` folder; Edit/ControlNet/Layered/2.1 variants
    are refused by name."""
    config_file = folder / "transformer" / "config.json"
    transformer = read_json(config_file) if config_file.is_file() else {}
    if name != PIPELINE_CLASS or transformer.get("_class_name", TRANSFORMER_CLASS) != (
            TRANSFORMER_CLASS) or transformer.get("guidance_embeds") or transformer.get(
            "zero_cond_t") or transformer.get("use_additional_t_cond"):
        raise UnsupportedModelFamilyError(
            f"{folder} is a {name} model: of Qwen-Image cgidm supports the text-to-image "
            f"{PIPELINE_CLASS} (Qwen-Image, Qwen-Image-2512). " + SUPPORTED_HINT)
    require_pipeline_parts(folder, name, index)
    return QWEN_IMAGE_FAMILY


# -- the codec -----------------------------------------------------------------------------------


class QwenImageVAE2D(torch.nn.Module):
    """``AutoencoderKLQwenImage`` on single images, its latents normalised per channel.

    Exposes what the SD pair's codec reads (``config.scaling_factor`` 1, ``shift_factor`` 0,
    ``latent_channels``, ``block_out_channels`` of the right count for the down-sampling
    factor, ``dtype``, ``encode(x).latent_dist.mean/.std``, ``decode(z).sample``)."""

    latents_mean: torch.Tensor  # buffers, registered below
    latents_std: torch.Tensor

    def __init__(self, vae: AutoencoderKLQwenImage) -> None:
        super().__init__()
        self.vae = vae
        config = vae.config
        channels = int(config.z_dim)
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean,
                                                          dtype=torch.float32).view(1, channels,
                                                                                    1, 1),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(config.latents_std,
                                                         dtype=torch.float32).view(1, channels,
                                                                                   1, 1),
                             persistent=False)
        self.config = SimpleNamespace(
            scaling_factor=1.0, shift_factor=0.0, latent_channels=channels,
            block_out_channels=(0,) * (len(config.temperal_downsample) + 1), sample_size=None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        dist = self.vae.encode(x.unsqueeze(2)).latent_dist
        mean = (dist.mean[:, :, 0].float() - self.latents_mean) / self.latents_std
        std = dist.std[:, :, 0].float() / self.latents_std
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=std))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        z = z.float() * self.latents_std + self.latents_mean
        decoded = self.vae.decode(z.unsqueeze(2).to(self.dtype)).sample
        return SimpleNamespace(sample=decoded[:, :, 0])


# -- the pair ------------------------------------------------------------------------------------


class _QwenImageConditioning:
    """What a Qwen-Image pair does differently from an SD pair (mixin before FlowMatchingPair)."""

    family = QWEN_IMAGE_FAMILY
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    pixels_per_latent: int

    def __init__(self, *, scheduler_config: dict[str, Any], **kwargs: Any) -> None:
        vae = kwargs["vae"]
        scale = 2 ** len(vae.vae.config.temperal_downsample)
        kwargs.setdefault("denoiser_config", SimpleNamespace(
            sample_size=QWEN_IMAGE_NATIVE_SIZE // scale, in_channels=vae.config.latent_channels,
            block_out_channels=(0, 0)))
        self.scheduler_config = dict(scheduler_config)
        super().__init__(**kwargs)

    def shift_for(self, latent: torch.Tensor) -> float:
        return time_shift(self.scheduler_config, (latent.shape[-2] // 2) * (latent.shape[-1] // 2))

    def _embed(self, tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module,
               prompt: str) -> torch.Tensor:
        del tokenizer  # both models read the base's tokenizer
        tokens = self.tokenizer([PROMPT_TEMPLATE.format(prompt)],
                                max_length=TEXT_TOKENS + TEMPLATE_TOKENS, padding=True,
                                truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            hidden = text_encoder(input_ids=tokens.input_ids.to(self.device), attention_mask=mask,
                                  output_hidden_states=True).hidden_states[-1]
        return hidden[0][mask[0].bool()][TEMPLATE_TOKENS:][:TEXT_TOKENS].unsqueeze(0).to(
            self.dtype)

    def _predict(self, unet: torch.nn.Module, z_t: torch.Tensor, t: torch.Tensor,
                 context: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """The velocity ``noise - x0`` at ``z_t``, unpacked, float32."""
        del prediction_type
        z_t = z_t.to(self.device, torch.float32)
        batch, _, height, width = z_t.shape
        # defined by the pair class this mixin is combined with (below)
        s = self.batch_sigmas(t, z_t)  # type: ignore[attr-defined]
        hidden = context.to(self.device, self.dtype)
        if hidden.shape[0] != batch:
            hidden = hidden.expand(batch, *hidden.shape[1:])
        output = unet(hidden_states=pack_latents(z_t).to(self.dtype),
                      timestep=(s * 1000).to(self.dtype) / 1000,  # the pipeline's arithmetic
                      encoder_hidden_states=hidden, encoder_hidden_states_mask=None,
                      img_shapes=[[(1, height // 2, width // 2)]] * batch, guidance=None,
                      return_dict=False)[0]
        return unpack_latents(output.float(), height, width)

    def describe(self) -> dict[str, Any]:
        # super() is the pair class the mixin is combined with; mypy sees object
        return {**super().describe(),  # type: ignore[misc]
                # defined by the pair class this mixin is combined with (below)
                "time_shift_at_native_size": self.native_time_shift()}  # type: ignore[attr-defined]


class QwenImagePair(_QwenImageConditioning, FlowMatchingPair, StableDiffusionPair):
    """A Qwen-Image base and a fine-tune (pipeline, ``transformer/`` folder or single file)."""


class QwenImageLoraPair(_QwenImageConditioning, FlowMatchingPair, StableDiffusionLoraPair):
    """A Qwen-Image base and a LoRA of it: ONE transformer, adapter on and off."""


# -- loading -------------------------------------------------------------------------------------


def load_qwen_image_single_file_transformer(file: Path, config_folder: Path, opts: LoadOptions
                                            ) -> Any:
    """The transformer's own tensor names (``model.diffusion_model.`` stripped), loaded by
    diffusers' ``from_single_file`` with the base's config (offline)."""
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import load_file

    if not is_qwen_image_single_file(safetensors_keys(file)):
        raise IncompatiblePairError(f"{file} holds no Qwen-Image transformer (no img_in.*, "
                                    "txt_norm.*, txt_in.* tensors)")
    with loading_errors("the single-file transformer", file, mismatch_is_incompatible=True):
        state = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v
                 for k, v in load_file(str(file)).items()}
        # diffusers maps Qwen-Image's single files by identity, so the prefix is stripped here
        return QwenImageTransformer2DModel.from_single_file(
            state, config=str(config_folder), subfolder="transformer", local_files_only=True,
            torch_dtype=opts.dtype)


def load_qwen_vl(folder: Path, opts: LoadOptions) -> Any:
    """Qwen2.5-VL (its language model; the vision tower is loaded but never run)."""
    return load_model_type_encoder(
        folder, opts, model_type="qwen2_5_vl", class_name="Qwen2_5_VLForConditionalGeneration",
        expected="the Qwen2.5-VL encoder Qwen-Image uses")


SPEC = TransformerFamily(
    family=QWEN_IMAGE_FAMILY, title="Qwen-Image", pipeline_class=PIPELINE_CLASS,
    transformer_class=TRANSFORMER_CLASS, text_encoder=load_qwen_vl,
    single_file=load_qwen_image_single_file_transformer,
    no_own_encoder="this Qwen-Image fine-tune has no text encoder of its own",
    architecture=("in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                  "joint_attention_dim", "patch_size", "guidance_embeds"))


def load_qwen_image_vae(folder: Path, opts: LoadOptions) -> QwenImageVAE2D:
    from diffusers import AutoencoderKLQwenImage

    with loading_errors("the VAE", folder / "vae"):
        vae = AutoencoderKLQwenImage.from_pretrained(
            folder, subfolder="vae", use_safetensors=True,
            local_files_only=opts.local_files_only, torch_dtype=torch.float32)
    return QwenImageVAE2D(vae.eval())


def load_qwen_image_base(folder: Path, opts: LoadOptions, transformer_file: Path | None = None
                         ) -> TransformerBase:
    transformer = base_transformer(SPEC, folder, opts, transformer_file)
    tokenizer = auto_tokenizer(folder, opts)
    base = TransformerBase(
        folder=folder, transformer=transformer, vae=load_qwen_image_vae(folder, opts),
        text_encoder=load_qwen_vl(folder, opts), tokenizer=tokenizer,
        scheduler_config=flow_scheduler_config(folder, "Qwen-Image"))
    config = base.transformer.config
    width = base.text_encoder.config.text_config.hidden_size
    latent = 4 * int(base.vae.config.latent_channels)
    if (config.joint_attention_dim, config.in_channels) != (width, latent):
        raise UnsupportedModelFamilyError(
            f"{folder}: the transformer expects {config.joint_attention_dim}-dim text features "
            f"and {config.in_channels} packed latent features, but Qwen2.5-VL gives {width} and "
            f"the VAE {latent}: not a Qwen-Image layout")
    return base


ADAPTER = TransformerAdapter(
    SPEC, pipeline_family=qwen_image_pipeline_family, load_base=load_qwen_image_base,
    pair=QwenImagePair, lora_pair=QwenImageLoraPair)


# -- the family registry's adapter interface (``cgidm_core.families.FamilyAdapter``, #23) ---------


check_pipeline_folder = ADAPTER.check_pipeline_folder
load_pair = ADAPTER.load_pair
load_lora_base = ADAPTER.load_lora_base

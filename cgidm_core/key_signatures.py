"""What a safetensors file's tensor NAMES say it holds, without reading a weight.

One place for these rules, shared by the library's on-disk detection
(:mod:`cgidm_core.models.formats`) and the gateway's upload check (:mod:`cgidm.model_files`).
They live in the library, which imports nothing of the service, and import only the standard
library, so the torch-free gateway can use them.
"""

from __future__ import annotations

from cgidm_core.names import (
    CHROMA_FAMILY,
    FLUX2_FAMILY,
    FLUX_FAMILY,
    QWEN_IMAGE_FAMILY,
    SD3_FAMILY,
    ZIMAGE_FAMILY,
)

_LDM_UNET_PREFIX = "model.diffusion_model."
_SDXL_SINGLE_FILE_PREFIX = "conditioner.embedders."
_TRANSFORMER_MARKERS = ("transformer_blocks.", "single_transformer_blocks.", "double_blocks.",
                        "single_blocks.", "x_embedder.", "context_embedder.")


def looks_like_lora(keys: list[str]) -> bool:
    """LoRA files (diffusers, peft or kohya naming) name every weight with ``lora``."""
    weights = [k for k in keys if not k.endswith(".alpha")]
    return bool(weights) and all("lora" in k.lower() for k in weights)


def looks_like_single_file(keys: list[str]) -> bool:
    return any(k.startswith(_LDM_UNET_PREFIX) for k in keys)


def is_sdxl_single_file(keys: list[str]) -> bool:
    return any(k.startswith(_SDXL_SINGLE_FILE_PREFIX) for k in keys)


def is_sdxl_lora(keys: list[str]) -> bool:
    return any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in keys)


def looks_like_transformer(keys: list[str]) -> bool:
    return any(k.startswith(_TRANSFORMER_MARKERS) for k in keys)


_FLUX_LORA_PREFIXES = ("transformer.", "lora_unet_double_blocks_", "lora_unet_single_blocks_",
                       "lora_transformer_", "double_blocks.", "single_blocks.",
                       "diffusion_model.double_blocks.", "diffusion_model.single_blocks.")


def is_flux_lora(keys: list[str]) -> bool:
    """A LoRA of a Flux.1 transformer, in any naming diffusers' Flux loader converts: diffusers/
    peft (``transformer.*``), kohya-ss (``lora_unet_double_blocks_*``, ``..._single_blocks_*``)
    or XLabs (``double_blocks.N.processor.*``)."""
    return any(k.startswith(_FLUX_LORA_PREFIXES) for k in keys) and not is_sd3_own_lora(keys)


def transformer_family(keys: list[str]) -> str | None:
    """``flux``, ``flux2``, ``chroma``, ``z-image``, ``qwen-image`` or ``sd3`` for a single-file
    transformer,
    ``None`` for anything else.

    Flux.1 in Black Forest Labs' naming (``double_blocks.*``, ``single_blocks.*``, optionally
    under ``model.diffusion_model.``) or diffusers' (``single_transformer_blocks.*``); SD3 in
    Stability's (``joint_blocks.*``) or diffusers' (``transformer_blocks.*`` with ``pos_embed``).
    """
    names = [k[len(_LDM_UNET_PREFIX):] if k.startswith(_LDM_UNET_PREFIX) else k for k in keys]
    if any(k.startswith(("single_stream_modulation.", "double_stream_modulation_img."))
           for k in names):
        return FLUX2_FAMILY  # Flux.2's shared modulation (BFL and diffusers naming)
    if any(k.startswith("txt_norm.") for k in names) and any(k.startswith("img_in.")
                                                             for k in names):
        return QWEN_IMAGE_FAMILY  # Qwen-Image's MMDiT: RMS-normed Qwen2.5-VL text input
    if any(k.startswith("noise_refiner.") for k in names) and any(
            k.startswith("context_refiner.") for k in names) and any(
            k.startswith("cap_embedder.") for k in names):
        return ZIMAGE_FAMILY  # the NextDiT layout (Lumina-Image 2.0's too: told apart by shape)
    if any(k.startswith("distilled_guidance_layer.") for k in names):
        return CHROMA_FAMILY  # Flux.1's blocks, modulated by Chroma's guidance approximator
    if any(k.startswith(("double_blocks.", "single_blocks.", "single_transformer_blocks."))
           for k in names):
        return FLUX_FAMILY
    if any(k.startswith("joint_blocks.") for k in names) or (
            "pos_embed.proj.weight" in names and any(k.startswith("transformer_blocks.")
                                                     for k in names)):
        return SD3_FAMILY
    return None


def looks_like_diffusers_unet(keys: list[str]) -> bool:
    names = set(keys)
    return "conv_in.weight" in names and any(k.startswith("down_blocks.") for k in keys) \
        and any(k.startswith("time_embedding.") for k in keys)


def is_conditional_unet(keys: list[str]) -> bool:
    """A text-conditioned UNet (Stable Diffusion) has cross-attention (``attn2``) layers."""
    return any(".attn2." in k for k in keys)


# -- rules the family registry (:mod:`cgidm_core.families`) points at -----------------------

_LDM_VAE_PREFIX = "first_stage_model."


def is_sdxl_unet(keys: list[str]) -> bool:
    """SDXL's UNet in diffusers naming: its size conditioning (``add_embedding.*``)."""
    return any(k.startswith("add_embedding.") for k in keys)


def is_sd_single_file(keys: list[str]) -> bool:
    """An SD 1.x/2.x (or UNet-only SDXL) checkpoint in the LDM layout, not a transformer."""
    return looks_like_single_file(keys) and not is_sdxl_single_file(keys) \
        and transformer_family(keys) is None


def is_sdxl_file(keys: list[str]) -> bool:
    """Any file that only SDXL has: its SGM single file, a LoRA of its second text encoder, or
    its UNet's size conditioning."""
    return is_sdxl_single_file(keys) or is_sdxl_lora(keys) or is_sdxl_unet(keys)


def is_flux_file(keys: list[str]) -> bool:
    """A Flux.1 transformer in any naming (not Chroma's, which shares its blocks: a LoRA-name
    rule would claim Chroma's and XLabs-style ``double_blocks.*`` files alike)."""
    return transformer_family(keys) == FLUX_FAMILY


def is_sd3_file(keys: list[str]) -> bool:
    return transformer_family(keys) == SD3_FAMILY


def is_chroma_file(keys: list[str]) -> bool:
    return transformer_family(keys) == CHROMA_FAMILY


def is_zimage_file(keys: list[str]) -> bool:
    return transformer_family(keys) == ZIMAGE_FAMILY


def is_qwen_image_file(keys: list[str]) -> bool:
    return transformer_family(keys) == QWEN_IMAGE_FAMILY


def is_flux2_file(keys: list[str]) -> bool:
    return transformer_family(keys) == FLUX2_FAMILY


def is_sd3_own_lora(keys: list[str]) -> bool:
    """A LoRA only SD 3.x has: sd-scripts' ``lora_unet_joint_blocks_*``, or diffusers'
    ``transformer.*`` next to a second CLIP (``text_encoder_2.*``, CLIP-G), which Flux.1's
    trainers never write."""
    return looks_like_lora(keys) and (
        any(k.startswith("lora_unet_joint_blocks_") for k in keys)
        or (any(k.startswith("text_encoder_2.") for k in keys)
            and any(k.startswith("transformer.") for k in keys)))


def is_sd3_lora(keys: list[str]) -> bool:
    """A LoRA that may be of SD 3.x: its own namings, or a diffusers ``transformer.*`` one
    (the same names as any diffusion transformer's; the adapter checks the layers exist)."""
    return is_sd3_own_lora(keys) or (looks_like_lora(keys) and any(
        k.startswith("transformer.") for k in keys))


#: Namings of the LoRAs diffusers' Z-Image and Qwen-Image loaders convert: diffusers/peft,
#: ComfyUI / ai-toolkit (``diffusion_model.*``) and musubi-tuner / kohya (``lora_unet_*`` with
#: their own block names: Z-Image's ``layers`` and refiners, Qwen-Image's
#: ``transformer_blocks``; SD's ``lora_unet_down_blocks_*`` and Flux.1's
#: ``lora_unet_double_blocks_*`` are not theirs).
_DIT_LORA_PREFIXES = ("transformer.", "diffusion_model.", "lora_unet_layers_",
                      "lora_unet_noise_refiner_", "lora_unet_context_refiner_",
                      "lora_unet_transformer_blocks_")
_FLUX_BLOCK_LORA_PREFIXES = ("diffusion_model.double_blocks.", "diffusion_model.single_blocks.")


def is_dit_lora(keys: list[str]) -> bool:
    """A LoRA of a diffusion transformer in a naming that does not say which one (Z-Image,
    Qwen-Image): the adapter's loader checks its layers against the base."""
    return looks_like_lora(keys) and any(k.startswith(_DIT_LORA_PREFIXES) for k in keys) \
        and not any(k.startswith(_FLUX_BLOCK_LORA_PREFIXES) for k in keys) \
        and not is_sd3_own_lora(keys)


def is_flux2_lora(keys: list[str]) -> bool:
    """A Flux.2 LoRA as diffusers saves it (``transformer.*``); the BFL / kohya namings its
    loader also converts are not tested."""
    return looks_like_lora(keys) and any(k.startswith("transformer.") for k in keys) \
        and not is_sd3_own_lora(keys)


def is_unet_lora(keys: list[str]) -> bool:
    """A LoRA of an SD 1.x/2.x or SDXL UNet: any LoRA but a Flux one (an SDXL LoRA without
    second-encoder layers has no name that tells it from an SD one)."""
    return looks_like_lora(keys) and not is_flux_lora(keys)


def is_sd_lora(keys: list[str]) -> bool:
    """A LoRA that may be of SD 1.x/2.x: a UNet LoRA without SDXL's second-encoder layers."""
    return is_unet_lora(keys) and not is_sdxl_lora(keys)


#: Names only a text-conditioned UNet (SD/SDXL: cross-attention transformer blocks, LDM/SGM
#: block names) or a text encoder has; a pixel ``UNet2DModel`` has none of them.
_NOT_PIXEL_LORA_PARTS = ("transformer_blocks", "attn1", "attn2", "proj_in", "proj_out",
                         "input_blocks", "output_blocks", "middle_block", "text_encoder",
                         "lora_te")


def is_pixel_lora(keys: list[str]) -> bool:
    """A LoRA that may be of a pixel ``UNet2DModel`` (diffusers' ``unet.*.lora_A/B`` or kohya's
    ``lora_unet_*``, as cgidm_core.pixel_lora writes them): UNet layers only, none of them a
    text-conditioned UNet's. A LoRA of ResNet convolutions alone cannot say which UNet it is of
    (SD claims it too); loading it checks every layer against the base. A Flux LoRA in kohya
    naming (``lora_unet_double_blocks_*``) is not one."""
    return is_unet_lora(keys) and all(k.startswith(("unet.", "lora_unet_")) for k in keys) \
        and not any(part in k for k in keys for part in _NOT_PIXEL_LORA_PARTS)


def is_ldm_single_file(keys: list[str]) -> bool:
    """A UNet checkpoint in the LDM/SGM layout (SD 1.x/2.x or SDXL), not a transformer."""
    return looks_like_single_file(keys) and transformer_family(keys) is None


def is_sd_unet_file(keys: list[str]) -> bool:
    """Bare text-conditioned UNet weights without SDXL's size conditioning."""
    return is_text_conditioned_unet_file(keys) and not is_sdxl_unet(keys)


def is_complete_sd_checkpoint(keys: list[str]) -> bool:
    """A complete SD 1.x/2.x single file: LDM UNet, VAE and the one text encoder."""
    return (looks_like_single_file(keys) and any(k.startswith(_LDM_VAE_PREFIX) for k in keys)
            and any(k.startswith("cond_stage_model.") for k in keys)
            and not any(k.startswith(_SDXL_SINGLE_FILE_PREFIX) for k in keys)
            and transformer_family(keys) is None)


def is_complete_sdxl_checkpoint(keys: list[str]) -> bool:
    """A complete SDXL base single file: LDM UNet, VAE and the second (OpenCLIP-G) encoder."""
    return (looks_like_single_file(keys) and any(k.startswith(_LDM_VAE_PREFIX) for k in keys)
            and any(k.startswith(_SDXL_SINGLE_FILE_PREFIX + "1.") for k in keys)
            and transformer_family(keys) is None)


def is_text_conditioned_unet_file(keys: list[str]) -> bool:
    """Bare UNet weights in diffusers naming with cross-attention (SD 1.x/2.x, SDXL)."""
    return looks_like_diffusers_unet(keys) and is_conditional_unet(keys)


def is_pixel_unet_file(keys: list[str]) -> bool:
    """Bare UNet weights in diffusers naming without cross-attention (a pixel UNet2DModel)."""
    return looks_like_diffusers_unet(keys) and not is_conditional_unet(keys)

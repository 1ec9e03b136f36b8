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
    return any(k.startswith(_FLUX_LORA_PREFIXES) for k in keys)


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

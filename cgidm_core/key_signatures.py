"""What a safetensors file's tensor NAMES say it holds, without reading a weight.

One place for these rules, shared by the library's on-disk detection
(:mod:`cgidm_core.models.formats`) and the gateway's upload check (:mod:`cgidm.model_files`).
They live in the library, which imports nothing of the service, and import only the standard
library, so the torch-free gateway can use them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    """A LoRA of a Flux.1 (or Chroma) transformer, in any naming diffusers' Flux loader
    converts: diffusers/peft (``transformer.*``, of Flux.1's modules: :data:`FLUX_NAMES`),
    kohya-ss (``lora_unet_double_blocks_*``, ``..._single_blocks_*``) or XLabs
    (``double_blocks.N.processor.*``)."""
    if is_sd3_own_lora(keys):
        return False
    if any(k.startswith(_FLUX_LORA_PREFIXES[1:]) for k in keys):
        return True
    return fits_transformer(keys, FLUX_NAMES)


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


#: Flux.2 dev's guidance embedding (BFL naming, diffusers naming); Klein has none.
_FLUX2_GUIDANCE = ("guidance_in.", "time_guidance_embed.guidance_embedder.")


def is_flux2_dev_file(keys: list[str]) -> bool:
    """A Flux.2 transformer with a guidance embedding: dev's (``flux2-dev.safetensors``)."""
    names = [k[len(_LDM_UNET_PREFIX):] if k.startswith(_LDM_UNET_PREFIX) else k for k in keys]
    return is_flux2_file(keys) and any(k.startswith(_FLUX2_GUIDANCE) for k in names)


def is_flux2_klein_file(keys: list[str]) -> bool:
    """A Flux.2 transformer without a guidance embedding: Klein's."""
    return is_flux2_file(keys) and not is_flux2_dev_file(keys)


#: HiDream-I1's sparse-MoE transformer blocks: names no other family uses (original and
#: diffusers naming alike), in files (optionally under ``model.diffusion_model.``) and LoRAs
#: (``transformer.*``, ComfyUI's ``diffusion_model.*``, kohya-style ``lora_unet_*``).
_HIDREAM_BLOCKS = ("double_stream_blocks", "single_stream_blocks")


def is_hidream_file(keys: list[str]) -> bool:
    """A HiDream-I1 transformer as one file."""
    names = [k[len(_LDM_UNET_PREFIX):] if k.startswith(_LDM_UNET_PREFIX) else k for k in keys]
    return any(k.startswith(tuple(f"{b}." for b in _HIDREAM_BLOCKS)) for k in names)


def is_hidream_lora(keys: list[str]) -> bool:
    """A LoRA of a HiDream-I1 transformer, in any of the namings its trainers write."""
    return looks_like_lora(keys) and any(
        k.startswith(("transformer.", "diffusion_model.", "lora_unet_", "lora_transformer_"))
        and any(block in k for block in _HIDREAM_BLOCKS) for k in keys)


def is_sd3_own_lora(keys: list[str]) -> bool:
    """A LoRA only SD 3.x has: sd-scripts' ``lora_unet_joint_blocks_*``, or diffusers'
    ``transformer.*`` next to a second CLIP (``text_encoder_2.*``, CLIP-G), which Flux.1's
    trainers never write."""
    return looks_like_lora(keys) and (
        any(k.startswith("lora_unet_joint_blocks_") for k in keys)
        or (any(k.startswith("text_encoder_2.") for k in keys)
            and any(k.startswith("transformer.") for k in keys)))


def is_sd3_lora(keys: list[str]) -> bool:
    """A LoRA that may be of SD 3.x: its own namings, or diffusers ``transformer.*`` names of
    SD 3.x's modules (:data:`SD3_NAMES`)."""
    return is_sd3_own_lora(keys) or fits_transformer(keys, SD3_NAMES)


# -- diffusion-transformer LoRAs by the module names they adapt ------------------------------


@dataclass(frozen=True)
class TransformerNames:
    """The module names of one family's diffusion transformer in diffusers naming, which is
    what a diffusers/peft (``transformer.*``) or ComfyUI / ai-toolkit (``diffusion_model.*``)
    LoRA's tensor names are made of: its block lists with the block count of the family's
    largest released variant, the module paths inside a block (a regular expression) and the
    modules outside the blocks. A LoRA fits the family when every module it adapts is one of
    these; ``uniform``: every block of the family has the same modules, so a LoRA adapts the
    same ones in every block it touches (an SD 3.x LoRA does not: its last block has no
    ``to_add_out``, SD 3.5 medium's first 13 an ``attn2``)."""

    blocks: tuple[tuple[str, int], ...]
    inner: str
    outer: tuple[str, ...] = ()
    uniform: bool = False


_JOINT_ATTENTION = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
#: Flux.1 and Chroma (Chroma is Flux.1-schnell's blocks without their modulation layers): 19
#: double-stream and 38 single-stream blocks.
FLUX_NAMES = TransformerNames(
    blocks=(("transformer_blocks", 19), ("single_transformer_blocks", 38)),
    inner=_JOINT_ATTENTION + r"|ff(_context)?\.net\.(0\.proj|2)|norm1(_context)?\.linear"
                             r"|norm\.linear|proj_mlp|proj_out",
    outer=("x_embedder", "context_embedder", "proj_out", "norm_out.", "time_text_embed.",
           "distilled_guidance_layer."),
)
#: SD 3.x (MMDiT; 38 joint blocks in 3.5 large, 24 in 3.0 / 3.5 medium, whose first 13 have a
#: second self-attention ``attn2``).
SD3_NAMES = TransformerNames(
    blocks=(("transformer_blocks", 38),),
    inner=r"attn2\.(to_q|to_k|to_v|to_out\.0)|" + _JOINT_ATTENTION
          + r"|ff(_context)?\.net\.(0\.proj|2)|norm1(_context)?\.linear",
    outer=("pos_embed.", "context_embedder", "proj_out", "norm_out.", "time_text_embed."),
)
#: Qwen-Image (MMDiT, 60 identical blocks with separate image and text MLPs and modulations).
QWEN_IMAGE_NAMES = TransformerNames(
    blocks=(("transformer_blocks", 60),),
    inner=_JOINT_ATTENTION + r"|(img|txt)_mlp\.net\.(0\.proj|2)|(img|txt)_mod\.1",
    outer=("img_in", "txt_in", "proj_out", "norm_out.", "time_text_embed."),
    uniform=True,
)
#: Flux.2 (dev: 8 double-stream and 48 single-stream blocks; Klein 4B 5 + 20, 9B 8 + 24), whose
#: single blocks fuse q, k, v and the MLP input in one ``to_qkv_mlp_proj``.
FLUX2_NAMES = TransformerNames(
    blocks=(("transformer_blocks", 8), ("single_transformer_blocks", 48)),
    inner=_JOINT_ATTENTION + r"|attn\.(to_qkv_mlp_proj|to_out)"
                             r"|ff(_context)?\.(linear_in|linear_out)",
    outer=("x_embedder", "context_embedder", "proj_out", "norm_out.", "time_guidance_embed.",
           "double_stream_modulation_img.", "double_stream_modulation_txt.",
           "single_stream_modulation."),
)
#: Z-Image (single-stream S3-DiT in the NextDiT layout: 30 layers, two refiners each side); in
#: ComfyUI naming its attention is ``qkv`` / ``out``.
ZIMAGE_NAMES = TransformerNames(
    blocks=(("layers", 30), ("noise_refiner", 2), ("context_refiner", 2)),
    inner=r"attention\.(to_q|to_k|to_v|to_out\.0|qkv|out)|feed_forward\.(w1|w2|w3)"
          r"|adaLN_modulation\.0",
    outer=("all_x_embedder.", "x_embedder", "cap_embedder.", "all_final_layer.", "final_layer.",
           "t_embedder."),
)

#: Where a LoRA's transformer part is: diffusers/peft and ComfyUI / ai-toolkit namings.
_TRANSFORMER_LORA_PREFIXES = ("transformer.", "diffusion_model.")
#: What ends a LoRA tensor's name after the module it adapts (peft, kohya-style, DoRA).
_LORA_SUFFIX = re.compile(r"\.(lora_[AB]|lora_down|lora_up|lora\.down|lora\.up|alpha|dora_scale"
                          r"|lora_magnitude_vector)(\..*)?$")
_BLOCK = re.compile(r"^(?P<blocks>[A-Za-z_]+)\.(?P<index>\d+)\.(?P<module>.+)$")


def _adapted_modules(keys: list[str]) -> list[str]:
    """The transformer modules a LoRA adapts, in diffusers naming (prefix and LoRA suffix
    removed); empty when it has no ``transformer.*`` / ``diffusion_model.*`` part."""
    out = []
    for key in keys:
        prefix = next((p for p in _TRANSFORMER_LORA_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            out.append(_LORA_SUFFIX.sub("", key[len(prefix):]))
    return out


def fits_transformer(keys: list[str], names: TransformerNames) -> bool:
    """Whether a LoRA in diffusers or ComfyUI naming adapts only modules of ``names``'s
    transformer (and, for a ``uniform`` one, the same modules in every block it touches)."""
    modules = _adapted_modules(keys)
    if not modules or not looks_like_lora(keys):
        return False
    bounds = dict(names.blocks)
    inner = re.compile(names.inner)
    per_block: dict[tuple[str, int], set[str]] = {}
    for module in modules:
        match = _BLOCK.match(module)
        if match is None or match["blocks"] not in bounds:
            if not module.startswith(names.outer):
                return False
            continue
        index = int(match["index"])
        if index >= bounds[match["blocks"]] or not inner.fullmatch(match["module"]):
            return False
        per_block.setdefault((match["blocks"], index), set()).add(match["module"])
    if names.uniform:
        for blocks, _count in names.blocks:
            shapes = {frozenset(m) for (b, _), m in per_block.items() if b == blocks}
            if len(shapes) > 1:
                return False
    return True


def is_transformer_lora(keys: list[str]) -> bool:
    """A LoRA of some diffusion transformer, whichever: its diffusers / ComfyUI part or a
    kohya / musubi / XLabs naming of a transformer's blocks (never a UNet LoRA)."""
    return looks_like_lora(keys) and (
        bool(_adapted_modules(keys)) or is_sd3_own_lora(keys)
        or any(k.startswith(_FLUX_LORA_PREFIXES + _KOHYA_DIT_PREFIXES) for k in keys))


#: musubi-tuner / kohya namings of Z-Image's and Qwen-Image's blocks, which diffusers' loaders
#: convert (untested: no trainer of them was run here).
_KOHYA_ZIMAGE_PREFIXES = ("lora_unet_layers_", "lora_unet_noise_refiner_",
                          "lora_unet_context_refiner_")
_KOHYA_QWEN_PREFIXES = ("lora_unet_transformer_blocks_",)
_KOHYA_DIT_PREFIXES = _KOHYA_ZIMAGE_PREFIXES + _KOHYA_QWEN_PREFIXES


def is_zimage_lora(keys: list[str]) -> bool:
    """A Z-Image LoRA: diffusers / ComfyUI names of its layers and refiners, or musubi's."""
    return fits_transformer(keys, ZIMAGE_NAMES) or (
        looks_like_lora(keys) and any(k.startswith(_KOHYA_ZIMAGE_PREFIXES) for k in keys))


def is_qwen_image_lora(keys: list[str]) -> bool:
    """A Qwen-Image LoRA: diffusers / ComfyUI / ai-toolkit names of its 60 blocks, or kohya's."""
    return fits_transformer(keys, QWEN_IMAGE_NAMES) or (
        looks_like_lora(keys) and any(k.startswith(_KOHYA_QWEN_PREFIXES) for k in keys))


def is_flux2_lora(keys: list[str]) -> bool:
    """A Flux.2 LoRA as diffusers saves it (``transformer.*`` names of Flux.2's modules:
    :data:`FLUX2_NAMES`), as ai-toolkit shares it (BFL names under ``diffusion_model.``) or as
    musubi-tuner / sd-scripts name it (``lora_unet_double_blocks_*``), the last two converted by
    diffusers' Flux.2 loader; Flux.1's LoRAs use the same BFL block names, so the base decides."""
    if is_sd3_own_lora(keys):
        return False
    return fits_transformer(keys, FLUX2_NAMES) or (looks_like_lora(keys) and any(
        k.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks.",
                      "lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys))


def is_unet_lora(keys: list[str]) -> bool:
    """A LoRA of an SD 1.x/2.x or SDXL UNet: any LoRA but a diffusion transformer's (an SDXL
    LoRA without second-encoder layers has no name that tells it from an SD one)."""
    return looks_like_lora(keys) and not is_transformer_lora(keys)


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

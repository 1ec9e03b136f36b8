"""The ``UNet2DConditionModel`` config rules shared by the SD 1.x/2.x and SDXL adapters.

Both families use the same denoiser class; its config says which one it is (SDXL's size
conditioning, ``addition_embed_type="text_time"``) and refuses the SDXL refiner and the
inpainting/upscaling variants by name. Reads JSON configs only (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cgidm_core import families
from cgidm_core.errors import IncompatiblePairError, UnsupportedModelFamilyError
from cgidm_core.models.formats import SUPPORTED_HINT
from cgidm_core.names import SD_FAMILY, SDXL_FAMILY

SDXL_REFINER_REFUSAL = (
    "the SDXL refiner is not supported: it is an image-to-image model conditioned on an "
    "aesthetic score and one text encoder, not the base a fine-tune is made from; give the SDXL "
    "base 1.0 pipeline (or a fine-tune of it) instead. " + SUPPORTED_HINT
)

#: SDXL base 1.0 conditions on 6 added time ids (original size, crop, target size); the refiner
#: on 5 (original size, crop, aesthetic score).
SDXL_TIME_IDS = 6


def unet_family(unet_config: dict[str, Any], where: Path) -> str:
    """``stable-diffusion`` or ``stable-diffusion-xl`` from a UNet config; refuses the rest."""
    embed = unet_config.get("addition_embed_type")
    if embed is None:
        return SD_FAMILY
    if embed != "text_time":
        raise UnsupportedModelFamilyError(
            f"{where}: a UNet with addition_embed_type={embed!r} (not SD 1.x/2.x or SDXL base). "
            + SUPPORTED_HINT
        )
    time_dim = unet_config.get("addition_time_embed_dim")
    text_dim = unet_config.get("projection_class_embeddings_input_dim")
    cross = unet_config.get("cross_attention_dim")
    # The refiner's one text encoder gives both the cross-attention features and the pooled
    # feature, next to 5 time ids (2560 = 5 * 256 + 1280 with cross_attention_dim 1280); the
    # base's pooled feature comes from its second encoder only (2816 = 6 * 256 + 1280, 2048).
    numbers = all(isinstance(v, int) for v in (time_dim, text_dim, cross))
    # `numbers` says all three are ints, which mypy cannot carry from all() to the names
    if numbers and text_dim - (SDXL_TIME_IDS - 1) * time_dim == cross:  # type: ignore[operator]
        raise UnsupportedModelFamilyError(f"{where}: {SDXL_REFINER_REFUSAL}")
    return SDXL_FAMILY


def check_unet_family(unet_config: dict[str, Any], where: Path, family: str) -> None:
    """A UNet of another family than the pair's is an incompatible pair, said in plain words."""
    found = unet_family(unet_config, where)
    if found != family:
        raise IncompatiblePairError(
            f"{where} holds a {families.title(found)} UNet but the pretrained model is "
            f"{families.title(family)}; both models must be of the same family"
        )


def refuse_variant(folder: Path, name: str, unet_config: dict[str, Any]) -> None:
    if unet_config.get("in_channels", 4) != 4 or unet_config.get("class_embed_type"):
        raise UnsupportedModelFamilyError(
            f"{folder} ({name}) is an inpainting/upscaling variant whose UNet takes extra "
            "inputs. " + SUPPORTED_HINT
        )

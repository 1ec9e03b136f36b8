"""Recognising model formats and families from files on disk, before any weights are loaded.

Detection reads only JSON configs and safetensors headers, so refusing an unsupported model
(the SDXL refiner, SD3, pickle weights, a corrupt file) is instant and never runs code from
the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cgidm_core.errors import (
    IncompatiblePairError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelFamilyError,
)
from cgidm_core.key_signatures import (  # noqa: F401 - the name rules are shared with the gateway
    is_flux_lora,
    is_sdxl_lora,
    is_sdxl_single_file,
    looks_like_diffusers_unet,
    looks_like_lora,
    looks_like_single_file,
    transformer_family,
)
from cgidm_core.names import (  # noqa: F401 - re-exported for the loaders next to the rules
    CHROMA_FAMILY,
    DDPM_FAMILY,
    FINETUNED_KINDS,
    FLUX2_FAMILY,
    FLUX_FAMILY,
    PIXEL_FAMILIES,
    PIXEL_FLOW_FAMILY,
    QWEN_IMAGE_FAMILY,
    SD3_FAMILY,
    SD_FAMILY,
    SDXL_FAMILY,
    ZIMAGE_FAMILY,
)

FLOW_SCHEDULERS = frozenset({"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"})

SUPPORTED_HINT = (
    "cgidm supports Stable Diffusion 1.x/2.x and SDXL base 1.0 (StableDiffusionPipeline / "
    "StableDiffusionXLPipeline folders, with fine-tunes as pipeline folders, DreamBooth unet/ "
    "(+text_encoder/, text_encoder_2/) folders, LoRA .safetensors or single-file .safetensors "
    "checkpoints), Flux.1 dev and schnell (FluxPipeline folders, with fine-tunes as pipeline "
    "folders, transformer/ folders, LoRA .safetensors or single-file transformers), "
    "Stable Diffusion 3 / 3.5 medium and large (StableDiffusion3Pipeline folders), Chroma "
    "(ChromaPipeline), Z-Image (ZImagePipeline), Qwen-Image (QwenImagePipeline) and Flux.2 Klein "
    "(Flux2KleinPipeline), with the same fine-tune layouts as Flux.1, "
    "and pixel-space DDPM (DDPMPipeline folders)"
)
SD3_REFUSAL = (
    "a Stable Diffusion 3 / 3.5 checkpoint as one file is a transformer (its VAE and text "
    "encoders are published apart): give the StableDiffusion3Pipeline folder it belongs to for "
    "its config, VAE, text encoders and scheduler (pretrained_config=..., CLI "
    "--pretrained-config DIR)"
)
SDXL_REFINER_REFUSAL = (
    "the SDXL refiner is not supported: it is an image-to-image model conditioned on an "
    "aesthetic score and one text encoder, not the base a fine-tune is made from; give the SDXL "
    "base 1.0 pipeline (or a fine-tune of it) instead. " + SUPPORTED_HINT
)
PICKLE_HINT = (
    "cgidm loads safetensors weights only, because pickle files (.bin/.ckpt/.pt) can run code "
    "when opened. Convert the model once in a trusted environment, e.g. "
    "`DiffusionPipeline.from_pretrained(path).save_pretrained(out, safe_serialization=True)`"
)

IDENTICAL_MODELS = (
    "the fine-tuned model {ft} has exactly the weights of the pretrained model {pre}: there is "
    "nothing to contrast; check that the two paths point to different models"
)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_PIXEL_PIPELINES = {"DDPMPipeline", "DDIMPipeline"}
_PIXEL_UNETS = {"UNet2DModel"}
_PICKLE_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".pkl"}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON config, or ModelFormatError saying which file is broken."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"cannot read {path} ({exc}); the folder looks damaged") from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} is not a JSON object; the model folder looks damaged")
    return data


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names in a safetensors file (header only), or ModelFormatError if it is corrupt."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt"
        ) from exc


def _refuse_pickle_file(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ModelFormatError(f"{path} is a pickle checkpoint. {PICKLE_HINT}")


def _lora_file_in(folder: Path) -> Path | None:
    candidate = folder / LORA_WEIGHT_NAME
    if candidate.is_file():
        return candidate
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1 and looks_like_lora(safetensors_keys(files[0])):
        return files[0]
    return None


def lora_weights_file(path: Path) -> Path:
    """The LoRA weights file for a LoRA path (the file itself, or the one in the folder)."""
    if path.is_file():
        return path
    found = _lora_file_in(path)
    if found is None:
        raise ModelFormatError(f"no LoRA weights ({LORA_WEIGHT_NAME}) in {path}")
    return found


#: The diffusers class of a Flux.1 transformer (``transformer/config.json``).
FLUX_TRANSFORMER = "FluxTransformer2DModel"


#: The diffusers class of a Stable Diffusion 3.x transformer (adapter: ``models.sd3``).
SD3_TRANSFORMER = "SD3Transformer2DModel"


def _class_name(config_file: Path) -> str:
    return str(read_json(config_file).get("_class_name", ""))


def detect_finetuned_kind(path: str | Path) -> str:
    """Say how a fine-tuned model is stored: one of :data:`cgidm_core.names.FINETUNED_KINDS`.

    - ``pipeline``: a full diffusers folder (``model_index.json``) of Stable Diffusion;
    - ``ddpm``: a pixel-space pipeline folder, or a ``UNet2DModel`` (alone or in ``unet/``);
    - ``dreambooth``: ``unet/`` and optionally ``text_encoder/`` without ``model_index.json``
      (or a bare ``UNet2DConditionModel`` folder); for Flux a ``transformer/`` folder (or a bare
      ``FluxTransformer2DModel`` folder);
    - ``lora``: a LoRA ``.safetensors`` file, or a folder holding
      ``pytorch_lora_weights.safetensors``;
    - ``single_file``: one ``.safetensors`` checkpoint in the original LDM key layout, or a
      Flux.1 transformer as one file (Black Forest Labs' or diffusers' naming);
    - ``unet``: one ``.safetensors`` file of bare UNet weights in diffusers naming, built with
      the base's UNet config (see ``unet_file``).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path {path} does not exist")
    if path.is_file():
        _refuse_pickle_file(path)
        if path.suffix.lower() != ".safetensors":
            raise ModelFormatError(
                f"{path} is not a .safetensors file; give a diffusers folder, a LoRA .safetensors "
                "or a single-file .safetensors checkpoint"
            )
        keys = safetensors_keys(path)
        if looks_like_lora(keys):
            return "lora"
        if transformer_family(keys) in (FLUX_FAMILY, SD3_FAMILY, CHROMA_FAMILY, ZIMAGE_FAMILY,
                                        QWEN_IMAGE_FAMILY, FLUX2_FAMILY):
            return "single_file"
        if looks_like_single_file(keys) or is_sdxl_single_file(keys):
            return "single_file"
        if looks_like_diffusers_unet(keys):
            return "unet"
        raise ModelFormatError(
            f"{path} holds neither LoRA weights, nor a Stable Diffusion checkpoint (no "
            "'model.diffusion_model.*' tensors), nor bare UNet weights (conv_in, down_blocks)"
        )
    if (path / "model_index.json").is_file():
        name = _class_name(path / "model_index.json")
        return "ddpm" if name in _PIXEL_PIPELINES else "pipeline"
    if (path / "unet" / "config.json").is_file():
        pixel = _class_name(path / "unet" / "config.json") in _PIXEL_UNETS
        return "ddpm" if pixel else "dreambooth"
    if (path / "transformer" / "config.json").is_file():
        return "dreambooth"
    if (path / "config.json").is_file():
        name = _class_name(path / "config.json")
        if name in _PIXEL_UNETS:
            return "ddpm"
        if name in ("UNet2DConditionModel", FLUX_TRANSFORMER, SD3_TRANSFORMER,
                    "ChromaTransformer2DModel", "ZImageTransformer2DModel",
                    "QwenImageTransformer2DModel", "Flux2Transformer2DModel"):
            return "dreambooth"
    if (path / LORA_WEIGHT_NAME.replace(".safetensors", ".bin")).is_file():
        raise ModelFormatError(f"{path} holds a pickle LoRA (.bin). {PICKLE_HINT}")
    if _lora_file_in(path) is not None:
        return "lora"
    raise ModelFormatError(
        f"cannot tell what model {path} holds: expected model_index.json, a unet/ folder, a "
        f"{LORA_WEIGHT_NAME} or a .safetensors file. " + SUPPORTED_HINT
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
    if numbers and text_dim - (SDXL_TIME_IDS - 1) * time_dim == cross:
        raise UnsupportedModelFamilyError(f"{where}: {SDXL_REFINER_REFUSAL}")
    return SDXL_FAMILY


def check_unet_family(unet_config: dict[str, Any], where: Path, family: str) -> None:
    """A UNet of another family than the pair's is an incompatible pair, said in plain words."""
    found = unet_family(unet_config, where)
    if found != family:
        raise IncompatiblePairError(
            f"{where} holds a {_FAMILY_NAMES[found]} UNet but the pretrained model is "
            f"{_FAMILY_NAMES[family]}; both models must be of the same family"
        )


_FAMILY_NAMES = {SD_FAMILY: "Stable Diffusion 1.x/2.x", SDXL_FAMILY: "SDXL",
                 DDPM_FAMILY: "pixel-space DDPM", FLUX_FAMILY: "Flux.1",
                 PIXEL_FLOW_FAMILY: "pixel-space flow-matching model",
                 SD3_FAMILY: "Stable Diffusion 3.x", CHROMA_FAMILY: "Chroma",
                 ZIMAGE_FAMILY: "Z-Image", QWEN_IMAGE_FAMILY: "Qwen-Image",
                 FLUX2_FAMILY: "Flux.2 Klein"}


def family_name(family: str) -> str:
    return _FAMILY_NAMES.get(family, family)


def _refuse_variant(folder: Path, name: str, unet_config: dict[str, Any]) -> None:
    if unet_config.get("in_channels", 4) != 4 or unet_config.get("class_embed_type"):
        raise UnsupportedModelFamilyError(
            f"{folder} ({name}) is an inpainting/upscaling variant whose UNet takes extra "
            "inputs. " + SUPPORTED_HINT
        )


def pipeline_family(folder: Path) -> str:
    """Family of a pipeline folder: ``stable-diffusion``, ``stable-diffusion-xl`` or ``ddpm``.

    Refuses everything else (the SDXL refiner, SD3, Flux Fill/control, inpainting variants...) by
    name.
    """
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelFormatError(
            f"{folder} has no model_index.json; the pretrained model must be a diffusers pipeline "
            "folder. " + SUPPORTED_HINT
        )
    index = read_json(index_file)
    name = str(index.get("_class_name", ""))
    if name in _PIXEL_PIPELINES:
        return PIXEL_FLOW_FAMILY if pixel_objective(folder) == "flow" else DDPM_FAMILY
    if name.startswith("StableDiffusion3"):
        from cgidm_core.models.sd3 import sd3_pipeline_family

        return sd3_pipeline_family(folder, name, index)
    if name.startswith("Flux2"):
        from cgidm_core.models.flux2 import flux2_pipeline_family

        return flux2_pipeline_family(folder, name, index)
    if name.startswith("Flux"):
        return _flux_pipeline_family(folder, name, index)
    if name.startswith("Chroma"):
        from cgidm_core.models.chroma import chroma_pipeline_family

        return chroma_pipeline_family(folder, name, index)
    if name.startswith("QwenImage"):
        from cgidm_core.models.qwen_image import qwen_image_pipeline_family

        return qwen_image_pipeline_family(folder, name, index)
    if name.startswith("ZImage"):
        from cgidm_core.models.zimage import zimage_pipeline_family

        return zimage_pipeline_family(folder, name, index)
    unet_config_file = folder / "unet" / "config.json"
    unet_config = read_json(unet_config_file) if unet_config_file.is_file() else {}
    if name.startswith("StableDiffusionXL") or "text_encoder_2" in index:
        te1 = index.get("text_encoder")
        if index.get("requires_aesthetics_score") or not te1 or te1[0] is None:
            raise UnsupportedModelFamilyError(f"{folder} ({name}): {SDXL_REFINER_REFUSAL}")
        if unet_config:
            if unet_family(unet_config, folder) != SDXL_FAMILY:
                raise UnsupportedModelFamilyError(
                    f"{folder} ({name}) has a UNet without SDXL's size conditioning. "
                    + SUPPORTED_HINT
                )
            _refuse_variant(folder, name, unet_config)
        parts = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        missing = [part for part in parts if part not in index]
        if missing:
            raise ModelFormatError(f"{folder} ({name}) lacks {', '.join(missing)}")
        return SDXL_FAMILY
    has_sd_parts = all(part in index for part in ("unet", "vae", "text_encoder", "tokenizer"))
    if name.startswith("StableDiffusion") and has_sd_parts and "transformer" not in index:
        if unet_config:
            if unet_family(unet_config, folder) != SD_FAMILY:
                raise UnsupportedModelFamilyError(
                    f"{folder} ({name}) has a UNet with SDXL conditioning but one text encoder. "
                    + SUPPORTED_HINT
                )
            _refuse_variant(folder, name, unet_config)
        return SD_FAMILY
    raise UnsupportedModelFamilyError(f"{folder} is a {name or 'unknown'} model. " + SUPPORTED_HINT)


def _flux_pipeline_family(folder: Path, name: str, index: dict[str, Any]) -> str:
    """Flux.1 dev or schnell (``FluxPipeline``); Fill, Canny/Depth control, Kontext and Flux.2
    variants are refused by name: their transformer takes extra image channels or another
    architecture, not the text-to-image model a fine-tune is made from."""
    config_file = folder / "transformer" / "config.json"
    transformer = read_json(config_file) if config_file.is_file() else {}
    if name != "FluxPipeline" or transformer.get("_class_name", FLUX_TRANSFORMER) != (
            FLUX_TRANSFORMER):
        raise UnsupportedModelFamilyError(
            f"{folder} is a {name} model ({transformer.get('_class_name', 'unknown transformer')})"
            ": of the Flux family cgidm supports the Flux.1 dev and schnell text-to-image "
            "pipelines (FluxPipeline). " + SUPPORTED_HINT
        )
    missing = [part for part in ("transformer", "vae", "text_encoder", "text_encoder_2",
                                 "tokenizer", "tokenizer_2", "scheduler") if part not in index]
    if missing:
        raise ModelFormatError(f"{folder} ({name}) lacks {', '.join(missing)}")
    vae_file = folder / "vae" / "config.json"
    latent_channels = read_json(vae_file).get("latent_channels", 16) if vae_file.is_file() else 16
    if transformer and transformer.get("in_channels") != 4 * latent_channels:
        raise UnsupportedModelFamilyError(
            f"{folder} ({name}) has a transformer taking {transformer.get('in_channels')} input "
            f"features, not the {4 * latent_channels} of packed {latent_channels}-channel latents:"
            " a Fill/control variant, not Flux.1 dev or schnell. " + SUPPORTED_HINT
        )
    return FLUX_FAMILY


def pixel_objective(folder: Path) -> str | None:
    """``"flow"`` or ``"ddpm"``: how a pixel pipeline folder (or bare UNet folder) was trained.

    Read from its saved scheduler's class, the one thing that tells a flow-matching
    ``UNet2DModel`` from a DDPM one; ``None`` when the folder has no scheduler config (a bare
    UNet fine-tune, which then follows its base).
    """
    config_file = folder / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        return None
    return "flow" if read_json(config_file).get("_class_name") in FLOW_SCHEDULERS else "ddpm"


def weights_variant(component_dir: Path, stems: tuple[str, ...]) -> str | None:
    """Which weights variant to load from a component folder (``None`` = the plain file).

    Raises ModelFormatError for folders with only pickle weights or no weights at all, before
    diffusers/transformers would, so the message can tell the user what to do.
    """
    if not component_dir.is_dir():
        raise ModelFormatError(f"{component_dir} is missing")
    for stem in stems:
        if (component_dir / f"{stem}.safetensors").is_file() or (
            component_dir / f"{stem}.safetensors.index.json"
        ).is_file():
            return None
    # "<stem>.<variant>.safetensors", or sharded "<stem>.<variant>-00001-of-00002.safetensors"
    variants = sorted(
        {
            file.name[len(stem) + 1 : -len(".safetensors")].split("-")[0]
            for stem in stems
            for file in component_dir.glob(f"{stem}.*.safetensors")
        }
    )
    if variants:
        return "fp16" if "fp16" in variants else variants[0]
    if any(f.suffix.lower() in _PICKLE_SUFFIXES for f in component_dir.iterdir()):
        raise ModelFormatError(f"{component_dir} holds only pickle weights. {PICKLE_HINT}")
    raise ModelFormatError(f"{component_dir} holds no .safetensors weights")

"""Recognising model formats and families from files on disk, before any weights are loaded.

Detection reads only JSON configs and safetensors headers, so refusing an unsupported model
(the SDXL refiner, Flux.2 dev, pickle weights, a corrupt file) is instant and never runs code from
the model. Which family a file or folder belongs to is the family registry's answer
(:mod:`cgidm_core.families`): this module reads the files and asks the table, and names no
family itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cgidm_core import families
from cgidm_core.errors import (
    FamilyMismatchError,
    IncompatiblePairError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelFamilyError,
)
from cgidm_core.families import Family
from cgidm_core.family_evidence import FamilyEvidence, weigh
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
    DDPM_FAMILY,
    FINETUNED_KINDS,
    FLUX_FAMILY,
    PIXEL_FAMILIES,
    PIXEL_FLOW_FAMILY,
    SD_FAMILY,
    SDXL_FAMILY,
)
from cgidm_core.names import PICKLE_SUFFIXES as PICKLE_SUFFIXES

FLOW_SCHEDULERS = frozenset({"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"})

#: What the registry loads, for refusals (built from the table).
SUPPORTED_HINT = families.supported_hint()
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
_PICKLE_SUFFIXES = frozenset(PICKLE_SUFFIXES)
#: What each fine-tune layout is called in messages.
LAYOUT_NAMES = {"lora": "LoRA", "single_file": "single-file checkpoint",
                "dreambooth": "fine-tuned denoiser folder", "pipeline": "pipeline",
                "unet": "bare UNet weights file", "ddpm": "pixel-space model folder"}


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


def _class_name(config_file: Path) -> str:
    return str(read_json(config_file).get("_class_name", ""))


def _refuse_refused_denoiser(class_name: str, where: Path) -> None:
    refused = families.refused_denoiser(class_name)
    if refused is not None:
        raise UnsupportedModelFamilyError(f"{where} ({class_name}): {refused.message}")


def _pixel_claim(claims: list[Family]) -> bool:
    """Whether the claiming families store fine-tunes as pixel model folders (layout ``ddpm``)."""
    return any("ddpm" in family.finetuned_layouts for family in claims)


def detect_finetuned_kind(path: str | Path) -> str:
    """The fine-tune's layout: ``pipeline``, ``dreambooth``, ``lora``, ``single_file``, ``ddpm``
    or ``unet``, from its files and the registry's recognition rules (no weights are read)."""
    path = Path(path)
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
        refused = families.refused_file(keys)
        if refused is not None:
            raise UnsupportedModelFamilyError(f"{path}: {refused.message}")
        if families.file_claims(keys, "single_file"):
            return "single_file"
        if families.file_claims(keys, "unet"):
            return "unet"
        raise ModelFormatError(
            f"{path} holds neither LoRA weights, nor a Stable Diffusion checkpoint (no "
            "'model.diffusion_model.*' tensors), nor bare UNet weights (conv_in, down_blocks)"
        )
    if (path / "model_index.json").is_file():
        name = _class_name(path / "model_index.json")
        return "ddpm" if _pixel_claim(families.pipeline_class_claims(name)) else "pipeline"
    if (path / "unet" / "config.json").is_file():
        claims = families.denoiser_claims(_class_name(path / "unet" / "config.json"))
        return "ddpm" if _pixel_claim(claims) else "dreambooth"
    if (path / "transformer" / "config.json").is_file():
        _refuse_refused_denoiser(_class_name(path / "transformer" / "config.json"), path)
        return "dreambooth"
    if (path / "config.json").is_file():
        name = _class_name(path / "config.json")
        claims = families.denoiser_claims(name)
        if claims:
            return "ddpm" if _pixel_claim(claims) else "dreambooth"
        _refuse_refused_denoiser(name, path)
    if (path / LORA_WEIGHT_NAME.replace(".safetensors", ".bin")).is_file():
        raise ModelFormatError(f"{path} holds a pickle LoRA (.bin). {PICKLE_HINT}")
    if _lora_file_in(path) is not None:
        return "lora"
    raise ModelFormatError(
        f"cannot tell what model {path} holds: expected model_index.json, a unet/ folder, a "
        f"{LORA_WEIGHT_NAME} or a .safetensors file. " + SUPPORTED_HINT
    )


def family_name(family: str) -> str:
    """A family's name for users ("Stable Diffusion 1.x/2.x"), from the registry."""
    return families.title(family)


def scheduler_objective(folder: Path) -> str:
    """``"flow"`` or ``"noise"``: the objective a pipeline folder's saved scheduler says."""
    return "flow" if pixel_objective(folder) == "flow" else "noise"


def pipeline_entry(folder: Path) -> Family:
    """The registry entry of a pipeline folder (its ``model_index.json`` class, and for pixel
    pipelines its scheduler), after the family's adapter has refused the variants it cannot
    load; families that are recognised only to be refused are refused by name."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelFormatError(
            f"{folder} has no model_index.json; the pretrained model must be a diffusers pipeline "
            "folder. " + SUPPORTED_HINT
        )
    index = read_json(index_file)
    name = str(index.get("_class_name", ""))
    refused = families.refused_pipeline(name)
    if refused is not None:
        raise UnsupportedModelFamilyError(f"{folder} ({name}): {refused.message}")
    family = families.pipeline_claim(name, index, lambda: scheduler_objective(folder))
    if family is None:
        raise UnsupportedModelFamilyError(
            f"{folder} is a {name or 'unknown'} model. " + SUPPORTED_HINT)
    families.adapter(family).check_pipeline_folder(folder, index)
    return family


def pipeline_family(folder: Path) -> str:
    """The registry name of a pipeline folder's family (see :func:`pipeline_entry`)."""
    return pipeline_entry(folder).name


def base_file_family(file: Path) -> Family:
    """The family of a pretrained model given as one ``.safetensors`` file, by its tensor names.

    A file no entry claims is explained by the LDM checkpoint rules (no UNet, no VAE, the SDXL
    refiner...), the layout every complete single file shared so far uses."""
    keys = safetensors_keys(file)
    refused = families.refused_file(keys)
    if refused is not None:
        raise UnsupportedModelFamilyError(f"{file}: {refused.message}")
    family = families.base_file_claim(keys)
    if family is not None:
        return family
    from cgidm_core.models.single_file_base import single_file_base_family

    single_file_base_family(keys, file)  # raises, saying what the file lacks
    raise UnsupportedModelFamilyError(f"{file}: no registered family's single-file layout. "
                                      + SUPPORTED_HINT)


def finetune_claims(kind: str, path: Path) -> list[Family] | None:
    """The families whose files the fine-tune's could be, or ``None`` when its layout does not
    say (bare weights, pixel folders: the adapter checks those against the base's config)."""
    if kind in ("lora", "single_file"):
        weights = lora_weights_file(path) if kind == "lora" else path
        return families.file_claims(safetensors_keys(weights), kind)
    if kind == "pipeline":
        return [pipeline_entry(path)]
    if kind == "dreambooth":
        for config in (path / "transformer" / "config.json", path / "unet" / "config.json",
                       path / "config.json"):
            if config.is_file():
                return families.denoiser_claims(_class_name(config)) or None
    return None


def _article(title: str) -> str:
    return "an" if title.startswith(("SDXL", "A", "E", "I", "O", "U")) else "a"


def _described(family: Family) -> str:
    """"a pixel-space DDPM", but "Flux.1" (a model, not a kind of model)."""
    return f"a {family.title}" if family.space == "pixel" else family.title


def check_finetune_family(family: Family, kind: str, path: Path) -> FamilyEvidence | None:
    """Refuse, before any weight is read, a fine-tune that cannot be of the base's family: a
    layout the family has no use for (a pixel UNet for a latent base), or files the registry
    gives to other families only (a Flux LoRA for an SDXL base); a LoRA of a family refused by
    name (:data:`cgidm_core.families.REFUSED`) is refused with its message, and a LoRA whose
    header names only other families' bases (:mod:`cgidm_core.family_evidence`) with
    :class:`FamilyMismatchError`. Returns, for a LoRA, what says it is of the base's family
    (``ambiguous`` when only the base does), for the pair's ``describe()``."""
    if kind == "lora":
        weights = lora_weights_file(path)
        refused = families.refused_lora(safetensors_keys(weights))
        if refused is not None:
            raise UnsupportedModelFamilyError(f"{weights} is a {refused.title} LoRA: "
                                              f"{refused.message}")
    if kind not in family.finetuned_layouts:
        if kind in ("single_file", "lora") and family in (finetune_claims(kind, path) or []):
            raise ModelFormatError(
                f"{path} is {_article(family.title)} {family.title} {LAYOUT_NAMES[kind]}, a "
                "layout cgidm recognises but does not load for this family yet (it loads: "
                f"{', '.join(family.finetuned_layouts)}); save it as a diffusers folder first, "
                "e.g. with the denoiser class's from_single_file(...).save_pretrained(...)")
        if "ddpm" in family.finetuned_layouts:
            what = f"a latent, text-conditioned fine-tune ({kind})"
        elif kind == "ddpm":
            what = "a pixel-space DDPM or flow model (UNet2DModel)"
        else:
            layout = LAYOUT_NAMES[kind]
            what = f"{_article(layout)} {layout}, a layout this family has no use for"
        raise IncompatiblePairError(
            f"the pretrained model is {_described(family)} but {path} is "
            f"{what}; both models must be of the same family"
        )
    claims = finetune_claims(kind, path)
    if not claims or family in claims:  # the files do not say: the adapter checks them
        return _lora_evidence(family, path) if kind == "lora" else None
    if kind == "pipeline":
        raise IncompatiblePairError(
            f"the fine-tuned model {path} is {_article(claims[0].title)} {claims[0].title} "
            f"pipeline but the pretrained one is {family.title}"
        )
    found = " or ".join(claim.title for claim in claims)
    raise IncompatiblePairError(
        f"{path} is {_article(found)} {found} {LAYOUT_NAMES[kind]} but the pretrained model is "
        f"{family.title}; compare it with the base it was trained from"
    )


def _lora_evidence(family: Family, path: Path) -> FamilyEvidence:
    """Weigh a LoRA's header metadata against its names; refuse one trained for another base."""
    from cgidm_core.prompts import safetensors_metadata

    weights = lora_weights_file(path)
    evidence = weigh(safetensors_keys(weights), safetensors_metadata(weights), family.name)
    if evidence.trained_for:
        raise FamilyMismatchError(evidence.mismatch_message(str(weights)), evidence.trained_for)
    return evidence


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

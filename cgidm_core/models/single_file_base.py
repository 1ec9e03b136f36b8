"""A pretrained model given as one ``.safetensors`` checkpoint (e.g. ``sd_xl_base_1.0``).

The pair loaders work from diffusers folders (they read text encoders back from disk, attach
LoRAs, compare configs), so a single-file base is converted once into a diffusers folder kept in
cgidm's cache (``CGIDM_CACHE_DIR``, default ``~/.cache/cgidm``), keyed by the file's path, size
and modification time, and loaded from there afterwards. The conversion is diffusers'
``from_single_file``: it infers the model type from the checkpoint's keys and needs that type's
configs (JSON and tokenizer files, no weights) from the Hugging Face cache; offline, without them,
the error says to allow the network once or give the diffusers folder. The converted folder is a
full copy of the weights (about 7 GB for SDXL base in float16).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from cgidm_core import families
from cgidm_core.errors import ModelFormatError, UnsupportedModelFamilyError
from cgidm_core.models.formats import (
    SD_FAMILY,
    SDXL_FAMILY,
    SUPPORTED_HINT,
    safetensors_keys,
    transformer_family,
)
from cgidm_core.models.unet_configs import SDXL_REFINER_REFUSAL
from cgidm_core.models.vpred import mark_converted_base


def single_file_base_family(keys: list[str], where: Path) -> str:
    """The family of a complete original-layout checkpoint; refuses the refiner and the rest."""
    transformer = transformer_family(keys)
    if transformer is not None:  # a denoiser alone: its family's entry says what completes it
        raise UnsupportedModelFamilyError(
            f"{where} is a {families.title(transformer)} transformer on its own, not a complete "
            "checkpoint: give its pipeline folder (pretrained_config=..., CLI "
            "--pretrained-config DIR)")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelFormatError(
            f"{where} holds no UNet ('model.diffusion_model.*'): a pretrained single file must be "
            "a complete Stable Diffusion or SDXL checkpoint. " + SUPPORTED_HINT
        )
    if not any(k.startswith("first_stage_model.") for k in keys):
        raise ModelFormatError(
            f"{where} holds no VAE ('first_stage_model.*'); a pretrained single file must be a "
            "complete checkpoint (or give the base's diffusers folder)"
        )
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return SDXL_FAMILY
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise UnsupportedModelFamilyError(f"{where}: {SDXL_REFINER_REFUSAL}")
    if any(k.startswith("cond_stage_model.") for k in keys):
        return SD_FAMILY
    raise UnsupportedModelFamilyError(
        f"{where} has neither Stable Diffusion's nor SDXL's text encoders. " + SUPPORTED_HINT
    )


def cache_root() -> Path:
    return Path(os.environ.get("CGIDM_CACHE_DIR", "~/.cache/cgidm")).expanduser() / "converted"


def converted_base_folder(file: Path, pipeline_class: str, *, allow_network: bool,
                          root: Path | None = None, **components: Any) -> Path:
    """The diffusers folder of a single-file base, converting it on first use with the family
    adapter's diffusers pipeline class (``components``: parts it should not build, e.g. SD's
    ``safety_checker=None``)."""
    import diffusers

    from cgidm_core.models.components import loading_errors

    file = file.resolve()
    keys = safetensors_keys(file)
    single_file_base_family(keys, file)  # refuses what is not a complete file
    stat = file.stat()
    key = hashlib.sha256(f"{file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = (root or cache_root()) / f"{file.stem}-{key}"
    if (target / "model_index.json").is_file():
        mark_converted_base(target, keys)
        return target
    pipeline = getattr(diffusers, pipeline_class)
    try:
        with loading_errors("the single-file base", file):
            pipe = pipeline.from_single_file(str(file), local_files_only=not allow_network,
                                             **components)
    except ModelFormatError as exc:
        hint = ("" if allow_network else
                " Converting it needs diffusers' configs for this model type from the Hugging "
                "Face cache: run once with allow_network=True (CLI: --allow-network; configs "
                "only are downloaded), or give the base's diffusers pipeline folder.")
        raise ModelFormatError(f"{exc}.{hint}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    try:
        os.replace(staging, target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    mark_converted_base(target, keys)  # v-pred / zero-terminal-SNR markers (models.vpred)
    return target

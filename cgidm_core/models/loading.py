"""One entry point that turns two model references into a :class:`~cgidm_core.pair.ModelPair`.

The path is the same for every family, and names none: resolve both references to paths; ask
the family registry (:mod:`cgidm_core.families`, through :mod:`~cgidm_core.models.formats`)
which family the pretrained model is; detect the fine-tune's layout and refuse one whose files
belong to another family; hand both to that family's adapter module; read the trigger prompt.
Refusals (missing path, pickle weights, the SDXL refiner, two models that cannot be compared)
happen before weights are read wherever the files allow it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cgidm_core import families
from cgidm_core.errors import (
    ConfigError,
    IncompatiblePairError,
    ModelFormatError,
    ModelNotFoundError,
)
from cgidm_core.families import Family
from cgidm_core.models.adapter import LoadOptions, PairRequest
from cgidm_core.models.devices import resolve_device, resolve_dtype
from cgidm_core.models.formats import (
    PICKLE_HINT,
    base_file_family,
    check_finetune_family,
    detect_finetuned_kind,
    lora_weights_file,
    pipeline_entry,
)
from cgidm_core.names import FINETUNED_KINDS
from cgidm_core.pair import ModelPair

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_pair_from_paths(
    pretrained: str | Path,
    finetuned: str | Path,
    *,
    finetuned_kind: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_network: bool = False,
    keep_text_encoders: bool = False,
    pretrained_config: str | Path | None = None,
) -> ModelPair:
    """Load a pretrained model and its suspected fine-tune as one pair, frozen, in eval mode.

    From paths (or cached Hub ids) only: :func:`cgidm_core.load_pair` is the public entry point,
    which also accepts the demo names and records each model's provenance.

    ``pretrained`` is a diffusers pipeline folder of a registered family (``cgidm models
    --families``), a complete single-file checkpoint (converted once, see
    ``single_file_base``), or a single-file denoiser (a diffusion transformer), whose config and
    other parts come from the pipeline folder ``pretrained_config``; ``finetuned`` is any
    layout :func:`detect_finetuned_kind` recognises (``finetuned_kind`` overrides the
    detection). ``device``/``dtype`` default to CUDA and the family's GPU dtype (float16,
    bfloat16 for the diffusion transformers) when a GPU exists, else CPU+float32. Without
    ``allow_network`` nothing is downloaded: Hub ids must already be in the local cache.
    Text-conditioned pairs drop their text encoders after encoding each new prompt and read them
    back from disk for the next new one, unless ``keep_text_encoders``.
    """
    target = resolve_device(device)
    resolve_dtype(dtype, target)  # an unknown dtype is refused before anything is read
    pre_path = resolve_model_path(pretrained, allow_network)
    ft_path = resolve_model_path(finetuned, allow_network)
    family, pre_folder, pre_file = _pretrained_model(pre_path, pretrained_config, allow_network)
    kind = _finetuned_kind(ft_path, finetuned_kind)
    evidence = check_finetune_family(family, kind, ft_path)
    opts = LoadOptions(
        device=target,
        dtype=resolve_dtype(_default_dtype(family, dtype, target), target),
        local_files_only=not allow_network,
    )
    request = PairRequest(family=family, pretrained=pre_folder, finetuned=ft_path, kind=kind,
                          opts=opts, keep_text_encoders=keep_text_encoders,
                          pretrained_file=pre_file)
    pair = families.adapter(family).load_pair(request)
    if evidence is not None:
        pair.family_evidence = evidence.describe()
    if family.conditioning == "text":
        _read_instance_prompt(pair, ft_path, kind)
    return pair


def _default_dtype(family: Family, dtype: str | torch.dtype | None,
                   target: torch.device) -> str | torch.dtype | None:
    """"auto" on a GPU is the family's GPU dtype (Flux.1: bfloat16, its T5 and transformer
    activations overflow float16); elsewhere what :func:`resolve_dtype` says."""
    auto = dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto")
    return family.defaults.gpu_dtype if auto and target.type == "cuda" else dtype


def _finetuned_kind(ft_path: Path, finetuned_kind: str | None) -> str:
    if finetuned_kind is None:
        return detect_finetuned_kind(ft_path)
    if finetuned_kind in FINETUNED_KINDS:
        return finetuned_kind
    raise ConfigError(
        f"unknown fine-tuned kind {finetuned_kind!r}; use one of {', '.join(FINETUNED_KINDS)}"
    )


def _pretrained_model(
    pre_path: Path, config: str | Path | None, allow_network: bool
) -> tuple[Family, Path, Path | None]:
    """``(family, pipeline folder, pretrained denoiser file or None)`` of the pretrained model.

    A single file is either complete (the adapter converts it into a pipeline folder once) or
    the family's denoiser alone, completed by the pipeline folder ``config``
    (``Recognition.base_file_layout``)."""
    if not pre_path.is_file():
        if config is not None:
            raise ConfigError(
                "pretrained_config (--pretrained-config) is for a pretrained denoiser given as "
                f"one file (a {_denoiser_file_families()} transformer); {pre_path} is not one"
            )
        return pipeline_entry(pre_path), pre_path, None
    if pre_path.suffix.lower() != ".safetensors":
        raise ModelFormatError(
            f"{pre_path}: a pretrained model file must be a .safetensors checkpoint. "
            + PICKLE_HINT
        )
    family = base_file_family(pre_path)
    if family.recognition.base_file_layout == "denoiser":
        return family, _config_folder(pre_path, family, config, allow_network), pre_path
    if config is not None:
        raise ConfigError(
            f"pretrained_config (--pretrained-config) is for a pretrained denoiser given as one "
            f"file; {pre_path} is a complete {family.title} checkpoint, which needs none"
        )
    adapter = families.adapter(family)
    # not in the FamilyAdapter protocol: only the families whose base file is a whole
    # checkpoint (base_file_layout "pipeline", checked above) define it
    folder = adapter.convert_single_file_base(  # type: ignore[attr-defined]
        pre_path, allow_network=allow_network)
    return pipeline_entry(folder), folder, None


def _denoiser_file_families() -> str:
    return " or ".join(f.title for f in families.FAMILIES
                       if f.recognition.base_file_layout == "denoiser")


def _config_folder(file: Path, family: Family, config: str | Path | None,
                   allow_network: bool) -> Path:
    if config is None:
        raise ConfigError(
            f"{file} is a {family.title} transformer on its own: give the {family.title} "
            "pipeline folder it belongs to for its config, VAE, text encoders and scheduler "
            "(pretrained_config=..., CLI --pretrained-config DIR)"
        )
    folder = resolve_model_path(config, allow_network)
    if pipeline_entry(folder) is not family:
        raise IncompatiblePairError(f"{folder} is not a {family.title} pipeline folder, so it "
                                    f"cannot supply the parts of the transformer {file}")
    return folder


def _read_instance_prompt(pair: ModelPair, ft_path: Path, kind: str) -> None:
    """The fine-tune's instance prompt from its own files, as the pair's default prompt."""
    from cgidm_core.prompts import finetune_prompt

    weights = lora_weights_file(ft_path) if kind == "lora" else None
    found = finetune_prompt(ft_path, weights=weights)
    if found is not None:
        pair.default_prompt, pair.default_prompt_source, pair.default_prompt_origin = found


# -- references ----------------------------------------------------------------------------------


def resolve_model_path(reference: str | Path, allow_network: bool) -> Path:
    """A local path as is; a Hub id (``owner/name``) from the local cache, or downloaded if allowed.

    Downloads take configs and safetensors weights only, so pickle files never reach the disk.
    """
    path = Path(reference).expanduser()
    if path.exists():
        return path
    text = str(reference)
    if isinstance(reference, str) and _REPO_ID.match(text) and not text.endswith(".safetensors"):
        return _hub_snapshot(text, allow_network)
    raise ModelNotFoundError(f"model path {path} does not exist")


def _hub_snapshot(repo_id: str, allow_network: bool) -> Path:
    from huggingface_hub import snapshot_download

    ignore = ["*.fp16.*", "*non_ema*", "*.ema.*", "*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack"]
    try:
        root = Path(
            snapshot_download(
                repo_id, local_files_only=not allow_network, allow_patterns=["*.json", "*.txt"]
            )
        )
        # Pipeline repos also carry huge top-level single-file checkpoints: take only the folders.
        is_pipeline = (root / "model_index.json").is_file() or (root / "unet").is_dir()
        weights = ["*/*.safetensors"] if is_pipeline else ["*.safetensors"]
        return Path(
            snapshot_download(
                repo_id,
                local_files_only=not allow_network,
                allow_patterns=["*.json", "*.txt", *weights],
                ignore_patterns=ignore,
            )
        )
    except Exception as exc:  # huggingface_hub raises many error types for "not available"
        hint = (
            "it is neither a local path nor in the local Hugging Face cache; pass "
            "allow_network=True (CLI: --allow-network) to download it"
            if not allow_network
            else f"it could not be fetched from the Hugging Face Hub ({_short(exc)})"
        )
        raise ModelNotFoundError(f"model {repo_id!r} not found: {hint}") from exc


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

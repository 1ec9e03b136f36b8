"""One entry point that turns two model references into a :class:`~cgidm_core.pair.ModelPair`.

The pretrained model fixes the family (from its ``model_index.json``); the fine-tuned model's
storage format is detected from its files. Refusals (missing path, pickle weights, SDXL, two
models that cannot be compared) happen before weights are read wherever the files allow it.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

from cgidm_core.errors import (
    ConfigError,
    IncompatiblePairError,
    ModelFormatError,
    ModelNotFoundError,
)
from cgidm_core.models.ddpm import DDPMPair
from cgidm_core.models.devices import resolve_device, resolve_dtype
from cgidm_core.models.formats import (
    IDENTICAL_MODELS,
    PICKLE_HINT,
    detect_finetuned_kind,
    family_name,
    is_flux_lora,
    lora_weights_file,
    pipeline_family,
    pixel_objective,
    read_json,
    safetensors_keys,
    transformer_family,
    weights_variant,
)
from cgidm_core.models.pixel_flow import PixelFlowPair
from cgidm_core.models.predictions import alphas_cumprod_of, build_scheduler, check_prediction_type
from cgidm_core.models.sd_loading import (
    LoadOptions,
    SDFinetune,
    attach_lora,
    check_compatible,
    describe_family_mismatch,
    load_dreambooth,
    load_finetuned_pipeline,
    load_sd_base,
    load_single_file,
    loading_errors,
    place,
    same_weights,
    text_encoder_reloader,
)
from cgidm_core.models.stable_diffusion import StableDiffusionLoraPair, StableDiffusionPair
from cgidm_core.models.unet_file import load_unet_file
from cgidm_core.names import (
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

    ``pretrained`` is a diffusers pipeline folder (Stable Diffusion 1.x/2.x, SDXL base, Flux.1
    dev/schnell or pixel DDPM), a complete single-file checkpoint (converted once, see
    ``single_file_base``), or a single-file Flux.1 transformer, whose config and other parts
    (VAE, text encoders, tokenizers, scheduler) come from the Flux pipeline folder
    ``pretrained_config``;
    ``finetuned`` is any format :func:`detect_finetuned_kind` recognises (``finetuned_kind``
    overrides the detection). ``device``/``dtype`` default to CUDA+float16 when a GPU exists
    (bfloat16 for Flux.1), else CPU+float32. Without ``allow_network`` nothing is downloaded:
    Hub ids must already be in the local cache. Stable Diffusion, SDXL and Flux pairs drop their
    text encoders after encoding each new prompt and read them back from disk for the next new
    one, unless ``keep_text_encoders``.
    """
    target = resolve_device(device)
    opts = LoadOptions(
        device=target,
        dtype=resolve_dtype(dtype, target),
        local_files_only=not allow_network,
    )
    pre_path = resolve_model_path(pretrained, allow_network)
    ft_path = resolve_model_path(finetuned, allow_network)
    pretrained_transformer = None
    transformer_file_family = (
        transformer_family(safetensors_keys(pre_path))
        if pre_path.is_file() and pre_path.suffix.lower() == ".safetensors" else None)
    if transformer_file_family in (FLUX_FAMILY, *_ADAPTERS):
        pretrained_transformer, pre_path = pre_path, _flux_config_folder(
            pre_path, pretrained_config, allow_network, transformer_file_family)
    elif pretrained_config is not None:
        raise ConfigError(
            "pretrained_config (--pretrained-config) is for a pretrained Flux.1 transformer given "
            f"as one file; {pre_path} is not one"
        )
    if pre_path.is_file():
        if pre_path.suffix.lower() != ".safetensors":
            raise ModelFormatError(
                f"{pre_path}: a pretrained model file must be a .safetensors checkpoint. "
                + PICKLE_HINT
            )
        from cgidm_core.models.single_file_base import converted_base_folder

        pre_path = converted_base_folder(pre_path, allow_network=allow_network)
    family = pipeline_family(pre_path)
    if finetuned_kind is None:
        kind = detect_finetuned_kind(ft_path)
    elif finetuned_kind in FINETUNED_KINDS:
        kind = finetuned_kind
    else:
        raise ConfigError(
            f"unknown fine-tuned kind {finetuned_kind!r}; use one of {', '.join(FINETUNED_KINDS)}"
        )
    if kind != "unet" and (family in PIXEL_FAMILIES) != (kind == "ddpm"):
        raise describe_family_mismatch(family, kind, ft_path)
    if family == DDPM_FAMILY:
        return load_ddpm_pair(pre_path, ft_path, opts, kind=kind)
    if family == PIXEL_FLOW_FAMILY:
        return load_pixel_flow_pair(pre_path, ft_path, opts, kind=kind)
    _refuse_adapter_mismatch(family, kind, ft_path)
    if family in _ADAPTERS:  # one adapter module each (sd3.py, chroma.py, zimage.py)
        module = importlib.import_module(_ADAPTERS[family][0])
        pair = getattr(module, _ADAPTERS[family][1])(
            pre_path, ft_path, kind, _bfloat16_on_gpu(opts, dtype),
            keep_text_encoders=keep_text_encoders, pretrained_transformer=pretrained_transformer)
        _read_instance_prompt(pair, ft_path, kind)
        return pair
    _refuse_flux_mismatch(family, kind, ft_path)
    if family == FLUX_FAMILY:
        from cgidm_core.models.flux_loading import load_flux_pair

        if target.type == "cuda" and (dtype is None or str(dtype).strip().lower() == "auto"):
            # Flux.1 is trained and released in bfloat16; its T5 and transformer activations
            # overflow float16 (the GPU default for the other families)
            opts = LoadOptions(device=target, dtype=torch.bfloat16,
                               local_files_only=opts.local_files_only)

        pair = load_flux_pair(pre_path, ft_path, kind, opts,
                              keep_text_encoders=keep_text_encoders,
                              pretrained_transformer=pretrained_transformer)
    elif family == SDXL_FAMILY:
        from cgidm_core.models.sdxl_loading import load_sdxl_pair

        pair = load_sdxl_pair(pre_path, ft_path, kind, opts, keep_text_encoders=keep_text_encoders)
    else:
        pair = load_sd_pair(pre_path, ft_path, kind, opts, keep_text_encoders=keep_text_encoders)
    _read_instance_prompt(pair, ft_path, kind)
    return pair


def _flux_config_folder(file: Path, config: str | Path | None, allow_network: bool,
                        family: str = FLUX_FAMILY) -> Path:
    """The pipeline folder that supplies a one-file transformer's config and other parts
    (Flux.1, and SD 3.x, whose published single files hold the MMDiT alone)."""
    name = family_name(family)
    if config is None:
        raise ConfigError(
            f"{file} is a {name} transformer on its own: give the {name} pipeline folder it "
            "belongs to for its config, VAE, text encoders and scheduler (pretrained_config=..., "
            "CLI --pretrained-config DIR)"
        )
    folder = resolve_model_path(config, allow_network)
    if pipeline_family(folder) != family:
        raise IncompatiblePairError(f"{folder} is not a {name} pipeline folder, so it cannot "
                                    f"supply the parts of the {name} transformer {file}")
    return folder


def _bfloat16_on_gpu(opts: LoadOptions, dtype: str | torch.dtype | None) -> LoadOptions:
    """bfloat16 instead of the float16 GPU default, for the families released in bfloat16
    whose T5 / transformer activations overflow float16 (Flux.1, SD 3.5)."""
    if opts.device.type == "cuda" and (dtype is None or str(dtype).strip().lower() == "auto"):
        return LoadOptions(device=opts.device, dtype=torch.bfloat16,
                           local_files_only=opts.local_files_only)
    return opts


#: Families loaded by one self-contained adapter module each: family -> (module, loader,
#: recogniser of a fine-tune's files by their names). The family registry (issue #23) takes
#: these over.
_ADAPTERS = {
    SD3_FAMILY: ("cgidm_core.models.sd3", "load_sd3_pair", "is_sd3_finetune"),
    CHROMA_FAMILY: ("cgidm_core.models.chroma", "load_chroma_pair", "is_chroma_finetune"),
    ZIMAGE_FAMILY: ("cgidm_core.models.zimage", "load_zimage_pair", "is_zimage_finetune"),
    QWEN_IMAGE_FAMILY: ("cgidm_core.models.qwen_image", "load_qwen_image_pair",
                        "is_qwen_image_finetune"),
    FLUX2_FAMILY: ("cgidm_core.models.flux2", "load_flux2_pair", "is_flux2_finetune"),
}


def _refuse_adapter_mismatch(family: str, kind: str, ft_path: Path) -> None:
    """A fine-tune whose file names say it is of an adapter family other than the base's is
    refused before loading (a LoRA's names are often shared by several families: those are
    refused by the loader, from their shapes)."""
    for other, (module_name, _, recogniser) in _ADAPTERS.items():
        if other == family or kind not in ("single_file", "dreambooth", "lora"):
            continue
        if getattr(importlib.import_module(module_name), recogniser)(kind, ft_path):
            raise IncompatiblePairError(
                f"{ft_path} is a {family_name(other)} fine-tune but the pretrained model is "
                f"{family_name(family)}; compare it with the {family_name(other)} pipeline it "
                "was trained from")


def _refuse_flux_mismatch(family: str, kind: str, ft_path: Path) -> None:
    """A Flux fine-tune on a Stable Diffusion base (or the reverse) is refused before loading."""
    flux_files = None
    if kind == "lora":
        flux_files = is_flux_lora(safetensors_keys(lora_weights_file(ft_path)))
    elif kind == "single_file":
        flux_files = transformer_family(safetensors_keys(ft_path)) == FLUX_FAMILY
    elif kind == "dreambooth":
        flux_files = (ft_path / "transformer").is_dir() or (
            (ft_path / "config.json").is_file()
            and read_json(ft_path / "config.json").get("_class_name") == "FluxTransformer2DModel")
    if flux_files is None or flux_files == (family == FLUX_FAMILY):
        return
    what = {"lora": "LoRA", "single_file": "single-file checkpoint",
            "dreambooth": "fine-tuned denoiser folder"}[kind]
    if flux_files:
        raise IncompatiblePairError(
            f"{ft_path} is a Flux.1 {what} but the pretrained model is {family_name(family)}; "
            "compare it with the Flux.1 pipeline it was trained from"
        )
    raise IncompatiblePairError(
        f"{ft_path} is a Stable Diffusion / SDXL {what} but the pretrained model is Flux.1; "
        "compare it with the base it was trained from"
    )


def _read_instance_prompt(pair: ModelPair, ft_path: Path, kind: str) -> None:
    """The fine-tune's instance prompt from its own files, as the pair's default prompt."""
    from cgidm_core.prompts import finetune_prompt

    weights = lora_weights_file(ft_path) if kind == "lora" else None
    found = finetune_prompt(ft_path, weights=weights)
    if found is not None:
        pair.default_prompt, pair.default_prompt_source, pair.default_prompt_origin = found


# -- Stable Diffusion ----------------------------------------------------------------------------


def load_sd_pair(
    pre_path: Path, ft_path: Path, kind: str, opts: LoadOptions, *, keep_text_encoders: bool = False
) -> ModelPair:
    base = load_sd_base(pre_path, opts)
    shared = {
        "vae": place(base.vae, opts, torch.float32),
        "tokenizer": base.tokenizer,
        "alphas_cumprod": base.alphas_cumprod,
        "prediction_type": base.prediction_type,
        "device": opts.device,
        "dtype": opts.dtype,
    }
    if kind == "lora":
        attach_lora(ft_path, base, opts)
        return StableDiffusionLoraPair(
            unet=place(base.unet, opts),
            text_encoder=place(base.text_encoder, opts),
            keep_text_encoders=keep_text_encoders,
            text_encoder_reloader=text_encoder_reloader(
                kind, pre_path, ft_path, opts, unet_config=base.unet.config
            ),
            **shared,
        )

    loaders = {
        "pipeline": load_finetuned_pipeline,
        "dreambooth": load_dreambooth,
        "single_file": load_single_file,
        "unet": lambda file, base, opts: SDFinetune(
            unet=load_unet_file(file, base.folder, opts.dtype, SD_FAMILY)),
    }
    finetune = loaders[kind](ft_path, base, opts)
    check_compatible(base, finetune, ft_path)
    # Identical networks are kept once: a UNet-only fine-tune shares the base text encoder.
    text_encoder = finetune.text_encoder
    if text_encoder is None or (
        finetune.tokenizer is None and same_weights(text_encoder, base.text_encoder)
    ):
        text_encoder = base.text_encoder
    unet = finetune.unet
    if same_weights(unet, base.unet):
        if text_encoder is base.text_encoder:
            raise IncompatiblePairError(IDENTICAL_MODELS.format(ft=ft_path, pre=pre_path))
        unet = base.unet
    unet_pretrained = place(base.unet, opts)
    unet_finetuned = unet_pretrained if unet is base.unet else place(unet, opts)
    text_encoder_pretrained = place(base.text_encoder, opts)
    # Only the text encoder is converted again from a single file: the rest is the pair's own.
    components = {"unet": unet_finetuned, "vae": shared["vae"], "tokenizer": base.tokenizer,
                  "scheduler": base.scheduler}
    return StableDiffusionPair(
        unet_pretrained=unet_pretrained,
        unet_finetuned=unet_finetuned,
        keep_text_encoders=keep_text_encoders,
        text_encoder_reloader=text_encoder_reloader(
            kind, pre_path, ft_path, opts, single_file_components=components
        ),
        text_encoder_pretrained=text_encoder_pretrained,
        text_encoder_finetuned=(
            text_encoder_pretrained
            if text_encoder is base.text_encoder
            else place(text_encoder, opts)
        ),
        tokenizer_finetuned=finetune.tokenizer,
        prediction_type_finetuned=finetune.prediction_type,
        finetuned_kind=kind,
        **shared,
    )


# -- pixel-space DDPM and flow matching ----------------------------------------------------------


def _ddpm_unet_location(folder: Path) -> tuple[Path, str | None]:
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet", "unet"
    if (folder / "config.json").is_file():
        return folder, None
    raise ModelFormatError(f"{folder} has no unet/ folder with a UNet2DModel")


def _load_ddpm_unet(folder: Path, opts: LoadOptions):
    from diffusers import UNet2DModel

    component, subfolder = _ddpm_unet_location(folder)
    config = read_json(component / "config.json")
    if config.get("_class_name") != "UNet2DModel":
        raise ModelFormatError(f"{component} is a {config.get('_class_name')}, not a UNet2DModel")
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        raise ModelFormatError(
            f"{component} is class-conditional; cgidm supports unconditional pixel DDPMs"
        )
    with loading_errors("the UNet", component):
        unet = UNet2DModel.from_pretrained(
            folder,
            subfolder=subfolder,
            use_safetensors=True,
            local_files_only=opts.local_files_only,
            torch_dtype=opts.dtype,
            variant=weights_variant(component, ("diffusion_pytorch_model",)),
        )
    return unet


def _ddpm_schedule(folder: Path) -> tuple[torch.Tensor, str] | None:
    config_file = folder / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        return None
    config = read_json(config_file)
    with loading_errors("the scheduler", config_file):
        alphas = alphas_cumprod_of(build_scheduler(config))
    prediction = check_prediction_type(config.get("prediction_type", "epsilon"), config_file)
    return alphas, prediction


def _refuse_mixed_objectives(pre_path: Path, ft_path: Path, base_objective: str) -> None:
    """A DDPM and a flow-matching model predict different things at different inputs: no pair.

    Checked from the saved schedulers before any weights are read. A fine-tune without a
    scheduler (a bare UNet folder) is taken to follow its base.
    """
    found = pixel_objective(ft_path)
    if found is None or found == base_objective:
        return
    names = {"ddpm": "a DDPM (noise prediction)", "flow": "a flow-matching model (velocity "
             "prediction, FlowMatchEulerDiscreteScheduler)"}
    raise IncompatiblePairError(
        f"the pretrained model {pre_path} is {names[base_objective]} but the fine-tune {ft_path} "
        f"is {names[found]}: a fine-tune keeps its base's training objective, so these two are "
        "not a base and its fine-tune; give the base the fine-tune was trained from"
    )


def _shared_unet_checks(pre_path: Path, ft_path: Path, unet_pre, unet_ft) -> None:
    for name in ("in_channels", "sample_size"):
        if getattr(unet_pre.config, name) != getattr(unet_ft.config, name):
            raise IncompatiblePairError(
                f"the fine-tuned UNet has {name}={getattr(unet_ft.config, name)} but the "
                f"pretrained one has {getattr(unet_pre.config, name)}"
            )
    if same_weights(unet_pre, unet_ft):
        raise IncompatiblePairError(IDENTICAL_MODELS.format(ft=ft_path, pre=pre_path))


def _flow_schedule(folder: Path) -> tuple[int, float] | None:
    """``(num_train_timesteps, shift)`` of a flow-matching pixel folder's scheduler."""
    config_file = folder / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        return None
    config = read_json(config_file)
    if config.get("use_dynamic_shifting"):
        raise ModelFormatError(
            f"{config_file}: dynamic (resolution-dependent) time shifting is not supported for "
            "pixel flow models; save the scheduler with a fixed `shift`"
        )
    steps, shift = config.get("num_train_timesteps", 1000), config.get("shift", 1.0)
    if not isinstance(steps, int) or steps < 2 or not isinstance(shift, int | float) or shift <= 0:
        raise ModelFormatError(f"{config_file}: num_train_timesteps {steps!r} / shift {shift!r} "
                               "are not a usable flow schedule")
    return steps, float(shift)


def load_pixel_flow_pair(
    pre_path: Path, ft_path: Path, opts: LoadOptions, kind: str = "ddpm"
) -> PixelFlowPair:
    """Two flow-matching ``UNet2DModel`` (velocity prediction) as one pair.

    The inversion's draws of ``s`` follow :data:`PIXEL_FLOW_INVERSION_SHIFT` (measured), not the
    sampler's ``shift``, which only says how the model is sampled; both fine-tune and base must
    agree on the number of training timesteps, which maps the drawn t to ``s``. ``kind="unet"``:
    the fine-tune is a bare weights file (``unet_file``), which follows its base's objective.
    """
    if kind != "unet":
        _refuse_mixed_objectives(pre_path, ft_path, "flow")
    schedule = _flow_schedule(pre_path)
    assert schedule is not None  # pipeline_family read it
    ft_schedule = None if kind == "unet" else _flow_schedule(ft_path)
    if ft_schedule is not None and ft_schedule[0] != schedule[0]:
        raise IncompatiblePairError(
            f"{ft_path} was trained with {ft_schedule[0]} flow timesteps but {pre_path} with "
            f"{schedule[0]}"
        )
    unet_pre = _load_ddpm_unet(pre_path, opts)
    unet_ft = _load_pixel_finetuned_unet(pre_path, ft_path, opts, kind)
    _shared_unet_checks(pre_path, ft_path, unet_pre, unet_ft)
    return PixelFlowPair(
        place(unet_pre, opts),
        place(unet_ft, opts),
        num_train_timesteps=schedule[0],
        device=opts.device,
        dtype=opts.dtype,
    )


def _load_pixel_finetuned_unet(pre_path: Path, ft_path: Path, opts: LoadOptions, kind: str):
    """The fine-tuned pixel UNet: a folder, or (``kind="unet"``) a bare weights file built with
    the base's UNet config (``unet_file``)."""
    if kind == "unet":
        return load_unet_file(ft_path, pre_path, opts.dtype)
    return _load_ddpm_unet(ft_path, opts)


def load_ddpm_pair(
    pre_path: Path, ft_path: Path, opts: LoadOptions, kind: str = "ddpm"
) -> DDPMPair:
    """Two pixel UNets; ``kind="unet"``: the fine-tune is a bare weights file (``unet_file``)."""
    if kind != "unet":
        _refuse_mixed_objectives(pre_path, ft_path, "ddpm")
    schedule = _ddpm_schedule(pre_path)
    if schedule is None:
        raise ModelFormatError(f"{pre_path} has no scheduler/scheduler_config.json")
    alphas, prediction = schedule
    ft_schedule = _ddpm_schedule(ft_path)
    if ft_schedule is not None and not torch.allclose(ft_schedule[0], alphas, atol=1e-5):
        raise IncompatiblePairError(
            f"{ft_path} was trained with a different noise schedule than {pre_path}"
        )
    unet_pre = _load_ddpm_unet(pre_path, opts)
    unet_ft = _load_pixel_finetuned_unet(pre_path, ft_path, opts, kind)
    _shared_unet_checks(pre_path, ft_path, unet_pre, unet_ft)
    return DDPMPair(
        place(unet_pre, opts),
        place(unet_ft, opts),
        alphas,
        prediction_type=prediction,
        prediction_type_finetuned=ft_schedule[1] if ft_schedule else None,
        device=opts.device,
        dtype=opts.dtype,
    )


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

"""The SDXL adapter (registry entry ``stable-diffusion-xl``): loading an SDXL pair from each
fine-tune format (the SDXL counterpart of ``sd_loading``).

The same rules as for SD 1.x/2.x: every network is built on the CPU first, safetensors only, local
files only unless the caller allowed the network, no remote code; identical networks are kept
once; a LoRA is ONE UNet (and one pair of text encoders) with a named adapter that the pair
switches on for the fine-tuned model and off for the pretrained one. The UNet, VAE and scheduler
loaders are shared with SD (``sd_loading``); what is SDXL's own is the second text encoder and
tokenizer, and diffusers' SDXL LoRA / single-file entry points (which convert kohya and original
checkpoint names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cgidm_core.errors import IncompatiblePairError, ModelFormatError, UnsupportedModelFamilyError
from cgidm_core.models.adapter import BaseRequest, LoadOptions, LoraBase, PairRequest
from cgidm_core.models.components import (
    LORA_ADAPTER_NAME,
    count_adapted_layers,
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
    loading_errors,
    place,
    read_lora_state_dict,
    same_weights,
    scheduler_of,
)
from cgidm_core.models.formats import (
    IDENTICAL_MODELS,
    SDXL_FAMILY,
    SUPPORTED_HINT,
    lora_weights_file,
    read_json,
    safetensors_keys,
)
from cgidm_core.models.predictions import alphas_cumprod_of
from cgidm_core.models.sdxl import (
    SDXLTextEncoders,
    StableDiffusionXLLoraPair,
    StableDiffusionXLPair,
)
from cgidm_core.models.stable_diffusion import TextEncoderReloader
from cgidm_core.models.unet_configs import (
    SDXL_REFINER_REFUSAL,
    SDXL_TIME_IDS,
    refuse_variant,
    unet_family,
)
from cgidm_core.models.unet_file import load_unet_file
from cgidm_core.models.vpred import (
    check_finetune_objective,
    check_lora_objective,
    single_file_objective,
)
from cgidm_core.prompts import safetensors_metadata

if TYPE_CHECKING:  # annotations only; mypy reads transformers as Any (pyproject.toml)
    from transformers import PreTrainedTokenizerBase

_TEXT_ENCODERS = {
    "text_encoder": ("CLIPTextModel", "tokenizer"),
    "text_encoder_2": ("CLIPTextModelWithProjection", "tokenizer_2"),
}
#: Key prefixes of the two text encoders in an original (SGM) single-file SDXL checkpoint.
_SINGLE_FILE_TEXT_PREFIXES = {
    "text_encoder": "conditioner.embedders.0.",
    "text_encoder_2": "conditioner.embedders.1.",
}


@dataclass
class SDXLBase:
    """The pretrained SDXL pipeline's parts, on the CPU until they are placed."""

    folder: Path
    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: PreTrainedTokenizerBase
    tokenizer_2: PreTrainedTokenizerBase
    scheduler: Any
    alphas_cumprod: torch.Tensor
    prediction_type: str


@dataclass
class SDXLFinetune:
    """What a fine-tune brings; ``None`` fields are the base's."""

    unet: Any = None
    text_encoder: Any = None
    text_encoder_2: Any = None
    prediction_type: str | None = None


def load_sdxl_text_encoder(folder: Path, name: str, opts: LoadOptions) -> Any:
    """``text_encoder`` (CLIPTextModel) or ``text_encoder_2`` (CLIPTextModelWithProjection)."""
    return load_text_encoder(folder, opts, name, _TEXT_ENCODERS[name][0], "SDXL")


def load_sdxl_base(folder: Path, opts: LoadOptions) -> SDXLBase:
    scheduler, prediction_type = scheduler_of(folder)
    base = SDXLBase(
        folder=folder,
        unet=load_unet(folder, "unet", opts, SDXL_FAMILY),
        vae=load_vae(folder, opts),  # float32 always: the SDXL VAE overflows in float16
        text_encoder=load_sdxl_text_encoder(folder, "text_encoder", opts),
        text_encoder_2=load_sdxl_text_encoder(folder, "text_encoder_2", opts),
        tokenizer=load_tokenizer(folder, opts),
        tokenizer_2=load_tokenizer(folder, opts, "tokenizer_2"),
        scheduler=scheduler,
        alphas_cumprod=alphas_cumprod_of(scheduler),
        prediction_type=prediction_type,
    )
    _check_conditioning_sizes(base)
    return base


def _check_conditioning_sizes(base: SDXLBase) -> None:
    """The UNet must take what the two encoders give: hidden sizes summed, pooled + 6 time ids."""
    unet = base.unet.config
    hidden = base.text_encoder.config.hidden_size + base.text_encoder_2.config.hidden_size
    pooled = base.text_encoder_2.config.projection_dim
    added = SDXL_TIME_IDS * int(unet.addition_time_embed_dim) + pooled
    if hidden != unet.cross_attention_dim or added != unet.projection_class_embeddings_input_dim:
        raise UnsupportedModelFamilyError(
            f"{base.folder}: the UNet expects {unet.cross_attention_dim}-dim text features and a "
            f"{unet.projection_class_embeddings_input_dim}-dim added embedding, but the text "
            f"encoders give {hidden} and {added} (pooled {pooled} + {SDXL_TIME_IDS} time ids): "
            "not an SDXL base 1.0 layout. " + SUPPORTED_HINT
        )


# -- fine-tune formats -------------------------------------------------------------------------


def _own_text_encoders(folder: Path, base: SDXLBase, opts: LoadOptions) -> dict[str, Any]:
    """The text encoders a fine-tune folder carries (``text_encoder/``, ``text_encoder_2/``)."""
    out = {}
    for name in _TEXT_ENCODERS:
        if (folder / name / "config.json").is_file():
            encoder = load_sdxl_text_encoder(folder, name, opts)
            base_encoder = getattr(base, name)
            if encoder.config.vocab_size != base_encoder.config.vocab_size:
                raise ModelFormatError(
                    f"{folder / name} has a vocabulary of {encoder.config.vocab_size} tokens but "
                    f"the base's has {base_encoder.config.vocab_size}; cgidm does not support "
                    "SDXL fine-tunes that add tokens (textual inversion)"
                )
            out[name] = encoder
    return out


def load_sdxl_pipeline_finetune(folder: Path, base: SDXLBase, opts: LoadOptions) -> SDXLFinetune:
    """A full SDXL pipeline folder; its VAE is not loaded (both models use the base's)."""
    prediction_type = None
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        scheduler, prediction_type = scheduler_of(folder)
        if not torch.allclose(alphas_cumprod_of(scheduler), base.alphas_cumprod, atol=1e-5):
            raise IncompatiblePairError(
                f"{folder} was trained with a different noise schedule than the pretrained model"
            )
    return SDXLFinetune(
        unet=load_unet(folder, "unet", opts, SDXL_FAMILY),
        prediction_type=prediction_type,
        **_own_text_encoders(folder, base, opts),
    )


def load_sdxl_dreambooth(folder: Path, base: SDXLBase, opts: LoadOptions) -> SDXLFinetune:
    """``unet/`` (+ ``text_encoder/``, ``text_encoder_2/``), or a bare UNet folder."""
    subfolder = "unet" if (folder / "unet").is_dir() else None
    return SDXLFinetune(
        unet=load_unet(folder, subfolder, opts, SDXL_FAMILY),
        **_own_text_encoders(folder, base, opts),
    )


def _single_file_pipeline(
    file: Path, base_folder: Path, opts: LoadOptions, components: dict[str, Any]
) -> Any:
    from diffusers import StableDiffusionXLPipeline

    with loading_errors("the single-file checkpoint", file, mismatch_is_incompatible=True):
        return StableDiffusionXLPipeline.from_single_file(
            str(file),
            config=str(base_folder),
            local_files_only=True,
            torch_dtype=opts.dtype,
            **components,
        )


def single_file_text_encoders(keys: list[str]) -> list[str]:
    """Which text encoders an original-layout SDXL checkpoint carries."""
    return [
        name
        for name, prefix in _SINGLE_FILE_TEXT_PREFIXES.items()
        if any(k.startswith(prefix) for k in keys)
    ]


def load_sdxl_single_file(file: Path, base: SDXLBase, opts: LoadOptions) -> SDXLFinetune:
    """An original (SGM) layout SDXL checkpoint, converted offline with the base folder as config.

    Only what the file holds is converted: the UNet, and each text encoder it carries; the VAE,
    the tokenizers, the scheduler and any text encoder it lacks are the base's.
    """
    keys = safetensors_keys(file)
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelFormatError(f"{file} holds no UNet ('model.diffusion_model.*' tensors)")
    own = single_file_text_encoders(keys)
    components: dict[str, Any] = {
        "vae": base.vae,
        "tokenizer": base.tokenizer,
        "tokenizer_2": base.tokenizer_2,
        "scheduler": base.scheduler,
    }
    for name in _TEXT_ENCODERS:
        if name not in own:
            components[name] = getattr(base, name)
    objective = single_file_objective(keys, file)  # v-pred / zero-terminal-SNR markers
    check_finetune_objective(objective, base.scheduler.config, file)
    pipe = _single_file_pipeline(file, base.folder, opts, components)
    return SDXLFinetune(unet=pipe.unet, prediction_type=objective.prediction_type,
                        **{name: getattr(pipe, name) for name in own})


def _read_sdxl_lora(weights: Path, unet_config: Any
                    ) -> tuple[dict[str, torch.Tensor], Any, Any]:
    """A LoRA's state dict in diffusers naming: kohya ``lora_unet_*``/``lora_te1_*``/
    ``lora_te2_*`` keys are converted by diffusers' SDXL loader (given the UNet config)."""
    from diffusers import StableDiffusionXLPipeline

    return read_lora_state_dict(StableDiffusionXLPipeline, weights, unet_config=unet_config)


def _attach_to_text_encoders(lora: tuple[dict[str, torch.Tensor], Any, Any],
                             encoders: dict[str, Any],
                             weights: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    state_dict, network_alphas, metadata = lora
    for prefix, encoder in encoders.items():
        if not any(key.startswith(prefix + ".") for key in state_dict):
            continue
        with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
            StableDiffusionXLPipeline.load_lora_into_text_encoder(
                state_dict,
                network_alphas,
                text_encoder=encoder,
                prefix=prefix,
                adapter_name=LORA_ADAPTER_NAME,
                metadata=metadata,
            )


def attach_sdxl_lora(path: Path, base: SDXLBase) -> int:
    """Load a LoRA into the base UNet and text encoders as one named adapter; returns the number
    of adapted layers (0 is refused: the file fits nothing in this base)."""
    from diffusers import StableDiffusionXLPipeline

    weights = lora_weights_file(path)
    lora = _read_sdxl_lora(weights, base.unet.config)
    state_dict, network_alphas, metadata = lora
    with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
        StableDiffusionXLPipeline.load_lora_into_unet(
            state_dict,
            network_alphas,
            unet=base.unet,
            adapter_name=LORA_ADAPTER_NAME,
            metadata=metadata,
        )
    encoders = {"text_encoder": base.text_encoder, "text_encoder_2": base.text_encoder_2}
    _attach_to_text_encoders(lora, encoders, weights)
    return count_adapted_layers(weights, "SDXL base model", base.unet, *encoders.values())


# -- the pair ----------------------------------------------------------------------------------


def _check_unet_fits(base: SDXLBase, finetune: SDXLFinetune, where: Path) -> None:
    pre, ft = base.unet.config, finetune.unet.config
    names = ("in_channels", "out_channels", "cross_attention_dim",
             "projection_class_embeddings_input_dim", "addition_time_embed_dim")
    for name in names:
        if getattr(pre, name) != getattr(ft, name):
            raise IncompatiblePairError(
                f"the fine-tuned UNet in {where} has {name}={getattr(ft, name)} but the "
                f"pretrained one has {getattr(pre, name)}; was it fine-tuned from this base?"
            )


def _kept_or_shared(own: Any, base_module: Any) -> Any:
    """The base's module when the fine-tune has none or an identical one."""
    if own is None or same_weights(own, base_module):
        return base_module
    return own


def sdxl_text_encoder_reloader(
    kind: str, base_folder: Path, finetuned_path: Path, opts: LoadOptions, *,
    own: tuple[str, ...], unet_config: Any = None, single_file_components: dict[str, Any] | None
    = None,
) -> TextEncoderReloader:
    """Builds the pair's text encoders again as :func:`load_sdxl_pair` built them.

    ``own`` names the encoders the fine-tune has of its own (the others are the base's, shared
    between the two models' :class:`SDXLTextEncoders`, and shared again in the rebuilt pair so
    that adopting the weights keeps the sharing).
    """

    def reload(finetuned: bool) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        encoders = {name: load_sdxl_text_encoder(base_folder, name, opts)
                    for name in _TEXT_ENCODERS}
        if kind == "lora":
            weights = lora_weights_file(finetuned_path)
            _attach_to_text_encoders(_read_sdxl_lora(weights, unet_config), encoders, weights)
        pretrained = place(SDXLTextEncoders(**encoders), opts)
        if not finetuned:
            return pretrained, None
        mine: dict[str, Any] = {}
        if kind == "single_file":
            components = dict(single_file_components or {})
            components.update({n: encoders[n] for n in _TEXT_ENCODERS if n not in own})
            pipe = _single_file_pipeline(finetuned_path, base_folder, opts, components)
            mine = {name: getattr(pipe, name) for name in own}
        elif kind in ("pipeline", "dreambooth"):
            mine = {name: load_sdxl_text_encoder(finetuned_path, name, opts) for name in own}
        else:
            raise ModelFormatError(f"a {kind} fine-tune has no text encoder of its own to reload")
        parts = {name: mine.get(name, getattr(pretrained, name)) for name in _TEXT_ENCODERS}
        return pretrained, place(SDXLTextEncoders(**parts), opts)

    return reload


def _shared_parts(base: SDXLBase, opts: LoadOptions, keep_text_encoders: bool
                  ) -> dict[str, Any]:
    return {
        "vae": place(base.vae, opts, torch.float32),
        "tokenizer": base.tokenizer,
        "tokenizer_2": base.tokenizer_2,
        "alphas_cumprod": base.alphas_cumprod,
        "prediction_type": base.prediction_type,
        "device": opts.device,
        "dtype": opts.dtype,
        "keep_text_encoders": keep_text_encoders,
    }


def sdxl_lora_pair(base: SDXLBase, lora: Path, opts: LoadOptions, *, keep_text_encoders: bool
                   ) -> StableDiffusionXLLoraPair:
    """The pair of a loaded base with the LoRA file ``lora`` attached as one named adapter
    (its objective checked first). ``cgidm check`` and an audit's LoRA swapping both build an
    SDXL LoRA pair here."""
    check_lora_objective(safetensors_metadata(lora_weights_file(lora)),
                         base.prediction_type, base.scheduler.config, lora)
    attach_sdxl_lora(lora, base)
    encoders = SDXLTextEncoders(base.text_encoder, base.text_encoder_2)
    return StableDiffusionXLLoraPair(
        unet=place(base.unet, opts),
        text_encoder=place(encoders, opts),
        text_encoder_reloader=sdxl_text_encoder_reloader(
            "lora", base.folder, lora, opts, own=(), unet_config=base.unet.config
        ),
        **_shared_parts(base, opts, keep_text_encoders),
    )


def load_sdxl_pair(
    pre_path: Path, ft_path: Path, kind: str, opts: LoadOptions, *, keep_text_encoders: bool
) -> StableDiffusionXLPair | StableDiffusionXLLoraPair:
    """An SDXL pair from a base pipeline folder and a fine-tune in any supported format."""
    base = load_sdxl_base(pre_path, opts)
    if kind == "lora":
        return sdxl_lora_pair(base, ft_path, opts, keep_text_encoders=keep_text_encoders)
    shared = _shared_parts(base, opts, keep_text_encoders)
    loaders: dict[str, Callable[[Path, SDXLBase, LoadOptions], SDXLFinetune]] = {
        "pipeline": load_sdxl_pipeline_finetune,
        "dreambooth": load_sdxl_dreambooth,
        "single_file": load_sdxl_single_file,
        "unet": lambda file, base, opts: SDXLFinetune(
            unet=load_unet_file(file, base.folder, opts.dtype, SDXL_FAMILY)),
    }
    if kind not in loaders:
        raise IncompatiblePairError(
            f"the pretrained model is SDXL but {ft_path} is a {kind} model; both models must be "
            "of the same family"
        )
    finetune = loaders[kind](ft_path, base, opts)
    _check_unet_fits(base, finetune, ft_path)
    te1 = _kept_or_shared(finetune.text_encoder, base.text_encoder)
    te2 = _kept_or_shared(finetune.text_encoder_2, base.text_encoder_2)
    own = tuple(name for name, module in (("text_encoder", te1), ("text_encoder_2", te2))
                if module is not getattr(base, name))
    unet = base.unet if same_weights(finetune.unet, base.unet) else finetune.unet
    if unet is base.unet and not own:
        raise IncompatiblePairError(IDENTICAL_MODELS.format(ft=ft_path, pre=pre_path))
    unet_pretrained = place(base.unet, opts)
    unet_finetuned = unet_pretrained if unet is base.unet else place(unet, opts)
    encoders_pretrained = place(SDXLTextEncoders(base.text_encoder, base.text_encoder_2), opts)
    encoders_finetuned = encoders_pretrained
    if own:
        encoders_finetuned = place(SDXLTextEncoders(
            te1 if "text_encoder" in own else encoders_pretrained.text_encoder,
            te2 if "text_encoder_2" in own else encoders_pretrained.text_encoder_2,
        ), opts)
    components = {"unet": unet_finetuned, "vae": shared["vae"], "tokenizer": base.tokenizer,
                  "tokenizer_2": base.tokenizer_2, "scheduler": base.scheduler}
    return StableDiffusionXLPair(
        unet_pretrained=unet_pretrained,
        unet_finetuned=unet_finetuned,
        text_encoder_pretrained=encoders_pretrained,
        text_encoder_finetuned=encoders_finetuned,
        text_encoder_reloader=sdxl_text_encoder_reloader(
            kind, pre_path, ft_path, opts, own=own, single_file_components=components
        ),
        prediction_type_finetuned=finetune.prediction_type,
        finetuned_kind=kind,
        **shared,
    )


# -- the adapter interface (cgidm_core.families.FamilyAdapter) ---------------------------------


def check_pipeline_folder(folder: Path, index: dict[str, Any]) -> None:
    """Refuse the refiner (one text encoder, aesthetic score), a UNet without SDXL's size
    conditioning, inpainting variants, and a folder missing one of SDXL's parts."""
    name = str(index.get("_class_name", ""))
    te1 = index.get("text_encoder")
    if index.get("requires_aesthetics_score") or not te1 or te1[0] is None:
        raise UnsupportedModelFamilyError(f"{folder} ({name}): {SDXL_REFINER_REFUSAL}")
    unet_config_file = folder / "unet" / "config.json"
    unet_config = read_json(unet_config_file) if unet_config_file.is_file() else {}
    if unet_config:
        if unet_family(unet_config, folder) != SDXL_FAMILY:
            raise UnsupportedModelFamilyError(
                f"{folder} ({name}) has a UNet without SDXL's size conditioning. "
                + SUPPORTED_HINT
            )
        refuse_variant(folder, name, unet_config)
    parts = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    missing = [part for part in parts if part not in index]
    if missing:
        raise ModelFormatError(f"{folder} ({name}) lacks {', '.join(missing)}")


def convert_single_file_base(file: Path, *, allow_network: bool) -> Path:
    """A complete SGM checkpoint (``sd_xl_base_1.0.safetensors``) as a pipeline folder."""
    from cgidm_core.models.single_file_base import converted_base_folder

    return converted_base_folder(file, "StableDiffusionXLPipeline", allow_network=allow_network)


def load_pair(request: PairRequest) -> StableDiffusionXLPair | StableDiffusionXLLoraPair:
    return load_sdxl_pair(request.pretrained, request.finetuned, request.kind, request.opts,
                          keep_text_encoders=request.keep_text_encoders)


def load_lora_base(request: BaseRequest) -> LoraBase:
    """The base kept loaded for an audit's LoRAs of it (:mod:`cgidm_core.lora_swap`): each
    LoRA file becomes the pair :func:`load_sdxl_pair` builds for it, text encoders kept."""
    opts = request.opts
    base = load_sdxl_base(request.pretrained, opts)
    adapted = (place(base.unet, opts), place(base.text_encoder, opts),
               place(base.text_encoder_2, opts))
    return LoraBase(pair=lambda lora: sdxl_lora_pair(base, lora, opts, keep_text_encoders=True),
                    adapted=adapted, parts=(*adapted, place(base.vae, opts, torch.float32)))

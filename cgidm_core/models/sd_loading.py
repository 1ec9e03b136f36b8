"""The Stable Diffusion 1.x/2.x adapter (registry entry ``stable-diffusion``): loading the
pieces of an SD pair from each fine-tune format. The helpers every family shares are in
:mod:`cgidm_core.models.components` (re-exported here for older imports).

Every network is loaded on the CPU first (so a LoRA can be attached and identical networks
detected before anything reaches the GPU), then frozen and moved. Weights are read as safetensors
only, configs from the local folder only unless the caller allowed the network, and never with
remote code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cgidm_core.errors import (
    IncompatiblePairError,
    ModelFormatError,
    UnsupportedModelFamilyError,
)
from cgidm_core.models.adapter import BaseRequest, LoadOptions, LoraBase, PairRequest
from cgidm_core.models.components import (  # noqa: F401 - re-exported for older imports
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
)
from cgidm_core.models.components import scheduler_of as _scheduler_of
from cgidm_core.models.formats import (
    IDENTICAL_MODELS,
    SD_FAMILY,
    SUPPORTED_HINT,
    is_sdxl_lora,
    is_sdxl_single_file,
    lora_weights_file,
    read_json,
    safetensors_keys,
)
from cgidm_core.models.predictions import alphas_cumprod_of
from cgidm_core.models.stable_diffusion import StableDiffusionLoraPair, StableDiffusionPair
from cgidm_core.models.unet_configs import refuse_variant, unet_family
from cgidm_core.models.unet_file import load_unet_file

if TYPE_CHECKING:  # annotations only; mypy reads transformers as Any (pyproject.toml)
    from transformers import PreTrainedTokenizerBase


@dataclass
class SDBase:
    """The pretrained pipeline's parts, on the CPU until :func:`finish` moves them."""

    folder: Path
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: PreTrainedTokenizerBase
    scheduler: Any
    alphas_cumprod: torch.Tensor
    prediction_type: str


@dataclass
class SDFinetune:
    """What a fine-tune brings; ``None`` fields are the base's."""

    unet: Any = None
    text_encoder: Any = None
    tokenizer: PreTrainedTokenizerBase | None = None
    prediction_type: str | None = None


def load_sd_base(folder: Path, opts: LoadOptions) -> SDBase:
    scheduler, prediction_type = _scheduler_of(folder)
    return SDBase(
        folder=folder,
        unet=load_unet(folder, "unet", opts),
        vae=load_vae(folder, opts),
        text_encoder=load_text_encoder(folder, opts),
        tokenizer=load_tokenizer(folder, opts),
        scheduler=scheduler,
        alphas_cumprod=alphas_cumprod_of(scheduler),
        prediction_type=prediction_type,
    )


# -- fine-tune formats -------------------------------------------------------------------------


def _tokenizer_for(text_encoder: Any, folder: Path, base: SDBase, opts: LoadOptions) -> Any:
    """The base tokenizer unless the fine-tune grew its vocabulary (textual-inversion tokens)."""
    if text_encoder is None or (
        text_encoder.config.vocab_size == base.text_encoder.config.vocab_size
    ):
        return None
    if (folder / "tokenizer").is_dir():
        return load_tokenizer(folder, opts)
    raise ModelFormatError(
        f"the text encoder in {folder} has a vocabulary of {text_encoder.config.vocab_size} tokens "
        f"but the base's has {base.text_encoder.config.vocab_size}, and {folder} has no tokenizer/"
    )


def load_finetuned_pipeline(folder: Path, base: SDBase, opts: LoadOptions) -> SDFinetune:
    """A full pipeline folder (its family checked by the registry before the adapter was called).
    Its VAE is not loaded: both models run in the base's latent space."""
    text_encoder = load_text_encoder(folder, opts) if (folder / "text_encoder").is_dir() else None
    prediction_type = None
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        scheduler, prediction_type = _scheduler_of(folder)
        if not torch.allclose(alphas_cumprod_of(scheduler), base.alphas_cumprod, atol=1e-5):
            raise IncompatiblePairError(
                f"{folder} was trained with a different noise schedule than the pretrained model"
            )
    return SDFinetune(
        unet=load_unet(folder, "unet", opts),
        text_encoder=text_encoder,
        tokenizer=_tokenizer_for(text_encoder, folder, base, opts),
        prediction_type=prediction_type,
    )


def load_dreambooth(folder: Path, base: SDBase, opts: LoadOptions) -> SDFinetune:
    """``unet/`` (+ ``text_encoder/``), as DreamBooth training writes; or a bare UNet folder."""
    subfolder = "unet" if (folder / "unet").is_dir() else None
    text_encoder = load_text_encoder(folder, opts) if (folder / "text_encoder").is_dir() else None
    return SDFinetune(
        unet=load_unet(folder, subfolder, opts),
        text_encoder=text_encoder,
        tokenizer=_tokenizer_for(text_encoder, folder, base, opts),
    )


def load_single_file(file: Path, base: SDBase, opts: LoadOptions) -> SDFinetune:
    """An LDM-layout checkpoint, converted by diffusers with the base folder as the config.

    The base's VAE, tokenizer and scheduler are handed in so that only the UNet and text encoder
    are built from the file.
    """
    from diffusers import StableDiffusionPipeline

    keys = safetensors_keys(file)
    if is_sdxl_single_file(keys):
        raise IncompatiblePairError(
            f"{file} is an SDXL checkpoint but the pretrained model is Stable Diffusion 1.x/2.x; "
            "compare it with the SDXL base it was fine-tuned from"
        )
    has_text_encoder = any(k.startswith("cond_stage_model.") for k in keys)
    components: dict[str, Any] = {
        "vae": base.vae,
        "tokenizer": base.tokenizer,
        "scheduler": base.scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }
    if not has_text_encoder:
        components["text_encoder"] = base.text_encoder
    with loading_errors("the single-file checkpoint", file, mismatch_is_incompatible=True):
        pipe = StableDiffusionPipeline.from_single_file(
            str(file),
            config=str(base.folder),
            local_files_only=True,
            torch_dtype=opts.dtype,
            **components,
        )
    return SDFinetune(unet=pipe.unet, text_encoder=pipe.text_encoder if has_text_encoder else None)


def _read_lora(weights: Path, unet_config: Any) -> tuple[dict[str, torch.Tensor], Any, Any]:
    """An SD 1.x/2.x LoRA (kohya/A1111 keys converted given the UNet config); an SDXL LoRA is
    refused as incompatible before diffusers fails on its shapes."""
    from diffusers import StableDiffusionPipeline

    if is_sdxl_lora(safetensors_keys(weights)):
        raise IncompatiblePairError(
            f"{weights} is an SDXL LoRA but the pretrained model is Stable Diffusion 1.x/2.x; "
            "compare it with the SDXL base it was trained on"
        )
    return read_lora_state_dict(StableDiffusionPipeline, weights, unet_config=unet_config)


def _lora_has_text_encoder(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith("text_encoder.") for key in state_dict)


def _attach_lora_to_text_encoder(
    lora: tuple[dict[str, torch.Tensor], Any, Any], text_encoder: Any, weights: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    state_dict, network_alphas, metadata = lora
    with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
        StableDiffusionPipeline.load_lora_into_text_encoder(
            state_dict,
            network_alphas,
            text_encoder=text_encoder,
            adapter_name=LORA_ADAPTER_NAME,
            metadata=metadata,
        )


def attach_lora(path: Path, base: SDBase, opts: LoadOptions) -> int:
    """Load a LoRA into the base UNet (and text encoder) as one named adapter.

    Goes through diffusers' LoRA loader, which also converts kohya/A1111 key names and reads the
    adapter's rank/alpha metadata. Returns the number of adapted layers.
    """
    from diffusers import StableDiffusionPipeline

    weights = lora_weights_file(path)
    lora = _read_lora(weights, base.unet.config)
    state_dict, network_alphas, metadata = lora
    with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
        StableDiffusionPipeline.load_lora_into_unet(
            state_dict,
            network_alphas,
            unet=base.unet,
            adapter_name=LORA_ADAPTER_NAME,
            metadata=metadata,
        )
    if _lora_has_text_encoder(state_dict):
        _attach_lora_to_text_encoder(lora, base.text_encoder, weights)
    return count_adapted_layers(weights, "base model", base.unet, base.text_encoder)


# -- reloading text encoders -------------------------------------------------------------------


def text_encoder_reloader(
    kind: str,
    base_folder: Path,
    finetuned_path: Path,
    opts: LoadOptions,
    *,
    unet_config: Any = None,
    single_file_components: dict[str, Any] | None = None,
) -> Callable[[bool], tuple[Any, Any]]:
    """A function that builds a pair's text encoders again, as :func:`load_sd_pair` built them.

    A pair that released its text encoders calls it for a prompt it has not encoded yet. It reads
    the same files as the first load: the base folder's ``text_encoder/``, and for the fine-tune
    its ``text_encoder/`` (pipeline, DreamBooth), the encoder inside its single file, or the
    base encoder with the LoRA's text-encoder layers attached. ``single_file_components`` are the
    pair's own UNet, VAE, tokenizer and scheduler, handed to diffusers so that only the text
    encoder is converted from the checkpoint. ``unet_config`` is the base UNet's config, which
    diffusers needs to convert kohya-style LoRA names.
    """

    def reload(finetuned: bool) -> tuple[Any, Any]:
        pretrained = load_text_encoder(base_folder, opts)
        if kind == "lora":
            weights = lora_weights_file(finetuned_path)
            lora = _read_lora(weights, unet_config)
            if _lora_has_text_encoder(lora[0]):
                _attach_lora_to_text_encoder(lora, pretrained, weights)
        pretrained = place(pretrained, opts)
        if not finetuned:
            return pretrained, None
        if kind == "single_file":
            encoder = _single_file_text_encoder(finetuned_path, base_folder, opts,
                                                single_file_components or {})
        elif kind in ("pipeline", "dreambooth"):
            encoder = load_text_encoder(finetuned_path, opts)
        else:
            raise ModelFormatError(f"a {kind} fine-tune has no text encoder of its own to reload")
        return pretrained, place(encoder, opts)

    return reload


def _single_file_text_encoder(
    file: Path, base_folder: Path, opts: LoadOptions, components: dict[str, Any]
) -> Any:
    from diffusers import StableDiffusionPipeline

    with loading_errors("the single-file checkpoint", file, mismatch_is_incompatible=True):
        pipe = StableDiffusionPipeline.from_single_file(
            str(file),
            config=str(base_folder),
            local_files_only=True,
            torch_dtype=opts.dtype,
            safety_checker=None,
            feature_extractor=None,
            **components,
        )
    return pipe.text_encoder


# -- checks and placement ----------------------------------------------------------------------


def check_compatible(base: SDBase, finetune: SDFinetune, where: Path) -> None:
    """The fine-tune must work in the base's latent space with a text encoder it understands."""
    pre, ft = base.unet.config, finetune.unet.config
    for name in ("in_channels", "out_channels", "sample_size"):
        if getattr(pre, name) != getattr(ft, name):
            raise IncompatiblePairError(
                f"the fine-tuned UNet in {where} has {name}={getattr(ft, name)} but the pretrained "
                f"one has {getattr(pre, name)}: they do not share a latent shape"
            )
    if pre.cross_attention_dim != ft.cross_attention_dim:
        raise IncompatiblePairError(
            f"the fine-tuned UNet in {where} expects {ft.cross_attention_dim}-dim text features "
            f"but the pretrained one {pre.cross_attention_dim}: they are different model families"
        )
    text_encoder = base.text_encoder if finetune.text_encoder is None else finetune.text_encoder
    if text_encoder.config.hidden_size != ft.cross_attention_dim:
        raise IncompatiblePairError(
            f"the text encoder used with {where} gives {text_encoder.config.hidden_size}-dim "
            f"features but its UNet expects {ft.cross_attention_dim}"
        )


def check_pipeline_folder(folder: Path, index: dict[str, Any]) -> None:
    """Refuse an SD-class folder whose UNet has SDXL conditioning, or an inpainting/upscaling
    variant (extra UNet inputs)."""
    name = str(index.get("_class_name", ""))
    unet_config_file = folder / "unet" / "config.json"
    unet_config = read_json(unet_config_file) if unet_config_file.is_file() else {}
    if unet_config:
        if unet_family(unet_config, folder) != SD_FAMILY:
            raise UnsupportedModelFamilyError(
                f"{folder} ({name}) has a UNet with SDXL conditioning but one text encoder. "
                + SUPPORTED_HINT
            )
        refuse_variant(folder, name, unet_config)


def convert_single_file_base(file: Path, *, allow_network: bool) -> Path:
    """A complete LDM checkpoint as a pipeline folder (converted once, cached)."""
    from cgidm_core.models.single_file_base import converted_base_folder

    return converted_base_folder(file, "StableDiffusionPipeline", allow_network=allow_network,
                                 safety_checker=None, feature_extractor=None)


def load_pair(request: PairRequest) -> StableDiffusionPair:
    return load_sd_pair(request.pretrained, request.finetuned, request.kind, request.opts,
                        keep_text_encoders=request.keep_text_encoders)


def load_lora_base(request: BaseRequest) -> LoraBase:
    """The base kept loaded for an audit's LoRAs of it (:mod:`cgidm_core.lora_swap`): each
    LoRA file becomes the pair :func:`load_sd_pair` builds for it, text encoders kept."""
    opts = request.opts
    base = load_sd_base(request.pretrained, opts)
    parts = (place(base.unet, opts), place(base.text_encoder, opts),
             place(base.vae, opts, torch.float32))
    return LoraBase(pair=lambda lora: sd_lora_pair(base, lora, opts, keep_text_encoders=True),
                    adapted=parts[:2], parts=parts)


def _shared_parts(base: SDBase, opts: LoadOptions) -> dict[str, Any]:
    return {
        "vae": place(base.vae, opts, torch.float32),
        "tokenizer": base.tokenizer,
        "alphas_cumprod": base.alphas_cumprod,
        "prediction_type": base.prediction_type,
        "device": opts.device,
        "dtype": opts.dtype,
    }


def sd_lora_pair(base: SDBase, lora: Path, opts: LoadOptions, *,
                 keep_text_encoders: bool) -> StableDiffusionLoraPair:
    """The pair of a loaded base with the LoRA file ``lora`` attached as one named adapter.
    ``cgidm check`` and an audit's LoRA swapping both build a LoRA pair here."""
    attach_lora(lora, base, opts)
    return StableDiffusionLoraPair(
        unet=place(base.unet, opts),
        text_encoder=place(base.text_encoder, opts),
        keep_text_encoders=keep_text_encoders,
        text_encoder_reloader=text_encoder_reloader(
            "lora", base.folder, lora, opts, unet_config=base.unet.config),
        **_shared_parts(base, opts),
    )


# -- the adapter of the Stable Diffusion 1.x/2.x family (registry entry ``stable-diffusion``) --


def load_sd_pair(
    pre_path: Path, ft_path: Path, kind: str, opts: LoadOptions, *, keep_text_encoders: bool = False
) -> StableDiffusionPair:
    base = load_sd_base(pre_path, opts)
    if kind == "lora":
        return sd_lora_pair(base, ft_path, opts, keep_text_encoders=keep_text_encoders)
    shared = _shared_parts(base, opts)

    loaders: dict[str, Callable[[Path, SDBase, LoadOptions], SDFinetune]] = {
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

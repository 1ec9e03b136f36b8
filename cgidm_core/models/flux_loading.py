"""The Flux.1 adapter (registry entry ``flux``): loading a Flux.1 pair from each layout (the Flux
counterpart of ``sd_loading``/``sdxl_loading``).

The same rules as for Stable Diffusion: every network is built on the CPU first, safetensors only,
local files only unless the caller allowed the network, no remote code; identical networks are
kept once; a LoRA is ONE transformer (and CLIP encoder) with a named adapter that the pair
switches on for the fine-tuned model and off for the pretrained one.

Layouts:

- pretrained: a ``FluxPipeline`` folder, or one ``.safetensors`` transformer (a fine-tuned or
  quantised-then-restored Flux.1 checkpoint, Black Forest Labs' or diffusers' naming) with a
  pipeline folder that supplies its config and everything else (``pretrained_config``);
- fine-tuned: a ``FluxPipeline`` folder (its transformer; see below), a ``transformer/`` folder
  (what diffusers' Flux DreamBooth script saves), a bare transformer folder, a single-file
  transformer (converted by diffusers' ``FluxTransformer2DModel.from_single_file`` with the base
  folder as its config, offline), or a LoRA in any format diffusers' Flux loader converts
  (diffusers/peft, kohya-ss ``lora_unet_*``/``lora_te1_*``, XLabs ``double_blocks.*``).

Text encoders: a Flux fine-tune rarely trains them (T5-XXL almost never; kohya can train CLIP
through a LoRA, which is supported). A full pipeline folder fine-tune carries both, and each is
read: its CLIP encoder (``text_encoder/``) and its T5 (``text_encoder_2/``) condition the
fine-tuned model where they differ from the base's, and are shared with the base where they are
identical (one copy). Like the base's, they are released after the prompt is encoded and read
back from the fine-tune's folder for a new prompt.
"""

from __future__ import annotations

import re
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
    load_vae,
    loading_errors,
    place,
    read_lora_state_dict,
    same_weights,
)
from cgidm_core.models.flux import FluxLoraPair, FluxPair, FluxTextEncoders
from cgidm_core.models.formats import (
    FLUX_FAMILY,
    IDENTICAL_MODELS,
    SUPPORTED_HINT,
    is_flux_lora,
    lora_weights_file,
    read_json,
    safetensors_keys,
    transformer_family,
    weights_variant,
)
from cgidm_core.models.stable_diffusion import TextEncoderReloader

if TYPE_CHECKING:  # annotations only; mypy reads transformers as Any (pyproject.toml)
    from transformers import PreTrainedTokenizerBase

_TRANSFORMER_WEIGHTS = ("diffusion_pytorch_model",)
#: The diffusers class of a Flux.1 transformer (``transformer/config.json``).
FLUX_TRANSFORMER = "FluxTransformer2DModel"
_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


@dataclass
class FluxBase:
    """The pretrained Flux pipeline's parts, on the CPU until they are placed."""

    folder: Path
    transformer: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: PreTrainedTokenizerBase
    tokenizer_2: PreTrainedTokenizerBase
    scheduler_config: dict[str, Any]


def flux_scheduler_config(folder: Path) -> dict[str, Any]:
    """The scheduler config, which holds the time shift (a flow-matching scheduler is required)."""
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = read_json(config_file)
    name = config.get("_class_name", _SCHEDULER_CLASS)
    if name != _SCHEDULER_CLASS:
        raise ModelFormatError(
            f"{config_file} is a {name}; a Flux.1 pipeline samples with {_SCHEDULER_CLASS}, "
            "whose config holds the time shift cgidm uses"
        )
    if int(config.get("num_train_timesteps", 1000)) != 1000:
        raise ModelFormatError(
            f"{config_file}: num_train_timesteps {config.get('num_train_timesteps')} (Flux.1 "
            "uses 1000)"
        )
    return config


def load_flux_transformer(folder: Path, subfolder: str | None, opts: LoadOptions) -> Any:
    """A ``FluxTransformer2DModel`` from a diffusers folder (SD3's transformer is refused)."""
    from diffusers import FluxTransformer2DModel

    component = folder / subfolder if subfolder else folder
    name = read_json(component / "config.json").get("_class_name")
    if name != FLUX_TRANSFORMER:
        raise UnsupportedModelFamilyError(
            f"{component} holds a {name}, not a {FLUX_TRANSFORMER}. " + SUPPORTED_HINT
        )
    with loading_errors("the transformer", component):
        return FluxTransformer2DModel.from_pretrained(
            folder,
            subfolder=subfolder,
            use_safetensors=True,
            local_files_only=opts.local_files_only,
            torch_dtype=opts.dtype,
            variant=weights_variant(component, _TRANSFORMER_WEIGHTS),
        )


def load_flux_single_file_transformer(file: Path, config_folder: Path, opts: LoadOptions) -> Any:
    """A transformer saved as one file, converted offline with ``config_folder``'s
    ``transformer/config.json`` as its architecture (diffusers converts Black Forest Labs'
    ``double_blocks``/``single_blocks`` naming; diffusers-named files load as they are)."""
    from diffusers import FluxTransformer2DModel

    keys = safetensors_keys(file)
    if transformer_family(keys) != FLUX_FAMILY:
        raise ModelFormatError(f"{file} holds no Flux.1 transformer (no double_blocks.*, "
                               "single_blocks.* or single_transformer_blocks.* tensors)")
    with loading_errors("the single-file transformer", file, mismatch_is_incompatible=True):
        return FluxTransformer2DModel.from_single_file(
            str(file),
            config=str(config_folder),
            subfolder="transformer",
            local_files_only=True,
            torch_dtype=opts.dtype,
        )


def load_flux_text_encoder(folder: Path, name: str, opts: LoadOptions) -> Any:
    """``text_encoder`` (``CLIPTextModel``) or ``text_encoder_2`` (``T5EncoderModel``)."""
    class_name = {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"}[name]
    return load_text_encoder(folder, opts, name, class_name, "Flux.1")


def load_t5_tokenizer(folder: Path, opts: LoadOptions) -> Any:
    from transformers import AutoTokenizer

    with loading_errors("the tokenizer", folder / "tokenizer_2"):
        return AutoTokenizer.from_pretrained(
            folder, subfolder="tokenizer_2", local_files_only=opts.local_files_only
        )


def load_flux_base(
    folder: Path, opts: LoadOptions, transformer_file: Path | None = None
) -> FluxBase:
    """The pretrained pipeline; ``transformer_file`` replaces its ``transformer/`` weights."""
    transformer = (
        load_flux_transformer(folder, "transformer", opts) if transformer_file is None
        else load_flux_single_file_transformer(transformer_file, folder, opts)
    )
    base = FluxBase(
        folder=folder,
        transformer=transformer,
        vae=load_vae(folder, opts),  # float32, as for SD: it runs twice per image
        text_encoder=load_flux_text_encoder(folder, "text_encoder", opts),
        text_encoder_2=load_flux_text_encoder(folder, "text_encoder_2", opts),
        tokenizer=load_tokenizer(folder, opts),
        tokenizer_2=load_t5_tokenizer(folder, opts),
        scheduler_config=flux_scheduler_config(folder),
    )
    _check_conditioning_sizes(base)
    return base


def _check_conditioning_sizes(base: FluxBase) -> None:
    """The transformer must take what the encoders and the VAE give."""
    config = base.transformer.config
    t5 = base.text_encoder_2.config.d_model
    pooled = base.text_encoder.config.hidden_size
    latent = 4 * int(base.vae.config.latent_channels)
    if (config.joint_attention_dim, config.pooled_projection_dim, config.in_channels) != (
            t5, pooled, latent):
        raise UnsupportedModelFamilyError(
            f"{base.folder}: the transformer expects {config.joint_attention_dim}-dim T5 features,"
            f" a {config.pooled_projection_dim}-dim pooled CLIP feature and {config.in_channels}"
            f" packed latent features, but the encoders give {t5} and {pooled} and the VAE "
            f"{latent}: not a Flux.1 dev/schnell layout. " + SUPPORTED_HINT
        )


def _check_transformer_fits(base: FluxBase, transformer: Any, where: Path) -> None:
    pre, ft = base.transformer.config, transformer.config
    if bool(pre.guidance_embeds) != bool(ft.guidance_embeds):
        variant = {True: "Flux.1-dev (guidance embedding)", False: "Flux.1-schnell (none)"}
        raise IncompatiblePairError(
            f"the fine-tuned transformer in {where} is {variant[bool(ft.guidance_embeds)]} but the"
            f" pretrained one is {variant[bool(pre.guidance_embeds)]}; compare a fine-tune with "
            "the variant it was trained from"
        )
    names = ("in_channels", "joint_attention_dim", "pooled_projection_dim", "num_layers",
             "num_single_layers", "attention_head_dim", "num_attention_heads", "patch_size")
    for name in names:
        if getattr(pre, name) != getattr(ft, name):
            raise IncompatiblePairError(
                f"the fine-tuned transformer in {where} has {name}={getattr(ft, name)} but the "
                f"pretrained one has {getattr(pre, name)}; was it fine-tuned from this base?"
            )


# -- fine-tune layouts ------------------------------------------------------------------------


def load_flux_finetuned_transformer(path: Path, kind: str, base: FluxBase,
                                    opts: LoadOptions) -> tuple[Any, Any, Any]:
    """``(transformer, own CLIP or None, own T5 or None)`` of a pipeline, ``transformer/`` or
    single file (only a pipeline folder carries text encoders)."""
    clip = t5 = None
    if kind == "pipeline":
        transformer = load_flux_transformer(path, "transformer", opts)
        if (path / "text_encoder" / "config.json").is_file():
            clip = load_flux_text_encoder(path, "text_encoder", opts)
        if (path / "text_encoder_2" / "config.json").is_file():
            t5 = load_flux_text_encoder(path, "text_encoder_2", opts)
            _check_t5_fits(base, t5, path)
    elif kind == "dreambooth":
        if (path / "unet").is_dir() and not (path / "transformer").is_dir():
            raise IncompatiblePairError(
                f"{path} holds a UNet (a Stable Diffusion / SDXL fine-tune) but the pretrained "
                "model is Flux.1; both models must be of the same family"
            )
        subfolder = "transformer" if (path / "transformer").is_dir() else None
        transformer = load_flux_transformer(path, subfolder, opts)
    elif kind == "single_file":
        if transformer_family(safetensors_keys(path)) != FLUX_FAMILY:
            raise IncompatiblePairError(
                f"{path} is a Stable Diffusion / SDXL checkpoint but the pretrained model is "
                "Flux.1; both models must be of the same family"
            )
        transformer = load_flux_single_file_transformer(path, base.folder, opts)
    else:
        raise IncompatiblePairError(
            f"the pretrained model is Flux.1 but {path} is a {kind} model; both models must be "
            "of the same family"
        )
    _check_transformer_fits(base, transformer, path)
    return transformer, clip, t5


def _check_t5_fits(base: FluxBase, t5: Any, where: Path) -> None:
    """A fine-tune's own T5 must give the features the transformers take from the base's."""
    pre, ft = base.text_encoder_2.config.d_model, t5.config.d_model
    if pre != ft:
        raise IncompatiblePairError(
            f"the fine-tuned T5 encoder in {where}/text_encoder_2 gives {ft}-dim features but the"
            f" pretrained one {pre}; was it fine-tuned from this base?"
        )


def read_flux_lora(weights: Path) -> tuple[dict[str, torch.Tensor], Any, Any]:
    """A Flux LoRA's state dict in diffusers naming (kohya and XLabs keys converted by diffusers'
    ``FluxPipeline.lora_state_dict``), its network alphas and its rank/alpha metadata."""
    from diffusers import FluxPipeline

    keys = safetensors_keys(weights)
    if not is_flux_lora(keys):
        raise IncompatiblePairError(
            f"{weights} is a Stable Diffusion / SDXL LoRA (no Flux transformer keys) but the "
            "pretrained model is Flux.1; compare it with the base it was trained on"
        )
    return read_lora_state_dict(
        FluxPipeline, weights, return_alphas=True,
        not_a_lora="is not a Flux LoRA that diffusers can load (control LoRAs with norm or "
                   "input-expansion weights are not supported)",
    )


_OLD_TEXT_ENCODER_LORA = re.compile(
    r"\.(?:(to_q|to_k|to_v|to_out)_lora|lora_linear_layer)\.(down|up)\.weight$"
)


def peft_text_encoder_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """CLIP LoRA keys in peft naming (``q_proj.lora_A.weight``).

    diffusers' kohya Flux converter (0.42) emits the text-encoder layers in its old naming
    (``to_q_lora.down.weight``, ``mlp.fc1.lora_linear_layer.down.weight``, alpha already folded
    in), which its own text-encoder loader no longer recognises: ``FluxPipeline.load_lora_weights``
    fails on every kohya LoRA that trained CLIP. Renaming them is all that is missing.
    """
    projections = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

    def rename(key: str) -> str:
        match = _OLD_TEXT_ENCODER_LORA.search(key)
        if match is None:
            return key
        module = key[: match.start()]
        if match.group(1):
            module += "." + projections[match.group(1)]
        return f"{module}.lora_{'A' if match.group(2) == 'down' else 'B'}.weight"

    return {rename(key): value for key, value in state_dict.items()}


def _attach_to_clip(lora: tuple[dict[str, torch.Tensor], Any, Any], clip: Any,
                    weights: Path) -> None:
    from diffusers import FluxPipeline

    state_dict, network_alphas, metadata = lora
    if not any(key.startswith("text_encoder.") for key in state_dict):
        return
    state_dict = peft_text_encoder_keys(
        {k: v for k, v in state_dict.items() if k.startswith("text_encoder.")})
    with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
        FluxPipeline.load_lora_into_text_encoder(
            state_dict,
            network_alphas,
            text_encoder=clip,
            prefix="text_encoder",
            adapter_name=LORA_ADAPTER_NAME,
            metadata=metadata,
        )


def attach_flux_lora(path: Path, base: FluxBase) -> int:
    """Load a LoRA into the base transformer (and CLIP) as one named adapter; returns the number
    of adapted layers (0 is refused: the file fits nothing in this base)."""
    from diffusers import FluxPipeline

    weights = lora_weights_file(path)
    lora = read_flux_lora(weights)
    state_dict, network_alphas, metadata = lora
    transformer_keys = {k: v for k, v in state_dict.items() if k.startswith("transformer.")}
    if transformer_keys:
        with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
            FluxPipeline.load_lora_into_transformer(
                transformer_keys,
                network_alphas,
                transformer=base.transformer,
                adapter_name=LORA_ADAPTER_NAME,
                metadata=metadata,
            )
    _attach_to_clip(lora, base.text_encoder, weights)
    return count_adapted_layers(weights, "Flux.1 base model", base.transformer, base.text_encoder)


# -- the pair ---------------------------------------------------------------------------------


def flux_text_encoder_reloader(
    kind: str, base_folder: Path, finetuned_path: Path, opts: LoadOptions, *,
    own_clip: bool, own_t5: bool = False,
) -> TextEncoderReloader:
    """Builds the pair's text encoders again as :func:`load_flux_pair` built them (the base's
    CLIP and T5; the LoRA's CLIP layers attached; a pipeline fine-tune's own CLIP and/or T5,
    the base's where the fine-tune's is identical)."""

    def reload(finetuned: bool) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        clip = load_flux_text_encoder(base_folder, "text_encoder", opts)
        t5 = load_flux_text_encoder(base_folder, "text_encoder_2", opts)
        if kind == "lora":
            weights = lora_weights_file(finetuned_path)
            _attach_to_clip(read_flux_lora(weights), clip, weights)
        pretrained = place(FluxTextEncoders(clip, t5), opts)
        if not finetuned:
            return pretrained, None
        if not (own_clip or own_t5):
            raise ModelFormatError(f"a {kind} fine-tune has no text encoder of its own to reload")
        own = FluxTextEncoders(
            load_flux_text_encoder(finetuned_path, "text_encoder", opts) if own_clip
            else pretrained.text_encoder,
            load_flux_text_encoder(finetuned_path, "text_encoder_2", opts) if own_t5
            else pretrained.text_encoder_2,
        )
        return pretrained, place(own, opts)

    return reload


@dataclass(frozen=True)
class TrainingSettings:
    """What a kohya-ss Flux fine-tune recorded about its training in its safetensors header."""

    guidance: float | None = None
    guidance_source: str = "default"
    #: A fixed time shift (``None``: the base scheduler config's, dynamic for dev).
    shift: float | None = None
    shift_source: str = "scheduler_config"


#: kohya-ss ``--timestep_sampling`` values that draw ``s`` without a shift (uniform, or a
#: sigmoid of a normal centred on 0.5): the inversion's uniform draws, unshifted, are closest.
_UNSHIFTED_SAMPLING = ("uniform", "sigmoid", "sigma")


def _number(raw: str | None, low: float, high: float) -> float | None:
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and low <= value <= high else None


def training_settings(path: Path, kind: str) -> TrainingSettings:
    """Guidance and time shift from kohya-ss's ``ss_guidance_scale``, ``ss_timestep_sampling``
    and ``ss_discrete_flow_shift`` (``flux_train_network.py`` writes them), when present."""
    from cgidm_core.prompts import safetensors_metadata

    file = lora_weights_file(path) if kind == "lora" else path if path.is_file() else None
    if file is None:
        return TrainingSettings()
    metadata = safetensors_metadata(file)
    guidance = _number(metadata.get("ss_guidance_scale"), 0.0, 100.0)
    sampling = metadata.get("ss_timestep_sampling")
    shift, shift_source = None, "scheduler_config"
    if sampling == "shift":
        shift = _number(metadata.get("ss_discrete_flow_shift"), 0.01, 100.0)
    elif sampling in _UNSHIFTED_SAMPLING:
        shift = 1.0
    if shift is not None:
        shift_source = f"{file.name}: ss_timestep_sampling={sampling}"
    return TrainingSettings(
        guidance=guidance,
        guidance_source=f"{file.name}: ss_guidance_scale" if guidance is not None else "default",
        shift=shift,
        shift_source=shift_source,
    )


def _shared_parts(base: FluxBase, trained: TrainingSettings, opts: LoadOptions,
                  keep_text_encoders: bool) -> dict[str, Any]:
    return {
        "vae": place(base.vae, opts, torch.float32),
        "tokenizer": base.tokenizer,
        "tokenizer_2": base.tokenizer_2,
        "scheduler_config": base.scheduler_config,
        "guidance": trained.guidance,
        "guidance_source": trained.guidance_source,
        "alphas_cumprod": None,
        "prediction_type": "flow",
        "device": opts.device,
        "dtype": opts.dtype,
        "keep_text_encoders": keep_text_encoders,
    }


def flux_lora_pair(base: FluxBase, lora: Path, opts: LoadOptions, *, keep_text_encoders: bool
                   ) -> FluxPair | FluxLoraPair:
    """The pair of a loaded base with the LoRA file ``lora`` attached as one named adapter, with
    the guidance and time shift its kohya-ss metadata records. ``cgidm check`` and an audit's
    LoRA swapping both build a Flux.1 LoRA pair here."""
    trained = training_settings(lora, "lora")
    attach_flux_lora(lora, base)
    return _with_shift(trained, FluxLoraPair(
        unet=place(base.transformer, opts),
        text_encoder=place(FluxTextEncoders(base.text_encoder, base.text_encoder_2), opts),
        text_encoder_reloader=flux_text_encoder_reloader("lora", base.folder, lora, opts,
                                                         own_clip=False),
        **_shared_parts(base, trained, opts, keep_text_encoders),
    ))


def load_flux_pair(
    pre_path: Path, ft_path: Path, kind: str, opts: LoadOptions, *, keep_text_encoders: bool,
    pretrained_transformer: Path | None = None,
) -> FluxPair | FluxLoraPair:
    """A Flux.1 pair from a base pipeline folder (optionally with its transformer from
    ``pretrained_transformer``, one file) and a fine-tune in any supported layout."""
    base = load_flux_base(pre_path, opts, pretrained_transformer)
    if kind == "lora":
        return flux_lora_pair(base, ft_path, opts, keep_text_encoders=keep_text_encoders)
    trained = training_settings(ft_path, kind)
    shared = _shared_parts(base, trained, opts, keep_text_encoders)
    transformer, clip, t5 = load_flux_finetuned_transformer(ft_path, kind, base, opts)
    if clip is not None and same_weights(clip, base.text_encoder):
        clip = None
    if t5 is not None and same_weights(t5, base.text_encoder_2):
        t5 = None  # the usual case: one copy of the 4.7B-parameter T5 serves both models
    if same_weights(transformer, base.transformer):
        if clip is None and t5 is None:
            raise IncompatiblePairError(IDENTICAL_MODELS.format(ft=ft_path, pre=pre_path))
        transformer = base.transformer
    transformer_pretrained = place(base.transformer, opts)
    transformer_finetuned = (transformer_pretrained if transformer is base.transformer
                             else place(transformer, opts))
    encoders_pretrained = place(FluxTextEncoders(base.text_encoder, base.text_encoder_2), opts)
    encoders_finetuned = encoders_pretrained
    if clip is not None or t5 is not None:
        encoders_finetuned = place(FluxTextEncoders(
            encoders_pretrained.text_encoder if clip is None else clip,
            encoders_pretrained.text_encoder_2 if t5 is None else t5,
        ), opts)
    return _with_shift(trained, FluxPair(
        unet_pretrained=transformer_pretrained,
        unet_finetuned=transformer_finetuned,
        text_encoder_pretrained=encoders_pretrained,
        text_encoder_finetuned=encoders_finetuned,
        text_encoder_reloader=flux_text_encoder_reloader(kind, pre_path, ft_path, opts,
                                                         own_clip=clip is not None,
                                                         own_t5=t5 is not None),
        finetuned_kind=kind,
        **shared,
    ))


def _with_shift(trained: TrainingSettings, pair: FluxPair | FluxLoraPair
                ) -> FluxPair | FluxLoraPair:
    pair.flow_shift_override = trained.shift
    pair.time_shift_source = trained.shift_source
    return pair


# -- the adapter interface (cgidm_core.families.FamilyAdapter) ---------------------------------


def check_pipeline_folder(folder: Path, index: dict[str, Any]) -> None:
    """Flux.1 dev or schnell (``FluxPipeline``) only; Fill, Canny/Depth control, Kontext and Flux.2
    variants are refused by name: their transformer takes extra image channels or another
    architecture, not the text-to-image model a fine-tune is made from."""
    name = str(index.get("_class_name", ""))
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


def load_pair(request: PairRequest) -> FluxPair | FluxLoraPair:
    """``request.pretrained_file``: a pretrained transformer given as one file, completed by the
    pipeline folder ``request.pretrained``."""
    return load_flux_pair(request.pretrained, request.finetuned, request.kind, request.opts,
                          keep_text_encoders=request.keep_text_encoders,
                          pretrained_transformer=request.pretrained_file)


def load_lora_base(request: BaseRequest) -> LoraBase:
    """The base kept loaded for an audit's LoRAs of it (:mod:`cgidm_core.lora_swap`): each
    LoRA file becomes the pair :func:`load_flux_pair` builds for it, text encoders kept."""
    opts = request.opts
    base = load_flux_base(request.pretrained, opts, request.pretrained_file)
    adapted = (place(base.transformer, opts), place(base.text_encoder, opts))
    return LoraBase(pair=lambda lora: flux_lora_pair(base, lora, opts, keep_text_encoders=True),
                    adapted=adapted,
                    parts=(*adapted, place(base.text_encoder_2, opts),
                           place(base.vae, opts, torch.float32)))

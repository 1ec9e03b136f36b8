"""What the diffusers-transformer families (Z-Image, Qwen-Image, Chroma, Flux.2 Klein, SD 3.x)
load the same way, parametrised by a :class:`TransformerFamily`.

A model family is one adapter, not a copy: each family module keeps only what differs (its
recognition, its conditioning and quirks, its encoder and VAE loaders) and hands this module the
pipeline and transformer class names, the title its messages use and its pair classes. The steps
here are the ones the families shared line for line: a transformer folder checked against its
``_class_name`` and read; the scheduler config checked; a fine-tune read per layout kind and
checked against the base's architecture; a LoRA attached through the pipeline's own loader as one
named adapter; the text encoder reloaded; the pair assembled from the base and the fine-tune.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cgidm_core.errors import IncompatiblePairError, ModelFormatError, UnsupportedModelFamilyError
from cgidm_core.models.adapter import LoraBase
from cgidm_core.models.formats import (
    IDENTICAL_MODELS,
    family_name,
    lora_weights_file,
    read_json,
    weights_variant,
)
from cgidm_core.models.sd_loading import (
    LORA_ADAPTER_NAME,
    LoadOptions,
    count_adapted_layers,
    loading_errors,
    place,
    same_weights,
)
from cgidm_core.models.stable_diffusion import TextEncoderReloader

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase

    from cgidm_core.models.adapter import BaseRequest, PairRequest
    from cgidm_core.pair import ModelPair

_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"

#: ``(path, base folder, opts) -> transformer``: a one-file transformer read with the base's config.
SingleFileLoader = Callable[[Path, Path, LoadOptions], Any]
#: ``(folder, opts) -> text encoder``.
EncoderLoader = Callable[[Path, LoadOptions], Any]


@dataclass(frozen=True)
class TransformerFamily:
    """What tells one transformer family's loading apart from another's."""

    family: str
    #: The family's name in messages ("Z-Image", "Qwen-Image").
    title: str
    pipeline_class: str
    transformer_class: str
    #: Config fields a fine-tune must share with its base.
    architecture: tuple[str, ...]
    #: The text encoder's loader.
    text_encoder: EncoderLoader
    #: The one-file transformer's loader (it may refuse the layout with what to do instead).
    single_file: SingleFileLoader
    #: The message when a fine-tune's own text encoder is asked for and it has none.
    no_own_encoder: str
    #: Whether a fine-tuned pipeline's own text encoder is read (Flux.2 Klein's are not).
    reads_finetuned_encoder: bool = True
    #: The title in "of the ... base" / "... base model" where it is longer than ``title``.
    base_title: str | None = None

    @property
    def base_name(self) -> str:
        return self.base_title or self.title


#: The parts every transformer family's pipeline folder has.
PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def require_pipeline_parts(folder: Path, name: str, index: dict[str, Any]) -> None:
    """Refuse, before any weight is read, a pipeline folder whose ``model_index.json`` lacks
    one of :data:`PIPELINE_PARTS`."""
    missing = [p for p in PIPELINE_PARTS if p not in index]
    if missing:
        raise ModelFormatError(f"{folder} ({name}) lacks {', '.join(missing)}")


def load_transformer(spec: TransformerFamily, folder: Path, subfolder: str | None,
                     opts: LoadOptions) -> Any:
    """The family's transformer from a diffusers folder, refused if its class is another's."""
    import diffusers

    component = folder / subfolder if subfolder else folder
    name = read_json(component / "config.json").get("_class_name")
    if name != spec.transformer_class:
        raise IncompatiblePairError(f"{component} holds a {name}, not the "
                                    f"{spec.transformer_class} of the {spec.title} base")
    with loading_errors("the transformer", component):
        return getattr(diffusers, spec.transformer_class).from_pretrained(
            folder, subfolder=subfolder, use_safetensors=True,
            local_files_only=opts.local_files_only, torch_dtype=opts.dtype,
            variant=weights_variant(component, ("diffusion_pytorch_model",)))


def load_single_file_transformer(spec: TransformerFamily, file: Path, config_folder: Path,
                                 opts: LoadOptions, *, recognised: Callable[[list[str]], bool],
                                 missing: str) -> Any:
    """A one-file transformer converted offline by diffusers' ``from_single_file`` with the
    base's config; a file whose keys are not the family's is refused as ``{file} holds no
    {missing}``."""
    import diffusers

    from cgidm_core.models.formats import safetensors_keys

    if not recognised(safetensors_keys(file)):
        raise IncompatiblePairError(f"{file} holds no {missing}")
    with loading_errors("the single-file transformer", file, mismatch_is_incompatible=True):
        return getattr(diffusers, spec.transformer_class).from_single_file(
            str(file), config=str(config_folder), subfolder="transformer",
            local_files_only=True, torch_dtype=opts.dtype)


def base_transformer(spec: TransformerFamily, folder: Path, opts: LoadOptions,
                     transformer_file: Path | None) -> Any:
    """The base's transformer: its pipeline folder's, or one file read with its config."""
    if transformer_file is None:
        return load_transformer(spec, folder, "transformer", opts)
    return spec.single_file(transformer_file, folder, opts)


def auto_tokenizer(folder: Path, opts: LoadOptions) -> Any:
    """The pipeline folder's ``tokenizer/``, whatever its class."""
    from transformers import AutoTokenizer

    with loading_errors("the tokenizer", folder / "tokenizer"):
        return AutoTokenizer.from_pretrained(folder, subfolder="tokenizer",
                                             local_files_only=opts.local_files_only)


def load_model_type_encoder(folder: Path, opts: LoadOptions, *, model_type: str,
                            class_name: str, expected: str) -> Any:
    """The pipeline's ``text_encoder/`` as transformers' ``class_name``, refused unless its
    config's ``model_type`` is ``model_type`` (``expected`` names it in the message, e.g. "the
    Qwen3 encoder Z-Image uses")."""
    import transformers

    component = folder / "text_encoder"
    config = read_json(component / "config.json")
    if config.get("model_type") != model_type:
        raise UnsupportedModelFamilyError(f"{component} is a {config.get('model_type')} model, "
                                          f"not {expected}")
    with loading_errors("the text encoder", component):
        return getattr(transformers, class_name).from_pretrained(
            folder, subfolder="text_encoder", use_safetensors=True,
            local_files_only=opts.local_files_only, dtype=opts.dtype,
            variant=weights_variant(component, ("model",)))


def flow_scheduler_config(folder: Path, title: str) -> dict[str, Any]:
    """The scheduler config (it holds the time shift), refused unless a 1000-step flow-matching
    Euler scheduler's."""
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = read_json(config_file)
    if config.get("_class_name", _SCHEDULER_CLASS) != _SCHEDULER_CLASS or int(
            config.get("num_train_timesteps", 1000)) != 1000:
        raise ModelFormatError(f"{config_file}: {title} samples with a 1000-step "
                               f"{_SCHEDULER_CLASS}, whose config holds the time shift")
    return config


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def check_architecture(spec: TransformerFamily, base_config: Any, config: Any, path: Path
                       ) -> None:
    """Refuse a fine-tuned transformer whose architecture is not its base's."""
    for name in spec.architecture:
        a, b = getattr(base_config, name), getattr(config, name)
        if _as_tuple(a) != _as_tuple(b):
            raise IncompatiblePairError(f"the fine-tuned transformer in {path} has {name}={b} "
                                        f"but the pretrained one has {a}; was it fine-tuned "
                                        "from this base?")


def load_finetuned(spec: TransformerFamily, path: Path, kind: str, base: Any, opts: LoadOptions
                   ) -> tuple[Any, Any]:
    """``(transformer, own text encoder or None)`` of a fine-tune in a pipeline folder, a
    ``transformer/`` folder (``dreambooth``) or one file; another layout kind is refused."""
    from cgidm_core.models.formats import pipeline_family

    encoder = None
    if kind == "pipeline":
        family = pipeline_family(path)
        if family != spec.family:
            raise IncompatiblePairError(f"the fine-tuned model {path} is a "
                                        f"{family_name(family)} pipeline but the pretrained one "
                                        f"is {spec.base_name}")
        transformer = load_transformer(spec, path, "transformer", opts)
        if spec.reads_finetuned_encoder and (path / "text_encoder" / "config.json").is_file():
            encoder = spec.text_encoder(path, opts)
    elif kind == "dreambooth":
        subfolder = "transformer" if (path / "transformer").is_dir() else None
        transformer = load_transformer(spec, path, subfolder, opts)
    elif kind == "single_file":
        transformer = spec.single_file(path, base.folder, opts)
    else:
        raise IncompatiblePairError(f"the pretrained model is {spec.base_name} but {path} is a "
                                    f"{kind} model; both models must be of the same family")
    check_architecture(spec, base.transformer.config, transformer.config, path)
    return transformer, encoder


def attach_lora(spec: TransformerFamily, path: Path, transformer: torch.nn.Module) -> int:
    """A LoRA through the family pipeline's own loader (its converter reads the community
    namings it knows), attached to ``transformer`` as one named adapter; returns the number of
    adapted layers (0 is refused)."""
    import diffusers

    pipeline = getattr(diffusers, spec.pipeline_class)
    weights = lora_weights_file(path)
    with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
        state_dict, metadata = pipeline.lora_state_dict(
            str(weights.parent), weight_name=weights.name, use_safetensors=True,
            local_files_only=True, return_lora_metadata=True)
    if not state_dict or not all("lora" in key for key in state_dict):
        raise ModelFormatError(f"{weights} is not a {spec.title} LoRA that diffusers can load")
    keys = {k: v for k, v in state_dict.items() if k.startswith("transformer.")}
    if not keys:
        raise IncompatiblePairError(f"{weights} holds no {spec.title} transformer LoRA layers")
    with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
        pipeline.load_lora_into_transformer(
            keys, transformer=transformer, adapter_name=LORA_ADAPTER_NAME, metadata=metadata)
    return count_adapted_layers(weights, f"{spec.base_name} base model", transformer)


def encoder_reloader(spec: TransformerFamily, base_folder: Path, finetuned_path: Path,
                     opts: LoadOptions, own: bool) -> TextEncoderReloader:
    """Reads the base's text encoder again (and the fine-tune's own, where it has one; asking
    for one it lacks raises ``ModelFormatError(spec.no_own_encoder)``)."""

    def reload(finetuned: bool) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        if finetuned and not own:
            raise ModelFormatError(spec.no_own_encoder)
        pretrained = place(spec.text_encoder(base_folder, opts), opts)
        if not finetuned:
            return pretrained, None
        return pretrained, place(spec.text_encoder(finetuned_path, opts), opts)

    return reload


@dataclass
class TransformerBase:
    """A base pipeline's parts, on the CPU until placed."""

    folder: Path
    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: PreTrainedTokenizerBase
    scheduler_config: dict[str, Any]


@dataclass(frozen=True)
class TransformerAdapter:
    """One family's adapter: its loading (``spec``), its recognition of the pipeline folders it
    loads (``pipeline_family(folder, class name, model_index)``, which raises for the others),
    its base loader (``load_base(folder, opts, one-file transformer or None)``), its pair
    classes and, where its LoRAs need their own loader, that loader (``(path, base) -> adapted
    layers``; :func:`attach_lora` otherwise). Its :meth:`check_pipeline_folder` and
    :meth:`load_pair` are the family module's registry interface
    (:class:`cgidm_core.families.FamilyAdapter`)."""

    spec: TransformerFamily
    pipeline_family: Callable[[Path, str, dict[str, Any]], str]
    load_base: Callable[[Path, LoadOptions, Path | None], TransformerBase]
    pair: type
    lora_pair: type
    attach: Callable[[Path, Any], int] | None = None

    def check_pipeline_folder(self, folder: Path, index: dict[str, Any]) -> None:
        """Refuse, before any weight is read, a pipeline folder this adapter cannot load."""
        self.pipeline_family(folder, str(index.get("_class_name", "")), index)

    def load_pair(self, request: PairRequest) -> ModelPair:
        """A pair from the registry's ``PairRequest`` (``pretrained``, ``finetuned``, ``kind``,
        ``opts``, ``keep_text_encoders``, ``pretrained_file``: a one-file transformer whose
        other parts come from the ``pretrained`` folder)."""
        base = self.load_base(request.pretrained, request.opts, request.pretrained_file)
        return assemble_pair(self, base, request.pretrained, request.finetuned, request.kind,
                             request.opts, keep_text_encoders=request.keep_text_encoders)

    def load_lora_base(self, request: BaseRequest) -> LoraBase:
        """The base kept loaded for an audit's LoRAs of it (:mod:`cgidm_core.lora_swap`): each
        LoRA file becomes the pair :meth:`load_pair` builds for it, text encoder kept. A LoRA of
        these families adapts the transformer only."""
        opts = request.opts
        base = self.load_base(request.pretrained, opts, request.pretrained_file)
        transformer = place(base.transformer, opts)
        return LoraBase(
            pair=lambda lora: lora_pair(self, base, lora, opts, keep_text_encoders=True),
            adapted=(transformer,),
            parts=(transformer, place(base.text_encoder, opts),
                   place(base.vae, opts, torch.float32)))

    def attach_lora(self, path: Path, base: Any) -> int:
        if self.attach is not None:
            return self.attach(path, base)
        return attach_lora(self.spec, path, base.transformer)

    def reloader(self, pre_path: Path, ft_path: Path, opts: LoadOptions, own: bool
                 ) -> TextEncoderReloader:
        return encoder_reloader(self.spec, pre_path, ft_path, opts, own)


def _shared_parts(base: Any, opts: LoadOptions, keep_text_encoders: bool) -> dict[str, Any]:
    return {
        "vae": place(base.vae, opts, torch.float32), "tokenizer": base.tokenizer,
        "scheduler_config": base.scheduler_config, "alphas_cumprod": None,
        "prediction_type": "flow", "device": opts.device, "dtype": opts.dtype,
        "keep_text_encoders": keep_text_encoders,
    }


def lora_pair(parts: TransformerAdapter, base: Any, lora: Path, opts: LoadOptions, *,
              keep_text_encoders: bool) -> Any:
    """The pair of a loaded base with the LoRA file ``lora`` attached to its transformer as one
    named adapter. ``cgidm check`` and an audit's LoRA swapping both build a LoRA pair here."""
    parts.attach_lora(lora, base)
    return parts.lora_pair(
        unet=place(base.transformer, opts), text_encoder=place(base.text_encoder, opts),
        text_encoder_reloader=parts.reloader(base.folder, lora, opts, False),
        **_shared_parts(base, opts, keep_text_encoders))


def assemble_pair(parts: TransformerAdapter, base: Any, pre_path: Path, ft_path: Path, kind: str,
                  opts: LoadOptions, *, keep_text_encoders: bool) -> Any:
    """The pair of a loaded base (``transformer``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``scheduler_config``) and a fine-tune: for a LoRA ONE transformer with the adapter attached;
    otherwise the fine-tune's transformer (the base's where the weights are the same) and its
    own text encoder where it has one that differs. A fine-tune identical to its base is
    refused."""
    shared = _shared_parts(base, opts, keep_text_encoders)
    if kind == "lora":
        return lora_pair(parts, base, ft_path, opts, keep_text_encoders=keep_text_encoders)
    transformer, encoder = load_finetuned(parts.spec, ft_path, kind, base, opts)
    if encoder is not None and same_weights(encoder, base.text_encoder):
        encoder = None
    if same_weights(transformer, base.transformer):
        if encoder is None:
            raise IncompatiblePairError(IDENTICAL_MODELS.format(ft=ft_path, pre=pre_path))
        transformer = base.transformer
    pretrained = place(base.transformer, opts)
    text_encoder = place(base.text_encoder, opts)
    return parts.pair(
        unet_pretrained=pretrained,
        unet_finetuned=pretrained if transformer is base.transformer
        else place(transformer, opts),
        text_encoder_pretrained=text_encoder,
        text_encoder_finetuned=text_encoder if encoder is None else place(encoder, opts),
        text_encoder_reloader=parts.reloader(pre_path, ft_path, opts, encoder is not None),
        finetuned_kind=kind, **shared)

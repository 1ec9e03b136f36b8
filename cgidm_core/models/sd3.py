"""Stable Diffusion 3 / 3.5 (medium and large): one adapter module, recognition to pair.

SD 3.x is a rectified-flow MMDiT, so the forward process and the loss target are
:class:`~cgidm_core.models.flow.FlowMatchingPair`'s (``x_s = (1 - s) x0 + s noise``, target
``noise - x0``). The pair reuses the Stable Diffusion adapter as Flux.1 does (one float32 VAE
with SD3's scaling *and shift* factors, prompt embeddings cached per prompt, text encoders
released after encoding and read back for a new prompt, ONE transformer with a switchable
adapter for a LoRA) and follows diffusers' ``StableDiffusion3Pipeline``:

- the text: CLIP-L and CLIP-G (both ``CLIPTextModelWithProjection``) give their penultimate
  hidden states, concatenated along the features and zero-padded to T5's width, then T5's last
  hidden states are appended along the sequence (77 + 256 tokens); their projected pooled outputs
  are concatenated into ``pooled_projections``. A pipeline saved without T5 (loaded with
  ``text_encoder_3=None``, Stability's documented way to save memory, then saved) gets zeros in
  T5's place, as diffusers does;
- the latent: the transformer patchifies the ``(16, H, W)`` latent itself (``patch_size`` 2), so
  the velocity comes back in latent shape;
- the time: the transformer takes ``1000 s`` (the scheduler's timesteps); ``s`` is the drawn
  timestep through the scheduler config's shift (3.0 for SD 3.5, fixed; dynamic shifting is
  honoured as for Flux.1 if a config asks for it).

SD 3.5 medium (MMDiT-X: extra self-attention ``attn2`` in the first blocks, qk RMS norm) and
large (qk RMS norm) differ only in the transformer config, which diffusers reads; both are
tested on tiny random configs of their layouts (``tests/test_sd3.py``).

Layouts: pretrained ``StableDiffusion3Pipeline`` folder, or one ``.safetensors`` transformer (
Stability's ``model.diffusion_model.joint_blocks.*`` naming, as ``sd3.5_large.safetensors`` is
published, or diffusers') with a pipeline folder for the rest (``pretrained_config``); fine-tuned
pipeline folder, ``transformer/`` folder, single file (converted by diffusers'
``SD3Transformer2DModel.from_single_file`` offline with the base's config), or a LoRA in the
diffusers/peft naming that diffusers' SD3 DreamBooth-LoRA script, SimpleTuner and ai-toolkit
write (``transformer.*``, optionally ``text_encoder.*`` / ``text_encoder_2.*`` CLIP layers).
kohya-ss SD3 LoRAs (``lora_unet_joint_blocks_*``, ``lora_te1_*``, ``lora_te2_*``) are converted
by :mod:`cgidm_core.models.sd3_kohya_lora` (diffusers 0.42's SD3 loader has no converter for
them) and then loaded by diffusers' SD3 loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from cgidm_core.errors import IncompatiblePairError, ModelFormatError, UnsupportedModelFamilyError
from cgidm_core.models.adapter import LoraBase
from cgidm_core.models.flow import FlowMatchingPair
from cgidm_core.models.flux import time_shift
from cgidm_core.models.formats import (
    IDENTICAL_MODELS,
    SUPPORTED_HINT,
    family_name,
    lora_weights_file,
    read_json,
    safetensors_keys,
    transformer_family,
)
from cgidm_core.models.sd3_kohya_lora import is_kohya_sd3_lora, read_kohya_sd3_lora
from cgidm_core.models.sd_loading import (
    LORA_ADAPTER_NAME,
    LoadOptions,
    count_adapted_layers,
    load_text_encoder,
    load_tokenizer,
    load_vae,
    loading_errors,
    place,
    same_weights,
)
from cgidm_core.models.stable_diffusion import (
    StableDiffusionLoraPair,
    StableDiffusionPair,
    TextEncoderReloader,
)
from cgidm_core.models.text_encoders import tokenize
from cgidm_core.models.transformer_adapter import (
    TransformerFamily,
    load_single_file_transformer,
    load_transformer,
)
from cgidm_core.names import SD3_FAMILY

if TYPE_CHECKING:  # annotations only; mypy reads these packages as Any (pyproject.toml)
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerBase, T5EncoderModel

    from cgidm_core.models.adapter import BaseRequest, PairRequest

# -- recognition (no weights read) ---------------------------------------------------------------

#: ``model_index.json`` class of the text-to-image pipeline this adapter loads.
PIPELINE_CLASS = "StableDiffusion3Pipeline"
#: ``transformer/config.json`` class.
TRANSFORMER_CLASS = "SD3Transformer2DModel"
#: T5 tokens per prompt: ``StableDiffusion3Pipeline``'s default ``max_sequence_length``.
T5_TOKENS = 256
#: Native side when the transformer config does not give one (SD 3.5 samples at 1024 px).
SD3_NATIVE_SIZE = 1024
_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
_TEXT_ENCODERS = {"text_encoder": "CLIPTextModelWithProjection",
                  "text_encoder_2": "CLIPTextModelWithProjection",
                  "text_encoder_3": "T5EncoderModel"}
#: Other SD3 pipelines (ControlNet, inpainting, img2img, PAG) are not what a fine-tune is of.
OTHER_SD3_PIPELINE = (
    "of Stable Diffusion 3 cgidm supports the text-to-image StableDiffusion3Pipeline (SD 3.0 / "
    "3.5 medium / 3.5 large)"
)


def is_sd3_single_file(keys: list[str]) -> bool:
    """An SD3 transformer as one file: Stability's ``joint_blocks.*`` (under
    ``model.diffusion_model.`` in the released checkpoints) or diffusers' naming."""
    return transformer_family(keys) == SD3_FAMILY


def sd3_pipeline_family(folder: Path, name: str, index: dict[str, Any]) -> str:
    """``sd3`` for a ``StableDiffusion3Pipeline`` folder with an SD3 transformer; other SD3
    pipelines and missing parts are refused by name (no weights read)."""
    config_file = folder / "transformer" / "config.json"
    transformer = read_json(config_file) if config_file.is_file() else {}
    if name != PIPELINE_CLASS or transformer.get("_class_name", TRANSFORMER_CLASS) != (
            TRANSFORMER_CLASS):
        raise UnsupportedModelFamilyError(
            f"{folder} is a {name} model: {OTHER_SD3_PIPELINE}. " + SUPPORTED_HINT)
    missing = [part for part in ("transformer", "vae", "text_encoder", "text_encoder_2",
                                 "tokenizer", "tokenizer_2", "scheduler") if part not in index]
    if missing:
        raise ModelFormatError(f"{folder} ({name}) lacks {', '.join(missing)}")
    return SD3_FAMILY


# -- the pair ------------------------------------------------------------------------------------


class SD3TextEncoders(torch.nn.Module):
    """A model's three text encoders as one module (released, reloaded and counted as one):
    ``text_encoder`` CLIP-L, ``text_encoder_2`` CLIP-G, ``text_encoder_3`` T5-XXL (or ``None``)."""

    def __init__(self, text_encoder: CLIPTextModelWithProjection,
                 text_encoder_2: CLIPTextModelWithProjection,
                 text_encoder_3: T5EncoderModel | None) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.text_encoder_3 = text_encoder_3

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, clip_ids: torch.Tensor, clip_ids_2: torch.Tensor,
               t5_ids: torch.Tensor | None, t5_shape: tuple[int, int]) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
        """``(prompt embeddings (1, 77 + L, d_t5), pooled (1, p1 + p2))`` as
        ``StableDiffusion3Pipeline.encode_prompt`` computes them (no clip skip)."""
        first = self.text_encoder(clip_ids, output_hidden_states=True)
        second = self.text_encoder_2(clip_ids_2, output_hidden_states=True)
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        if self.text_encoder_3 is None or t5_ids is None:
            t5 = torch.zeros((1, *t5_shape), device=clip.device, dtype=clip.dtype)
        else:
            t5 = self.text_encoder_3(t5_ids)[0]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        hidden = torch.cat([clip.to(t5.dtype), t5], dim=-2)
        pooled = torch.cat([first[0], second[0]], dim=-1)
        return hidden, pooled


def sd3_latent_config(transformer_config: Any, vae_config: Any) -> SimpleNamespace:
    """The latent for :class:`~cgidm_core.pair.ModelPair`: the transformer's ``sample_size``
    (128 latent pixels for SD 3.5) and ``in_channels`` (16); sides a multiple of ``patch_size``."""
    scale = 2 ** (len(vae_config.block_out_channels) - 1)
    side = getattr(transformer_config, "sample_size", None) or SD3_NATIVE_SIZE // scale
    patch = int(getattr(transformer_config, "patch_size", 2))
    return SimpleNamespace(sample_size=int(side), in_channels=int(transformer_config.in_channels),
                           block_out_channels=(0,) * max(1, patch.bit_length()))


class _SD3Conditioning:
    """What an SD3 pair does differently from an SD pair; the mixin before FlowMatchingPair and
    the SD pair classes (``unet_*`` attributes hold the transformers)."""

    family = SD3_FAMILY
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    unet_pretrained: SD3Transformer2DModel

    def __init__(self, *, tokenizer_2: PreTrainedTokenizerBase,
                 tokenizer_3: PreTrainedTokenizerBase, scheduler_config: dict[str, Any],
                 max_sequence_length: int | None = None, **kwargs: Any) -> None:
        transformer: SD3Transformer2DModel = kwargs.get("unet_pretrained", kwargs.get("unet"))
        kwargs.setdefault("denoiser_config",
                          sd3_latent_config(transformer.config, kwargs["vae"].config))
        self.tokenizer_2 = tokenizer_2
        self.tokenizer_3 = tokenizer_3
        self.scheduler_config = dict(scheduler_config)
        self.max_sequence_length = int(max_sequence_length or T5_TOKENS)
        super().__init__(**kwargs)
        self.patch_size = int(self.unet_pretrained.config.patch_size)
        self.joint_attention_dim = int(self.unet_pretrained.config.joint_attention_dim)

    def shift_for(self, latent: torch.Tensor) -> float:
        tokens = (latent.shape[-2] // self.patch_size) * (latent.shape[-1] // self.patch_size)
        return time_shift(self.scheduler_config, tokens)

    def _embed(self, tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module, prompt: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
        del tokenizer  # both models read the base's three tokenizers
        length = self.tokenizer.model_max_length  # the pipeline's for both CLIPs
        clip_ids = tokenize(self.tokenizer, prompt, length).input_ids.to(self.device)
        clip_ids_2 = tokenize(self.tokenizer_2, prompt, length).input_ids.to(self.device)
        t5_ids = None
        if self.tokenizer_3 is not None:
            t5_ids = tokenize(self.tokenizer_3, prompt,
                              self.max_sequence_length).input_ids.to(self.device)
        with torch.no_grad():
            # the pair's text-encoder module defines encode(); Module.__getattr__ hides it
            hidden, pooled = text_encoder.encode(  # type: ignore[operator]
                clip_ids, clip_ids_2, t5_ids, (self.max_sequence_length, self.joint_attention_dim))
        return hidden.to(self.dtype), pooled.to(self.dtype)

    def _predict(self, unet: torch.nn.Module, z_t: torch.Tensor, t: torch.Tensor,
                 context: tuple[torch.Tensor, torch.Tensor], prediction_type: str
                 ) -> torch.Tensor:
        """The velocity ``noise - x0`` at ``z_t`` (float32, latent shape)."""
        del prediction_type  # always "flow"
        z_t = z_t.to(self.device, torch.float32)
        batch = z_t.shape[0]
        # defined by the pair class this mixin is combined with (below)
        s = self.batch_sigmas(t, z_t)  # type: ignore[attr-defined]
        hidden, pooled = (c.to(self.device, self.dtype) for c in context)
        if hidden.shape[0] != batch:
            hidden = hidden.expand(batch, *hidden.shape[1:])
            pooled = pooled.expand(batch, *pooled.shape[1:])
        output = unet(hidden_states=z_t.to(self.dtype),
                      # defined by the pair class this mixin is combined with (below)
                      timestep=(s * self.num_train_timesteps).to(self.dtype),  # type: ignore[attr-defined]
                      encoder_hidden_states=hidden, pooled_projections=pooled,
                      return_dict=False)[0]
        return output.float()

    def describe(self) -> dict[str, Any]:
        config = self.unet_pretrained.config
        return {
            # super() is the pair class the mixin is combined with; mypy sees object
            **super().describe(),  # type: ignore[misc]
            "variant": sd3_variant(config),
            "time_shift": "dynamic" if self.scheduler_config.get("use_dynamic_shifting")
            else "fixed",
            # defined by the pair class this mixin is combined with (below)
            "time_shift_at_native_size": self.native_time_shift(),  # type: ignore[attr-defined]
            "t5_tokens": self.max_sequence_length if self.tokenizer_3 is not None else 0,
        }


def sd3_variant(config: Any) -> str:
    """``3.5-medium`` (MMDiT-X dual attention), ``3.5-large`` (qk norm) or ``3.0`` (neither)."""
    if getattr(config, "dual_attention_layers", None):
        return "3.5-medium"
    return "3.5-large" if getattr(config, "qk_norm", None) else "3.0"


# the conditioning mixin replaces the SD pair's _embed/_predict with its family's own
# signatures (LSP by design: only the pair itself calls them)
class SD3Pair(_SD3Conditioning, FlowMatchingPair, StableDiffusionPair):  # type: ignore[misc]
    """An SD 3.x base and a fine-tune (pipeline folder, ``transformer/`` folder or single file)."""


# the conditioning mixin replaces the SD pair's _embed/_predict with its family's own
# signatures (LSP by design: only the pair itself calls them)
class SD3LoraPair(_SD3Conditioning, FlowMatchingPair, StableDiffusionLoraPair):  # type: ignore[misc]
    """An SD 3.x base and a LoRA of it: ONE transformer (and CLIP encoders), adapter on/off."""


# -- loading -------------------------------------------------------------------------------------


@dataclass
class SD3Base:
    """The pretrained pipeline's parts, on the CPU until placed."""

    folder: Path
    transformer: Any
    vae: Any
    encoders: SD3TextEncoders
    tokenizer: PreTrainedTokenizerBase
    tokenizer_2: PreTrainedTokenizerBase
    tokenizer_3: PreTrainedTokenizerBase
    scheduler_config: dict[str, Any]


def sd3_scheduler_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = read_json(config_file)
    if config.get("_class_name", _SCHEDULER_CLASS) != _SCHEDULER_CLASS:
        raise ModelFormatError(f"{config_file} is a {config.get('_class_name')}; SD 3.x samples "
                               f"with {_SCHEDULER_CLASS}, whose config holds the time shift")
    if int(config.get("num_train_timesteps", 1000)) != 1000:
        raise ModelFormatError(f"{config_file}: num_train_timesteps "
                               f"{config.get('num_train_timesteps')} (SD 3.x uses 1000)")
    return config


def load_sd3_transformer(folder: Path, subfolder: str | None, opts: LoadOptions) -> Any:
    return load_transformer(SPEC, folder, subfolder, opts)


def load_sd3_single_file_transformer(file: Path, config_folder: Path, opts: LoadOptions) -> Any:
    """One-file transformer converted offline with ``config_folder``'s transformer config."""
    return load_single_file_transformer(
        SPEC, file, config_folder, opts, recognised=is_sd3_single_file,
        missing="Stable Diffusion 3 transformer (no joint_blocks.* tensors); the pretrained "
                "model is SD 3.x")


def load_sd3_encoders(folder: Path, opts: LoadOptions) -> SD3TextEncoders:
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() \
        else {}
    has_t5 = (folder / "text_encoder_3" / "config.json").is_file() and (
        (index.get("text_encoder_3") or [None])[0] is not None)
    return SD3TextEncoders(*(
        load_text_encoder(folder, opts, name, cls, "Stable Diffusion 3")
        if name != "text_encoder_3" or has_t5 else None
        for name, cls in _TEXT_ENCODERS.items()))


#: What SD 3.x shares with the other transformer families: its transformer's loading (its text
#: encoders, three and a LoRA's CLIP layers, are read by :func:`load_sd3_encoders` and
#: :func:`sd3_text_encoder_reloader`; the fine-tune and the pair are assembled here).
SPEC = TransformerFamily(
    family=SD3_FAMILY, title="Stable Diffusion 3", pipeline_class=PIPELINE_CLASS,
    transformer_class=TRANSFORMER_CLASS, text_encoder=load_sd3_encoders,
    single_file=load_sd3_single_file_transformer,
    no_own_encoder="this SD 3.x fine-tune has no text encoders of its own",
    architecture=("in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                  "joint_attention_dim", "pooled_projection_dim", "patch_size",
                  "dual_attention_layers", "qk_norm"))


def load_sd3_base(folder: Path, opts: LoadOptions, transformer_file: Path | None = None
                  ) -> SD3Base:
    from transformers import AutoTokenizer

    transformer = (load_sd3_transformer(folder, "transformer", opts) if transformer_file is None
                   else load_sd3_single_file_transformer(transformer_file, folder, opts))
    encoders = load_sd3_encoders(folder, opts)
    tokenizer_3 = None
    if encoders.text_encoder_3 is not None:
        with loading_errors("the tokenizer", folder / "tokenizer_3"):
            tokenizer_3 = AutoTokenizer.from_pretrained(
                folder, subfolder="tokenizer_3", local_files_only=opts.local_files_only)
    base = SD3Base(folder=folder, transformer=transformer, vae=load_vae(folder, opts),
                   encoders=encoders, tokenizer=load_tokenizer(folder, opts),
                   tokenizer_2=load_tokenizer(folder, opts, "tokenizer_2"),
                   tokenizer_3=tokenizer_3, scheduler_config=sd3_scheduler_config(folder))
    _check_conditioning_sizes(base)
    return base


def _check_conditioning_sizes(base: SD3Base) -> None:
    config, enc = base.transformer.config, base.encoders
    pooled = enc.text_encoder.config.projection_dim + enc.text_encoder_2.config.projection_dim
    clip = enc.text_encoder.config.hidden_size + enc.text_encoder_2.config.hidden_size
    t5 = enc.text_encoder_3.config.d_model if enc.text_encoder_3 is not None else None
    latent = int(base.vae.config.latent_channels)
    fits = (config.pooled_projection_dim == pooled and config.in_channels == latent
            and config.joint_attention_dim >= clip and t5 in (None, config.joint_attention_dim))
    if not fits:
        raise UnsupportedModelFamilyError(
            f"{base.folder}: the transformer expects {config.pooled_projection_dim}-dim pooled "
            f"CLIP features, {config.joint_attention_dim}-dim text features and "
            f"{config.in_channels} latent channels, but the encoders give {pooled}, {clip} "
            f"(CLIP) / {t5} (T5) and the VAE {latent}: not a Stable Diffusion 3 layout")


def _check_transformer_fits(base: SD3Base, transformer: Any, where: Path) -> None:
    pre, ft = base.transformer.config, transformer.config
    for name in SPEC.architecture:
        a, b = getattr(pre, name, None), getattr(ft, name, None)
        if (tuple(a) if isinstance(a, list | tuple) else a) != (
                tuple(b) if isinstance(b, list | tuple) else b):
            raise IncompatiblePairError(
                f"the fine-tuned transformer in {where} has {name}={b} but the pretrained one "
                f"({sd3_variant(pre)}) has {a}; compare a fine-tune with the SD 3.x model it "
                "was trained from")


def load_sd3_finetuned(path: Path, kind: str, base: SD3Base, opts: LoadOptions
                       ) -> tuple[Any, SD3TextEncoders | None]:
    """``(transformer, own text encoders or None)`` of a pipeline, ``transformer/`` folder or
    single file (only a pipeline folder carries text encoders)."""
    from cgidm_core.models.formats import pipeline_family

    encoders = None
    if kind == "pipeline":
        family = pipeline_family(path)
        if family != SD3_FAMILY:
            raise IncompatiblePairError(f"the fine-tuned model {path} is a "
                                        f"{family_name(family)} pipeline but the pretrained one "
                                        "is Stable Diffusion 3")
        transformer = load_sd3_transformer(path, "transformer", opts)
        encoders = load_sd3_encoders(path, opts)
    elif kind == "dreambooth":
        if (path / "unet").is_dir() and not (path / "transformer").is_dir():
            raise IncompatiblePairError(f"{path} holds a UNet (a Stable Diffusion / SDXL "
                                        "fine-tune) but the pretrained model is SD 3.x")
        subfolder = "transformer" if (path / "transformer").is_dir() else None
        transformer = load_sd3_transformer(path, subfolder, opts)
    elif kind == "single_file":
        transformer = load_sd3_single_file_transformer(path, base.folder, opts)
    else:
        raise IncompatiblePairError(f"the pretrained model is Stable Diffusion 3 but {path} is a "
                                    f"{kind} model; both models must be of the same family")
    _check_transformer_fits(base, transformer, path)
    return transformer, encoders


def read_sd3_lora(weights: Path) -> tuple[dict[str, Any], Any]:
    """An SD3 LoRA's state dict (diffusers/peft naming) and metadata: a diffusers/peft-named
    file as diffusers reads it, a kohya-ss one converted first
    (:mod:`cgidm_core.models.sd3_kohya_lora`, which diffusers 0.42 has no converter for)."""
    from diffusers import StableDiffusion3Pipeline

    keys = safetensors_keys(weights)
    source: Any = str(weights.parent)
    if is_kohya_sd3_lora(keys):
        source = read_kohya_sd3_lora(weights)
    elif not any(k.startswith(("transformer.", "text_encoder.", "text_encoder_2."))
                 for k in keys):
        raise IncompatiblePairError(f"{weights} holds no SD3 transformer or CLIP LoRA layers "
                                    "(transformer.*, text_encoder.*, text_encoder_2.*, or "
                                    "kohya-ss lora_unet_joint_blocks_*)")
    with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
        state_dict, metadata = StableDiffusion3Pipeline.lora_state_dict(
            source, weight_name=weights.name, use_safetensors=True,
            local_files_only=True, return_lora_metadata=True)
    if not state_dict or not all("lora" in key for key in state_dict):
        raise ModelFormatError(f"{weights} is not a LoRA that diffusers' SD3 loader can load")
    return state_dict, metadata


def _attach_to_clips(lora: tuple[dict[str, Any], Any], encoders: SD3TextEncoders,
                     weights: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    state_dict, metadata = lora
    for prefix, encoder in (("text_encoder", encoders.text_encoder),
                            ("text_encoder_2", encoders.text_encoder_2)):
        if any(k.startswith(prefix + ".") for k in state_dict):
            with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
                StableDiffusion3Pipeline.load_lora_into_text_encoder(
                    state_dict, network_alphas=None, text_encoder=encoder, prefix=prefix,
                    adapter_name=LORA_ADAPTER_NAME, metadata=metadata)


def attach_sd3_lora(path: Path, base: SD3Base) -> int:
    """The LoRA attached to the base transformer (and CLIPs) as one named adapter."""
    from diffusers import StableDiffusion3Pipeline

    weights = lora_weights_file(path)
    lora = read_sd3_lora(weights)
    state_dict, metadata = lora
    transformer_keys = {k: v for k, v in state_dict.items() if k.startswith("transformer.")}
    if transformer_keys:
        with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
            StableDiffusion3Pipeline.load_lora_into_transformer(
                transformer_keys, transformer=base.transformer, adapter_name=LORA_ADAPTER_NAME,
                metadata=metadata)
    _attach_to_clips(lora, base.encoders, weights)
    return count_adapted_layers(weights, "Stable Diffusion 3 base model", base.transformer,
                                base.encoders)


def sd3_text_encoder_reloader(kind: str, base_folder: Path, finetuned_path: Path,
                              opts: LoadOptions, *, own: tuple[bool, bool, bool]
                              ) -> TextEncoderReloader:
    """Builds the encoders again as :func:`load_sd3_pair` did (LoRA CLIP layers attached; a
    pipeline fine-tune's own encoders where they differ from the base's)."""

    def reload(finetuned: bool) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        pretrained = load_sd3_encoders(base_folder, opts)
        if kind == "lora":
            weights = lora_weights_file(finetuned_path)
            _attach_to_clips(read_sd3_lora(weights), pretrained, weights)
        pretrained = place(pretrained, opts)
        if not finetuned:
            return pretrained, None
        theirs = load_sd3_encoders(finetuned_path, opts)
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        mixed = SD3TextEncoders(*(getattr(theirs if mine else pretrained, name)
                                  for name, mine in zip(names, own, strict=True)))
        return pretrained, place(mixed, opts)

    return reload


def _shared_parts(base: SD3Base, opts: LoadOptions, keep_text_encoders: bool) -> dict[str, Any]:
    return {
        "vae": place(base.vae, opts, torch.float32), "tokenizer": base.tokenizer,
        "tokenizer_2": base.tokenizer_2, "tokenizer_3": base.tokenizer_3,
        "scheduler_config": base.scheduler_config, "alphas_cumprod": None,
        "prediction_type": "flow", "device": opts.device, "dtype": opts.dtype,
        "keep_text_encoders": keep_text_encoders,
    }


def sd3_lora_pair(base: SD3Base, lora: Path, opts: LoadOptions, *, keep_text_encoders: bool
                  ) -> SD3LoraPair:
    """The pair of a loaded base with the LoRA file ``lora`` attached as one named adapter.
    ``cgidm check`` and an audit's LoRA swapping both build an SD 3.x LoRA pair here."""
    attach_sd3_lora(lora, base)
    return SD3LoraPair(
        unet=place(base.transformer, opts), text_encoder=place(base.encoders, opts),
        text_encoder_reloader=sd3_text_encoder_reloader("lora", base.folder, lora, opts,
                                                        own=(False, False, False)),
        **_shared_parts(base, opts, keep_text_encoders))


def load_sd3_pair(pre_path: Path, ft_path: Path, kind: str, opts: LoadOptions, *,
                  keep_text_encoders: bool, pretrained_transformer: Path | None = None
                  ) -> SD3Pair | SD3LoraPair:
    """An SD 3.x pair from a base pipeline folder (its transformer optionally from one file)
    and a fine-tune in any supported layout."""
    base = load_sd3_base(pre_path, opts, pretrained_transformer)
    if kind == "lora":
        return sd3_lora_pair(base, ft_path, opts, keep_text_encoders=keep_text_encoders)
    shared = _shared_parts(base, opts, keep_text_encoders)
    transformer, theirs = load_sd3_finetuned(ft_path, kind, base, opts)
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    own = tuple(
        theirs is not None and getattr(theirs, n) is not None
        and getattr(base.encoders, n) is not None
        and not same_weights(getattr(theirs, n), getattr(base.encoders, n)) for n in names)
    if same_weights(transformer, base.transformer):
        if not any(own):
            raise IncompatiblePairError(IDENTICAL_MODELS.format(ft=ft_path, pre=pre_path))
        transformer = base.transformer
    transformer_pretrained = place(base.transformer, opts)
    transformer_finetuned = (transformer_pretrained if transformer is base.transformer
                             else place(transformer, opts))
    encoders_pretrained = place(base.encoders, opts)
    encoders_finetuned = encoders_pretrained
    if any(own):
        assert theirs is not None
        encoders_finetuned = place(SD3TextEncoders(*(
            getattr(theirs if mine else encoders_pretrained, name)
            for name, mine in zip(names, own, strict=True))), opts)
    return SD3Pair(
        unet_pretrained=transformer_pretrained, unet_finetuned=transformer_finetuned,
        text_encoder_pretrained=encoders_pretrained, text_encoder_finetuned=encoders_finetuned,
        text_encoder_reloader=sd3_text_encoder_reloader(kind, pre_path, ft_path, opts,
                                                        # own has one flag per text encoder: three
                                                        own=own),  # type: ignore[arg-type]
        finetuned_kind=kind, **shared)


# -- the family registry's adapter interface (``cgidm_core.families.FamilyAdapter``, #23) ---------


def check_pipeline_folder(folder: Path, index: dict[str, Any]) -> None:
    """Refuse, before any weight is read, a pipeline folder this adapter cannot load."""
    sd3_pipeline_family(folder, str(index.get("_class_name", "")), index)


def load_pair(request: PairRequest) -> SD3Pair | SD3LoraPair:
    """Load a pair from the registry's ``PairRequest`` (``pretrained``, ``finetuned``, ``kind``,
    ``opts``, ``keep_text_encoders``, ``pretrained_file``: a one-file transformer whose other parts
    come from the ``pretrained`` folder)."""
    return load_sd3_pair(
        request.pretrained, request.finetuned, request.kind, request.opts,
        keep_text_encoders=request.keep_text_encoders,
        pretrained_transformer=request.pretrained_file)


def load_lora_base(request: BaseRequest) -> LoraBase:
    """The base kept loaded for an audit's LoRAs of it (:mod:`cgidm_core.lora_swap`): each
    LoRA file becomes the pair :func:`load_sd3_pair` builds for it, text encoders kept."""
    opts = request.opts
    base = load_sd3_base(request.pretrained, opts, request.pretrained_file)
    adapted = (place(base.transformer, opts), place(base.encoders, opts))
    return LoraBase(pair=lambda lora: sd3_lora_pair(base, lora, opts, keep_text_encoders=True),
                    adapted=adapted, parts=(*adapted, place(base.vae, opts, torch.float32)))

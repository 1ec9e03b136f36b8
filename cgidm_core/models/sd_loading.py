"""Loading the pieces of a Stable Diffusion pair from each fine-tune format.

Every network is loaded on the CPU first (so a LoRA can be attached and identical networks
detected before anything reaches the GPU), then frozen and moved. Weights are read as safetensors
only, configs from the local folder only unless the caller allowed the network, and never with
remote code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cgidm_core.errors import (
    CGIDMError,
    IncompatiblePairError,
    ModelFormatError,
    UnsupportedModelFamilyError,
)
from cgidm_core.models.formats import (
    PIXEL_FAMILIES,
    SD_FAMILY,
    SUPPORTED_HINT,
    check_unet_family,
    family_name,
    is_sdxl_lora,
    is_sdxl_single_file,
    lora_weights_file,
    pipeline_family,
    read_json,
    safetensors_keys,
    weights_variant,
)
from cgidm_core.models.predictions import alphas_cumprod_of, build_scheduler, check_prediction_type

LORA_ADAPTER_NAME = "cgidm_finetuned"
_UNET_WEIGHTS = ("diffusion_pytorch_model",)
_TEXT_ENCODER_WEIGHTS = ("model",)


@dataclass(frozen=True)
class LoadOptions:
    device: torch.device
    dtype: torch.dtype
    local_files_only: bool


@dataclass
class SDBase:
    """The pretrained pipeline's parts, on the CPU until :func:`finish` moves them."""

    folder: Path
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    alphas_cumprod: torch.Tensor
    prediction_type: str


@dataclass
class SDFinetune:
    """What a fine-tune brings; ``None`` fields are the base's."""

    unet: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    prediction_type: str | None = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextmanager
def loading_errors(
    what: str, where: Path, *, mismatch_is_incompatible: bool = False
) -> Iterator[None]:
    """Turn library errors while loading into errors that say which model and what to do."""
    from safetensors import SafetensorError

    try:
        yield
    except (CGIDMError, torch.cuda.OutOfMemoryError):
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        message = str(exc)
        # peft's "Target modules ... not found in the base model": a LoRA of another network
        mismatch = ("size mismatch", "shape", "not found in the base model")
        if mismatch_is_incompatible and any(m in message.lower() for m in mismatch):
            raise IncompatiblePairError(
                f"{what} in {where} does not fit the pretrained model ({_first_line(exc)}); "
                "was it fine-tuned from this base?"
            ) from exc
        raise ModelFormatError(f"could not load {what} from {where}: {_first_line(exc)}") from exc
    except Exception as exc:  # diffusers' own error classes (e.g. SingleFileComponentError)
        if type(exc).__module__.split(".")[0] not in {"diffusers", "transformers", "peft"}:
            raise
        raise ModelFormatError(f"could not load {what} from {where}: {_first_line(exc)}") from exc


def _transformers_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def _freeze(module: Any) -> Any:
    module.eval()
    module.requires_grad_(False)
    return module


def load_unet(
    folder: Path, subfolder: str | None, opts: LoadOptions, family: str = SD_FAMILY
) -> Any:
    """A ``UNet2DConditionModel`` of ``family`` (a UNet of another family is refused first)."""
    from diffusers import UNet2DConditionModel

    component = folder / subfolder if subfolder else folder
    check_unet_family(read_json(component / "config.json"), component, family)
    with loading_errors("the UNet", component):
        return UNet2DConditionModel.from_pretrained(
            folder,
            subfolder=subfolder,
            use_safetensors=True,
            local_files_only=opts.local_files_only,
            torch_dtype=opts.dtype,
            variant=weights_variant(component, _UNET_WEIGHTS),
        )


def load_text_encoder(
    folder: Path,
    opts: LoadOptions,
    name: str = "text_encoder",
    class_name: str = "CLIPTextModel",
    family: str = "Stable Diffusion",
) -> Any:
    """The transformers text encoder ``folder/name`` of class ``class_name``, safetensors only.

    Every family loads its encoders here (SD's CLIP, SDXL's second OpenCLIP with projection,
    Flux's T5), so an encoder of another architecture is refused with the same message naming
    what the ``family`` expects.
    """
    import transformers

    component = folder / name
    config = read_json(component / "config.json")
    architectures = set(config.get("architectures") or [class_name])
    if class_name not in architectures:
        raise UnsupportedModelFamilyError(
            f"{component} is a {', '.join(sorted(architectures))}, not the {class_name} "
            f"{family} uses; " + SUPPORTED_HINT
        )
    with loading_errors(f"the text encoder {name}", component):
        return getattr(transformers, class_name).from_pretrained(
            folder,
            subfolder=name,
            use_safetensors=True,
            local_files_only=opts.local_files_only,
            variant=weights_variant(component, _TEXT_ENCODER_WEIGHTS),
            **_transformers_dtype_kwargs(opts.dtype),
        )


def load_tokenizer(folder: Path, opts: LoadOptions, subfolder: str = "tokenizer") -> Any:
    """A CLIP tokenizer (SDXL has a second one in ``tokenizer_2``)."""
    from transformers import CLIPTokenizer

    with loading_errors("the tokenizer", folder / subfolder):
        return CLIPTokenizer.from_pretrained(
            folder, subfolder=subfolder, local_files_only=opts.local_files_only
        )


def _scheduler_of(folder: Path) -> tuple[Any, str]:
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = read_json(config_file)
    with loading_errors("the scheduler", config_file):
        scheduler = build_scheduler(config)
    prediction = check_prediction_type(config.get("prediction_type", "epsilon"), config_file)
    return scheduler, prediction


def load_vae(folder: Path, opts: LoadOptions) -> Any:
    """The base's VAE (SD and SDXL), float32 whatever ``opts.dtype``: the SDXL VAE overflows in
    float16 (its config says ``force_upcast``)."""
    from diffusers import AutoencoderKL

    with loading_errors("the VAE", folder / "vae"):
        return AutoencoderKL.from_pretrained(
            folder,
            subfolder="vae",
            use_safetensors=True,
            local_files_only=opts.local_files_only,
            torch_dtype=torch.float32,
            variant=weights_variant(folder / "vae", _UNET_WEIGHTS),
        )


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
    """A full pipeline folder. Its VAE is not loaded: both models run in the base's latent space."""
    family = pipeline_family(folder)
    if family != SD_FAMILY:
        raise IncompatiblePairError(
            f"the fine-tuned model {folder} is a {family} pipeline but the pretrained one is "
            "Stable Diffusion"
        )
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


def read_lora_state_dict(
    pipeline_class: Any,
    weights: Path,
    *,
    not_a_lora: str = "is not a LoRA that diffusers can load",
    **options: Any,
) -> tuple[dict, Any, Any]:
    """A LoRA file's state dict in diffusers' naming, its network alphas and its rank/alpha
    metadata, read by the family pipeline's own ``lora_state_dict`` (which converts kohya, A1111
    and XLabs key names; ``options`` are that loader's family-specific arguments).

    A file whose keys are not all LoRA weights (a control LoRA, a full checkpoint) is refused
    with ``f"{weights} {not_a_lora}"`` rather than half-loaded."""
    with loading_errors("the LoRA", weights, mismatch_is_incompatible=True):
        state_dict, network_alphas, metadata = pipeline_class.lora_state_dict(
            str(weights.parent),
            weight_name=weights.name,
            use_safetensors=True,
            local_files_only=True,
            return_lora_metadata=True,
            **options,
        )
    if not state_dict or not all("lora" in key for key in state_dict):
        raise ModelFormatError(f"{weights} {not_a_lora}")
    return state_dict, network_alphas, metadata


def count_adapted_layers(weights: Path, model: str, *networks: torch.nn.Module) -> int:
    """How many layers of ``networks`` carry the attached adapter; 0 is refused, since it means
    the file fits nothing in this ``model`` (a LoRA for another base)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = sum(isinstance(module, BaseTunerLayer)
                 for network in networks for module in network.modules())
    if layers == 0:
        raise ModelFormatError(f"{weights} holds no LoRA weights that fit this {model}")
    return layers


def _read_lora(weights: Path, unet_config: Any) -> tuple[dict, Any, Any]:
    """An SD 1.x/2.x LoRA (kohya/A1111 keys converted given the UNet config); an SDXL LoRA is
    refused as incompatible before diffusers fails on its shapes."""
    from diffusers import StableDiffusionPipeline

    if is_sdxl_lora(safetensors_keys(weights)):
        raise IncompatiblePairError(
            f"{weights} is an SDXL LoRA but the pretrained model is Stable Diffusion 1.x/2.x; "
            "compare it with the SDXL base it was trained on"
        )
    return read_lora_state_dict(StableDiffusionPipeline, weights, unet_config=unet_config)


def _lora_has_text_encoder(state_dict: dict) -> bool:
    return any(key.startswith("text_encoder.") for key in state_dict)


def _attach_lora_to_text_encoder(
    lora: tuple[dict, Any, Any], text_encoder: Any, weights: Path
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


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two networks hold identical tensors (so one copy can serve both models)."""
    state_a, state_b = a.state_dict(), b.state_dict()
    if state_a.keys() != state_b.keys():
        return False
    return all(
        state_a[k].shape == state_b[k].shape
        and state_a[k].dtype == state_b[k].dtype
        and torch.equal(state_a[k], state_b[k])
        for k in state_a
    )


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


def place(module: Any, opts: LoadOptions, dtype: torch.dtype | None = None) -> Any:
    """Freeze a network and move it to the pair's device (and dtype, if it is not there yet)."""
    dtype = dtype or opts.dtype
    module = _freeze(module)
    if module.dtype == dtype:
        return module.to(opts.device)
    return module.to(device=opts.device, dtype=dtype)


def describe_family_mismatch(
    pretrained_family: str, kind: str, where: Path
) -> IncompatiblePairError:
    if pretrained_family in PIXEL_FAMILIES:
        return IncompatiblePairError(
            f"the pretrained model is a {family_name(pretrained_family)} but {where} is a Stable "
            f"Diffusion fine-tune ({kind}); both models must be of the same family"
        )
    return IncompatiblePairError(
        f"the pretrained model is {family_name(pretrained_family)} but {where} is a pixel-space "
        "DDPM; both models must be of the same family"
    )


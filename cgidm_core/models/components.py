"""The loading helpers every family adapter shares: one place for how a network is read
(safetensors only, local files unless allowed, no remote code), how a loading error becomes an
error that says which model and what to do, and how a network is frozen and placed.

An adapter imports these and :mod:`cgidm_core.models.adapter`, and nothing of another family
(``sd_loading`` re-exports them for code written before the registry).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cgidm_core.errors import (
    CGIDMError,
    IncompatiblePairError,
    ModelFormatError,
    UnsupportedModelFamilyError,
)
from cgidm_core.models.adapter import LoadOptions
from cgidm_core.models.formats import SD_FAMILY, SUPPORTED_HINT, read_json, weights_variant
from cgidm_core.models.predictions import build_scheduler, check_prediction_type
from cgidm_core.models.unet_configs import check_unet_family

LORA_ADAPTER_NAME = "cgidm_finetuned"
_UNET_WEIGHTS = ("diffusion_pytorch_model",)
_TEXT_ENCODER_WEIGHTS = ("model",)


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


def scheduler_of(folder: Path) -> tuple[Any, str]:
    """A DDPM-family scheduler from its saved config, and its prediction type."""
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


def read_lora_state_dict(
    pipeline_class: Any,
    weights: Path,
    *,
    not_a_lora: str = "is not a LoRA that diffusers can load",
    **options: Any,
) -> tuple[dict[str, torch.Tensor], Any, Any]:
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


def place(module: Any, opts: LoadOptions, dtype: torch.dtype | None = None) -> Any:
    """Freeze a network and move it to the pair's device (and dtype, if it is not there yet)."""
    dtype = dtype or opts.dtype
    module = _freeze(module)
    if module.dtype == dtype:
        return module.to(opts.device)
    return module.to(device=opts.device, dtype=dtype)


def remove_lora_layers(network: torch.nn.Module) -> None:
    """Put the base's own modules back in place of every peft wrapper of ``network`` (diffusers'
    ``recurse_remove_peft_layers``; a pixel UNet, an SD UNet or text encoder): the adapter
    weights go, the base weights were never touched. Also forgets the adapter configs diffusers
    and transformers keep on the network, so the next LoRA may reuse the adapter name."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(network)
    for module in network.modules():  # a wrapper of several encoders: each keeps its own
        for attribute in ("peft_config", "_hf_peft_config_loaded"):
            if attribute in vars(module):
                delattr(module, attribute)

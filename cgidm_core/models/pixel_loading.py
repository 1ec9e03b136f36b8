"""Loading the two pixel-space families, DDPM and flow matching (shared by their adapters).

Both are an unconditional ``UNet2DModel`` in a ``DDPMPipeline`` folder; the saved scheduler
tells them apart (a ``FlowMatchEulerDiscreteScheduler`` means velocity prediction). Fine-tunes
are pipeline or UNet folders (layout ``ddpm``) or bare UNet weights (layout ``unet``, built with
the base's UNet config by :mod:`cgidm_core.models.unet_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cgidm_core.errors import IncompatiblePairError, ModelFormatError
from cgidm_core.models.adapter import LoadOptions
from cgidm_core.models.components import loading_errors, place, same_weights
from cgidm_core.models.ddpm import DDPMPair
from cgidm_core.models.formats import IDENTICAL_MODELS, pixel_objective, read_json, weights_variant
from cgidm_core.models.pixel_flow import PixelFlowPair
from cgidm_core.models.pixel_lora_loading import (
    DDPMLoraPair,
    PixelFlowLoraPair,
    attach_pixel_lora,
)
from cgidm_core.models.predictions import alphas_cumprod_of, build_scheduler, check_prediction_type
from cgidm_core.models.unet_file import load_unet_file

if TYPE_CHECKING:  # annotations only; mypy reads diffusers as Any (pyproject.toml)
    from diffusers import UNet2DModel

# -- pixel-space DDPM and flow matching ----------------------------------------------------------


def _ddpm_unet_location(folder: Path) -> tuple[Path, str | None]:
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet", "unet"
    if (folder / "config.json").is_file():
        return folder, None
    raise ModelFormatError(f"{folder} has no unet/ folder with a UNet2DModel")


def _load_ddpm_unet(folder: Path, opts: LoadOptions) -> UNet2DModel:
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


def _shared_unet_checks(pre_path: Path, ft_path: Path, unet_pre: UNet2DModel,
                        unet_ft: UNet2DModel) -> None:
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
    if kind not in ("unet", "lora"):
        _refuse_mixed_objectives(pre_path, ft_path, "flow")
    schedule = _flow_schedule(pre_path)
    assert schedule is not None  # the registry recognised the family from this scheduler
    ft_schedule = None if kind in ("unet", "lora") else _flow_schedule(ft_path)
    if ft_schedule is not None and ft_schedule[0] != schedule[0]:
        raise IncompatiblePairError(
            f"{ft_path} was trained with {ft_schedule[0]} flow timesteps but {pre_path} with "
            f"{schedule[0]}"
        )
    unet_pre = _load_ddpm_unet(pre_path, opts)
    if kind == "lora":
        return pixel_flow_lora_pair(unet_pre, ft_path, schedule[0], opts)
    unet_ft = _load_pixel_finetuned_unet(pre_path, ft_path, opts, kind)
    _shared_unet_checks(pre_path, ft_path, unet_pre, unet_ft)
    return PixelFlowPair(
        place(unet_pre, opts),
        place(unet_ft, opts),
        num_train_timesteps=schedule[0],
        device=opts.device,
        dtype=opts.dtype,
    )


def _load_pixel_finetuned_unet(pre_path: Path, ft_path: Path, opts: LoadOptions, kind: str
                               ) -> UNet2DModel:
    """The fine-tuned pixel UNet: a folder, or (``kind="unet"``) a bare weights file built with
    the base's UNet config (``unet_file``)."""
    if kind == "unet":
        return load_unet_file(ft_path, pre_path, opts.dtype)
    return _load_ddpm_unet(ft_path, opts)


def load_ddpm_pair(
    pre_path: Path, ft_path: Path, opts: LoadOptions, kind: str = "ddpm"
) -> DDPMPair:
    """Two pixel UNets; ``kind="unet"``: the fine-tune is a bare weights file (``unet_file``)."""
    if kind not in ("unet", "lora"):
        _refuse_mixed_objectives(pre_path, ft_path, "ddpm")
    schedule = _ddpm_schedule(pre_path)
    if schedule is None:
        raise ModelFormatError(f"{pre_path} has no scheduler/scheduler_config.json")
    alphas, prediction = schedule
    if kind == "lora":
        return ddpm_lora_pair(_load_ddpm_unet(pre_path, opts), ft_path, alphas, prediction, opts)
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


def ddpm_lora_pair(unet: UNet2DModel, lora: Path, alphas: torch.Tensor, prediction: str,
                   opts: LoadOptions) -> DDPMLoraPair:
    """A loaded base pixel UNet with the LoRA file ``lora`` attached (unmerged) as one pair.
    The audit's LoRA swapping calls this with a base it keeps loaded."""
    attach_pixel_lora(unet, lora)
    return DDPMLoraPair(place(unet, opts), alphas, prediction_type=prediction,
                        device=opts.device, dtype=opts.dtype)


def pixel_flow_lora_pair(unet: UNet2DModel, lora: Path, num_train_timesteps: int,
                         opts: LoadOptions) -> PixelFlowLoraPair:
    """A loaded base flow-matching pixel UNet with the LoRA file ``lora`` attached."""
    attach_pixel_lora(unet, lora)
    return PixelFlowLoraPair(place(unet, opts), num_train_timesteps=num_train_timesteps,
                             device=opts.device, dtype=opts.dtype)

"""Adapter of the pixel-space DDPM family (registry entry ``ddpm``): an unconditional
``UNet2DModel`` predicting noise, as in the demo pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cgidm_core.models.adapter import BaseRequest, LoraBase, PairRequest
from cgidm_core.models.components import place
from cgidm_core.models.ddpm import DDPMPair
from cgidm_core.models.pixel_loading import (
    _ddpm_schedule,
    _load_ddpm_unet,
    ddpm_lora_pair,
    load_ddpm_pair,
)


def check_pipeline_folder(folder: Path, index: dict[str, Any]) -> None:
    """Nothing to refuse: the registry matched the pipeline class and the noise scheduler."""


def load_pair(request: PairRequest) -> DDPMPair:
    return load_ddpm_pair(request.pretrained, request.finetuned, request.opts, kind=request.kind)


def load_lora_base(request: BaseRequest) -> LoraBase:
    """The base UNet kept loaded; each LoRA file becomes the pair ``load_pair`` builds for it."""
    from cgidm_core.errors import ModelFormatError

    schedule = _ddpm_schedule(request.pretrained)
    if schedule is None:
        raise ModelFormatError(f"{request.pretrained} has no scheduler/scheduler_config.json")
    alphas, prediction = schedule
    unet = place(_load_ddpm_unet(request.pretrained, request.opts), request.opts)
    return LoraBase(pair=lambda lora: ddpm_lora_pair(unet, lora, alphas, prediction,
                                                     request.opts),
                    adapted=(unet,), parts=(unet,))

"""Adapter of the pixel-space flow-matching family (registry entry ``pixel-flow``): an
unconditional ``UNet2DModel`` predicting velocity, as in the flow demo pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cgidm_core.models.adapter import BaseRequest, LoraBase, PairRequest
from cgidm_core.models.components import place
from cgidm_core.models.pixel_flow import PixelFlowPair
from cgidm_core.models.pixel_loading import (
    _flow_schedule,
    _load_ddpm_unet,
    load_pixel_flow_pair,
    pixel_flow_lora_pair,
)


def check_pipeline_folder(folder: Path, index: dict[str, Any]) -> None:
    """Nothing to refuse here: the scheduler's fixed shift is checked when the pair loads."""


def load_pair(request: PairRequest) -> PixelFlowPair:
    return load_pixel_flow_pair(request.pretrained, request.finetuned, request.opts,
                                kind=request.kind)


def load_lora_base(request: BaseRequest) -> LoraBase:
    """The base UNet kept loaded; each LoRA file becomes the pair ``load_pair`` builds for it."""
    schedule = _flow_schedule(request.pretrained)
    assert schedule is not None  # the registry recognised the family from this scheduler
    unet = place(_load_ddpm_unet(request.pretrained, request.opts), request.opts)
    return LoraBase(pair=lambda lora: pixel_flow_lora_pair(unet, lora, schedule[0],
                                                           request.opts),
                    adapted=(unet,), parts=(unet,))

"""Adapter of the pixel-space flow-matching family (registry entry ``pixel-flow``): an
unconditional ``UNet2DModel`` predicting velocity, as in the flow demo pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cgidm_core.models.adapter import PairRequest
from cgidm_core.models.pixel_flow import PixelFlowPair
from cgidm_core.models.pixel_loading import load_pixel_flow_pair


def check_pipeline_folder(folder: Path, index: dict[str, Any]) -> None:
    """Nothing to refuse here: the scheduler's fixed shift is checked when the pair loads."""


def load_pair(request: PairRequest) -> PixelFlowPair:
    return load_pixel_flow_pair(request.pretrained, request.finetuned, request.opts,
                                kind=request.kind)

"""Adapter of the pixel-space DDPM family (registry entry ``ddpm``): an unconditional
``UNet2DModel`` predicting noise, as in the demo pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cgidm_core.models.adapter import PairRequest
from cgidm_core.models.ddpm import DDPMPair
from cgidm_core.models.pixel_loading import load_ddpm_pair


def check_pipeline_folder(folder: Path, index: dict[str, Any]) -> None:
    """Nothing to refuse: the registry matched the pipeline class and the noise scheduler."""


def load_pair(request: PairRequest) -> DDPMPair:
    return load_ddpm_pair(request.pretrained, request.finetuned, request.opts, kind=request.kind)

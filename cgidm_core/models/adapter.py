"""What the generic loading path hands a family adapter (:class:`cgidm_core.families.
FamilyAdapter`): the two resolved models, the fine-tune's layout and the load options.

Kept apart from every family's code so that an adapter module imports this, the registry and
the shared helpers of :mod:`cgidm_core.models.sd_loading` (``loading_errors``, ``place``,
``same_weights``, ``load_text_encoder``...), and nothing of another family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cgidm_core.families import Family


@dataclass(frozen=True)
class LoadOptions:
    """Where and how every network of a pair is loaded."""

    device: torch.device
    dtype: torch.dtype
    local_files_only: bool


@dataclass(frozen=True)
class PairRequest:
    """One pair to load, as the generic path resolved it.

    ``pretrained`` is a pipeline folder of ``family`` (the converted folder of a complete
    single-file base). For a family whose pretrained single file holds the denoiser only
    (``Recognition.base_file_layout == "denoiser"``), ``pretrained_file`` is that file and
    ``pretrained`` the pipeline folder that supplies its config and other parts. ``kind`` is the
    fine-tune's layout (one of ``family.finetuned_layouts``), already checked against the files.
    """

    family: Family
    pretrained: Path
    finetuned: Path
    kind: str
    opts: LoadOptions
    keep_text_encoders: bool = False
    pretrained_file: Path | None = None

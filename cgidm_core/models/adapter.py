"""What the generic loading path hands a family adapter (:class:`cgidm_core.families.
FamilyAdapter`): the two resolved models, the fine-tune's layout and the load options.

Kept apart from every family's code so that an adapter module imports this, the registry and
the shared helpers of :mod:`cgidm_core.models.sd_loading` (``loading_errors``, ``place``,
``same_weights``, ``load_text_encoder``...), and nothing of another family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cgidm_core.families import Family
    from cgidm_core.pair import ModelPair


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


@dataclass(frozen=True)
class BaseRequest:
    """A base to load once for many LoRAs of it (``load_lora_base``): a :class:`PairRequest`
    without the fine-tune."""

    family: Family
    pretrained: Path
    opts: LoadOptions
    pretrained_file: Path | None = None


@dataclass
class LoraBase:
    """A base kept loaded while LoRAs of it are attached and removed one at a time.

    What an adapter's optional ``load_lora_base(BaseRequest)`` returns (the families that have
    one are the ones :mod:`cgidm_core.lora_swap` swaps). ``pair(lora file)`` attaches the LoRA
    and builds its pair with the SAME function the adapter's ``load_pair`` uses for a LoRA, so a
    swapped pair is the pair ``cgidm check`` loads (text encoders kept: they are the base's,
    shared by every LoRA). ``adapted`` are the networks a LoRA may attach to; removing the
    adapter from each (:meth:`detach`) puts the base's own modules back. ``parts`` are all the
    networks the base keeps loaded, for its size in the worker's cache budget."""

    pair: Callable[[Path], ModelPair]
    adapted: tuple[torch.nn.Module, ...]
    parts: tuple[torch.nn.Module, ...]

    def detach(self) -> None:
        """Remove every LoRA layer from the base (diffusers' ``recurse_remove_peft_layers``,
        what ``unload_lora`` does): the base computes bit for bit what it computed before."""
        from cgidm_core.models.components import remove_lora_layers

        for network in self.adapted:
            remove_lora_layers(network)

    def resident_bytes(self) -> int:
        """Bytes of the parameters and buffers the base keeps loaded (shared storages once)."""
        from cgidm_core.pair import storage_bytes

        return storage_bytes(list(self.parts))

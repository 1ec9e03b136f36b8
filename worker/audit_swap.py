"""LoRA swapping in the worker's audit subtasks: the loaded base outlives one subtask.

An audit sends one subtask per group of models of one base, routed by that base
(``cgidm.audits.model_groups``, ``cgidm.queue_routing``), so the subtasks of one base reach the
worker that had it loaded. This process keeps that base in one :class:`~cgidm_core.lora_swap.
BaseSlot` for all its subtasks: a LoRA of it (a registry entry with local files) is attached to
the loaded base, audited and removed (:class:`~cgidm_core.lora_swap.LoraSwapLoader`); every
other model (full fine-tunes, uploads, hub references) goes through the subtask's own loader and
the worker's pair cache, as before. The slot's base counts in the pair cache's byte budget
(``CGIDM_MODEL_CACHE_BYTES``, :meth:`worker.model_cache.ModelCache.hold`): keeping it evicts
pairs, a pair load may evict it, and a base larger than the whole budget is not kept (its LoRAs
are loaded as pairs, one per model, with a log line saying so).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cgidm.uploaded_models import ModelResolver, UploadedModel
from worker.context import WorkerContext

_SLOT: Any = None  # this process's cgidm_core.lora_swap.BaseSlot, made on first use


def _slot(ctx: WorkerContext) -> Any:
    global _SLOT
    if _SLOT is None or _SLOT.budget is not ctx.cache:
        from cgidm_core.lora_swap import BaseSlot

        _SLOT = BaseSlot(budget=ctx.cache)
    return _SLOT


def swapping_loader(ctx: WorkerContext, resolver: ModelResolver,
                    fallback: Callable[[Any], Any]) -> Any:
    """The subtask's pair loader with LoRAs of registry entries swapped on this process's
    loaded base; ``fallback`` (the subtask's loader) takes every other model."""
    from cgidm.model_refs import looks_like_reference
    from cgidm_core.demo import resolve_model_reference
    from cgidm_core.lora_swap import LoraSwapLoader

    def paths(model: Any) -> tuple[Path, Path] | None:
        if looks_like_reference(model.finetuned):
            return None  # fetched from a hub by the fallback, as for a job
        pre, ft = resolver.check_pair(model.pretrained, model.finetuned)
        if isinstance(ft, UploadedModel):
            return None  # its file comes through the worker's disk cache
        return resolve_model_reference(pre.path), resolve_model_reference(ft.path)

    return LoraSwapLoader(fallback, paths, device=ctx.settings.device,
                          dtype=ctx.settings.dtype, slot=_slot(ctx))

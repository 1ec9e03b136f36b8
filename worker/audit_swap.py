"""LoRA swapping in the worker's audit subtasks: the loaded base outlives one subtask.

An audit sends one subtask per group of models of one base, routed by that base
(``cgidm.audits.model_groups``, ``cgidm.queue_routing``), so the subtasks of one base reach the
worker that had it loaded. This process keeps that base in one :class:`~cgidm_core.lora_swap.
BaseSlot` for all its subtasks: a LoRA of it (a registry entry with local files) is attached to
the loaded base, audited and removed (:class:`~cgidm_core.lora_swap.LoraSwapLoader`); every
other model (full fine-tunes, uploads, hub references) goes through the subtask's own loader and
the worker's pair cache, as before. The slot holds one base outside the pair cache's byte budget
(``CGIDM_MODEL_CACHE_BYTES``): a worker needs room for it beside that budget.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cgidm.uploaded_models import ModelResolver, UploadedModel
from worker.context import WorkerContext

_SLOT: Any = None  # this process's cgidm_core.lora_swap.BaseSlot, made on first use
#: (key, cgidm_core.audit_run.BasePasses): the screen's memo of base passes of the last audit
#: and base this process ran, for the next subtask of the same audit and base.
_PASSES: tuple[tuple[Any, ...], Any] | None = None


def _slot() -> Any:
    global _SLOT
    if _SLOT is None:
        from cgidm_core.lora_swap import BaseSlot

        _SLOT = BaseSlot()
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
                          dtype=ctx.settings.dtype, slot=_slot())


def base_passes_for(audit_id: str, resolver: ModelResolver) -> Callable[[Any], Any]:
    """``run_audit``'s ``base_passes``: one memo of the base's screen passes kept by this process
    across the subtasks of one audit and one base (an audit of many models on one base is split
    into subtasks of ``cgidm.audits.GROUP_SIZE``), so only its first subtask here computes
    them; the values are those computed there, for the same noisy inputs and conditioning.

    Keyed by the audit, the base's registry id and path (an operator who repoints the id gets
    a new memo) and the prompt; one memo is kept (the last), so memory stays at one audit's
    screen passes of one base: (images + controls) x the contrast's samples base outputs.
    """
    from cgidm_core.audit_run import BasePasses

    def memo(group_key: tuple[str, str | None]) -> Any:
        global _PASSES
        pretrained, prompt = group_key
        try:
            base_path = getattr(resolver.get(pretrained), "path", None)
        except Exception:  # noqa: BLE001 - an unknown base fails at loading, with its message
            base_path = None
        if base_path is None:  # not one registered base ("auto": each model's own): no sharing
            return BasePasses()
        key = (audit_id, pretrained, base_path, prompt)
        if _PASSES is None or _PASSES[0] != key:
            _PASSES = (key, BasePasses())
        return _PASSES[1]

    return memo

"""LoRA swapping in the worker's audit subtasks: the loaded base outlives one subtask.

An audit sends one subtask per group of models of one base, routed by that base
(``cgidm.audits.model_groups``, ``cgidm.queue_routing``), so the subtasks of one base reach the
worker that had it loaded. This process keeps that base in one :class:`~cgidm_core.lora_swap.
BaseSlot` for all its subtasks: a LoRA of it is attached to the loaded base, audited and removed
(:class:`~cgidm_core.lora_swap.LoraSwapLoader`). Two kinds of LoRA swap:

- a registry entry with local files (its path);
- an uploaded LoRA file (``POST /models``, kind ``lora``), fetched into this machine's disk
  cache (:class:`worker.disk_cache.DiskCache`, verified against the sha256 recorded at upload)
  and pinned there while it is attached; the pin is released when the model is done (its
  weights are then in memory, and the file may leave the cache again).

Every other model (full fine-tunes, uploaded UNet weights or single files, hub references) goes
through the subtask's own loader and the worker's pair cache, as before. The slot's base counts
in the pair cache's byte budget (``CGIDM_MODEL_CACHE_BYTES``,
:meth:`worker.model_cache.ModelCache.hold`): keeping it evicts pairs, a pair load may evict it,
and a base larger than the whole budget is not kept (its LoRAs are loaded as pairs, one per
model, with a log line saying so).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cgidm.uploaded_models import ModelResolver, UploadedModel
from worker.context import WorkerContext

_SLOT: Any = None  # this process's cgidm_core.lora_swap.BaseSlot, made on first use
#: (key, cgidm_core.audit_run.BasePasses): the screen's memo of base passes of the last audit
#: and base this process ran, for the next subtask of the same audit and base.
_PASSES: tuple[tuple[Any, ...], Any] | None = None


def _slot(ctx: WorkerContext) -> Any:
    global _SLOT
    if _SLOT is None or _SLOT.budget is not ctx.cache:
        from cgidm_core.lora_swap import BaseSlot

        _SLOT = BaseSlot(budget=ctx.cache)
    return _SLOT


class PinnedUploads:
    """The swapping loader of one subtask, releasing the disk-cache pins of the uploaded LoRA
    files it attached when each model is done (``open`` exits, whatever happened inside).

    ``__call__``, ``open`` and ``stats`` are the :class:`~cgidm_core.lora_swap.LoraSwapLoader`'s,
    so :func:`cgidm_core.audit_run.run_audit` sees one loader."""

    def __init__(self, inner: Any, ctx: WorkerContext):
        self.inner, self.ctx = inner, ctx
        self.pinned: list[str] = []  # sha256 of the files pinned for the model being opened

    @property
    def stats(self) -> Any:
        return self.inner.stats

    def __call__(self, model: Any) -> Any:
        return self.inner(model)

    def fetch(self, upload: UploadedModel) -> Path | None:
        """The verified local file of an uploaded LoRA, pinned until the model is done; None
        without a disk cache (the fallback loader then fails the model with its message)."""
        disk = self.ctx.disk
        if disk is None:
            return None
        path = disk.fetch(upload.sha256, self.ctx.store.storage, upload.blob_key,
                          upload.size_bytes)
        self.pinned.append(upload.sha256)
        return path

    @contextmanager
    def open(self, model: Any) -> Iterator[Any]:
        try:
            with self.inner.open(model) as pair:
                yield pair
        finally:
            pinned, self.pinned = self.pinned, []
            if self.ctx.disk is not None:
                for sha256 in pinned:
                    self.ctx.disk.unpin(sha256)


def swapping_loader(ctx: WorkerContext, resolver: ModelResolver,
                    fallback: Callable[[Any], Any]) -> PinnedUploads:
    """The subtask's pair loader with LoRAs (registry entries with local files, uploaded LoRA
    files) swapped on this process's loaded base; ``fallback`` (the subtask's loader) takes
    every other model."""
    from cgidm.model_refs import looks_like_reference
    from cgidm_core.demo import resolve_model_reference
    from cgidm_core.lora_swap import LoraSwapLoader

    def paths(model: Any) -> tuple[Path, Path] | None:
        if looks_like_reference(model.finetuned):
            return None  # fetched from a hub by the fallback, as for a job
        pre, ft = resolver.check_pair(model.pretrained, model.finetuned)
        if isinstance(ft, UploadedModel):
            if ft.kind != "lora":
                return None  # UNet weights, single files: a pair of their own, as for a job
            blob = loader.fetch(ft)
            return None if blob is None else (resolve_model_reference(pre.path), blob)
        return resolve_model_reference(pre.path), resolve_model_reference(ft.path)

    loader = PinnedUploads(LoraSwapLoader(fallback, paths, device=ctx.settings.device,
                                          dtype=ctx.settings.dtype, slot=_slot(ctx)), ctx)
    return loader


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

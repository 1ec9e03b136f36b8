"""Per-process state of a worker: settings, storage, the model cache and its counters.

Built on first use inside the process that runs tasks (the prefork child, or the solo worker), so
nothing heavy happens in a parent process before it forks.
"""

from __future__ import annotations

import os
import re
import socket
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cgidm.jobs import JobStore, utcnow
from cgidm.leases import LeaseStore, leases_from_settings
from cgidm.registry import ModelEntry, Registry, load_registry
from cgidm.settings import Settings, get_settings
from cgidm.storage import storage_from_settings
from cgidm.uploaded_models import ModelResolver, UploadedModel, UploadStore
from worker.disk_cache import CachedFileCorrupt, DiskCache
from worker.model_cache import ModelCache
from worker.remote_models import RemoteModel

#: Registry pairs: (pretrained id, fine-tuned id, their paths, kind). Uploads: ("upload",
#: pretrained id, pretrained path, sha256 of the file, kind): keyed on content, so the same file
#: uploaded by two keys is one cached pair.
PairKey = tuple[str, str, str, str, str | None]
UPLOAD = "upload"


@dataclass
class WorkerContext:
    settings: Settings
    store: JobStore
    cache: ModelCache
    worker_id: str
    outcomes: Counter[str] = field(default_factory=Counter)
    disk: DiskCache | None = None
    #: sha256 -> (storage key, size) of an uploaded file, for the loader of a pair keyed on
    #: content; the key is None for a file fetched from a hub (already in the disk cache)
    sources: dict[str, tuple[str | None, int]] = field(default_factory=dict)
    #: Job leases (cgidm/leases.py); None: no fencing, the broker's redelivery alone.
    leases: LeaseStore | None = None

    def registry(self) -> Registry:
        return load_registry(self.settings.models)

    def resolver(self, owner: str | None) -> ModelResolver:
        """Model ids as the job's owner sees them: the registry and the owner's uploads."""
        return ModelResolver(self.registry(), UploadStore(self.store.storage), owner)

    def pair_key(self, pretrained: ModelEntry,
                 finetuned: ModelEntry | UploadedModel | RemoteModel) -> PairKey:
        if isinstance(finetuned, UploadedModel | RemoteModel):
            key = finetuned.blob_key if isinstance(finetuned, UploadedModel) else None
            self.sources[finetuned.sha256] = (key, finetuned.size_bytes)
            return (UPLOAD, pretrained.id, pretrained.path, finetuned.sha256, finetuned.kind)
        # Paths are part of the key: an operator who repoints an id gets the new weights.
        return (pretrained.id, finetuned.id, pretrained.path, finetuned.path, finetuned.kind)

    def publish_stats(self) -> None:
        """Write this process's counters where every gateway can read them (see app.metrics)."""
        self.store.save_worker_stats(
            self.worker_id,
            {
                "worker_id": self.worker_id,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "updated_at": utcnow().isoformat(),
                "model_cache": self.cache.stats().to_dict(),
                "disk_cache": self.disk.stats().to_dict() if self.disk else {},
                "jobs": dict(self.outcomes),
            },
        )


def _load_pair(key: PairKey, ctx: WorkerContext | None = None) -> Any:
    """Load the pair of a cache key; an uploaded fine-tune comes through the disk cache of
    ``ctx``."""
    from cgidm_core import load_pair

    settings = ctx.settings if ctx is not None else get_settings()
    if key[0] != UPLOAD:
        _, _, pre_path, ft_path, kind = key
        return load_pair(pre_path, ft_path, finetuned_kind=kind, device=settings.device,
                         dtype=settings.dtype)
    _, _, pre_path, sha256, kind = key
    if ctx is None or ctx.disk is None:
        raise RuntimeError("uploaded models need a worker context with a disk cache")
    from cgidm_core.errors import ModelFormatError

    key_in_storage, size = ctx.sources[sha256]
    try:
        if key_in_storage is None:  # fetched from a hub moments ago by this job
            blob = ctx.disk.fetch_with(sha256, _left_the_cache, size)[0]
        else:
            blob = ctx.disk.fetch(sha256, ctx.store.storage, key_in_storage, size)  # verified
    except CachedFileCorrupt as exc:  # storage holds other bytes than were uploaded
        raise ModelFormatError(str(exc)) from exc
    try:
        # kind "unet" (bare UNet weights) is a library kind too: the loader builds the network
        # from the base's UNet config, as `cgidm verify` does when it re-runs the result.
        return load_pair(pre_path, blob, finetuned_kind=kind, device=settings.device,
                         dtype=settings.dtype)
    except BaseException:
        ctx.disk.unpin(sha256)
        raise


def _left_the_cache(part: Any) -> None:
    from cgidm_core.errors import ModelFormatError

    raise ModelFormatError("the model fetched for this job left the disk cache before it was "
                           "loaded (CGIDM_MODEL_DISK_BYTES too small for the models in use?); "
                           "submit the job again")


def _evicted(ctx: WorkerContext, key: PairKey) -> None:
    if key[0] == UPLOAD and ctx.disk is not None:
        ctx.disk.unpin(key[3])  # its file may leave the disk cache again


@lru_cache(maxsize=1)
def get_context() -> WorkerContext:
    settings = get_settings()
    worker_id = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{socket.gethostname()}-{os.getpid()}")
    ctx = WorkerContext(
        settings=settings,
        store=JobStore(storage_from_settings(settings)),
        cache=ModelCache(settings.model_cache_bytes, lambda key: _load_pair(key, ctx),
                         on_evict=lambda key: _evicted(ctx, key)),
        worker_id=worker_id,
        disk=DiskCache(settings.resolved_model_cache_dir, settings.model_disk_bytes),
        leases=leases_from_settings(settings),
    )
    return ctx

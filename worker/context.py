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
from worker.model_cache import ModelCache

PairKey = tuple[str, str, str, str, str | None]


@dataclass
class WorkerContext:
    settings: Settings
    store: JobStore
    cache: ModelCache
    worker_id: str
    outcomes: Counter[str] = field(default_factory=Counter)
    #: Job leases (cgidm/leases.py); None: no fencing, the broker's redelivery alone.
    leases: LeaseStore | None = None

    def registry(self) -> Registry:
        return load_registry(self.settings.models)

    def pair_key(self, pretrained: ModelEntry, finetuned: ModelEntry) -> PairKey:
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
                "jobs": dict(self.outcomes),
            },
        )


def _load_pair(key: PairKey) -> Any:
    from cgidm_core import load_pair

    settings = get_settings()
    _, _, pre_path, ft_path, kind = key
    return load_pair(pre_path, ft_path, finetuned_kind=kind, device=settings.device,
                     dtype=settings.dtype)


@lru_cache(maxsize=1)
def get_context() -> WorkerContext:
    settings = get_settings()
    worker_id = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{socket.gethostname()}-{os.getpid()}")
    return WorkerContext(
        settings=settings,
        store=JobStore(storage_from_settings(settings)),
        cache=ModelCache(settings.model_cache_bytes, _load_pair),
        worker_id=worker_id,
        leases=leases_from_settings(settings),
    )

"""An LRU cache of loaded model pairs, bounded by a memory budget.

Loading a Stable Diffusion pair takes tens of seconds and gigabytes, so a worker keeps pairs
between jobs: a second job on the same pair starts at once. The budget counts the parameters and
buffers each pair keeps between jobs (``ModelPair.resident_bytes()``): a Stable Diffusion pair
drops its text encoders once a prompt is encoded and reads them back only while it encodes a new
one, so sizing it right after loading (``memory_bytes()``, encoders included) would overstate
every cached pair by ~12 %. Before a load, pairs are evicted until the largest pair seen so far
would fit, so a GPU is not asked to hold two big pairs at once.

The audit's LoRA-swap base (``worker/audit_swap.py``, :class:`cgidm_core.lora_swap.BaseSlot`)
counts in the same budget: :meth:`ModelCache.hold` evicts pairs to make room for it and it is
evicted like a pair (least recently used first); a base larger than the whole budget is not held.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("cgidm.worker.cache")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ModelCache:
    """``get(key)`` returns ``(pair, hit)``; ``loader(key)`` builds a pair on a miss."""

    def __init__(self, budget_bytes: int, loader: Callable[[Any], Any],
                 on_evict: Callable[[Any], None] | None = None):
        self.budget_bytes = budget_bytes
        self.loader = loader
        self.on_evict = on_evict  # e.g. let the disk cache remove the pair's files again
        self._pairs: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        #: entries put in by :meth:`hold` (not pairs), and what to call when they are evicted
        self._held: dict[Hashable, Callable[[], None]] = {}
        self._largest = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable) -> tuple[Any, bool]:
        with self._lock:
            if key in self._pairs:
                self._pairs.move_to_end(key)
                self.hits += 1
                return self._pairs[key][0], True
            self.misses += 1
            self._evict(reserve=self._largest)
            pair = self.loader(key)
            size = int(pair.resident_bytes())
            self._largest = max(self._largest, size)
            self._pairs[key] = (pair, size)
            self._evict(reserve=0, keep=key)
            return pair, False

    def hold(self, key: Hashable, value: Any, size: int, release: Callable[[], None]) -> bool:
        """Count ``value`` (``size`` bytes, not a pair: the audit's LoRA-swap base) in the
        budget, evicting the least recently used entries until it fits; ``release()`` is called
        if it is evicted later. A value larger than the whole budget is not held (False): unlike
        a pair it has no job that needs it, its owner loads the models another way."""
        with self._lock:
            self._forget(key)
            if size > self.budget_bytes:
                return False
            self._evict(reserve=size)
            self._pairs[key] = (value, size)
            self._held[key] = release
            return True

    def touch(self, key: Hashable) -> None:
        """A held entry was used: it is evicted last."""
        with self._lock:
            if key in self._pairs:
                self._pairs.move_to_end(key)

    def drop(self, key: Hashable) -> None:
        """Forget a held entry (its owner let it go; ``release`` is not called)."""
        with self._lock:
            self._forget(key)

    def _forget(self, key: Hashable) -> None:
        if key in self._held:
            self._pairs.pop(key, None)
            self._held.pop(key)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self._pairs.values())

    def _evict(self, reserve: int, keep: Hashable | None = None) -> None:
        evicted = False
        while self._pairs and self.total_bytes + reserve > self.budget_bytes:
            oldest = next(iter(self._pairs))
            if oldest == keep:
                break  # a pair larger than the budget still has to be usable for its job
            self._pairs.pop(oldest)
            self.evictions += 1
            if oldest in self._held:
                self._held.pop(oldest)()  # the owner lets it go
            elif self.on_evict is not None:
                self.on_evict(oldest)
            evicted = True
            log.info("evicted %s from the model cache", oldest)
        if evicted:
            _release_memory()

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, self.evictions, self.total_bytes,
                          len(self._pairs))


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - the worker always has torch
        pass

"""The worker's LRU of model pairs, with real (tiny) pairs loaded by cgidm_core."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import tinymodels
from worker.model_cache import ModelCache


@pytest.fixture(scope="module")
def two_pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("cache")
    return {"a": tinymodels.make_tiny_ddpm_pair(root / "a", seed=0),
            "b": tinymodels.make_tiny_ddpm_pair(root / "b", seed=1)}


def _cache(pairs, budget):
    from cgidm_core import load_pair

    loads: list[str] = []

    def loader(key: str):
        loads.append(key)
        return load_pair(*pairs[key], device="cpu")

    return ModelCache(budget, loader), loads


def test_second_get_reuses_the_loaded_pair(two_pairs):
    cache, loads = _cache(two_pairs, budget=10**9)
    first, hit1 = cache.get("a")
    again, hit2 = cache.get("a")
    assert (hit1, hit2) == (False, True) and again is first and loads == ["a"]
    cache.get("b")
    assert cache.stats().to_dict() == {"hits": 1, "misses": 2, "evictions": 0,
                                       "bytes": first.memory_bytes() * 2, "entries": 2}


def test_budget_evicts_least_recently_used(two_pairs):
    cache, loads = _cache(two_pairs, budget=1)  # smaller than any pair: keep only the one in use
    a, _ = cache.get("a")
    b, hit = cache.get("b")
    assert not hit and cache.stats().entries == 1 and cache.stats().evictions == 1
    a2, hit = cache.get("a")
    assert not hit and a2 is not a and loads == ["a", "b", "a"]


def test_budget_for_one_and_a_half_pairs_keeps_recent_one(two_pairs):
    from cgidm_core import load_pair

    size = load_pair(*two_pairs["a"], device="cpu").memory_bytes()
    cache, loads = _cache(two_pairs, budget=int(size * 1.5))
    cache.get("a")
    cache.get("a")
    cache.get("b")  # evicts a before loading b (b may be as large as a)
    cache.get("b")
    assert loads == ["a", "b"] and cache.hits == 2 and cache.evictions == 1

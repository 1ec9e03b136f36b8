"""The worker's LRU of model pairs, with real (tiny) pairs loaded by cgidm_core."""

from __future__ import annotations

from pathlib import Path

import pytest

from cgidm_testkit import tinymodels
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


def test_sd_pair_is_sized_as_held_between_jobs(tmp_path):
    """A Stable Diffusion pair loaded with default settings drops its text encoders once its
    first prompt is encoded. The cache counts the released size from the moment it loads the
    pair (not the size right after loading, encoders included), and a job with a new prompt
    (encoders read back, then released again) leaves that size right."""
    from cgidm_core import load_pair

    base = tinymodels.make_tiny_sd(tmp_path / "base")
    dreambooth = tinymodels.make_dreambooth_folder(base, tmp_path / "dreambooth")
    cache = ModelCache(10**9, lambda key: load_pair(base, dreambooth, device="cpu"))
    pair, _ = cache.get("a")
    assert pair.text_encoders_loaded
    loaded = pair.memory_bytes()
    pair.conditioning("sks style")  # the first job's prompt: encoded, then the release
    released = pair.memory_bytes()
    assert not pair.text_encoders_loaded and released < loaded
    assert cache.stats().bytes == released
    pair.conditioning("another prompt")  # a new prompt: read back, encoded, released again
    assert not pair.text_encoders_loaded and pair.memory_bytes() == released
    assert cache.stats().bytes == released

    # Two released pairs fit a budget that two pairs sized with their encoders would not.
    cache = ModelCache(2 * released + 1, lambda key: load_pair(base, dreambooth, device="cpu"))
    cache.get("a")
    cache.get("b")
    assert cache.stats().entries == 2 and cache.stats().evictions == 0

    # A pair that keeps its encoders is sized with them.
    kept = load_pair(base, dreambooth, device="cpu", keep_text_encoders=True)
    kept.conditioning("sks style")
    assert kept.resident_bytes() == kept.memory_bytes() == loaded

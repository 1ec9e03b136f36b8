"""The workers' disk cache of uploaded models, with real processes sharing one folder."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from pathlib import Path

import pytest

from cgidm.storage import LocalStorage
from worker.disk_cache import CachedFileCorrupt, DiskCache


def _store(tmp_path: Path, blobs: dict[str, bytes]) -> tuple[LocalStorage, dict[str, str]]:
    storage = LocalStorage(tmp_path / "storage")
    hashes = {}
    for key, data in blobs.items():
        storage.put_bytes(key, data)
        hashes[key] = hashlib.sha256(data).hexdigest()
    return storage, hashes


def _fetch(root: str, storage_root: str, sha: str, key: str, queue) -> None:
    cache = DiskCache(Path(root), 10**9)
    path = cache.fetch(sha, LocalStorage(storage_root), key)
    queue.put((os.getpid(), cache.downloads, cache.hits,
               hashlib.sha256(path.read_bytes()).hexdigest()))


def test_processes_fetching_the_same_file_download_it_once(tmp_path):
    data = os.urandom(24 * 1024 * 1024)  # big enough that the fetches overlap
    storage, hashes = _store(tmp_path, {"m/a.safetensors": data})
    sha = hashes["m/a.safetensors"]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_fetch, args=(str(tmp_path / "cache"),
                                                  str(storage.root), sha, "m/a.safetensors",
                                                  queue)) for _ in range(4)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert sum(r[1] for r in results) == 1 and sum(r[2] for r in results) == 3
    assert {r[3] for r in results} == {sha}  # every process read the whole, verified file
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def test_storage_bytes_that_do_not_match_are_never_published(tmp_path):
    storage, hashes = _store(tmp_path, {"m/a.safetensors": b"one"})
    cache = DiskCache(tmp_path / "cache", 10**6)
    with pytest.raises(CachedFileCorrupt, match="upload it again"):
        cache.fetch(hashlib.sha256(b"other").hexdigest(), storage, "m/a.safetensors")
    assert not list(cache.blobs.iterdir()) and not list(cache.tmp.iterdir())


def test_pinned_files_survive_eviction(tmp_path):
    blobs = {f"m/{n}.safetensors": bytes([n]) * 1000 for n in range(3)}
    storage, hashes = _store(tmp_path, blobs)
    cache = DiskCache(tmp_path / "cache", 2500)
    sha = [hashes[f"m/{n}.safetensors"] for n in range(3)]
    cache.fetch(sha[0], storage, "m/0.safetensors", 1000)  # pinned (in use)
    cache.fetch(sha[1], storage, "m/1.safetensors", 1000, pin=False)
    other = DiskCache(tmp_path / "cache", 2500)  # another process's view, same folder
    other.fetch(sha[2], storage, "m/2.safetensors", 1000, pin=False)
    assert not cache.blob_path(sha[1]).exists()  # unpinned: evicted although newer than 0
    assert cache.blob_path(sha[0]).exists() and cache.blob_path(sha[2]).exists()
    cache.unpin(sha[0])
    os.utime(cache.blob_path(sha[0]), (1, 1))  # least recently used now
    other.fetch(sha[1], storage, "m/1.safetensors", 1000, pin=False)
    assert not cache.blob_path(sha[0]).exists() and other.stats().files == 2

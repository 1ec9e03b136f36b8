"""A content-addressed disk cache of uploaded model files, shared by the workers of a machine.

Uploaded models live in object storage; the loaders need local files. A worker fetches a model
into ``CGIDM_MODEL_CACHE_DIR/blobs/<sha256>.safetensors`` the first time a job needs it, and later
jobs (any worker process on the machine) read the same file. Rules:

- **Verified.** A download is hashed as it is written and published only if its sha256 is the one
  recorded at upload; a cached file is hashed again every time it is handed to a loader (a model
  is loaded from disk only when the in-memory pair cache misses, and hashing costs a fraction of
  loading), so a file changed on disk, by a bad disk or a person, is detected, removed and
  fetched again.
- **Atomic.** A download goes to ``tmp/`` and is renamed into ``blobs/`` when complete and
  verified, so no process ever opens half a file. An exclusive ``flock`` per hash makes a second
  process wait for the first one's download instead of fetching the same file twice.
- **Bounded.** ``CGIDM_MODEL_DISK_BYTES`` caps the blobs' total size; before a download the least
  recently used blobs are removed until the new file fits. A blob whose model is loaded (in this
  or another process) is *pinned* by a shared ``flock`` on its lock file and is never removed;
  as with the memory cache, one file larger than the budget is still used for its job.

A bare UNet weights file is loaded from its blob by the library's ``unet`` kind
(``cgidm_core.models.unet_file``), which takes the architecture from the base folder's config.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cgidm.errors import CgidmServiceError
from cgidm.storage import Storage

log = logging.getLogger("cgidm.worker.disk_cache")

HASH_CHUNK = 4 * 1024 * 1024


class CachedFileCorrupt(CgidmServiceError):
    """Storage handed us bytes whose sha256 is not the one recorded at upload."""

    code = "model_format"  # the worker fails the job as the library's ModelFormatError


@dataclass
class DiskCacheStats:
    hits: int = 0
    downloads: int = 0
    evictions: int = 0
    corrupt: int = 0
    bytes: int = 0
    files: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


class DiskCache:
    """See the module docstring. Thread-safe; process-safe through ``flock``."""

    def __init__(self, root: Path, budget_bytes: int):
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.blobs, self.tmp, self.locks = (
            self.root / name for name in ("blobs", "tmp", "locks"))
        for folder in (self.blobs, self.tmp, self.locks):
            folder.mkdir(parents=True, exist_ok=True)
        self._pins: dict[str, list[IO[bytes]]] = {}
        self._lock = threading.Lock()
        self.hits = self.downloads = self.evictions = self.corrupt = 0

    # -- paths and locks -----------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / f"{sha256}.safetensors"

    def _lock_file(self, sha256: str) -> IO[bytes]:
        return (self.locks / f"{sha256}.lock").open("a+b")

    def pin(self, sha256: str) -> None:
        """Keep the blob on disk while this process uses it (shared lock, until :meth:`unpin`)."""
        handle = self._lock_file(sha256)
        fcntl.flock(handle, fcntl.LOCK_SH)
        with self._lock:
            self._pins.setdefault(sha256, []).append(handle)

    def unpin(self, sha256: str) -> None:
        with self._lock:
            handles = self._pins.get(sha256) or []
            handle = handles.pop() if handles else None
            if not handles:
                self._pins.pop(sha256, None)
        if handle is not None:
            handle.close()  # releases the shared lock

    # -- fetching ------------------------------------------------------------------------------

    def fetch(self, sha256: str, storage: Storage, key: str, size: int | None = None,
              pin: bool = True) -> Path:
        """A verified local copy of the object ``key`` whose content hash is ``sha256``."""
        return self.fetch_with(sha256, lambda part: self._download(sha256, storage, key, part),
                               size, pin)[0]

    def fetch_with(self, sha256: str, download: Callable[[Path], None],
                   size: int | None = None, pin: bool = True) -> tuple[Path, bool]:
        """The blob ``sha256``, from the cache or written by ``download(part)`` into a ``.part``
        file under ``tmp/`` (which must hold exactly those bytes when it returns: it is hashed
        again here before it is published); returns (path, whether it was cached). Used for
        uploads (from storage) and for models fetched from a hub (``cgidm.model_fetch``); a
        download that raises leaves nothing behind."""
        path = self.blob_path(sha256)
        handle: IO[bytes] | None  # None once a pin owns it
        handle = self._lock_file(sha256)
        hit = False
        try:
            # A shared lock first: it is compatible with the pins of processes (this one
            # included) that have the file loaded, so a cached file is handed out while others
            # use it. Only a missing or damaged file takes the exclusive lock, one download per
            # file whatever the process (a pinned file is never missing: pins keep it).
            fcntl.flock(handle, fcntl.LOCK_SH)
            if path.is_file() and sha256_file(path) == sha256:
                hit = True
            else:
                fcntl.flock(handle, fcntl.LOCK_EX)
                hit = path.is_file() and sha256_file(path) == sha256  # fetched meanwhile?
            if hit:
                os.utime(path)  # most recently used
                self.hits += 1
            else:
                if path.is_file():
                    self.corrupt += 1
                    log.warning("cached model %s does not match its sha256 (changed on disk); "
                                "fetching it again", sha256)
                    path.unlink(missing_ok=True)
                self._evict(reserve=size or 0, keep=sha256)
                part = self.tmp / f"{sha256}.part"  # one name per file: a later try resumes it
                try:
                    download(part)
                    got = sha256_file(part)
                    if got != sha256:
                        raise CachedFileCorrupt(f"the model file fetched for {sha256} has "
                                                f"sha256 {got}; it was not cached")
                    os.replace(part, path)
                finally:
                    part.unlink(missing_ok=True)
                log.info("fetched model %s into the disk cache (%d bytes)", sha256,
                         path.stat().st_size)
                self.downloads += 1
                self._evict(reserve=0, keep=sha256)  # in case the size was not known
            if pin:  # the lock becomes (or stays) the pin's shared one: no gap to evict in
                fcntl.flock(handle, fcntl.LOCK_SH)
                with self._lock:
                    self._pins.setdefault(sha256, []).append(handle)
                handle = None
        finally:
            if handle is not None:
                handle.close()
        return path, hit

    def store(self, sha256: str, size: int | None, download: Callable[[Path], None]
              ) -> tuple[Path, bool]:
        """``cgidm.model_fetch.CacheStore``: a hub model into the cache, unpinned."""
        return self.fetch_with(sha256, download, size, pin=False)

    def remove(self, sha256: str) -> None:
        """Drop a blob that turned out unusable (a hub file that fails the safety checks)."""
        self._try_remove(sha256, self.blob_path(sha256))

    def _download(self, sha256: str, storage: Storage, key: str, part: Path) -> None:
        digest = hashlib.sha256()
        with part.open("wb") as handle:
            for block in storage.open_stream(key, chunk_size=HASH_CHUNK):
                digest.update(block)
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        if digest.hexdigest() != sha256:
            raise CachedFileCorrupt(
                f"the uploaded model in storage ({key}) has sha256 {digest.hexdigest()}, not "
                f"the {sha256} recorded when it was uploaded; upload it again")

    # -- eviction ------------------------------------------------------------------------------

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for path in self.blobs.glob("*.safetensors"):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                out.append((stat.st_mtime, stat.st_size, path))
        return sorted(out)

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def _evict(self, reserve: int, keep: str) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:  # least recently used first
            if total + reserve <= self.budget_bytes:
                break
            sha = path.name.removesuffix(".safetensors")
            if sha == keep or not self._try_remove(sha, path):
                continue
            total -= size
            self.evictions += 1
            log.info("evicted model %s from the disk cache (%d bytes)", sha, size)

    def _try_remove(self, sha256: str, path: Path) -> bool:
        """Remove a blob nobody has pinned or is downloading (non-blocking)."""
        with self._lock_file(sha256) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                path.unlink(missing_ok=True)
                return True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def stats(self) -> DiskCacheStats:
        entries = self._entries()
        return DiskCacheStats(self.hits, self.downloads, self.evictions, self.corrupt,
                              sum(size for _, size, _ in entries), len(entries))

"""Fetching a suspect model named by a hub reference (``cgidm.model_refs``), pinned and verified.

Hugging Face (``huggingface_hub``, its own cache layout under ``<cache>/huggingface``):

- ``GET {HF_ENDPOINT}/api/models/{repo}/revision/{rev}?blobs=true`` (``HfApi.model_info``)
  resolves the revision to its commit hash, lists the files (with each LFS file's sha256 and
  size) and gives the model card's ``base_model``;
- ``HEAD``/``GET {HF_ENDPOINT}/{repo}/resolve/{commit}/{file}`` (``hf_hub_download``) fetch the
  file by that commit, never by a branch, so the record names bytes that cannot move;
- ``HF_HUB_OFFLINE=1``: no request at all; the model comes from the cache (a branch name is
  resolved through the cache's ``refs/``), or the error says it is not cached.

Civitai (its public REST API, base URL ``CGIDM_CIVITAI_URL``, token ``CGIDM_CIVITAI_TOKEN`` sent as
``Authorization: Bearer``):

- ``GET /api/v1/model-versions/{id}``: the version's files (the primary one is fetched), each
  file's published ``hashes.SHA256`` and ``downloadUrl``, ``baseModel`` and ``trainedWords``;
- ``GET {downloadUrl}`` (``/api/download/models/{id}``, which redirects to a storage URL): the
  file, into a ``.part`` file, resumed with ``Range`` after a dropped connection; its sha256 must
  be the published one before the file is renamed into the cache; otherwise the ``.part`` is
  deleted and nothing is cached;
- ``GET /api/v1/model-versions/by-hash/{sha256}``: which version a local file is (optional).

Only ``.safetensors`` files are fetched (a pickle can run code when opened), at most
``max_bytes``, and the caller checks the header like an upload's (``cgidm.model_files``). The
module imports neither torch nor the gateway; the worker and the command line use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from cgidm.errors import CodedError
from cgidm.model_refs import ModelReference

if TYPE_CHECKING:  # annotations only
    from cgidm.settings import Settings

log = logging.getLogger("cgidm.model_fetch")

CHUNK = 1024 * 1024
#: Ranged retries of one download after its connection dropped, before it fails.
DOWNLOAD_ATTEMPTS = 4
DEFAULT_CIVITAI_URL = "https://civitai.com"
#: Files of a diffusers pipeline folder fetched for a snapshot (never pickles).
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.md"]


class ModelFetchError(CodedError):
    """A reference could not be fetched: ``code`` names the cause in one word (it becomes the
    job's error code), the message what to do."""


@dataclass
class FetchConfig:
    """Where and how to fetch: the cache folder, the sites' base URLs, the token, the limit."""

    cache_dir: Path
    civitai_url: str = DEFAULT_CIVITAI_URL
    civitai_token: str | None = None
    hf_endpoint: str | None = None  # default: HF_ENDPOINT, else huggingface.co
    max_bytes: int = 8 * 1024**3
    timeout: float = 60.0
    #: a diffusers folder (snapshot) is acceptable; the service takes single files only
    allow_snapshot: bool = True
    #: True: the cache only, no request (a Civitai version fetched before is found through the
    #: metadata saved with it). None: HF_HUB_OFFLINE decides.
    offline: bool | None = None

    @classmethod
    def from_settings(cls, settings: Settings, cache_dir: Path | None = None,
                      **overrides: Any) -> FetchConfig:
        return cls(cache_dir=Path(cache_dir or settings.resolved_model_cache_dir),
                   civitai_url=settings.civitai_url, civitai_token=settings.civitai_token,
                   max_bytes=settings.max_model_bytes, **overrides)

    @property
    def is_offline(self) -> bool:
        if self.offline is not None:
            return self.offline
        return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")

    @property
    def endpoint(self) -> str:
        return (self.hf_endpoint or os.environ.get("HF_ENDPOINT")
                or "https://huggingface.co").rstrip("/")


@dataclass
class FetchedModel:
    """A fetched suspect: where it is on disk and what it is, for the loader and the record."""

    reference: str          # as the user gave it
    canonical: str          # hf:o/n@COMMIT:file or civitai:N
    site: str
    path: Path              # the file (or, for a pipeline snapshot, the folder)
    filename: str
    size: int
    sha256: str | None      # of the file (None for a folder)
    revision: str | None = None      # Hugging Face commit hash
    version_id: int | None = None    # Civitai model version
    model_id: int | None = None
    base_model: str | None = None    # Civitai baseModel or the model card's base_model
    trained_words: list[str] = field(default_factory=list)
    source_url: str | None = None
    fetched_at: str = ""
    from_cache: bool = False

    def record(self) -> dict[str, Any]:
        """The provenance entry: everything but the local path."""
        out = asdict(self)
        out.pop("path")
        return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(4 * CHUNK):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process of the machine (one download per file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _check_safetensors_name(name: str, where: str) -> None:
    from cgidm.model_files import PICKLE_REFUSAL
    from cgidm_core.names import PICKLE_SUFFIXES

    if not name.lower().endswith(".safetensors"):
        raise ModelFetchError("pickle_checkpoint" if name.lower().endswith(
            PICKLE_SUFFIXES) else "unsupported_model_file",
            f"{where}: {name!r} is not a .safetensors file; {PICKLE_REFUSAL}")


def _check_size(size: int | None, config: FetchConfig, where: str) -> None:
    if size is not None and size > config.max_bytes:
        raise ModelFetchError("file_too_large", f"{where} is {size} bytes, more than the "
                              f"{config.max_bytes} allowed (CGIDM_MAX_MODEL_BYTES)")


# ------------------------------------------------------------------------------------------
# HTTP with clear errors


def _status_error(response: httpx.Response, what: str, token_setting: str) -> ModelFetchError:
    status = response.status_code
    if status in (401, 403):
        return ModelFetchError("model_access_denied", f"{what}: the site answered {status}; the "
                               f"model needs an account or the token was refused: set "
                               f"{token_setting} to an API token that may download it")
    if status == 404:
        return ModelFetchError("model_not_found", f"{what}: not found (404); check the reference")
    if status == 429:
        wait = response.headers.get("Retry-After")
        return ModelFetchError("hub_rate_limited", f"{what}: the site is rate-limiting requests "
                               f"(429){f'; retry after {wait} s' if wait else ''}")
    return ModelFetchError("hub_unavailable", f"{what}: the site answered {status}")


def download_verified(client: httpx.Client, url: str, part: Path, sha256: str, *,
                      headers: dict[str, str], max_bytes: int, what: str,
                      attempts: int = DOWNLOAD_ATTEMPTS) -> None:
    """Download ``url`` into ``part`` and check that its sha256 is ``sha256``.

    A ``part`` left by an earlier attempt (a dropped connection, a killed process) is resumed
    with ``Range: bytes=N-``; a server that ignores the range starts it over. Any failure that
    is not a dropped connection, and a dropped connection ``attempts`` times, deletes ``part``
    and raises; so does a hash that is not the published one."""
    try:
        for attempt in range(1, attempts + 1):
            have = part.stat().st_size if part.exists() else 0
            request_headers = dict(headers)
            if have:
                request_headers["Range"] = f"bytes={have}-"
            try:
                if _stream_into(client, url, part, have, request_headers, max_bytes, what):
                    break
            except (httpx.TransportError, httpx.DecodingError) as exc:  # dropped: resume it
                log.warning("%s: download interrupted after %d bytes (%s); attempt %d of %d",
                            what, part.stat().st_size if part.exists() else 0, exc, attempt,
                            attempts)
                if attempt == attempts:
                    raise ModelFetchError("download_incomplete", f"{what}: the download broke "
                                          f"off {attempts} times ({exc}); nothing was cached, "
                                          "try again later") from exc
                time.sleep(min(0.2 * attempt, 1.0))
            except httpx.HTTPError as exc:  # too many redirects, a bad URL...
                raise ModelFetchError("hub_unavailable", f"{what}: {exc}") from exc
        got = sha256_file(part)
        if got != sha256:
            raise ModelFetchError("model_hash_mismatch", f"{what}: the downloaded file has "
                                  f"sha256 {got}, not the published {sha256}; it was refused "
                                  "and nothing was cached")
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _stream_into(client: httpx.Client, url: str, part: Path, have: int,
                 headers: dict[str, str], max_bytes: int, what: str) -> bool:
    """One GET; True when the whole body arrived (or the part was already complete)."""
    with client.stream("GET", url, headers=headers, follow_redirects=True) as response:
        if response.status_code == 416 and have:  # the part is already whole
            return True
        if response.status_code not in (200, 206):
            raise _status_error(response, what, "CGIDM_CIVITAI_TOKEN")
        mode = "ab"
        if response.status_code == 200 or not response.headers.get(
                "Content-Range", "").startswith(f"bytes {have}-"):
            mode, have = "wb", 0  # the range was ignored: start over
        length = response.headers.get("Content-Length")
        if length is not None and have + int(length) > max_bytes:
            raise ModelFetchError("file_too_large", f"{what} is {have + int(length)} bytes, more "
                                  f"than the {max_bytes} allowed (CGIDM_MAX_MODEL_BYTES)")
        written = have
        with part.open(mode) as handle:
            for block in response.iter_bytes():
                written += len(block)
                if written > max_bytes:
                    raise ModelFetchError("file_too_large", f"{what} is larger than the "
                                          f"{max_bytes} bytes allowed (CGIDM_MAX_MODEL_BYTES)")
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
    return True


# ------------------------------------------------------------------------------------------
# Civitai


def _civitai_client(config: FetchConfig) -> httpx.Client:
    headers = {"User-Agent": "cgidm"}
    if config.civitai_token:
        headers["Authorization"] = f"Bearer {config.civitai_token}"
    return httpx.Client(base_url=config.civitai_url.rstrip("/"), headers=headers,
                        timeout=config.timeout)


def civitai_version(client: httpx.Client, version_id: int) -> dict[str, Any]:
    """The version's metadata (``GET /api/v1/model-versions/{id}``)."""
    what = f"Civitai model version {version_id}"
    try:
        response = client.get(f"/api/v1/model-versions/{version_id}", follow_redirects=True)
    except httpx.HTTPError as exc:
        raise ModelFetchError("hub_unavailable", f"{what}: {client.base_url} cannot be "
                              f"reached ({exc}); check CGIDM_CIVITAI_URL") from exc
    if response.status_code != 200:
        raise _status_error(response, what, "CGIDM_CIVITAI_TOKEN")
    try:
        document = response.json()
    except ValueError:
        raise ModelFetchError("hub_unavailable", f"{what}: the API answered something that is "
                              "not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("files"), list):
        raise ModelFetchError("hub_unavailable", f"{what}: the API answer has no files list")
    return document


def civitai_file(version: dict[str, Any], version_id: int) -> dict[str, Any]:
    """The file to check: the primary model file if it is safetensors, else the first
    safetensors model file; refused when the version has none or no published SHA256."""
    files = [f for f in version["files"] if isinstance(f, dict)
             and f.get("type", "Model") in ("Model", "Pruned Model")]
    files.sort(key=lambda f: not f.get("primary"))
    what = f"Civitai model version {version_id}"
    if not files:
        raise ModelFetchError("unsupported_model_file", f"{what} has no model file")
    safe = [f for f in files if str(f.get("name", "")).lower().endswith(".safetensors")
            or (f.get("metadata") or {}).get("format") == "SafeTensor"]
    if not safe:
        _check_safetensors_name(str(files[0].get("name")), what)
    chosen = safe[0]
    name = str(chosen.get("name") or f"civitai-{version_id}.safetensors")
    _check_safetensors_name(name, what)
    sha = str((chosen.get("hashes") or {}).get("SHA256") or "").lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelFetchError("unverifiable_model_file", f"{what}: the API publishes no SHA256 "
                              f"for {name!r}, so the download could not be checked; it was not "
                              "fetched")
    if not chosen.get("downloadUrl"):
        raise ModelFetchError("unsupported_model_file", f"{what}: {name!r} has no downloadUrl")
    return {**chosen, "name": name, "sha256": sha}


def civitai_by_hash(config: FetchConfig, sha256: str) -> dict[str, Any] | None:
    """The Civitai version whose file has this sha256 (``GET /api/v1/model-versions/by-hash``),
    or None when Civitai does not know it."""
    with _civitai_client(config) as client:
        try:
            response = client.get(f"/api/v1/model-versions/by-hash/{sha256.upper()}")
        except httpx.HTTPError as exc:
            raise ModelFetchError("hub_unavailable", f"Civitai by-hash lookup: {exc}") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise _status_error(response, "Civitai by-hash lookup", "CGIDM_CIVITAI_TOKEN")
        try:
            document = response.json()
        except ValueError:
            document = None
    if not isinstance(document, dict):
        raise ModelFetchError("hub_unavailable", "Civitai by-hash lookup: the API answered "
                              "something that is not a model version")
    return {"version_id": document.get("id"), "model_id": document.get("modelId"),
            "base_model": document.get("baseModel"), "air": document.get("air")}


#: What writes a verified file into place: ``(sha256, size, download)`` where ``download(part)``
#: fills ``part``; returns the final path. The worker passes its disk cache's; the command line
#: uses :func:`plain_cache_store`.
CacheStore = Callable[[str, int | None, Callable[[Path], None]], tuple[Path, bool]]


def plain_cache_store(root: Path) -> CacheStore:
    """A content-addressed folder (``<root>/blobs/<sha256>.safetensors``, ``.part`` files in
    ``<root>/tmp``), one download per file through a lock: the command line's cache."""

    def store(sha256: str, size: int | None, download: Callable[[Path], None]
              ) -> tuple[Path, bool]:
        final = root / "blobs" / f"{sha256}.safetensors"
        with file_lock(root / "locks" / f"{sha256}.lock"):
            if final.is_file() and sha256_file(final) == sha256:
                return final, True
            part = root / "tmp" / f"{sha256}.part"
            part.parent.mkdir(parents=True, exist_ok=True)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                download(part)
                os.replace(part, final)
            except BaseException:
                part.unlink(missing_ok=True)  # nothing half-cached
                raise
            return final, False

    return store


def _saved_version(saved: Path, version_id: int) -> dict[str, Any]:
    try:
        return json.loads(saved.read_text())
    except (OSError, ValueError):
        raise ModelFetchError("model_not_cached", f"Civitai model version {version_id} was "
                              "never fetched here and HF_HUB_OFFLINE is set; fetch it once "
                              "online") from None


def fetch_civitai(ref: ModelReference, config: FetchConfig,
                  store: CacheStore | None = None) -> FetchedModel:
    """The version's primary safetensors file, verified against its published SHA256."""
    assert ref.version_id is not None
    store = store or plain_cache_store(config.cache_dir / "remote")
    saved = config.cache_dir / "remote" / "civitai" / f"{ref.version_id}.json"
    with _civitai_client(config) as client:
        if config.is_offline:
            version = _saved_version(saved, ref.version_id)
        else:
            version = civitai_version(client, ref.version_id)
        chosen = civitai_file(version, ref.version_id)
        size_kb = chosen.get("sizeKB")
        approx = int(float(size_kb) * 1024) if isinstance(size_kb, int | float) else None
        what = f"Civitai model version {ref.version_id} ({chosen['name']})"
        _check_size(approx and int(approx * 0.99), config, what)
        url = str(chosen["downloadUrl"])

        def download(part: Path) -> None:
            log.info("fetching %s from %s", what, url)
            download_verified(client, url, part, chosen["sha256"], headers={},
                              max_bytes=config.max_bytes, what=what)

        if config.is_offline:
            def download(part: Path) -> None:  # noqa: F811 - offline: the cache or nothing
                raise ModelFetchError("model_not_cached", f"{what} is not in the cache and "
                                      "HF_HUB_OFFLINE is set; fetch it once online")

        path, hit = store(chosen["sha256"], approx, download)
    if not config.is_offline:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(version))
    words = [str(w).strip() for w in version.get("trainedWords") or [] if str(w).strip()]
    return FetchedModel(
        reference=ref.given, canonical=ref.canonical, site="civitai", path=path,
        filename=chosen["name"], size=path.stat().st_size, sha256=chosen["sha256"],
        version_id=ref.version_id, model_id=version.get("modelId") or ref.model_id,
        base_model=version.get("baseModel"), trained_words=words, source_url=url,
        fetched_at=_now(), from_cache=hit)


# ------------------------------------------------------------------------------------------
# Hugging Face


def _hf_error(exc: Exception, what: str) -> ModelFetchError:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, LocalEntryNotFoundError):
        return ModelFetchError("model_not_cached", f"{what}: not in the cache and offline "
                               "(HF_HUB_OFFLINE) or the Hub cannot be reached; fetch it once "
                               "online")
    if isinstance(exc, GatedRepoError):
        return ModelFetchError("model_access_denied", f"{what}: the repository is gated; accept "
                               "its terms on the Hub and set HF_TOKEN to a read token")
    if isinstance(exc, RepositoryNotFoundError):
        return ModelFetchError("model_not_found", f"{what}: no such repository (or it is "
                               "private: set HF_TOKEN to a read token that may see it)")
    if isinstance(exc, RevisionNotFoundError):
        return ModelFetchError("model_not_found", f"{what}: no such revision")
    if isinstance(exc, EntryNotFoundError):
        return ModelFetchError("model_not_found", f"{what}: no such file at this revision")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 429:
        return ModelFetchError("hub_rate_limited", f"{what}: the Hub is rate-limiting (429)")
    if status in (401, 403):
        return ModelFetchError("model_access_denied", f"{what}: the Hub answered {status}; set "
                               "HF_TOKEN to a read token that may download it")
    return ModelFetchError("hub_unavailable", f"{what}: {type(exc).__name__}: {exc}")


def _pick_file(names: list[str], what: str) -> str | None:
    """The one weights file of a repository, or None for a diffusers pipeline folder."""
    if "model_index.json" in names:
        return None
    weights = [n for n in names if n.endswith(".safetensors")]
    for preferred in ("pytorch_lora_weights.safetensors",):
        if preferred in weights:
            return preferred
    top = [n for n in weights if "/" not in n]
    if len(top) == 1:
        return top[0]
    if not weights:
        pickles = [n for n in names if n.endswith((".bin", ".ckpt", ".pt", ".pth"))]
        _check_safetensors_name(pickles[0] if pickles else "(no weights file)", what)
    raise ModelFetchError("ambiguous_model_file", f"{what} holds several weights files "
                          f"({', '.join(sorted(weights)[:6])}); name one: hf:REPO[@REV]:FILE")


def _card_base_model(card: Any) -> str | None:
    value = getattr(card, "base_model", None) if card is not None else None
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value) if value else None


def _hf_index(config: FetchConfig, repo_id: str, revision: str, filename: str | None) -> Path:
    key = hashlib.sha256(f"{repo_id}@{revision}:{filename or ''}".encode()).hexdigest()[:32]
    return config.cache_dir / "remote" / "hf" / f"{key}.json"


def _remember_hf_file(config: FetchConfig, ref: ModelReference, revision: str,
                      entry: dict[str, Any]) -> None:
    """What a store-backed fetch found (commit, file, sha256), so an offline run finds the
    file in the content-addressed store, under the revision as given and under its commit."""
    for rev in {revision, entry["commit"]}:
        for name in {ref.filename, entry["filename"]}:
            index = _hf_index(config, ref.repo_id or "", rev, name)
            index.parent.mkdir(parents=True, exist_ok=True)
            index.write_text(json.dumps(entry))


def _stored_hf_file(config: FetchConfig, store: CacheStore, ref: ModelReference,
                    revision: str) -> FetchedModel | None:
    """Offline: the file an earlier store-backed fetch put in the store, if it is still there."""
    try:
        entry = json.loads(_hf_index(config, ref.repo_id or "", revision,
                                     ref.filename).read_text())
    except (OSError, ValueError):
        return None

    def missing(part: Path) -> None:
        raise ModelFetchError("model_not_cached", f"Hugging Face model {ref.repo_id}: "
                              f"{entry['filename']} left the cache and HF_HUB_OFFLINE is set")

    path, _ = store(entry["sha256"], entry.get("size"), missing)
    commit = entry["commit"]
    return FetchedModel(
        reference=ref.given, canonical=f"hf:{ref.repo_id}@{commit}:{entry['filename']}",
        site="hf", path=path, filename=entry["filename"], size=path.stat().st_size,
        sha256=entry["sha256"], revision=commit, base_model=entry.get("base_model"),
        source_url=f"{config.endpoint}/{ref.repo_id}/resolve/{commit}/{entry['filename']}",
        fetched_at=_now(), from_cache=True)


def _remember_revision(cache: Path, repo_id: str, revision: str, commit: str) -> None:
    """Record in the cache's ``refs/`` which commit a branch or tag named when it was fetched
    (files are downloaded by commit, which records no branch), so that an offline run
    (HF_HUB_OFFLINE) finds ``hf:REPO@main`` where the online one put it."""
    from huggingface_hub.file_download import repo_folder_name

    if revision == commit:
        return
    refs = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    refs.parent.mkdir(parents=True, exist_ok=True)
    refs.write_text(commit)


@contextlib.contextmanager
def _hub_mode(offline: bool) -> Iterator[None]:
    """huggingface_hub reads HF_HUB_OFFLINE once, when it is imported; the command line sets it
    for every model load, while a hub reference is itself the request to fetch. This sets the
    library's mode for the fetch alone."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def fetch_hf(ref: ModelReference, config: FetchConfig,
             store: CacheStore | None = None) -> FetchedModel:
    """The file (or pipeline snapshot) at the reference's revision, pinned to its commit."""
    with _hub_mode(config.is_offline):
        return _fetch_hf(ref, config, store)


@dataclass
class _HfListing:
    """What the Hub (or, offline, the local snapshot) says of a reference: the commit its
    revision is, the file to fetch (``None``: the whole pipeline folder), the card's base model,
    and for an LFS file its sha256 and size as listed."""

    commit: str
    filename: str | None
    base_model: str | None
    expected: str | None = None
    size: int | None = None
    files: frozenset[str] = frozenset()


def _fetch_hf(ref: ModelReference, config: FetchConfig,
              store: CacheStore | None = None) -> FetchedModel:
    from huggingface_hub import hf_hub_download

    assert ref.repo_id is not None
    cache = config.cache_dir / "huggingface"
    what = f"Hugging Face model {ref.repo_id}"
    revision = ref.revision or "main"
    # 1. Offline, a file this worker fetched before is served from its own cache.
    if config.is_offline and store is not None:
        known = _stored_hf_file(config, store, ref, revision)
        if known is not None:
            return known
    try:
        # 2. Pin the revision to a commit and pick the file (or take the pipeline folder).
        listing = _hf_listing(ref, config, cache, what, revision)
        if listing.filename is None:
            return _hf_snapshot(ref, config, cache, what, listing)
        filename, commit = listing.filename, listing.commit
        _check_safetensors_name(filename, what)
        # 3. Download it: into the worker's content-addressed store when the Hub lists its
        #    sha256, else into the Hugging Face cache (checked and stored below).
        local: Path | None = None
        if store is not None and listing.expected is not None:
            path, hit = _hf_download_to_store(ref, config, store, what, listing)
            sha = listing.expected  # the store hashed the file and refuses any other content
            _remember_hf_file(config, ref, revision, {
                "commit": commit, "filename": filename, "sha256": sha, "size": listing.size,
                "base_model": listing.base_model})
        else:
            local = Path(hf_hub_download(ref.repo_id, filename, revision=commit,
                                         cache_dir=cache, endpoint=config.endpoint,
                                         local_files_only=config.is_offline))
        # 4. Online, remember the revision's commit (and the card) for offline runs.
        if not config.is_offline:
            _remember_revision(cache, ref.repo_id, revision, commit)
            if "README.md" in listing.files and local is not None:
                hf_hub_download(ref.repo_id, "README.md", revision=commit, cache_dir=cache,
                                endpoint=config.endpoint)
    except ModelFetchError:
        raise
    except Exception as exc:  # huggingface_hub's HTTP and cache errors
        raise _hf_error(exc, what) from exc
    # 5. A file in the Hugging Face cache: check its hash, then hand it to the store.
    if local is not None:
        sha = sha256_file(local)
        if listing.expected is not None and sha != listing.expected:
            raise ModelFetchError("model_hash_mismatch", f"{what}: {filename} has sha256 "
                                  f"{sha}, not the {listing.expected} the Hub lists for commit "
                                  f"{commit}")
        path, hit = local, config.is_offline
        if store is not None:  # offline, or a file the Hub lists no sha256 for
            path, hit = store(sha, local.stat().st_size, _linked_copy(local))
    return FetchedModel(
        reference=ref.given, canonical=f"hf:{ref.repo_id}@{commit}:{filename}", site="hf",
        path=path, filename=filename, size=path.stat().st_size, sha256=sha, revision=commit,
        base_model=listing.base_model,
        source_url=f"{config.endpoint}/{ref.repo_id}/resolve/{commit}/{filename}",
        fetched_at=_now(), from_cache=hit)


def _hf_listing(ref: ModelReference, config: FetchConfig, cache: Path, what: str,
                revision: str) -> _HfListing:
    """The commit, file and card of the reference: offline from the local snapshot, online from
    the Hub's model info (which also lists the file's LFS sha256 and size, checked against
    the size limit before anything is downloaded)."""
    from huggingface_hub import HfApi, snapshot_download

    assert ref.repo_id is not None
    if config.is_offline:
        folder = Path(snapshot_download(ref.repo_id, revision=revision, cache_dir=cache,
                                        local_files_only=True))
        names = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        filename = ref.filename or _pick_file(names, what)
        base_model = None
        readme = folder / "README.md"
        if readme.is_file():
            from huggingface_hub import ModelCard

            base_model = _card_base_model(ModelCard.load(readme).data)
        return _HfListing(commit=folder.name, filename=filename, base_model=base_model)
    info = HfApi(endpoint=config.endpoint).model_info(
        ref.repo_id, revision=revision, files_metadata=True, timeout=config.timeout)
    commit = info.sha
    if not commit:
        raise ModelFetchError("hub_unavailable", f"{what}: the Hub did not say which "
                              "commit the revision is")
    siblings = {s.rfilename: s for s in info.siblings or []}
    filename = ref.filename or _pick_file(list(siblings), what)
    if filename is not None and filename not in siblings:
        raise ModelFetchError("model_not_found", f"{what}: no file {filename!r} at "
                              f"{revision} ({commit[:12]})")
    listing = _HfListing(commit=commit, filename=filename,
                         base_model=_card_base_model(info.card_data),
                         files=frozenset(siblings))
    if filename is not None:
        sibling = siblings[filename]
        lfs = sibling.lfs
        listing.expected = lfs.sha256 if lfs is not None else None
        listing.size = lfs.size if lfs is not None else sibling.size
        _check_size(listing.size, config, f"{what}: {filename}")
    return listing


def _hf_snapshot(ref: ModelReference, config: FetchConfig, cache: Path, what: str,
                 listing: _HfListing) -> FetchedModel:
    """A reference to a whole diffusers pipeline folder: the CLI fetches its snapshot (weights
    as safetensors only); the service refuses it (it takes single files)."""
    from huggingface_hub import snapshot_download

    assert ref.repo_id is not None
    if not config.allow_snapshot:
        raise ModelFetchError("unsupported_model_file", f"{what} is a diffusers "
                              "pipeline folder; the service takes single .safetensors "
                              "files (a LoRA, a single-file checkpoint): name one with "
                              "hf:REPO[@REV]:FILE, or check the folder with the CLI")
    commit = listing.commit
    folder = Path(snapshot_download(
        ref.repo_id, revision=commit, cache_dir=cache, allow_patterns=SNAPSHOT_PATTERNS,
        endpoint=config.endpoint, local_files_only=config.is_offline))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return FetchedModel(
        reference=ref.given, canonical=f"hf:{ref.repo_id}@{commit}", site="hf",
        path=folder, filename="", size=size, sha256=None, revision=commit,
        base_model=listing.base_model, source_url=f"{config.endpoint}/{ref.repo_id}",
        fetched_at=_now(), from_cache=config.is_offline)


def _hf_download_to_store(ref: ModelReference, config: FetchConfig, store: CacheStore,
                          what: str, listing: _HfListing) -> tuple[Path, bool]:
    """The worker: its content-addressed cache is the cache (bounded by
    CGIDM_MODEL_DISK_BYTES), keyed by the sha256 the Hub lists, so a file cached before is not
    downloaded again, and no second copy stays in the HF cache. Returns (path, cache hit)."""
    from huggingface_hub import hf_hub_download

    assert ref.repo_id is not None and listing.filename is not None
    filename, commit, expected = listing.filename, listing.commit, listing.expected
    repo_id = ref.repo_id  # narrowed to str by the assert, also inside download() below

    def download(part: Path) -> None:
        staging = part.with_name(part.name + ".hf")
        try:
            got = Path(hf_hub_download(repo_id, filename, revision=commit,
                                       local_dir=staging, endpoint=config.endpoint))
            if sha256_file(got) != expected:
                raise ModelFetchError("model_hash_mismatch", f"{what}: {filename} is "
                                      f"not the file the Hub lists for commit {commit} "
                                      f"(sha256 {expected}); nothing was cached")
            os.replace(got, part)
        finally:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)

    assert expected is not None
    return store(expected, listing.size, download)


def _linked_copy(local: Path) -> Callable[[Path], None]:
    """A store filler that hard-links the Hugging Face cache's blob (no second copy on disk on
    the same file system), or copies it."""

    def copy(part: Path) -> None:
        blob = local.resolve()  # the snapshot entry is a symlink into the HF blobs
        part.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.link(blob, part)  # same file system: no second copy on disk
            return
        import shutil

        shutil.copyfile(blob, part)

    return copy


def fetch(ref: ModelReference, config: FetchConfig,
          store: CacheStore | None = None) -> FetchedModel:
    """Fetch (or find in the cache) the model ``ref`` names; :class:`ModelFetchError` if not."""
    if ref.site == "civitai":
        return fetch_civitai(ref, config, store)
    return fetch_hf(ref, config, store)

"""Object storage shared by the gateway and the worker: a local folder or an S3 bucket.

Both backends behave like S3 (flat keys with ``/`` separators, whole-object writes), so code
written against the local folder runs unchanged against MinIO or AWS. Writes are atomic in both:
a reader sees the old object or the new one, never half of one, which is what lets the gateway
read ``job.json`` while the worker rewrites it.
"""

from __future__ import annotations

import builtins  # `list` below is also a method name, so annotations after it say builtins.list
import contextlib
import json
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from cgidm.errors import CgidmServiceError

if TYPE_CHECKING:  # annotations only
    from cgidm.settings import Settings

CHUNK_SIZE = 64 * 1024
#: Size of each part of an S3 multipart upload (S3 wants >= 5 MiB for all parts but the last);
#: the most a streaming upload holds in memory.
S3_PART_BYTES = 8 * 1024 * 1024
_TMP_PREFIX = ".tmp-"
_SEGMENT = re.compile(r"^[A-Za-z0-9._=+@,-]+$")


class StorageError(CgidmServiceError):
    """Storage refused or failed an operation in a way retrying will not fix."""

    code, http_status = "storage_unavailable", 503


class StorageUnavailable(StorageError):
    """Storage cannot be reached right now (network, server down, throttled); worth retrying."""


class ObjectNotFound(StorageError, KeyError):
    """No object under this key."""

    code, http_status = "not_found", 404

    def __str__(self) -> str:  # KeyError would print the repr of the key
        return str(self.args[0]) if self.args else "object not found"


class InvalidKey(StorageError, ValueError):
    """A key that could escape its prefix or is not portable across backends."""


def check_key(key: str, *, prefix: bool = False) -> str:
    """Refuse keys with empty, ``.``/``..`` or unusual segments, so no key escapes the root."""
    body = key[:-1] if prefix and key.endswith("/") else key
    if prefix and body == "":
        return key
    segments = body.split("/")
    for segment in segments:
        if segment in ("", ".", "..") or not _SEGMENT.match(segment):
            raise InvalidKey(f"invalid storage key {key!r}")
    return key


class ObjectWriter(ABC):
    """Streams one object into storage; nobody sees it before :meth:`commit`."""

    #: bytes written so far
    size: int = 0

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def commit(self) -> None:
        """Publish the object (atomically: readers never see part of it)."""

    @abstractmethod
    def abort(self) -> None:
        """Drop everything written; safe to call more than once, and after a failed write."""

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()


class Storage(ABC):
    """The operations the service needs; keys are ``/``-separated relative paths."""

    url: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Write a whole object atomically (replacing any previous one)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read a whole object; :class:`ObjectNotFound` if absent."""

    @abstractmethod
    def open_stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Chunks of an object, for streaming large artifacts; raises :class:`ObjectNotFound`
        before the first chunk, so callers can answer 404 before starting a response."""

    @abstractmethod
    def open_writer(self, key: str, content_type: str | None = None) -> ObjectWriter:
        """A writer for an object too large to hold in memory: ``write`` chunks, then
        ``commit`` (the object appears whole) or ``abort`` (nothing is left behind)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (recursively), sorted."""

    @abstractmethod
    def list_children(self, prefix: str) -> builtins.list[str]:
        """Names of the "folders" directly under ``prefix`` (which ends with ``/``), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; a missing object is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under ``prefix``."""

    @abstractmethod
    def ping(self) -> None:
        """Raise :class:`StorageError` unless storage is reachable and usable."""

    def put_json(self, key: str, document: Any) -> None:
        data = json.dumps(document, indent=2, sort_keys=False).encode()
        self.put_bytes(key, data, content_type="application/json")

    def get_json(self, key: str) -> Any:
        try:
            return json.loads(self.get_bytes(key))
        except json.JSONDecodeError as exc:
            raise StorageError(f"object {key!r} is not valid JSON: {exc}") from exc


class LocalStorage(Storage):
    """A folder on a local disk: temp file + ``os.replace`` make every write atomic."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str, *, prefix: bool = False) -> Path:
        check_key(key, prefix=prefix)
        return self.root / key

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"cannot write {key!r} under {self.root}: {exc}") from exc

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key!r} under {self.root}: {exc}") from exc

    def open_stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key!r} under {self.root}: {exc}") from exc

        def chunks() -> Iterator[bytes]:
            with handle:
                while block := handle.read(chunk_size):
                    yield block

        return chunks()

    def open_writer(self, key: str, content_type: str | None = None) -> ObjectWriter:
        return _LocalWriter(self, key, self._path(key))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        check_key(prefix, prefix=True)
        folder, _, stem = prefix.rpartition("/")
        base = self.root / folder if folder else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def list_children(self, prefix: str) -> builtins.list[str]:
        base = self._path(prefix, prefix=True)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        if prefix.endswith("/"):
            shutil.rmtree(self._path(prefix, prefix=True), ignore_errors=True)
        else:
            for key in self.list(prefix):
                self.delete(key)

    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create storage folder {self.root}: {exc}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"storage folder {self.root} is not writable")


class _LocalWriter(ObjectWriter):
    """A temp file beside the object, renamed over it on commit."""

    def __init__(self, storage: LocalStorage, key: str, path: Path):
        self.key, self.path, self.size = key, path, 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
        except OSError as exc:
            raise StorageError(f"cannot write {key!r} under {storage.root}: {exc}") from exc
        self.tmp = Path(tmp)
        self.handle: Any = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        try:
            self.handle.write(data)
        except OSError as exc:
            self.abort()
            raise StorageError(f"cannot write {self.key!r}: {exc}") from exc
        self.size += len(data)

    def commit(self) -> None:
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise StorageError(f"cannot write {self.key!r}: {exc}") from exc

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()
        self.tmp.unlink(missing_ok=True)


class S3Storage(Storage):
    """An S3 bucket (AWS, MinIO, ...) under an optional key prefix, through boto3.

    botocore retries throttling and 5xx answers itself ("standard" mode); what still fails is
    raised as :class:`StorageUnavailable`, so the worker's task can retry it with a backoff.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        max_attempts: int = 5,
    ):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def _key(self, key: str, *, prefix: bool = False) -> str:
        return self.prefix + check_key(key, prefix=prefix)

    def _translate(self, exc: Exception, key: str) -> StorageError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(key)
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling"):
                return StorageUnavailable(f"S3 {self.url} failed on {key!r}: {code or status}")
            return StorageError(f"S3 {self.url} refused {key!r}: {code} {error.get('Message', '')}")
        return StorageUnavailable(f"S3 {self.url} unreachable ({type(exc).__name__}: {exc})")

    def _call(self, key: str, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, key) from exc

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self._call(key, "put_object", Key=self._key(key), Body=data, **extra)

    def get_bytes(self, key: str) -> bytes:
        response = self._call(key, "get_object", Key=self._key(key))
        return self._read_body(key, response["Body"].read)

    def _read_body(self, key: str, read: Any, *args: Any) -> Any:
        from botocore.exceptions import BotoCoreError

        try:
            return read(*args)
        except (BotoCoreError, OSError) as exc:
            raise StorageUnavailable(f"S3 {self.url}: reading {key!r} broke off: {exc}") from exc

    def open_stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        body = self._call(key, "get_object", Key=self._key(key))["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from self._read_body(key, body.iter_chunks, chunk_size)
            finally:
                body.close()

        return chunks()

    def open_writer(self, key: str, content_type: str | None = None) -> ObjectWriter:
        return _S3MultipartWriter(self, key, content_type)

    def exists(self, key: str) -> bool:
        try:
            self._call(key, "head_object", Key=self._key(key))
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix, prefix=True)
        keys: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self._call(prefix, "list_objects_v2", Prefix=full, **token)
            keys.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def list_children(self, prefix: str) -> builtins.list[str]:
        full = self._key(prefix, prefix=True)
        names: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self._call(
                prefix, "list_objects_v2", Prefix=full, Delimiter="/", **token
            )
            names.extend(
                item["Prefix"][len(full) :].rstrip("/") for item in page.get("CommonPrefixes", [])
            )
            if not page.get("IsTruncated"):
                return sorted(names)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, key: str) -> None:
        self._call(key, "delete_object", Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self.prefix + k} for k in keys[start : start + 1000]]
            self._call(prefix, "delete_objects", Delete={"Objects": batch, "Quiet": True})

    def ping(self) -> None:
        try:
            self._call("", "head_bucket")
        except StorageUnavailable:
            raise
        except StorageError as exc:
            raise StorageUnavailable(f"bucket {self.bucket!r} is not usable: {exc}") from exc


class _S3MultipartWriter(ObjectWriter):
    """An S3 multipart upload. Each full part of :data:`S3_PART_BYTES` is sent by one background
    thread while the next part fills, so reading the client and writing to S3 overlap; memory
    stays at two parts whatever the object's size. Until ``complete_multipart_upload`` no object
    exists; ``abort`` deletes the parts already sent (an upload nobody completes or aborts, from
    a process that died, is removed by the bucket's stale-upload expiry, see docs/SERVICE.md)."""

    def __init__(self, storage: S3Storage, key: str, content_type: str | None):
        from concurrent.futures import ThreadPoolExecutor

        self.storage, self.key, self.size = storage, key, 0
        self.full_key = storage._key(key)
        extra = {"ContentType": content_type} if content_type else {}
        created = storage._call(key, "create_multipart_upload", Key=self.full_key, **extra)
        self.upload_id: str | None = created["UploadId"]
        self.parts: list[dict[str, Any]] = []
        self.buffer = bytearray()
        self.sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-part")
        self.in_flight: Any = None

    def write(self, data: bytes) -> None:
        self.buffer += data
        self.size += len(data)
        while len(self.buffer) >= S3_PART_BYTES:
            part = bytes(self.buffer[:S3_PART_BYTES])
            del self.buffer[:S3_PART_BYTES]
            self._wait()  # at most one part in flight
            self.in_flight = self.sender.submit(self._upload, len(self.parts) + 1, part)
            self.parts.append({"PartNumber": len(self.parts) + 1, "ETag": None})

    def _upload(self, number: int, part: bytes) -> None:
        answer = self.storage._call(self.key, "upload_part", Key=self.full_key,
                                    UploadId=self.upload_id, PartNumber=number, Body=part)
        self.parts[number - 1]["ETag"] = answer["ETag"]

    def _wait(self) -> None:
        future, self.in_flight = self.in_flight, None
        if future is None:
            return
        try:
            future.result()
        except StorageError:
            self.abort()
            raise

    def commit(self) -> None:
        self._wait()
        if self.buffer or not self.parts:  # the last part may be small (or the only one empty)
            number = len(self.parts) + 1
            self.parts.append({"PartNumber": number, "ETag": None})
            try:
                self._upload(number, bytes(self.buffer))
            except StorageError:
                self.abort()
                raise
            self.buffer.clear()
        try:
            self.storage._call(self.key, "complete_multipart_upload", Key=self.full_key,
                               UploadId=self.upload_id, MultipartUpload={"Parts": self.parts})
        except StorageError:
            self.abort()
            raise
        self.upload_id = None
        self.sender.shutdown(wait=False)

    def abort(self) -> None:
        self.buffer = bytearray()
        future, self.in_flight = self.in_flight, None
        if future is not None:  # let the part in flight land, so the abort removes it too
            with contextlib.suppress(Exception):
                future.result()
        self.sender.shutdown(wait=False)
        if self.upload_id is None:
            return
        upload_id, self.upload_id = self.upload_id, None
        with contextlib.suppress(StorageError):
            self.storage._call(self.key, "abort_multipart_upload", Key=self.full_key,
                               UploadId=upload_id)


def open_storage(
    url: str, *, s3_endpoint_url: str | None = None, s3_max_attempts: int = 5
) -> Storage:
    """The backend a URL names: ``file:///abs/path`` or ``s3://bucket[/prefix]``."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"file storage URL must be file:///absolute/path, got {url!r}")
        return LocalStorage(unquote(parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"S3 storage URL must be s3://bucket[/prefix], got {url!r}")
        return S3Storage(
            parsed.netloc,
            parsed.path,
            endpoint_url=s3_endpoint_url,
            max_attempts=s3_max_attempts,
        )
    raise StorageError(
        f"unsupported storage URL {url!r}: use file:///absolute/path or s3://bucket/prefix"
    )


def storage_from_settings(settings: Settings) -> Storage:
    """The storage :class:`cgidm.settings.Settings` describe."""
    return open_storage(
        settings.resolved_storage_url,
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_max_attempts=settings.s3_max_attempts,
    )

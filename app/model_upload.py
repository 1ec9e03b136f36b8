"""Receiving a model upload: the multipart body streamed into storage, checked as it arrives.

A suspect model can be gigabytes (an SDXL-sized single-file checkpoint is about 7 GB), so the
gateway never holds it: the request body is read chunk by chunk (``request.stream()``), parsed
by python-multipart's streaming parser, and the file part goes straight into a storage writer (an
S3 multipart upload of 8 MiB parts, or a temp file renamed on success in a local folder). On the
way it is hashed (sha256) and counted: past ``CGIDM_MAX_MODEL_BYTES`` the read stops with a 413.
Its first bytes are the safetensors header, validated as soon as they are in (a pickle file or a
corrupt header is refused before the rest is read); the tensor names must fit the base's family
and the kind (``cgidm.model_files``). Every refusal, and a client that goes away, aborts the
writer: nothing half-written stays in storage.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from app.errors import ApiError, storage_unavailable
from cgidm.jobs import MAX_PROMPT_CHARS, JobSettings, utcnow
from cgidm.model_files import (
    PICKLE_REFUSAL,
    PICKLE_SUFFIXES,
    ModelFileError,
    SafetensorsHeader,
    check_size,
    classify,
    header_length,
    parse_header,
    prompt_from_metadata,
)
from cgidm.registry import InvalidModelReference, ModelEntry, Registry, UnknownModel
from cgidm.storage import ObjectWriter, StorageError
from cgidm.uploaded_models import UploadedModel, UploadStore, model_id, new_blob_key

log = logging.getLogger("cgidm.gateway")

FILE_FIELD = "file"
TEXT_FIELDS = ("finetuned_from", "name", "kind", "prompt")
MAX_TEXT_BYTES = 16 * 1024
#: File bytes gathered before one hand-off to the storage writer (hashing and writing run in a
#: worker thread, not in the event loop).
FLUSH_BYTES = 1024 * 1024


def _field_error(status: int, name: str, kind: str, msg: str, **extra: Any) -> ApiError:
    headers = {"Connection": "close"} if status == 413 else None
    return ApiError(status, ["body", name], kind, msg, headers=headers, **extra)


def _file_error(exc: ModelFileError, filename: str | None) -> ApiError:
    status = 415 if exc.code == "pickle_checkpoint" else 422
    return _field_error(status, FILE_FIELD, exc.code, str(exc), file=filename)


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)


class _Events:
    """python-multipart's callbacks, queued so the async code can act on them in order."""

    def __init__(self) -> None:
        self.queue: list[tuple[str, Any]] = []
        self._field = b""
        self._value = b""
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._add("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": lambda d, s, e: self.queue.append(("data", bytes(d[s:e]))),
            "on_part_end": lambda: self.queue.append(("end", None)),
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        filename = params.get(b"filename")
        self.queue.append(("part", _Part(
            name=params.get(b"name", b"").decode("latin-1"),
            filename=filename.decode("utf-8", "replace") if filename is not None else None,
            headers=self._headers)))


@dataclass
class UploadOutcome:
    model: UploadedModel
    created: bool


class ModelUpload:
    """One ``POST /models`` request, from the first body byte to the stored record."""

    def __init__(self, registry: Registry, store: UploadStore, owner: str | None,
                 max_bytes: int):
        self.registry, self.store, self.owner, self.max_bytes = registry, store, owner, max_bytes
        self.fields: dict[str, bytearray] = {}
        self.part: _Part | None = None
        self.filename: str | None = None
        self.file_seen = False
        self.file_done = False
        self.size = 0
        self.hasher = hashlib.sha256()
        self.prefix = bytearray()  # the first 8 + header bytes, kept until the header is parsed
        self.header_needed: int | None = None
        self.header: SafetensorsHeader | None = None
        self.pending = bytearray()
        self.writer: ObjectWriter | None = None
        self.blob_key = new_blob_key(owner)
        self.base: ModelEntry | None = None

    # -- the body ----------------------------------------------------------------------------

    async def receive(self, request: Request) -> UploadOutcome:
        content_type = request.headers.get("content-type", "")
        ctype, params = parse_options_header(content_type)
        if ctype != b"multipart/form-data" or not params.get(b"boundary"):
            raise ApiError(415, ["header", "content-type"], "not_multipart",
                           "send the model as multipart/form-data with a `file` part and a "
                           "`finetuned_from` field")
        events = _Events()
        parser = MultipartParser(params[b"boundary"],
                                 events.callbacks())  # type: ignore[arg-type]  # its callback TypedDict
        try:
            try:
                async for chunk in request.stream():
                    try:
                        parser.write(chunk)
                    except Exception as exc:  # python-multipart's parse errors
                        raise ApiError(400, ["body"], "malformed_multipart",
                                       f"the multipart body is malformed ({exc})") from None
                    await self._handle(events.queue)
                    events.queue.clear()
                parser.finalize()
            except ClientDisconnect:
                log.info("model upload: the client went away after %d bytes", self.size)
                raise ApiError(400, ["body"], "client_disconnected",
                               "the upload was interrupted; nothing was stored") from None
            await self._handle(events.queue)
            return await self._finish()
        except BaseException:
            await self._abort()
            raise

    async def _handle(self, queue: list[tuple[str, Any]]) -> None:
        for kind, value in queue:
            if kind == "part":
                await self._part_begin(value)
            elif kind == "data":
                await self._part_data(value)
            elif kind == "end":
                await self._part_end()

    async def _part_begin(self, part: _Part) -> None:
        self.part = part
        if part.filename is None:
            if part.name not in TEXT_FIELDS:
                raise _field_error(422, part.name, "unknown_field", f"unknown field "
                                   f"{part.name[:40]!r}; POST /models takes file, "
                                   + ", ".join(TEXT_FIELDS))
            if part.name in self.fields:
                raise _field_error(422, part.name, "duplicate_field",
                                   f"field {part.name!r} given twice")
            self.fields[part.name] = bytearray()
            return
        if part.name != FILE_FIELD:
            raise _field_error(422, part.name, "unknown_field", f"the model file goes in the "
                               f"`file` field, not {part.name[:40]!r}")
        if self.file_seen:
            raise _field_error(422, FILE_FIELD, "too_many_files", "one model file per upload")
        self.file_seen = True
        self.filename = part.filename
        if part.filename.lower().endswith(PICKLE_SUFFIXES):
            raise _field_error(415, FILE_FIELD, "pickle_checkpoint",
                               f"{part.filename}: {PICKLE_REFUSAL}", file=part.filename)
        if "finetuned_from" in self.fields:  # fields sent first: refuse a bad base before
            self._resolve_base()             # a byte of the file is stored
        try:
            self.writer = await run_in_threadpool(
                self.store.storage.open_writer, self.blob_key, "application/octet-stream")
        except StorageError as exc:
            raise storage_unavailable(exc) from exc

    async def _part_data(self, data: bytes) -> None:
        part = self.part
        if part is None:
            return
        if part.filename is None:
            buffer = self.fields[part.name]
            buffer += data
            if len(buffer) > MAX_TEXT_BYTES:
                raise _field_error(413, part.name, "field_too_large",
                                   f"field {part.name!r} is larger than {MAX_TEXT_BYTES} bytes")
            return
        self.size += len(data)
        if self.size > self.max_bytes:
            raise _field_error(413, FILE_FIELD, "file_too_large",
                               f"{self.filename}: larger than {self.max_bytes} bytes "
                               "(CGIDM_MAX_MODEL_BYTES); nothing was stored",
                               file=self.filename)
        if self.header is None:
            self._read_header(data)
        self.pending += data
        if len(self.pending) >= FLUSH_BYTES:
            await self._flush()

    def _read_header(self, data: bytes) -> None:
        self.prefix += data
        try:
            if self.header_needed is None and len(self.prefix) >= 8:
                self.header_needed = 8 + header_length(bytes(self.prefix[:8]))
            if self.header_needed is not None and len(self.prefix) >= self.header_needed:
                self.header = parse_header(bytes(self.prefix[8:self.header_needed]))
                self.prefix = bytearray()
                if self.header.file_bytes > self.max_bytes:
                    raise _field_error(413, FILE_FIELD, "file_too_large",
                                       f"{self.filename}: its header describes "
                                       f"{self.header.file_bytes} bytes, more than "
                                       f"{self.max_bytes} (CGIDM_MAX_MODEL_BYTES)",
                                       file=self.filename)
                if self.base is not None:
                    classify(self.header.names, self.base.family, self._text("kind"),
                             self.header.metadata)
        except ModelFileError as exc:
            raise _file_error(exc, self.filename) from None

    async def _part_end(self) -> None:
        if self.part is not None and self.part.filename is not None:
            self.file_done = True
            await self._flush()
        self.part = None

    async def _flush(self) -> None:
        if not self.pending or self.writer is None:
            return
        chunk, self.pending = bytes(self.pending), bytearray()
        writer, hasher = self.writer, self.hasher

        def write() -> None:
            hasher.update(chunk)
            writer.write(chunk)

        try:
            await run_in_threadpool(write)
        except StorageError as exc:
            raise ApiError(503, [], "storage_unavailable",
                           f"storage failed during the upload: {exc}; nothing was stored") from exc

    async def _abort(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            await run_in_threadpool(writer.abort)

    # -- the end -----------------------------------------------------------------------------

    def _text(self, name: str) -> str | None:
        raw = self.fields.get(name)
        if raw is None:
            return None
        try:
            value = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise _field_error(422, name, "invalid_text", f"{name} is not UTF-8 text") from None
        return value or None

    def _resolve_base(self) -> ModelEntry:
        ref = self._text("finetuned_from")
        if ref is None:
            raise _field_error(422, "finetuned_from", "missing",
                               "finetuned_from is required: the registry id of the base model "
                               "the upload was fine-tuned from (GET /models)")
        try:
            base = self.registry.get(ref)
        except InvalidModelReference as exc:
            raise _field_error(422, "finetuned_from", "invalid_model_reference",
                               str(exc)) from None
        except UnknownModel as exc:
            raise _field_error(422, "finetuned_from", "unknown_model", str(exc)) from None
        if base.finetuned_from is not None:
            raise _field_error(422, "finetuned_from", "not_a_base",
                               f"{ref!r} is itself a fine-tune of {base.finetuned_from!r}; "
                               "name the base model")
        self.base = base
        return base

    def _prompt(self, header: SafetensorsHeader) -> tuple[str | None, str]:
        prompt = self._text("prompt")
        if prompt is not None:
            try:
                JobSettings.model_validate({"pretrained": "x", "finetuned": "x",
                                            "prompt": prompt[:MAX_PROMPT_CHARS + 1]})
            except ValidationError as exc:
                msg = exc.errors()[0].get("msg", "invalid prompt")
                raise _field_error(422, "prompt", "invalid_prompt", f"prompt: {msg}") from None
            return prompt, "upload"
        found = prompt_from_metadata(header.metadata)
        return (found, "file_metadata") if found else (None, "none")

    async def _finish(self) -> UploadOutcome:
        if not self.file_seen or not self.file_done:
            raise _field_error(422, FILE_FIELD, "missing", "no model file: send it in the "
                               "`file` part of a multipart/form-data body")
        base = self.base or self._resolve_base()
        header = self.header
        try:
            if header is None:
                raise ModelFileError("corrupt_safetensors", f"the file has only {self.size} "
                                     "bytes, less than its safetensors header")
            check_size(header, self.size)
            kind = classify(header.names, base.family, self._text("kind"), header.metadata)
        except ModelFileError as exc:
            raise _file_error(exc, self.filename) from None
        prompt, source = self._prompt(header)
        name = self._text("name") or self.filename
        if name is not None and len(name) > 200:
            raise _field_error(422, "name", "too_long", "name: at most 200 characters")
        sha256 = self.hasher.hexdigest()
        ref = model_id(self.owner, sha256)
        existing = await run_in_threadpool(self.store.find, self.owner, ref)
        if existing is not None and existing.finetuned_from != base.id:
            raise _field_error(409, "finetuned_from", "already_uploaded",
                               f"this file is already your model {ref} as a fine-tune of "
                               f"{existing.finetuned_from!r}; delete it first to register it "
                               f"against {base.id!r}")
        writer, self.writer = self.writer, None
        if existing is not None:  # the same file again: one model
            if writer is not None:
                await run_in_threadpool(writer.abort)
            return UploadOutcome(existing, created=False)
        record = UploadedModel(
            id=ref, sha256=sha256, kind=kind, family=base.family, finetuned_from=base.id,
            size_bytes=self.size, prompt=prompt, prompt_source=source, name=name,
            filename=self.filename, created_at=utcnow(), tensors=len(header.tensors),
            dtypes=header.dtypes(), owner=self.owner, blob_key=self.blob_key)
        try:
            assert writer is not None
            await run_in_threadpool(writer.commit)
            await run_in_threadpool(self.store.save, record)
        except StorageError as exc:
            await run_in_threadpool(self.store.discard_blob, self.blob_key)
            raise ApiError(503, [], "storage_unavailable",
                           f"storage failed while saving the upload: {exc}; nothing was "
                           "stored") from exc
        log.info("model %s uploaded by %s: %s, %d bytes, sha256 %s", ref, self.owner or "local",
                 kind, self.size, sha256)
        return UploadOutcome(record, created=True)

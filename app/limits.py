"""Refusing submissions early: before the body is read when possible, else while it streams in.

Starlette parses a multipart body completely (spooling files to disk) before the route runs, so
size limits checked in the route would come after a client had pushed gigabytes at us. This ASGI
middleware sits in front of the app and, for ``POST /authenticate``:

1. refuses a declared ``Content-Length`` above ``CGIDM_MAX_REQUEST_BYTES`` without reading it;
2. authenticates the caller (401/403) before reading the body;
3. answers 429 + ``Retry-After`` when the queue already holds ``CGIDM_MAX_QUEUE_DEPTH`` jobs,
   counting submissions admitted but not yet enqueued (``app/admission.py``), and 503 when the
   broker cannot be asked;
4. watches the body as it streams: a file part past ``CGIDM_MAX_UPLOAD_BYTES``, more than
   ``CGIDM_MAX_FILES`` files, or a body past ``CGIDM_MAX_REQUEST_BYTES`` stops the read at once
   and answers 413 (422 for too many files), whatever the client declared.

``POST /models`` (a model upload, up to gigabytes) is authenticated before its body is read and
gets ``CGIDM_MAX_MODEL_BYTES`` plus room for its form fields as its total limit; the route itself
counts the file while streaming it to storage (``app/model_upload.py``). Every other route only
gets the total body limit. The route itself stores nothing until all
inputs are validated, so a refusal here leaves nothing in storage.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp

from app.admission import QueueFull
from app.auth import caller_of
from app.errors import ApiError
from cgidm.job_queue import BrokerUnavailable

if TYPE_CHECKING:  # annotations only
    from app.services import Services

log = logging.getLogger("cgidm.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SUBMIT_PATH = "/authenticate"
MODELS_PATH = "/models"
#: Room for the text fields and multipart framing around a model file of the largest size.
MODEL_FORM_OVERHEAD = 1024 * 1024
FILE_FIELDS = ("images", "controls")
#: Text fields (model ids, numbers, the prompt) are small; anything larger is not a setting.
MAX_FIELD_BYTES = 16 * 1024


class PartCounter:
    """Counts the bytes of each multipart part as the body streams through ``feed``."""

    def __init__(self, content_type: str, max_file_bytes: int, max_files: int):
        self.max_file_bytes, self.max_files = max_file_bytes, max_files
        self.error: ApiError | None = None
        self.files = 0
        self._field = b""
        self._value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._filename: str | None = None
        self._size = 0
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        self.parser: MultipartParser | None = None
        if boundary:
            self.parser = MultipartParser(boundary, {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
            })

    def feed(self, chunk: bytes) -> None:
        """Raise the first :class:`ApiError` the bytes seen so far justify."""
        if self.parser is None or self.error is not None or not chunk:
            return
        try:
            self.parser.write(chunk)
        except ApiError as exc:
            self.error = exc
        except Exception:  # a malformed body: Starlette's own parser will say so (400/422)
            self.parser = None
        if self.error is not None:
            raise self.error

    def _part_begin(self) -> None:
        self._headers, self._size, self._name, self._filename = {}, 0, "", None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("latin-1")
        filename = params.get(b"filename")
        self._filename = filename.decode("utf-8", "replace") if filename is not None else None
        if self._filename is not None:
            self.files += 1
            if self.files > self.max_files:
                field = self._name if self._name in FILE_FIELDS else "images"
                raise ApiError(422, ["body", field], "too_many_files",
                               f"more than {self.max_files} files; at most {self.max_files} "
                               "images + controls per job (CGIDM_MAX_FILES)")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._filename is not None and self._size > self.max_file_bytes:
            raise ApiError(413, ["body", self._name], "file_too_large",
                           f"{self._filename}: larger than {self.max_file_bytes} bytes "
                           "(CGIDM_MAX_UPLOAD_BYTES)", file=self._filename)
        if self._filename is None and self._size > MAX_FIELD_BYTES:
            raise ApiError(413, ["body", self._name], "field_too_large",
                           f"field {self._name!r} is larger than {MAX_FIELD_BYTES} bytes")


class SubmissionGate:
    """ASGI middleware applying the limits above; see the module docstring."""

    def __init__(self, app: ASGIApp, services: Services):
        self.app = app
        self.services = services
        self.settings = services.settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        upload = scope["method"] == "POST" and scope["path"] == MODELS_PATH
        limit, setting = ((settings.max_model_bytes + MODEL_FORM_OVERHEAD,
                           "CGIDM_MAX_MODEL_BYTES + 1 MiB of form fields") if upload else
                          (settings.max_request_bytes, "CGIDM_MAX_REQUEST_BYTES"))
        if length is not None and length.isdigit() and int(length) > limit:
            response = ApiError(413, ["body"], "request_too_large",
                                f"request body of {length} bytes exceeds "
                                f"{limit} bytes ({setting})").response()
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        counter = None
        reservation = None
        if upload:  # a model upload: who is calling, before gigabytes are read
            try:
                caller_of(settings, Request(scope))
            except ApiError as exc:
                await exc.response()(scope, receive, send)
                return
        if scope["method"] == "POST" and scope["path"] == SUBMIT_PATH:
            try:
                caller_of(settings, Request(scope))
                reservation = await self._admit()
            except ApiError as exc:
                await exc.response()(scope, receive, send)
                return
            content_type = headers.get("content-type", "")
            if content_type.lower().startswith("multipart/form-data"):
                counter = PartCounter(content_type, settings.max_upload_bytes,
                                      settings.max_files)
        if reservation is None:
            await self._guarded(scope, receive, send, counter, limit, setting)
            return
        held = [reservation]

        async def release() -> None:
            if held:
                await run_in_threadpool(self._release, held.pop())

        async def answer(message: Message) -> None:
            # When the answer starts, the job is in the queue or was refused: the place is given
            # back BEFORE the client can read the answer, so its next submission does not meet
            # this one counted twice (once queued, once reserved) and get a 429 at the border.
            if message["type"] == "http.response.start":
                await release()
            await send(message)

        try:
            await self._guarded(scope, receive, answer, counter, limit, setting)
        finally:
            await release()  # no answer was started (the client went away, the app failed)

    async def _admit(self) -> str:
        """Reserve a place in the queue for this submission (429 when there is none)."""
        limit = self.settings.max_queue_depth
        try:
            return await run_in_threadpool(self.services.admission.reserve,
                                           self.services.queue_depth, limit)
        except QueueFull as full:
            retry = self.settings.queue_retry_after
            raise ApiError(429, [], "queue_full",
                           f"{full.waiting} jobs are waiting or being submitted (limit {limit}, "
                           f"CGIDM_MAX_QUEUE_DEPTH); try again in {retry} s",
                           headers={"Retry-After": str(retry)}) from full
        except BrokerUnavailable as exc:  # we cannot promise to run the job
            log.warning("queue depth unknown, refusing the submission: %s", exc)
            raise ApiError(503, [], "broker_unavailable",
                           "the job queue is unavailable, try again later") from exc

    def _release(self, reservation: str) -> None:
        try:
            self.services.admission.release(reservation)
        except BrokerUnavailable as exc:  # the reservation expires by itself (RESERVATION_TTL)
            log.warning("could not release queue reservation %s: %s", reservation, exc)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send,
                       counter: PartCounter | None, limit: int, setting: str) -> None:
        received = 0
        refused: ApiError | None = None
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused is not None:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                received += len(body)
                try:
                    if received > limit:
                        raise ApiError(413, ["body"], "request_too_large",
                                       f"request body exceeds {limit} bytes ({setting})")
                    if counter is not None:
                        counter.feed(body)
                except ApiError as exc:
                    refused = exc
                    # The app sees the client go away and stops reading; nothing was stored.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused is not None and not started:
                return  # whatever the app answers to the cut body, ours replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if refused is None or started:
                raise
        if refused is not None and not started:
            response = refused.response()
            response.headers["Connection"] = "close"
            await response(scope, receive, send)

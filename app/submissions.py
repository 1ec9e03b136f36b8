"""Submitting a check: the one service function behind ``POST /authenticate``.

The route reads the HTTP request (its form fields and its files, each within the upload limit)
and hands plain values to :func:`submit_check`, which validates everything, stores the job and
queues it. Nothing here knows about HTTP requests, so tests call it directly, and any other front
end that submits jobs in-process does the same. Everything is validated before anything is
stored, so a refused submission leaves no object behind.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from app.auth import Caller
from app.errors import ApiError, storage_unavailable
from app.schemas import JobAccepted
from app.services import Services
from app.uploads import decode_image
from cgidm import content_credentials
from cgidm.job_queue import BrokerUnavailable
from cgidm.jobs import InputFile, JobRecord, JobSettings, input_key, new_job_id, safe_name, utcnow
from cgidm.model_refs import (
    AUTO_BASE,
    ModelReferenceError,
    looks_like_reference,
    parse_reference,
)
from cgidm.registry import InvalidModelReference, UnknownModel
from cgidm.storage import StorageError
from cgidm_core.names import FEATURE_METRICS

log = logging.getLogger("cgidm.gateway")


@dataclass(frozen=True)
class SubmittedFile:
    """One uploaded file as received: its form field (``images`` or ``controls``), its position
    in that field, the client's file name and the bytes."""

    field: str
    index: int
    filename: str | None
    data: bytes


def submit_check(services: Services, caller: Caller, settings: JobSettings,
                 images: Sequence[SubmittedFile],
                 controls: Sequence[SubmittedFile] = ()) -> JobAccepted:
    """Validate a check (files, models, images), store it and queue it; returns what the client
    is told (202). Raises :class:`~app.errors.ApiError` (4xx/503) with nothing stored."""
    # 1. No more files than a job may hold (CGIDM_MAX_FILES).
    max_files = services.settings.max_files
    if len(images) + len(controls) > max_files:
        raise ApiError(422, ["body", "images"], "too_many_files",
                       f"{len(images) + len(controls)} files; at most {max_files} "
                       "images + controls per job (CGIDM_MAX_FILES)")
    # 2. The models exist and the caller may use them; what the job is routed by.
    route_by = check_models(services, settings, caller)
    # 3. Every file is an image the worker can read: re-encoded as PNG, its credentials read.
    job_id = new_job_id()
    inputs, files, notes = _decoded_inputs(services, job_id, [*images, *controls])
    # 4. Store the job, queue it (removing it again if the queue is down), index it.
    record = JobRecord(job_id=job_id, created_at=utcnow(), settings=settings, inputs=inputs,
                       owner=caller.name, queue_key=route_by)
    _store_and_queue(services, record, files, route_by)
    log.info("job %s accepted for %s: %d images, %d controls", job_id, caller.name or "local",
             len(images), len(controls))
    return JobAccepted(job_id=job_id, status_url=f"/jobs/{job_id}", warnings=notes)


def _decoded_inputs(services: Services, job_id: str, uploads: Sequence[SubmittedFile]
                    ) -> tuple[list[InputFile], list[tuple[str, bytes]], list[str]]:
    """The job's input records, the PNGs to store under their keys, and the warnings (an
    animated image's later frames are dropped, ...)."""
    taken: set[str] = set()
    inputs: list[InputFile] = []
    files: list[tuple[str, bytes]] = []
    notes: list[str] = []
    for upload in uploads:
        role: Literal["image", "control"] = "image" if upload.field == "images" else "control"
        decoded = decode_image(upload.field, upload.filename or f"{upload.field}[{upload.index}]",
                               upload.data, services.settings.max_image_pixels)
        # read here: the stored PNG no longer carries the upload's C2PA manifest
        credentials = content_credentials.read(upload.data)
        name = safe_name(upload.filename, taken)
        key = input_key(job_id, role, upload.index, name)
        inputs.append(InputFile(name=name, role=role, key=key, filename=upload.filename,
                                width=decoded.width, height=decoded.height,
                                frames=decoded.frames,
                                sha256=hashlib.sha256(upload.data).hexdigest(),
                                content_credentials=credentials))
        files.append((key, decoded.png))
        notes.extend(decoded.warnings)
    return inputs, files, notes


def _store_and_queue(services: Services, record: JobRecord, files: list[tuple[str, bytes]],
                     route_by: str) -> None:
    """Store the job and its files, then queue it. A queue that cannot be reached removes the job
    again (503, nothing stored); the recent-jobs index is best effort."""
    job_id = record.job_id
    try:
        services.store.create(record, files)
    except StorageError as exc:  # create() removed what it had written
        raise storage_unavailable(exc) from exc
    try:
        services.enqueue(job_id, record.settings.pretrained, route_by)
    except BrokerUnavailable as exc:  # the job never reached a worker
        log.error("job %s could not be enqueued (%s); removing it", job_id, exc)
        services.store.delete_job_quietly(job_id)
        raise ApiError(503, [], "broker_unavailable",
                       "the job queue is unavailable, try again later; nothing was "
                       "stored") from exc
    try:  # the caller's recent-jobs list; the job itself is accepted either way
        services.store.index_job(record)
    except StorageError as exc:
        log.warning("job %s: not added to the recent-jobs index (%s)", job_id, exc)


def check_models(services: Services, settings: JobSettings, caller: Caller) -> str:
    """Registry ids, and for ``finetuned`` also the caller's own uploads (another key's upload
    is an unknown id, the same answer as for one that does not exist). Returns what the job is
    routed by: the fine-tune's id, or an upload's content hash (the same bytes uploaded by two
    keys go to the worker that has them loaded), or a hub reference's canonical form."""
    if settings.metric in FEATURE_METRICS and services.settings.feature_model is None:
        raise ApiError(422, ["body", "metric"], "metric_unavailable",
                       f"metric {settings.metric!r} needs a feature model, and this service has "
                       "none configured (CGIDM_FEATURE_MODEL); use ssim, psnr or mse")
    if looks_like_reference(settings.finetuned):
        return _check_reference(services, settings, caller)
    registry = services.resolver(caller.name)
    for field in ("pretrained", "finetuned"):
        try:
            registry.get(getattr(settings, field))
        except InvalidModelReference as exc:
            raise ApiError(422, ["body", field], "invalid_model_reference", str(exc)) from None
        except UnknownModel as exc:
            raise ApiError(422, ["body", field], "unknown_model", str(exc)) from None
        except StorageError as exc:
            raise storage_unavailable(exc) from exc
    try:
        _, tuned = registry.check_pair(settings.pretrained, settings.finetuned)
    except UnknownModel as exc:
        raise ApiError(422, ["body", "finetuned"], "incompatible_pair", str(exc)) from None
    except StorageError as exc:
        raise storage_unavailable(exc) from exc
    return getattr(tuned, "sha256", None) or settings.finetuned


def _check_reference(services: Services, settings: JobSettings, caller: Caller) -> str:
    """A suspect named by hub reference: the gateway checks its syntax and that the caller may
    name models on its host (CGIDM_MODEL_HOSTS), and that ``pretrained`` is a registered base;
    the worker fetches it (the gateway never downloads weights). Routed by the canonical form,
    so the same model named two ways goes to the worker that has it."""
    try:
        ref = parse_reference(settings.finetuned)
    except ModelReferenceError as exc:
        raise ApiError(422, ["body", "finetuned"], "invalid_model_reference", str(exc)) from None
    allowed = services.settings.hosts_for(caller.name)
    if ref.host not in allowed:
        hint = (f"this service lets you name models on {', '.join(sorted(allowed))} only"
                if allowed else "this service accepts no hub references from your key")
        raise ApiError(403, ["body", "finetuned"], "remote_model_not_allowed",
                       f"{hint} (operator setting CGIDM_MODEL_HOSTS); upload the file instead "
                       "(POST /models)")
    if settings.pretrained == AUTO_BASE:  # the worker takes the base the hub page records
        return ref.canonical
    try:
        base = services.resolver(caller.name).get(settings.pretrained)
    except InvalidModelReference as exc:
        raise ApiError(422, ["body", "pretrained"], "invalid_model_reference", str(exc)) from None
    except UnknownModel as exc:
        raise ApiError(422, ["body", "pretrained"], "unknown_model", str(exc)) from None
    except StorageError as exc:
        raise storage_unavailable(exc) from exc
    if getattr(base, "finetuned_from", None) is not None or getattr(base, "sha256", None):
        raise ApiError(422, ["body", "pretrained"], "not_a_base", f"{settings.pretrained!r} is "
                       "a fine-tune; name the registered base model the suspect was made from")
    return ref.canonical

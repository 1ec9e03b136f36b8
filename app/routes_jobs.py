"""Submitting jobs, following them, cancelling them and fetching their pictures."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.errors import ApiError
from app.schemas import ErrorBody, JobAccepted, JobView
from app.services import Services, get_services
from app.uploads import decode_image
from cgidm.jobs import (
    ARTIFACT_KINDS,
    FEATURE_METRICS,
    InputFile,
    JobError,
    JobNotFound,
    JobRecord,
    JobSettings,
    input_key,
    is_job_id,
    new_job_id,
    safe_name,
    utcnow,
)
from cgidm.registry import InvalidModelReference, UnknownModel
from cgidm.storage import ObjectNotFound, StorageError

log = logging.getLogger("cgidm.gateway")
router = APIRouter(tags=["jobs"])

_ERRORS = {
    404: {"model": ErrorBody, "description": "No such job or artifact."},
    422: {"model": ErrorBody, "description": "A field is invalid; `loc` names it."},
}
_FILE_FIELDS = {"images", "controls"}


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, ["path", "job_id"], "not_found", f"no job with id {job_id!r}")


def _storage_down(exc: Exception) -> ApiError:
    return ApiError(503, [], "storage_unavailable", f"storage is unavailable: {exc}")


def _check_models(services: Services, settings: JobSettings) -> None:
    registry = services.registry()
    for field in ("pretrained", "finetuned"):
        try:
            registry.get(getattr(settings, field))
        except InvalidModelReference as exc:
            raise ApiError(422, ["body", field], "invalid_model_reference", str(exc)) from None
        except UnknownModel as exc:
            raise ApiError(422, ["body", field], "unknown_model", str(exc)) from None
    try:
        registry.check_pair(settings.pretrained, settings.finetuned)
    except UnknownModel as exc:
        raise ApiError(422, ["body", "finetuned"], "incompatible_pair", str(exc)) from None
    if settings.metric in FEATURE_METRICS and services.settings.feature_model is None:
        raise ApiError(422, ["body", "metric"], "metric_unavailable",
                       f"metric {settings.metric!r} needs a feature model, and this service has "
                       "none configured (CGIDM_FEATURE_MODEL); use ssim, psnr or mse")


async def _read_limited(field: str, upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, ["body", field], "file_too_large",
                       f"{upload.filename}: larger than {limit} bytes (CGIDM_MAX_UPLOAD_BYTES)",
                       file=upload.filename)
    return data


@router.post(
    "/authenticate",
    status_code=202,
    response_model=JobAccepted,
    responses={**_ERRORS, 413: {"model": ErrorBody}, 503: {"model": ErrorBody}},
    summary="Submit images (and optional known non-member controls) for authentication",
)
async def authenticate(
    request: Request,
    response: Response,
    settings: Annotated[JobSettings, Form()],
    images: Annotated[list[UploadFile], File(description="Suspect images (1 or more).")],
    controls: Annotated[
        list[UploadFile] | None,
        File(description="Known non-members of the same kind (0 or more): they give each "
             "image a p-value and the set a Mann-Whitney U test."),
    ] = None,
    services: Services = Depends(get_services),
) -> JobAccepted:
    controls = controls or []
    form = await request.form()
    for key in form:
        if key not in _FILE_FIELDS and key not in JobSettings.model_fields:
            raise ApiError(422, ["body", key], "unknown_field", f"unknown field {key!r}")
    limits = services.settings
    if len(images) + len(controls) > limits.max_files:
        raise ApiError(422, ["body", "images"], "too_many_files",
                       f"{len(images) + len(controls)} files; at most {limits.max_files} "
                       "images + controls per job (CGIDM_MAX_FILES)")
    _check_models(services, settings)

    job_id = new_job_id()
    taken: set[str] = set()
    inputs: list[InputFile] = []
    files: list[tuple[str, bytes]] = []
    for field, uploads in (("images", images), ("controls", controls)):
        role = "image" if field == "images" else "control"
        for index, upload in enumerate(uploads):
            filename = upload.filename or f"{field}[{index}]"
            data = await _read_limited(field, upload, limits.max_upload_bytes)
            decoded = await run_in_threadpool(
                decode_image, field, filename, data, limits.max_image_pixels)
            name = safe_name(upload.filename, taken)
            key = input_key(job_id, role, index, name)
            inputs.append(InputFile(name=name, role=role, key=key, filename=upload.filename,
                                    width=decoded.width, height=decoded.height))
            files.append((key, decoded.png))

    record = JobRecord(job_id=job_id, created_at=utcnow(), settings=settings, inputs=inputs)
    try:
        await run_in_threadpool(services.store.create, record, files)
    except StorageError as exc:
        raise _storage_down(exc) from exc
    try:
        await run_in_threadpool(services.enqueue, job_id)
    except Exception as exc:  # the broker is down: the job never reached a worker
        log.error("job %s could not be enqueued: %s", job_id, exc)
        record.status, record.finished_at = "failed", utcnow()
        record.error = JobError(code="broker_unavailable", message=f"not enqueued: {exc}")
        await run_in_threadpool(services.store.save, record)
        raise ApiError(503, [], "broker_unavailable",
                       f"the job queue is unavailable, try again later ({exc})") from exc
    status_url = f"/jobs/{job_id}"
    response.headers["Location"] = status_url
    return JobAccepted(job_id=job_id, status_url=status_url)


def _view(services: Services, record: JobRecord) -> JobView:
    cancel = False if record.terminal else services.store.cancel_requested(record.job_id)
    status = "cancelled" if record.status == "queued" and cancel else record.status
    return JobView(**{**record.model_dump(), "status": status},
                   status_url=f"/jobs/{record.job_id}", cancel_requested=cancel)


def _load(services: Services, job_id: str) -> JobRecord:
    if not is_job_id(job_id):
        raise _not_found(job_id)
    try:
        return services.store.load(job_id)
    except JobNotFound:
        raise _not_found(job_id) from None
    except StorageError as exc:
        raise _storage_down(exc) from exc


@router.get("/jobs/{job_id}", response_model=JobView, responses=_ERRORS,
            summary="Status, progress and (when done) the result of a job")
def get_job(job_id: str, services: Services = Depends(get_services)) -> JobView:
    return _view(services, _load(services, job_id))


@router.delete(
    "/jobs/{job_id}",
    response_model=JobView,
    responses={**_ERRORS, 202: {"model": JobView, "description": "Running; stops shortly."},
               409: {"model": ErrorBody, "description": "Already finished."}},
    summary="Cancel a job",
)
def cancel_job(job_id: str, services: Services = Depends(get_services)) -> JSONResponse:
    """A queued job is cancelled at once (200); a running job stops within a few PGD steps and
    ends ``cancelled`` (202 now, poll to see it end)."""
    record = _load(services, job_id)
    if record.status in ("succeeded", "failed"):
        raise ApiError(409, ["path", "job_id"], "already_finished",
                       f"job {job_id} already {record.status}; only queued or running jobs "
                       "can be cancelled")
    if not record.terminal:
        try:
            services.store.request_cancel(job_id)
        except StorageError as exc:
            raise _storage_down(exc) from exc
    view = _view(services, record)
    code = 202 if record.status == "running" else 200
    return JSONResponse(view.model_dump(mode="json"), status_code=code)


@router.get(
    "/jobs/{job_id}/artifacts/{name}/{filename}",
    response_class=StreamingResponse,
    responses={200: {"content": {"image/png": {}}}, **_ERRORS},
    summary="A picture of a finished job: recovered.png, partial.png or side_by_side.png",
)
def get_artifact(job_id: str, name: str, filename: str,
                 services: Services = Depends(get_services)) -> StreamingResponse:
    record = _load(services, job_id)
    if filename not in {f"{kind}.png" for kind in ARTIFACT_KINDS}:
        raise ApiError(404, ["path", "filename"], "not_found",
                       f"no artifact {filename!r}; artifacts are "
                       + ", ".join(f"{k}.png" for k in ARTIFACT_KINDS))
    if record.status != "succeeded" or name not in {item.name for item in record.inputs}:
        raise ApiError(404, ["path", "name"], "not_found",
                       f"job {job_id} has no artifacts for {name!r} (status {record.status})")
    key = f"jobs/{job_id}/artifacts/{name}/{filename}"
    try:
        chunks = services.store.storage.open_stream(key)
    except ObjectNotFound:
        raise ApiError(404, ["path", "name"], "not_found", f"artifact {key} is missing") from None
    except StorageError as exc:
        raise _storage_down(exc) from exc
    return StreamingResponse(chunks, media_type="image/png")

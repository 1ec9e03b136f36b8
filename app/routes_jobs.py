"""Submitting jobs, following them, cancelling them and fetching their pictures."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.auth import Caller, CallerDep, caller_of
from app.errors import ApiError, storage_unavailable
from app.openapi import PNG_RESPONSE
from app.schemas import ErrorBody, JobAccepted, JobList, JobSummary, JobView
from app.services import Services, ServicesDep
from app.submissions import SubmittedFile, submit_check
from cgidm.jobs import (
    STORED_KINDS,
    ArtifactLinks,
    JobNotFound,
    JobRecord,
    JobSettings,
    artifact_key,
    artifact_url,
    is_job_id,
)
from cgidm.storage import ObjectNotFound, StorageError

log = logging.getLogger("cgidm.gateway")
router = APIRouter(tags=["jobs"])

#: The error answers every job route documents (FastAPI's ``responses`` shape).
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No API key, or an unknown one "
          "(`WWW-Authenticate: Bearer`)."},
    403: {"model": ErrorBody, "description": "No keys are configured and the caller is not on "
          "this machine."},
    404: {"model": ErrorBody, "description": "No such job or artifact (or another key's)."},
    422: {"model": ErrorBody, "description": "A field is invalid; `loc` names it."},
}
_FILE_FIELDS = {"images", "controls"}


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, ["path", "job_id"], "not_found", f"no job with id {job_id!r}")


async def _read_limited(field: str, upload: UploadFile, limit: int) -> bytes:
    # SubmissionGate (app.limits) already cut the body at the limit while it streamed in.
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
    responses={**_ERRORS, 413: {"model": ErrorBody, "description": "A file or the request is "
                                "too large (refused while it streams in)."},
               429: {"model": ErrorBody, "description": "The queue is full; retry after "
                     "`Retry-After` seconds."},
               503: {"model": ErrorBody, "description": "Broker or storage unavailable; nothing "
                     "was stored."}},
    summary="Submit images (and optional known non-member controls) for authentication",
)
async def authenticate(
    request: Request,
    response: Response,
    settings: Annotated[JobSettings, Form()],
    images: Annotated[list[UploadFile], File(description="Suspect images (1 or more).")],
    services: ServicesDep,
    caller: CallerDep,
    controls: Annotated[
        list[UploadFile] | None,
        File(description="Known non-members of the same kind (0 or more): they give each "
             "image a p-value and the set a Mann-Whitney U test."),
    ] = None,
) -> JobAccepted:
    """Everything is validated before anything is stored: a refused request leaves no object
    behind. Animated images are accepted with their first frame (see `warnings`)."""
    # 1. A form field the schema does not know is refused, not ignored.
    for key in await request.form():
        if key not in _FILE_FIELDS and key not in JobSettings.model_fields:
            raise ApiError(422, ["body", key], "unknown_field", f"unknown field {key!r}")
    # 2. Read every file within CGIDM_MAX_UPLOAD_BYTES (413 past it).
    limit = services.settings.max_upload_bytes
    files = {field: [SubmittedFile(field, index, upload.filename,
                                   await _read_limited(field, upload, limit))
                     for index, upload in enumerate(uploads)]
             for field, uploads in (("images", images), ("controls", controls or []))}
    # 3. Validate, store and queue the job (app.submissions.submit_check).
    accepted = await run_in_threadpool(submit_check, services, caller, settings,
                                       files["images"], files["controls"])
    response.headers["Location"] = accepted.status_url
    return accepted


#: Pictures of an image: the worker's artifacts and the upload itself (``original``).
PICTURE_KINDS = (*STORED_KINDS, "original")


def _signed_links(services: Services, record: JobRecord, links: ArtifactLinks) -> ArtifactLinks:
    sign = services.signer.sign
    return ArtifactLinks(**{kind: sign(getattr(links, kind), record.owner)
                            for kind in STORED_KINDS if getattr(links, kind) is not None})


def original_url(services: Services, record: JobRecord, name: str) -> str:
    """The (signed) URL of an uploaded image as stored; the web page shows it beside the
    recovery. Not in the result document, whose shape the worker owns."""
    return services.signer.sign(artifact_url(record.job_id, name, "original"), record.owner)


def _view(services: Services, record: JobRecord) -> JobView:
    cancel = False if record.terminal else services.store.cancel_requested(record.job_id)
    status = "cancelled" if record.status == "queued" and cancel else record.status
    if record.result is not None and services.signer.enabled:
        result = record.result.model_copy(deep=True)
        for item in (*result.images, *result.controls):
            item.artifacts = _signed_links(services, record, item.artifacts)
        record = record.model_copy(update={"result": result})
    return JobView(**{**record.model_dump(), "status": status},
                   status_url=f"/jobs/{record.job_id}", cancel_requested=cancel)


def _view_document(services: Services, record: JobRecord) -> dict[str, Any]:
    """The job as served: :func:`_view`, with the result exactly as the worker signed and stored
    it (only its artifact links replaced by the signed delivery URLs, which the signature does
    not cover), so a result signed before the models gained a field still verifies."""
    view = _view(services, record)
    body = view.model_dump(mode="json")
    stored = record.result_document()
    if stored is not None and view.result is not None:
        for section, items in (("images", view.result.images),
                               ("controls", view.result.controls)):
            links = {item.name: item.artifacts.model_dump(mode="json", exclude_none=True)
                     for item in items}
            for row in stored.get(section) or []:
                if isinstance(row, dict) and row.get("name") in links:
                    row["artifacts"] = links[row["name"]]
        body["result"] = stored
    return body


def _load(services: Services, job_id: str, caller: Caller | None) -> JobRecord:
    """The job, if it exists and ``caller`` owns it (``None``: checked by a signed URL)."""
    if not is_job_id(job_id):
        raise _not_found(job_id)
    try:
        record = services.store.load(job_id)
    except JobNotFound:
        raise _not_found(job_id) from None
    except StorageError as exc:
        raise storage_unavailable(exc) from exc
    if caller is not None and record.owner != caller.name:
        raise _not_found(job_id)  # the same answer as for a job that does not exist
    return record


@router.get("/jobs", response_model=JobList, responses=_ERRORS,
            summary="The caller's recent jobs, newest first")
def list_jobs(services: ServicesDep, caller: CallerDep,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
    """Jobs submitted with the caller's key (in local mode: every local job)."""
    try:
        ids = services.store.recent_job_ids(caller.name, limit)
    except StorageError as exc:
        raise storage_unavailable(exc) from exc
    jobs = []
    for job_id in ids:
        try:
            record = services.store.load(job_id)
        except JobNotFound:  # removed since
            continue
        except StorageError as exc:
            raise storage_unavailable(exc) from exc
        if record.owner != caller.name:
            continue
        view = _view(services, record)
        jobs.append(JobSummary(
            job_id=record.job_id, status=view.status, created_at=record.created_at,
            finished_at=record.finished_at, pretrained=record.settings.pretrained,
            finetuned=record.settings.finetuned,
            images=sum(1 for i in record.inputs if i.role == "image"),
            controls=sum(1 for i in record.inputs if i.role == "control"),
            fraction=record.progress.fraction, status_url=view.status_url))
    return JobList(jobs=jobs)


@router.get("/jobs/{job_id}", response_model=JobView, responses=_ERRORS,
            summary="Status, progress and (when done) the result of a job")
def get_job(job_id: str, services: ServicesDep,
            caller: CallerDep) -> JSONResponse:
    """Artifact URLs in the result are signed and expire (`CGIDM_ARTIFACT_URL_TTL`) when the
    service uses API keys; fetch the job again for fresh ones. The result is the document the
    worker signed, byte for byte in content."""
    return JSONResponse(_view_document(services, _load(services, job_id, caller)))


@router.delete(
    "/jobs/{job_id}",
    response_model=JobView,
    responses={**_ERRORS, 202: {"model": JobView, "description": "Running; stops shortly."},
               409: {"model": ErrorBody, "description": "Already finished."}},
    summary="Cancel a job",
)
def cancel_job(job_id: str, services: ServicesDep,
               caller: CallerDep) -> JSONResponse:
    """A queued job is cancelled at once (200); a running job stops within a few PGD steps and
    ends ``cancelled`` (202 now, poll to see it end)."""
    record = _load(services, job_id, caller)
    if record.status in ("succeeded", "failed"):
        raise ApiError(409, ["path", "job_id"], "already_finished",
                       f"job {job_id} already {record.status}; only queued or running jobs "
                       "can be cancelled")
    if not record.terminal:
        try:
            services.store.request_cancel(job_id)
        except StorageError as exc:
            raise storage_unavailable(exc) from exc
    code = 202 if record.status == "running" else 200
    return JSONResponse(_view_document(services, record), status_code=code)


@router.get(
    "/jobs/{job_id}/artifacts/{name}/{filename}",
    response_class=StreamingResponse,
    responses={200: {**PNG_RESPONSE, "description": "The picture (PNG)."}, **_ERRORS},
    summary="A picture of a job: recovered.png, partial.png, side_by_side.png or original.png",
)
def get_artifact(request: Request, job_id: str, name: str, filename: str,
                 services: ServicesDep, expires: str | None = None,
                 signature: str | None = None) -> StreamingResponse:
    """Authorised by the owner's key, or by the `expires` + `signature` of a URL taken from the
    job's result (no key needed: usable in `<img>` tags until it expires)."""
    signed = services.signer.enabled and signature is not None and expires is not None \
        and "authorization" not in request.headers
    caller = None if signed else caller_of(services.settings, request)
    if filename not in {f"{kind}.png" for kind in PICTURE_KINDS}:
        raise ApiError(404, ["path", "filename"], "not_found",
                       f"no artifact {filename!r}; artifacts are "
                       + ", ".join(f"{k}.png" for k in PICTURE_KINDS))
    path = f"/jobs/{job_id}/artifacts/{name}/{filename}"
    try:
        record = _load(services, job_id, caller)
    except ApiError:
        if signed:  # say nothing about jobs to a URL we did not sign
            services.signer.verify(path, None, expires or "", signature or "")
        raise
    if signed:
        services.signer.verify(path, record.owner, expires or "", signature or "")
    if filename == "original.png":  # the upload as stored, available from submission on
        upload = next((item for item in record.inputs if item.name == name), None)
        if upload is None:
            raise ApiError(404, ["path", "name"], "not_found",
                           f"job {job_id} has no image named {name!r}")
        return _stream(services, upload.key)
    if record.status != "succeeded" or record.attempt is None or \
            name not in {item.name for item in record.inputs}:
        raise ApiError(404, ["path", "name"], "not_found",
                       f"job {job_id} has no artifacts for {name!r} (status {record.status})")
    return _stream(services, artifact_key(job_id, name, filename.removesuffix(".png"),
                                          record.attempt))


def _stream(services: Services, key: str) -> StreamingResponse:
    try:
        chunks = services.store.storage.open_stream(key)
    except ObjectNotFound:
        raise ApiError(404, ["path", "name"], "not_found", f"artifact {key} is missing") from None
    except StorageError as exc:
        raise storage_unavailable(exc) from exc
    cache = "private, max-age=300" if services.signer.enabled else "no-store"
    return StreamingResponse(chunks, media_type="image/png", headers={"Cache-Control": cache})

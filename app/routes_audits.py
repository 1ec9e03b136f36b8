"""Audits: one portfolio against many suspect models (POST /audits, GET /audits/{id}, cancel,
pictures). The work is the workers' (worker/audit_tasks.py); the records are cgidm/audits.py."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.auth import Caller, CallerDep
from app.errors import ApiError, storage_unavailable
from app.openapi import PNG_RESPONSE
from app.routes_jobs import _read_limited
from app.schemas import ErrorBody
from app.services import Services, ServicesDep
from app.submissions import check_models
from app.uploads import decode_image
from cgidm.audits import (
    AuditInput,
    AuditModelSpec,
    AuditNotFound,
    AuditRequest,
    AuditStore,
    new_audit_id,
)
from cgidm.job_queue import BrokerUnavailable
from cgidm.jobs import JobSettings, safe_name, utcnow
from cgidm.storage import ObjectNotFound, StorageError

log = logging.getLogger("cgidm.gateway")
router = APIRouter(tags=["audits"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No API key, or an unknown one."},
    404: {"model": ErrorBody, "description": "No such audit (or another key's)."},
    422: {"model": ErrorBody, "description": "A field is invalid; `loc` names it."},
}
_FIELDS = {"images", "controls", "models", "fdr", "family_wise", "screen_clear_p", "steps",
           "seed"}
PICTURE_KINDS = ("side_by_side", "recovered")
#: Image names as the gateway stores them (cgidm.jobs.safe_name): nothing else is looked up.
_PICTURE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _store(services: Services) -> AuditStore:
    return AuditStore(services.store.storage)


def _parse_models(services: Services, raw: str, caller: Caller) -> list[AuditModelSpec]:
    """The model list as JSON, each entry checked like a job's models (registry ids, the
    caller's uploads, hub references where allowed); errors name the entry."""
    from cgidm_core.audit import MAX_AUDIT_MODELS, parse_models
    from cgidm_core.errors import ConfigError

    try:
        decoded = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(422, ["body", "models"], "invalid_json",
                       f"models is not valid JSON ({exc}); send a JSON list of "
                       '{"pretrained": ID, "finetuned": ID, "prompt": optional}') from None
    try:
        models = parse_models(decoded, max_models=MAX_AUDIT_MODELS)
    except ConfigError as exc:
        raise ApiError(422, ["body", "models"], "invalid_models", str(exc)) from None
    out = []
    for i, model in enumerate(models):
        try:
            settings = JobSettings(pretrained=model.pretrained, finetuned=model.finetuned,
                                   prompt=model.prompt)
        except ValueError as exc:
            raise ApiError(422, ["body", "models", i], "invalid_model",
                           f"models[{i}]: {exc}") from None
        try:
            check_models(services, settings, caller)
        except ApiError as exc:
            if exc.status >= 500:
                raise
            field = exc.loc[-1] if exc.loc else "finetuned"
            raise ApiError(exc.status, ["body", "models", i, field], exc.code,
                           f"models[{i}]: {exc.msg}") from None
        out.append(AuditModelSpec(**model.to_dict()))
    return out


@router.post(
    "/audits",
    status_code=202,
    operation_id="submit_audit",
    responses={**_ERRORS, 413: {"model": ErrorBody, "description": "A file is too large."},
               503: {"model": ErrorBody, "description": "Broker or storage unavailable; "
                     "nothing was stored."}},
    summary="Audit one set of images against many suspect models",
)
async def submit_audit(
    request: Request,
    response: Response,
    services: ServicesDep,
    caller: CallerDep,
    images: Annotated[list[UploadFile], File(description="The portfolio (1 or more).")],
    controls: Annotated[list[UploadFile], File(description="Known non-members (1 or more): "
                                               "every model's p-value is measured against them")],
    models: Annotated[str, Form(description='JSON list of {"pretrained": ID, "finetuned": ID, '
                                '"prompt": optional}')],
    fdr: Annotated[float, Form(gt=0, lt=1, description="Error level across models.")] = 0.05,
    family_wise: Annotated[str | None, Form(description="holm or bonferroni: control the "
                                            "family-wise error rate instead of the FDR")] = None,
    screen_clear_p: Annotated[float | None, Form(ge=0, le=1)] = None,
    steps: Annotated[int | None, Form(ge=1, le=10_000)] = None,
    seed: Annotated[int, Form(ge=0, le=2**32 - 1)] = 0,
) -> dict[str, Any]:
    """Validated before anything is stored; one job fans out over the workers, one subtask per
    base. Poll `GET /audits/{audit_id}`."""
    from cgidm_core.audit import SCREEN_CLEAR_P

    form = await request.form()
    for key in form:
        if key not in _FIELDS:
            raise ApiError(422, ["body", key], "unknown_field", f"unknown field {key!r}")
    if family_wise not in (None, "", "holm", "bonferroni"):
        raise ApiError(422, ["body", "family_wise"], "invalid_choice",
                       f"family_wise must be holm or bonferroni, got {family_wise!r}")
    limits = services.settings
    if len(images) + len(controls) > limits.max_files:
        raise ApiError(422, ["body", "images"], "too_many_files",
                       f"{len(images) + len(controls)} files; at most {limits.max_files} "
                       "images + controls per audit (CGIDM_MAX_FILES)")
    specs = await run_in_threadpool(_parse_models, services, models, caller)

    audit_id = new_audit_id()
    store = _store(services)
    taken: set[str] = set()
    inputs: dict[str, list[AuditInput]] = {"images": [], "controls": []}
    files: list[tuple[str, bytes]] = []
    for field, uploads in (("images", images), ("controls", controls)):
        for index, upload in enumerate(uploads):
            data = await _read_limited(field, upload, limits.max_upload_bytes)
            decoded = await run_in_threadpool(decode_image, field, upload.filename or field,
                                              data, limits.max_image_pixels)
            name = safe_name(upload.filename, taken)
            key = store.input_key(audit_id, "image" if field == "images" else "control",
                                  index, name)
            inputs[field].append(AuditInput(name=name, key=key,
                                            sha256=hashlib.sha256(data).hexdigest()))
            files.append((key, decoded.png))
    record = AuditRequest(audit_id=audit_id, owner=caller.name, created_at=utcnow(),
                          models=specs, level=fdr, correction=family_wise or "bh",
                          clear_p=SCREEN_CLEAR_P if screen_clear_p is None else screen_clear_p,
                          steps=steps, seed=seed, images=inputs["images"],
                          controls=inputs["controls"])
    try:
        await run_in_threadpool(store.create, record, files)
    except StorageError as exc:
        raise storage_unavailable(exc) from exc
    try:
        await run_in_threadpool(_enqueue, services, record)
    except BrokerUnavailable as exc:
        await run_in_threadpool(store.delete_quietly, audit_id)
        raise ApiError(503, [], "broker_unavailable", "the job queue is unavailable, try again "
                       "later; nothing was stored") from exc
    status_url = f"/audits/{audit_id}"
    response.headers["Location"] = status_url
    log.info("audit %s accepted for %s: %d models, %d images, %d controls", audit_id,
             caller.name or "local", len(specs), len(images), len(controls))
    return {"audit_id": audit_id, "status_url": status_url, "models": len(specs)}


def _enqueue(services: Services, record: AuditRequest) -> None:
    """Send the audit's group subtasks (cgidm/audit_leases.py): each holds a lease from the
    moment a worker takes it, so no step of an audit waits for the broker's visibility timeout
    when its worker is lost. A broker that fails half-way raises; the caller deletes the audit,
    and the groups already sent find no request and do nothing."""
    from cgidm.audit_leases import send_audit

    send_audit(services.celery, services.settings, record.models, record.audit_id)


def load_audit(services: Services, audit_id: str, caller: Caller | None) -> AuditRequest:
    """The audit's request, if it exists and belongs to ``caller`` (another key's is a 404)."""
    try:
        record = _store(services).load_request(audit_id)
    except AuditNotFound:
        raise ApiError(404, ["path", "audit_id"], "not_found",
                       f"no audit with id {audit_id!r}") from None
    except StorageError as exc:
        raise storage_unavailable(exc) from exc
    if caller is not None and record.owner != caller.name:
        raise ApiError(404, ["path", "audit_id"], "not_found", f"no audit with id {audit_id!r}")
    return record


def audit_view(services: Services, record: AuditRequest) -> dict[str, Any]:
    try:
        return _store(services).status(record)
    except StorageError as exc:
        raise storage_unavailable(exc) from exc


@router.get("/audits/{audit_id}", operation_id="get_audit", responses=_ERRORS,
            summary="Status, progress per model and (when done) the ranked result of an audit")
def get_audit(audit_id: str, services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    return audit_view(services, load_audit(services, audit_id, caller))


@router.delete("/audits/{audit_id}", operation_id="cancel_audit", status_code=202,
               responses={**_ERRORS, 409: {"model": ErrorBody, "description": "Finished."}},
               summary="Cancel an audit")
def cancel_audit(audit_id: str, services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    """Models already done stay stored; the running one stops within a few PGD steps."""
    record = load_audit(services, audit_id, caller)
    view = audit_view(services, record)
    if view["status"] in ("succeeded", "failed"):
        raise ApiError(409, ["path", "audit_id"], "already_finished",
                       f"audit {audit_id} already {view['status']}")
    try:
        _store(services).request_cancel(audit_id)
    except StorageError as exc:
        raise storage_unavailable(exc) from exc
    return audit_view(services, record)


@router.get("/audits/{audit_id}/pictures/{index}/{name}/{filename}",
            operation_id="get_audit_picture", response_class=StreamingResponse,
            responses={200: {**PNG_RESPONSE, "description": "The picture (PNG)."}, **_ERRORS},
            summary="An evidence picture of one model of an audit")
def get_audit_picture(audit_id: str, index: int, name: str, filename: str,
                      services: ServicesDep, caller: CallerDep) -> StreamingResponse:
    load_audit(services, audit_id, caller)
    kind = filename.removesuffix(".png")
    if kind not in PICTURE_KINDS or not filename.endswith(".png") or index < 0 or \
            not _PICTURE_NAME.match(name):
        raise ApiError(404, ["path", "filename"], "not_found",
                       f"no picture {filename!r}; pictures are side_by_side.png, recovered.png")
    key = AuditStore.picture_key(audit_id, index, name, kind)
    try:
        chunks = services.store.storage.open_stream(key)
    except ObjectNotFound:
        raise ApiError(404, ["path", "name"], "not_found",
                       f"audit {audit_id} has no picture {filename} of {name!r} for model "
                       f"{index}") from None
    except StorageError as exc:
        raise storage_unavailable(exc) from exc
    return StreamingResponse(chunks, media_type="image/png",
                             headers={"Cache-Control": "no-store"})

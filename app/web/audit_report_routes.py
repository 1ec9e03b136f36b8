"""GET /audits/{id}/report.pdf and /report.html: the per-audit report (app/web/audit_report.py),
made from the stored signed result and the flagged models' stored pictures."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from app.auth import Caller, CallerDep
from app.errors import ApiError, storage_unavailable
from app.openapi import PDF_RESPONSE
from app.routes_audits import _ERRORS, audit_view, load_audit
from app.services import Services, ServicesDep
from app.web import audit_report, report_document
from app.web.routes import REPORT_CSP
from cgidm import result_signing
from cgidm.audits import AuditStore
from cgidm.storage import ObjectNotFound, StorageError

router = APIRouter(tags=["audits"])
_NOT_DONE: dict[int | str, dict[str, Any]] = {
    409: {"model": _ERRORS[404]["model"], "description": "The audit has not succeeded (yet)."}}


def _pictures(services: Services, audit_id: str, result: dict[str, Any]
              ) -> dict[int, dict[str, bytes]]:
    out: dict[int, dict[str, bytes]] = {}
    for model in result.get("models") or []:
        if not model.get("flagged"):
            continue
        found = {}
        for row in model.get("images") or []:
            key = AuditStore.picture_key(audit_id, model["index"], row["name"],
                                         audit_report.SHOWN_KIND)
            try:
                found[row["name"]] = services.store.storage.get_bytes(key)
            except ObjectNotFound:
                continue
        out[model["index"]] = found
    return out


def _keys(services: Services) -> dict[str, Ed25519PublicKey] | None:
    settings = services.settings
    try:
        return result_signing.keys_of_set(result_signing.key_set(
            result_signing.load_or_create_key(settings.resolved_signing_key),
            settings.retired_public_keys))
    except result_signing.SigningKeyError:
        return None  # the report says the signature was not checked


def _report_html(services: Services, audit_id: str, caller: Caller) -> str:
    record = load_audit(services, audit_id, caller)
    view = audit_view(services, record)
    result = view.get("result")
    if view["status"] != "succeeded" or not isinstance(result, dict):
        raise ApiError(409, ["path", "audit_id"], "not_finished",
                       f"audit {audit_id} is {view['status']}; its report exists once it has "
                       "succeeded")
    try:
        pictures = _pictures(services, audit_id, result)
    except StorageError as exc:
        raise storage_unavailable(exc) from exc
    facts = [("Audit", audit_id),
             ("Submitted", report_document.fmt_time(record.created_at))]
    report = audit_report.build_report(result, pictures, facts, _keys(services),
                                       "audit.json")
    return audit_report.render_html(report)


@router.get(
    "/audits/{audit_id}/report.html",
    response_class=HTMLResponse,
    responses={**_ERRORS, **_NOT_DONE, 200: {"content": {"text/html": {"schema": {
        "type": "string"}}}, "description": "One self-contained HTML file."}},
    summary="The audit report: one self-contained HTML file that prints well to PDF",
)
async def audit_report_html(audit_id: str, services: ServicesDep,
                            caller: CallerDep) -> HTMLResponse:
    """Every picture is embedded (data URIs); the same document as report.pdf."""
    html = await run_in_threadpool(_report_html, services, audit_id, caller)
    return HTMLResponse(html, headers={
        "Content-Security-Policy": REPORT_CSP,
        "Content-Disposition": f'inline; filename="cgidm-audit-{audit_id}.html"',
        "Cache-Control": "no-store"})


@router.get(
    "/audits/{audit_id}/report.pdf",
    response_class=Response,
    responses={**_ERRORS, **_NOT_DONE, 200: {**PDF_RESPONSE,
                                             "description": "The audit report as a PDF."}},
    summary="The audit report as PDF: the finding, the ranked models, the flagged models' "
            "evidence pictures, method and reproduction",
)
async def audit_report_pdf(audit_id: str, services: ServicesDep,
                           caller: CallerDep) -> Response:
    """report.html printed by WeasyPrint: the two documents never disagree."""
    html = await run_in_threadpool(_report_html, services, audit_id, caller)
    pdf = await run_in_threadpool(report_document.render_pdf, html)
    return Response(pdf, media_type="application/pdf", headers={
        "Content-Disposition": f'attachment; filename="cgidm-audit-{audit_id}.pdf"',
        "Cache-Control": "no-store"})

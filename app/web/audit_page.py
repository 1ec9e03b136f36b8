"""The audit page: an audit as a ranked table, with the evidence pictures of the top hits.

Like the job page, ``/audits/{id}/page`` is the same for everyone and holds no audit data: a
browser cannot send the API key on a plain navigation, so the page's script (app.js, the key
the person signed in with, from sessionStorage) asks ``/audits/{id}/fragment.html`` with it,
until the audit ends. The fragment answers the owner's key like the API (in local mode, any
request from this machine); it is rendered by the server, with the pictures of the flagged
models embedded as data URIs, so it needs no further authorised requests.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.auth import CallerDep
from app.routes_audits import audit_view, load_audit
from app.services import Services, ServicesDep
from app.web.report_document import data_uri
from app.web.routes import PAGE_CSP, templates
from cgidm.audits import AuditStore
from cgidm.storage import ObjectNotFound, StorageError

router = APIRouter(include_in_schema=False)

#: How many flagged models show their pictures, and how many images each.
TOP_HITS = 5
PICTURES_PER_HIT = 6


def _pictures(services: Services, audit_id: str, model: dict[str, Any]) -> list[dict[str, str]]:
    """The side-by-side pictures (original | partial | recovered) of one flagged model's most
    member-like images, as data URIs."""
    images = sorted(model.get("images") or [], key=lambda r: -(r.get("evidence_score") or 0.0))
    out = []
    for record in images[:PICTURES_PER_HIT]:
        key = AuditStore.picture_key(audit_id, model["index"], record["name"], "side_by_side")
        try:
            data = services.store.storage.get_bytes(key)
        except (ObjectNotFound, StorageError):
            continue
        out.append({"name": record["name"], "src": data_uri(data),
                    "p_value": record.get("p_value")})
    return out


@router.get("/audits/{audit_id}/page", response_class=HTMLResponse,
            operation_id="audit_page")
def audit_page(request: Request, audit_id: str, services: ServicesDep) -> HTMLResponse:
    """The page shell; the id in the URL brings a reload or a shared link back to the audit."""
    response = templates.TemplateResponse(request, "audit.html", {
        "audit_id": audit_id, "keys_required": bool(services.settings.api_key_hashes)})
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/audits/{audit_id}/fragment.html", response_class=HTMLResponse,
            operation_id="audit_fragment")
def audit_fragment(request: Request, audit_id: str, services: ServicesDep,
                   caller: CallerDep) -> HTMLResponse:
    """The audit as an HTML fragment for the page: status, per-model progress while it runs,
    then the ranked table and the pictures of the top hits."""
    view = audit_view(services, load_audit(services, audit_id, caller))
    result = view.get("result") or {}
    hits = [m for m in result.get("models", []) if m.get("flagged")][:TOP_HITS]
    pictures = {m["index"]: _pictures(services, audit_id, m) for m in hits}
    response = templates.TemplateResponse(request, "audit_fragment.html", {
        "audit": view, "result": result, "hits": hits, "pictures": pictures})
    response.headers["Cache-Control"] = "no-store"
    return response

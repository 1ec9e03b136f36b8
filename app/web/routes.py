"""Routes of the web app: the pages, the evidence fragment, the report and offline API docs.

Pages (``/``, ``/checks/{job_id}``) are the same for everyone and hold no job data: the key
lives in the browser, which asks the JSON API and the evidence fragment with it. The fragment
and the report need the key like every job route. Every asset comes from this package
(``static/``) or, for Swagger UI and ReDoc, from the ``fastapi-offline`` package, which bundles
them; a Content-Security-Policy keeps the pages from loading anything from elsewhere.
"""

from __future__ import annotations

import functools
import importlib.resources
import io
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.auth import Caller, CallerDep
from app.errors import ApiError, storage_unavailable
from app.openapi import PDF_RESPONSE
from app.routes_jobs import _ERRORS, _load, _view, original_url
from app.services import Services, ServicesDep
from app.web import evidence, report_document
from cgidm import result_signing
from cgidm.jobs import BASE_RECOVERED, JobRecord, artifact_key
from cgidm.storage import ObjectNotFound, StorageError

HERE = Path(__file__).resolve().parent
STATIC_URL = "/static"
DOCS_ASSETS_URL = "/static/api-docs"
#: Pages load only from this origin; pictures may also be data URIs (the report).
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
            "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'; form-action 'self'")
#: The report is one file: its stylesheet is inline, its pictures data URIs, and no script.
REPORT_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
              "base-uri 'none'; frame-ancestors 'none'")
#: Swagger UI and ReDoc start from an inline script that FastAPI writes.
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; connect-src 'self'")

router = APIRouter(include_in_schema=False)
report_router = APIRouter(tags=["jobs"])


templates = Jinja2Templates(directory=str(HERE / "templates"))
report_document.install_filters(templates.env)


def _page(request: Request, name: str, **context: Any) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context)
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["Cache-Control"] = "no-store"
    return response


def _keys_required(request: Request) -> bool:
    services: Services = request.app.state.services
    return bool(services.settings.api_key_hashes)


@router.get("/", response_class=HTMLResponse)
def new_check_page(request: Request) -> HTMLResponse:
    return _page(request, "index.html", keys_required=_keys_required(request),
                 defaults=evidence.SHOWN_DEFAULTS, controls_needed=_controls_needed(request))


@router.get("/checks/{job_id}", response_class=HTMLResponse)
def check_page(request: Request, job_id: str) -> HTMLResponse:
    """The job page; the id in the URL brings a reload or a shared link back to the job."""
    return _page(request, "check.html", keys_required=_keys_required(request), job_id=job_id)


def _controls_needed(request: Request) -> int:
    services: Services = request.app.state.services
    return evidence.controls_needed(services.settings.controls_alpha)


def _succeeded(services: Services, job_id: str, caller: Caller) -> JobRecord:
    record = _load(services, job_id, caller)
    if record.status != "succeeded" or record.result is None:
        raise ApiError(409, ["path", "job_id"], "not_finished",
                       f"job {job_id} is {record.status}; the evidence exists once it has "
                       "succeeded")
    return record


@router.get("/jobs/{job_id}/evidence.html", response_class=HTMLResponse)
def evidence_fragment(request: Request, job_id: str,
                      services: ServicesDep,
                      caller: CallerDep) -> HTMLResponse:
    """The evidence as an HTML fragment for the job page (pictures by signed URL)."""
    record = _succeeded(services, job_id, caller)
    signed = _view(services, record).result  # artifact URLs signed when keys are in use
    assert signed is not None
    urls = {item.name: {"original": original_url(services, record, item.name),
                        "partial": item.artifacts.partial,
                        "recovered": item.artifacts.recovered,
                        **({BASE_RECOVERED: item.artifacts.base_recovered}
                           if item.artifacts.base_recovered else {})}
            for item in (*signed.images, *signed.controls)}
    view = evidence.build(record, services.settings.controls_alpha, urls)
    response = templates.TemplateResponse(request, "evidence_fragment.html",
                                          {"ev": view, "report": False})
    response.headers["Cache-Control"] = "no-store"
    return response


#: Longest side of an original embedded in the report: enough to judge on a page, while a
#: report of twenty photographs stays a few MB (the model saw them far smaller anyway).
REPORT_ORIGINAL_SIDE = 768


def _data_uri(services: Services, key: str, shrink: bool = False) -> str:
    data = _stored(services, key)
    if data is None:
        return ""
    mime = "image/png"
    if shrink:
        data, mime = _reduced(data)
    return report_document.data_uri(data, mime)


def _stored(services: Services, key: str) -> bytes | None:
    try:
        return services.store.storage.get_bytes(key)
    except ObjectNotFound:
        return None


def _reduced(png: bytes) -> tuple[bytes, str]:
    """A large upload as a smaller JPEG (PNG when it has transparency) for the report."""
    with Image.open(io.BytesIO(png)) as image:
        if max(image.size) <= REPORT_ORIGINAL_SIDE:
            return png, "image/png"
        image.thumbnail((REPORT_ORIGINAL_SIDE, REPORT_ORIGINAL_SIDE), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            image.save(out, format="PNG")
            return out.getvalue(), "image/png"
        image.convert("RGB").save(out, format="JPEG", quality=90)
        return out.getvalue(), "image/jpeg"


def _embedded_pictures(services: Services, record: JobRecord
                       ) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Data URIs of every picture, and per image whether they have the signed hashes."""
    assert record.result is not None and record.attempt is not None
    keys = {item.name: item.key for item in record.inputs}
    out: dict[str, dict[str, str]] = {}
    notes: dict[str, str] = {}
    for item in (*record.result.images, *record.result.controls):
        found = {kind: data for kind in ("partial", "recovered", BASE_RECOVERED)
                 if (data := _stored(services, artifact_key(record.job_id, item.name, kind,
                                                             record.attempt))) is not None}
        out[item.name] = {
            "original": _data_uri(services, keys[item.name], shrink=True),
            **{kind: report_document.data_uri(data) for kind, data in found.items()},
        }
        notes[item.name] = report_document.picture_note(item.model_dump(mode="json"), found)
    return out, notes


def _report_html(services: Services, record: JobRecord) -> str:
    """The report of a succeeded job, from the stored result and pictures (no torch)."""
    assert record.result is not None
    pictures, notes = _embedded_pictures(services, record)
    view = evidence.build(record, services.settings.controls_alpha, pictures)
    settings = services.settings
    try:
        keys = result_signing.keys_of_set(result_signing.key_set(
            result_signing.load_or_create_key(settings.resolved_signing_key),
            settings.retired_public_keys))
    except result_signing.SigningKeyError:
        keys = None  # the report says the signature was not checked
    facts = [("Job", record.job_id), ("Submitted", report_document.fmt_time(record.created_at)),
             ("Finished", report_document.fmt_time(record.finished_at)
              if record.finished_at else "\u2013")]
    parts = report_document.report_parts(
        record.result_document() or {}, record.result, settings.controls_alpha, facts,
        keys, "result.json", notes)
    return report_document.render_html(view, parts)


async def _report_of(services: Services, job_id: str, caller: Caller) -> tuple[JobRecord, str]:
    record = await run_in_threadpool(_succeeded, services, job_id, caller)
    try:
        html = await run_in_threadpool(_report_html, services, record)
    except StorageError as exc:
        raise storage_unavailable(exc) from exc
    return record, html


@report_router.get(
    "/jobs/{job_id}/report.html",
    response_class=HTMLResponse,
    responses={**_ERRORS, 200: {"content": {"text/html": {}},
                                "description": "One self-contained HTML file."},
               409: {"description": "The job has not succeeded (yet)."}},
    summary="The evidence report: one self-contained HTML file that prints well to PDF",
)
async def evidence_report(job_id: str, services: ServicesDep,
                          caller: CallerDep) -> HTMLResponse:
    """Every picture is embedded (data URIs) and the file loads nothing else, so it can be
    mailed, archived or printed as it is. The same document as report.pdf."""
    _, html = await _report_of(services, job_id, caller)
    return HTMLResponse(html, headers={
        "Content-Security-Policy": REPORT_CSP,
        "Content-Disposition": f'inline; filename="cgidm-report-{job_id}.html"',
        "Cache-Control": "no-store"})


@report_router.get(
    "/jobs/{job_id}/report.pdf",
    response_class=Response,
    responses={**_ERRORS, 200: {**PDF_RESPONSE,
                                "description": "The report as a PDF document."},
               409: {"description": "The job has not succeeded (yet)."}},
    summary="The evidence report as PDF: cover page, one page per image, method and "
            "reproduction",
)
async def evidence_report_pdf(job_id: str, services: ServicesDep,
                              caller: CallerDep) -> Response:
    """report.html printed by WeasyPrint: the two documents never disagree."""
    _, html = await _report_of(services, job_id, caller)
    pdf = await run_in_threadpool(report_document.render_pdf, html)
    return Response(pdf, media_type="application/pdf", headers={
        "Content-Disposition": f'attachment; filename="cgidm-report-{job_id}.pdf"',
        "Cache-Control": "no-store"})


# ------------------------------------------------------------------------------------------
# API docs without a CDN


def _docs_assets() -> Path:
    return Path(str(importlib.resources.files("fastapi_offline") / "static"))


#: The one remote URL ReDoc's bundle loads by itself: the Redocly logo in its menu. ReDoc drops
#: the image when it fails to load, so it gets an empty data URI instead of a CDN request.
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


@functools.lru_cache(maxsize=1)
def _redoc_script() -> bytes:
    return (_docs_assets() / "redoc.standalone.js").read_bytes().replace(REDOC_LOGO, b"data:,")


def install_web(app: FastAPI) -> None:
    """Mount the web app, its assets and the offline API docs on ``app`` (created with
    ``docs_url=None, redoc_url=None``)."""
    app.mount(STATIC_URL + "/app", StaticFiles(directory=HERE / "static"), name="web-static")

    @app.get(f"{DOCS_ASSETS_URL}/redoc.standalone.js", include_in_schema=False)
    def redoc_script() -> Response:  # before the mount below, which would serve the original
        return Response(_redoc_script(), media_type="text/javascript",
                        headers={"Cache-Control": "public, max-age=86400"})

    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=_docs_assets()), name="docs-static")
    app.include_router(router)
    app.include_router(report_router)
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} - API docs",
            swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
            # No validator badge: it would send the spec to a public validator.
            swagger_ui_parameters={"validatorUrl": None})
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        page = get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - API reference",
                              redoc_js_url=f"{DOCS_ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
                              with_google_fonts=False)
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

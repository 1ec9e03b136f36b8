"""The ASGI app: ``uvicorn app.main:app``. The web app at ``/``, API docs at ``/docs``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.auth import describe_mode, install_log_redaction
from app.errors import install_error_handlers
from app.limits import SubmissionGate
from app.openapi import install_client_ready_openapi, operation_id
from app.routes_audits import router as audits_router
from app.routes_jobs import router as jobs_router
from app.routes_models import router as models_router
from app.routes_ops import metrics_registry
from app.routes_ops import router as ops_router
from app.services import Services
from app.web.audit_page import router as audit_page_router
from app.web.audit_report_routes import router as audit_report_router
from app.web.routes import install_web
from cgidm import __version__
from cgidm.settings import Settings, get_settings

DESCRIPTION = """
Copyright authentication for fine-tuned diffusion models (CGI-DM, CVPR 2024).

Submit images you own (`POST /authenticate`) with the ids of a pretrained model and its suspected
fine-tune (see `GET /models`). A worker removes half of each image and recovers it with the
difference between the two models; a close recovery is evidence the fine-tune saw the image.
Add known non-members as `controls` to get a p-value per image and a rank test for the set.
Poll `GET /jobs/{job_id}` for progress and the result; fetch the pictures from the URLs in it.

**Authentication.** Send `Authorization: Bearer <key>` (the operator makes keys with
`cgidm keys new NAME`). A key sees only its own jobs. Artifact URLs in results are signed and
expire, so they work in `<img>` tags without the key. `/healthz`, `/readyz`, `/metrics`,
`/.well-known/cgidm-signing-keys.json` (the keys that verify results), these
docs and the web app's pages at `/` are public (the pages hold no data; they ask the API with the
key the person signs in with). A service with no keys configured answers only requests from its
own machine.
"""

log = logging.getLogger("cgidm.gateway")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    services = Services.create(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Gateways also hand out again the jobs of lost workers (cgidm/reaper.py), so a job is
        # recovered even while no worker is idle or every worker was restarted.
        from cgidm.reaper import start_reaper

        reaper = start_reaper(settings, services.store, "gateway")
        try:
            yield
        finally:
            if reaper is not None:
                reaper.stop()

    # /docs and /redoc are served by app.web with assets from the package (no CDN).
    # Operations are named by their route functions, and multipart bodies are described flat,
    # so that a client generated from /openapi.json reads well and sends files (app/openapi.py).
    app = FastAPI(title="cgidm", version=__version__, description=DESCRIPTION, docs_url=None,
                  redoc_url=None, lifespan=lifespan, generate_unique_id_function=operation_id)
    install_client_ready_openapi(app)
    app.state.services = services
    app.state.metrics_registry = metrics_registry(services)
    install_error_handlers(app)
    app.include_router(jobs_router)
    app.include_router(audits_router)
    app.include_router(audit_page_router)
    app.include_router(audit_report_router)
    app.include_router(models_router)
    app.include_router(ops_router)
    install_web(app)  # the web app at /, the report, offline /docs and /redoc
    # Size limits, authentication and the queue-depth check before the body is read.
    app.add_middleware(SubmissionGate, services=services)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__,
                  exc_info=exc)
        body = {"detail": [{"loc": [], "msg": "internal error; the operator's log has the "
                            "details", "type": "internal_error"}]}
        return JSONResponse(body, status_code=500)

    install_log_redaction()
    log.info("cgidm gateway: %s", describe_mode(settings))
    return app


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()

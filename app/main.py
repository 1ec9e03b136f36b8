"""The ASGI app: ``uvicorn app.main:app``. Interactive API docs at ``/docs``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.errors import ApiError, install_error_handlers
from app.routes_jobs import router as jobs_router
from app.routes_ops import metrics_registry
from app.routes_ops import router as ops_router
from app.services import Services
from cgidm import __version__
from cgidm.settings import Settings, get_settings

DESCRIPTION = """
Copyright authentication for fine-tuned diffusion models (CGI-DM, CVPR 2024).

Submit images you own (`POST /authenticate`) with the ids of a pretrained model and its suspected
fine-tune (see `GET /models`). A worker removes half of each image and recovers it with the
difference between the two models; a close recovery is evidence the fine-tune saw the image.
Add known non-members as `controls` to get a p-value per image and a rank test for the set.
Poll `GET /jobs/{job_id}` for progress and the result; fetch the pictures from the URLs in it.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    services = Services.create(settings)
    app = FastAPI(title="cgidm", version=__version__, description=DESCRIPTION)
    app.state.services = services
    app.state.metrics_registry = metrics_registry(services)
    install_error_handlers(app)
    app.include_router(jobs_router)
    app.include_router(ops_router)
    # Reject bodies that cannot be valid before reading them (uploads are spooled to disk).
    body_limit = settings.max_files * settings.max_upload_bytes + 1024 * 1024

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):  # type: ignore[no-untyped-def]
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > body_limit:
            error = ApiError(413, ["body"], "request_too_large",
                             f"request body of {length} bytes exceeds {body_limit} bytes "
                             "(CGIDM_MAX_FILES x CGIDM_MAX_UPLOAD_BYTES)")
            return JSONResponse(error.body(), status_code=413)
        return await call_next(request)

    return app


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()

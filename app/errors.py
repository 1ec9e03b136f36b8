"""Every client error is a 4xx JSON body naming the field, in FastAPI's validation shape::

    {"detail": [{"loc": ["body", "images"], "msg": "...", "type": "not_an_image",
                 "file": "cat.txt"}]}
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cgidm.errors import CgidmServiceError


class ApiError(CgidmServiceError):
    """A client-visible error about one field (``loc``) of the request. ``kind`` is its code
    (the body's ``type``; docs/ERRORS.md lists them all)."""

    def __init__(self, status: int, loc: list[str | int], kind: str, msg: str, *,
                 headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(msg)
        self.status, self.loc, self.kind, self.msg, self.extra = status, loc, kind, msg, extra
        self.code, self.http_status = kind, status
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def body(self) -> dict[str, Any]:
        return {"detail": [{"loc": self.loc, "msg": self.msg, "type": self.kind, **self.extra}]}


def storage_unavailable(exc: Exception) -> ApiError:
    """The 503 of every route whose storage (S3 or the local folder) could not be reached."""
    return ApiError(503, [], "storage_unavailable", f"storage is unavailable: {exc}")


def _plain(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


def _validation_body(exc: RequestValidationError) -> dict[str, Any]:
    details = []
    for error in exc.errors():
        item = {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""),
                "type": error.get("type", "invalid")}
        if _plain(error.get("input")):
            item["input"] = error.get("input")
        details.append(item)
    return {"detail": details}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_body(exc), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {"detail": [{"loc": [], "msg": str(exc.detail), "type": "http_error"}]}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

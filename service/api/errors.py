"""The one place where domain errors become HTTP status codes.

Every error body is `{"error": {"type", "message"}}`. Messages are the domain errors' own,
which never echo a caller's input; unexpected exceptions are logged and answered with a
generic 500 that names no exception class and carries no traceback.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clip_core.errors import (
    ClipCoreError,
    ImageDecodeError,
    InvalidInput,
    ModelNotFound,
    TextTooLong,
)

from ..errors import (
    BatchFailed,
    DeadlineExceeded,
    InvalidRequest,
    OutOfMemory,
    Overloaded,
    RequestTooLarge,
    ServiceError,
    UnsupportedMediaType,
    WorkerUnavailable,
)
from .schemas import ErrorBody

log = logging.getLogger(__name__)

# (error class, status, type) - the first match wins, so subclasses come first.
_TABLE: list[tuple[type[Exception], int, str]] = [
    (ImageDecodeError, 400, "invalid_image"),
    (TextTooLong, 422, "text_too_long"),
    (InvalidInput, 422, "invalid_input"),
    (InvalidRequest, 400, "invalid_request"),
    (UnsupportedMediaType, 415, "unsupported_media_type"),
    (RequestTooLarge, 413, "too_many_items"),
    (ModelNotFound, 404, "model_not_found"),
    (Overloaded, 503, "overloaded"),
    (WorkerUnavailable, 503, "unavailable"),
    (OutOfMemory, 503, "overloaded"),
    (DeadlineExceeded, 504, "deadline_exceeded"),
    (BatchFailed, 500, "inference_failed"),
]


def error_body(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message}}


def status_for(exc: Exception) -> tuple[int, str]:
    for cls, status, kind in _TABLE:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal_error"


def to_response(exc: Exception) -> JSONResponse:
    status, kind = status_for(exc)
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif status == 503:
        headers["Retry-After"] = "1"
    message = str(exc) if status != 500 or kind != "internal_error" else "internal error"
    return JSONResponse(error_body(kind, message), status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Registers the handlers: domain errors, validation errors, HTTP errors, the rest."""

    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        status, _ = status_for(exc)
        if status >= 500 and status != 503:
            log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return to_response(exc)

    # Domain errors go through the exception middleware; the catch-all Exception handler
    # runs in the outermost middleware, which answers and then re-raises for the server log.
    app.add_exception_handler(ServiceError, _domain)
    app.add_exception_handler(ClipCoreError, _domain)
    app.add_exception_handler(Exception, _domain)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Name the fields and what is wrong, never the values sent.
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in exc.errors()[:10]
        ]
        return JSONResponse(error_body("invalid_request", "; ".join(problems)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


# The error answers every inference route documents in OpenAPI.
OPENAPI_ERRORS: dict[int | str, dict] = {
    code: {"model": ErrorBody, "description": kind.replace("_", " ")}
    for code, kind in ((400, "invalid_request"), (404, "model_not_found"),
                       (413, "too_many_items"), (415, "unsupported_media_type"),
                       (422, "invalid_request"), (503, "overloaded"),
                       (504, "deadline_exceeded"))
}


def not_ready() -> JSONResponse:
    return JSONResponse(error_body("unavailable", "not ready"), status_code=503,
                        headers={"Retry-After": "1"})

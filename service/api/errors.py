"""The one place where domain errors become HTTP status codes.

Every error body is `{"error": {"type", "message"}}`. Messages are the domain errors' own,
which never echo a caller's input; unexpected exceptions are logged and answered with a
generic 500 that names no exception class and carries no traceback. Every error answer
is counted in `clip_errors_total{type}`.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from clip_core.errors import (
    ClipCoreError,
    ImageDecodeError,
    InvalidInput,
    ModelNotFound,
    TextTooLong,
)

from ..errors import (
    BatchFailed,
    BodyTooLarge,
    DeadlineExceeded,
    EmptyInput,
    FetchFailed,
    FetchTooLarge,
    ImageFormatNotAllowed,
    ImageTooLarge,
    InputTooLong,
    InvalidRequest,
    InvalidText,
    OutOfMemory,
    Overloaded,
    RateLimited,
    RequestTooLarge,
    ServiceError,
    TooManyItems,
    Unauthorized,
    UnsupportedMediaType,
    UrlNotAllowed,
    WorkerUnavailable,
)
from .schemas import ErrorBody

log = logging.getLogger(__name__)

# (error class, status, type) - the first match wins, so subclasses come first.
_TABLE: list[tuple[type[Exception], int, str]] = [
    (ImageDecodeError, 400, "invalid_image"),
    (TextTooLong, 422, "text_too_long"),
    (InputTooLong, 422, "text_too_long"),
    (InvalidText, 422, "invalid_text"),
    (InvalidInput, 422, "invalid_input"),
    (EmptyInput, 422, "invalid_request"),
    (InvalidRequest, 400, "invalid_request"),
    (UnsupportedMediaType, 415, "unsupported_media_type"),
    (ImageFormatNotAllowed, 415, "unsupported_image_format"),
    (RequestTooLarge, 413, "too_many_items"),
    (TooManyItems, 413, "too_many_items"),
    (BodyTooLarge, 413, "body_too_large"),
    (ImageTooLarge, 413, "image_too_large"),
    (FetchTooLarge, 413, "image_too_large"),
    (UrlNotAllowed, 400, "url_not_allowed"),
    (FetchFailed, 422, "fetch_failed"),
    (Unauthorized, 401, "unauthorized"),
    (RateLimited, 429, "rate_limited"),
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
    if isinstance(exc, (Overloaded, RateLimited)):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif status == 503:
        headers["Retry-After"] = "1"
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = ('Bearer realm="clip-server", error="invalid_token"'
                                       if exc.presented else 'Bearer realm="clip-server"')
    message = str(exc) if status != 500 or kind != "internal_error" else "internal error"
    return JSONResponse(error_body(kind, message), status_code=status, headers=headers)


def count(scope: Scope, kind: str) -> None:
    if scope.get("clip.body_overflow"):
        return  # BodyLimit answers (and counts) instead
    metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
    if metrics is not None:
        metrics.errors.labels(kind).inc()


def answer(scope: Scope, exc: Exception) -> JSONResponse:
    """`to_response`, counted: for middleware that answers before the app runs."""
    count(scope, status_for(exc)[1])
    return to_response(exc)


def install(app: FastAPI) -> None:
    """Registers the handlers: domain errors, validation errors, HTTP errors, the rest."""

    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        status, _ = status_for(exc)
        if status == 500:  # ours to fix; 503/504 are load and deadlines, not faults
            log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return answer(request.scope, exc)

    # Domain errors go through the exception middleware; the catch-all Exception handler
    # runs in the outermost middleware, which answers and then re-raises for the server log.
    app.add_exception_handler(ServiceError, _domain)
    app.add_exception_handler(ClipCoreError, _domain)
    app.add_exception_handler(Exception, _domain)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        count(request.scope, "invalid_request")
        problems = [_problem(e) for e in exc.errors()[:10]]
        return JSONResponse(error_body("invalid_request", "; ".join(problems)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        count(request.scope, kind)
        return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


def _problem(e: dict) -> str:
    """Where and what, never the value sent; an unknown field's name is the caller's
    input too, so it is not repeated."""
    loc = [str(p) for p in e["loc"] if p != "body"]
    if e.get("type") == "extra_forbidden":
        return f"{'.'.join([*loc[:-1], '?']) if len(loc) > 1 else 'body'}: unknown field"
    return f"{'.'.join(loc) or 'body'}: {e['msg']}"


# The error answers every inference route documents in OpenAPI.
OPENAPI_ERRORS: dict[int | str, dict] = {
    code: {"model": ErrorBody, "description": kind}
    for code, kind in (
        (400, "invalid_request, invalid_image, url_not_allowed"),
        (401, "unauthorized (API keys configured; WWW-Authenticate: Bearer)"),
        (404, "model_not_found"),
        (413, "too_many_items, body_too_large, image_too_large"),
        (415, "unsupported_media_type, unsupported_image_format"),
        (422, "invalid_request, text_too_long, invalid_text, invalid_input, fetch_failed"),
        (429, "rate_limited (Retry-After)"),
        (500, "inference_failed: the model failed on this input"),
        (503, "overloaded or unavailable (Retry-After)"),
        (504, "deadline_exceeded"),
    )
}


def not_ready() -> JSONResponse:
    return JSONResponse(error_body("unavailable", "not ready"), status_code=503,
                        headers={"Retry-After": "1"})


def not_alive() -> JSONResponse:
    return JSONResponse(error_body("unavailable", "a model worker stopped; restart"),
                        status_code=503)

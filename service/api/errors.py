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

from clip_core.errors import ClipCoreError

from ..errors import Fault, Overloaded, RateLimited, ServiceError, Unauthorized
from .schemas import ErrorBody

log = logging.getLogger(__name__)

_DOMAIN = (ServiceError, ClipCoreError)
_INTERNAL = ServiceError.error_type  # the type of an error no more precise than its base

# Each domain error names its fault, inherited by its subclasses (a clip_core error names
# it by value); this is the one place a fault becomes a status.
STATUS: dict[Fault, int] = {
    Fault.MALFORMED: 400,
    Fault.UNAUTHENTICATED: 401,
    Fault.NOT_FOUND: 404,
    Fault.TOO_LARGE: 413,
    Fault.UNSUPPORTED: 415,
    Fault.UNPROCESSABLE: 422,
    Fault.RATE_LIMITED: 429,
    Fault.OURS: 500,
    Fault.OVERLOADED: 503,
    Fault.UNAVAILABLE: 503,
    Fault.TIMEOUT: 504,
}


def error_body(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message}}


def status_for(exc: Exception) -> tuple[int, str]:
    """The status and error type of an answer to `exc`; anything unforeseen is ours."""
    if isinstance(exc, _DOMAIN):
        return STATUS[Fault(exc.fault)], exc.error_type
    return STATUS[Fault.OURS], _INTERNAL


def to_response(exc: Exception) -> JSONResponse:
    status, kind = status_for(exc)
    headers = {}
    if isinstance(exc, (Overloaded, RateLimited)):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif status == 503:  # unavailable, or out of memory: a moment may be enough
        headers["Retry-After"] = "1"
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = ('Bearer realm="clip-server", error="invalid_token"'
                                       if exc.presented else 'Bearer realm="clip-server"')
    # An unforeseen error, or one no more precise than its base, may hold internals.
    message = "internal error" if kind == _INTERNAL else str(exc)
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
    if isinstance(exc, Overloaded):
        scope["clip.overloaded"] = exc  # `Shedding` paces the answer
    return to_response(exc)


def install(app: FastAPI) -> None:
    """Registers the handlers: domain errors, validation errors, HTTP errors, the rest."""

    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        if status_for(exc)[0] == 500:  # ours to fix; 503/504 are load and deadlines
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
        (404, "model_not_found, policy_not_found"),
        (413, "too_many_items, body_too_large, image_too_large"),
        (415, "unsupported_media_type, unsupported_image_format"),
        (422, "invalid_request, text_too_long, invalid_text, invalid_input, fetch_failed, "
              "unknown_category"),
        (429, "rate_limited (Retry-After)"),
        (500, "inference_failed: the model failed on this input; device_failed: the device "
              "failed for good (the pod restarts)"),
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

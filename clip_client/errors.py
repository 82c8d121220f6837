"""Typed errors mirroring the server's: every error body is
`{"error": {"type", "message"}}`, and each `type` has a class here.

The classes are grouped by what a caller can do about them: `CallerError` (fix the
request; retrying will not help), `RetryableError` (overload or rate limit; the client
retries these itself until its deadline) and `ServerFault` (the server's fault).
"""

from __future__ import annotations

import json
from typing import ClassVar


class ClipError(Exception):
    """An error answer from the server (or, with `type` "http_error", from something in
    front of it)."""

    error_type: ClassVar[str] = "http_error"

    def __init__(self, message: str, *, status: int | None = None,
                 type: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type or self.error_type
        self.retry_after = retry_after  # seconds, from the Retry-After header

    def __str__(self) -> str:
        return f"{self.type} ({self.status}): {self.message}"


class CallerError(ClipError):
    """The request cannot succeed as sent."""


class RetryableError(ClipError):
    """Refused for now; the same request may succeed later (429, 503)."""


class ServerFault(ClipError):
    """The server failed (5xx) on a request that was not at fault."""


# ---- the caller's fault (4xx) ----
class InvalidRequest(CallerError):
    error_type = "invalid_request"


class InvalidInput(CallerError):
    error_type = "invalid_input"


class InvalidText(CallerError):
    error_type = "invalid_text"


class InvalidImage(CallerError):
    error_type = "invalid_image"


class UrlNotAllowed(CallerError):
    error_type = "url_not_allowed"


class FetchFailed(CallerError):
    error_type = "fetch_failed"


class TextTooLong(CallerError):
    error_type = "text_too_long"


class TooManyItems(CallerError):
    error_type = "too_many_items"


class BodyTooLarge(CallerError):
    error_type = "body_too_large"


class ImageTooLarge(CallerError):
    error_type = "image_too_large"


class UnsupportedMediaType(CallerError):
    error_type = "unsupported_media_type"


class UnsupportedImageFormat(CallerError):
    error_type = "unsupported_image_format"


class Unauthorized(CallerError):
    error_type = "unauthorized"


class ModelNotFound(CallerError):
    error_type = "model_not_found"


class PolicyNotFound(CallerError):
    error_type = "policy_not_found"


class UnknownCategory(CallerError):
    error_type = "unknown_category"


class NotFound(CallerError):
    error_type = "not_found"


class MethodNotAllowed(CallerError):
    error_type = "method_not_allowed"


# ---- refused for now (429, 503) ----
class RateLimited(RetryableError):
    error_type = "rate_limited"


class Overloaded(RetryableError):
    error_type = "overloaded"


class Unavailable(RetryableError):
    error_type = "unavailable"


# ---- the server's fault (5xx) ----
class DeadlineExceeded(ServerFault):
    error_type = "deadline_exceeded"


class InternalError(ServerFault):
    error_type = "internal_error"


class InferenceFailed(ServerFault):
    error_type = "inference_failed"


class DeviceFailed(InferenceFailed):
    error_type = "device_failed"


def _subclasses(cls: type[ClipError]) -> list[type[ClipError]]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


# type -> class, for every class that names a type of its own.
BY_TYPE: dict[str, type[ClipError]] = {
    c.error_type: c for c in _subclasses(ClipError)
    if c.error_type != ClipError.error_type
}

RETRYABLE_STATUSES = frozenset({429, 503})


def _by_status(status: int) -> type[ClipError]:
    if status in RETRYABLE_STATUSES:
        return RetryableError
    if 400 <= status < 500:
        return CallerError
    return ServerFault


def from_response(status: int, body: bytes, retry_after: float | None) -> ClipError:
    """The typed error for an error answer: by the body's `type` when the server wrote
    it, else by status (a proxy's HTML page, a gateway timeout)."""
    kind = message = None
    try:
        detail = json.loads(body)["error"]
        kind, message = str(detail["type"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        pass
    cls = BY_TYPE.get(kind or "") or _by_status(status)
    if message is None:
        message = body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
    return cls(message, status=status, type=kind, retry_after=retry_after)

"""Domain errors raised by the serving core (batcher, workers, cache).

Each class names its kind (`error_type`, the `type` of an error body) and its `Fault`;
subclasses inherit both unless they say otherwise. They carry no HTTP meaning: the API
layer maps faults to status codes in one module (clip_core's errors name the same faults
by value). Messages are safe to show a caller: they never echo a payload or an internal
traceback.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class Fault(str, enum.Enum):
    """Whose fault an error is and what the caller can do about it; one status each."""

    MALFORMED = "malformed"  # the request, or an input in it, cannot be read as sent
    UNAUTHENTICATED = "unauthenticated"  # no valid credentials
    NOT_FOUND = "not_found"  # names something that does not exist (a model)
    TOO_LARGE = "too_large"  # over a size or count limit; retrying will not help
    UNSUPPORTED = "unsupported"  # a media type or image format that is not read
    UNPROCESSABLE = "unprocessable"  # well-formed, but its content cannot be used
    RATE_LIMITED = "rate_limited"  # this caller sends too fast; retry later
    OVERLOADED = "overloaded"  # the server is too busy; retry later or elsewhere
    UNAVAILABLE = "unavailable"  # not serving now (loading, draining, failed)
    TIMEOUT = "timeout"  # the deadline passed before the work was done
    OURS = "ours"  # a fault of the server, not the caller's


# Faults that lie with the request: an error of one of these, raised by a backend for a
# single item, is that item's answer as it stands (service.isolation).
CALLERS_FAULTS = frozenset({Fault.MALFORMED, Fault.UNAUTHENTICATED, Fault.NOT_FOUND,
                            Fault.TOO_LARGE, Fault.UNSUPPORTED, Fault.UNPROCESSABLE,
                            Fault.RATE_LIMITED})


def is_callers_fault(err: BaseException) -> bool:
    """Whether `err` is a domain error, ours or clip_core's, that blames the request.

    clip_core's errors name their fault by value, as a class attribute; they are read as
    such because the batching core imports nothing of clip_core.
    """
    if isinstance(err, ServiceError):
        return err.fault in CALLERS_FAULTS
    fault, kind = getattr(type(err), "fault", None), getattr(type(err), "error_type", None)
    if not (isinstance(fault, str) and isinstance(kind, str)):
        return False
    try:
        return Fault(fault) in CALLERS_FAULTS
    except ValueError:
        return False


class ServiceError(Exception):
    """Base class of every error the serving core raises on purpose."""

    fault: ClassVar[Fault] = Fault.OURS
    # "internal_error" is answered with a generic message: the text may hold internals.
    error_type: ClassVar[str] = "internal_error"


class Overloaded(ServiceError):
    """The queue is full; the request was refused whole, before any of it ran."""

    fault = Fault.OVERLOADED
    error_type = "overloaded"

    def __init__(self, retry_after: float, message: str | None = None):
        self.retry_after = retry_after
        super().__init__(message or f"server is overloaded; retry after {retry_after:.0f} s")


class RequestTooLarge(ServiceError):
    """A request with more items than the queue can ever hold; retrying will not help."""

    fault = Fault.TOO_LARGE
    error_type = "too_many_items"

    def __init__(self, n_items: int, limit: int):
        self.n_items = n_items
        self.limit = limit
        super().__init__(f"request has {n_items} items; at most {limit} can be queued at once")


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before all of its items were computed."""

    fault = Fault.TIMEOUT
    error_type = "deadline_exceeded"


class WorkerUnavailable(ServiceError):
    """The model worker is not serving: not started, warming up, stopped or stalled."""

    fault = Fault.UNAVAILABLE
    error_type = "unavailable"


class Draining(WorkerUnavailable):
    """The worker is draining for shutdown and admits no new work."""


class BatchFailed(ServiceError):
    """An item failed inside the model. The cause is logged, not shown."""

    fault = Fault.OURS
    error_type = "inference_failed"


class DeviceFailed(BatchFailed):
    """Raised by a backend when the device's context is broken for good: a device-side
    assert, an illegal memory access, an uncorrectable ECC error. Every later call on that
    device would fail too, so the worker fails the batch, stops serving and reports
    itself failed (/healthz answers 503 and the orchestrator restarts the process).

    Ours, and answered 500 rather than 503: the batch's own inputs may have triggered
    the fault (an out-of-range index asserts on the device), and a 503 invites callers
    and proxies to retry, which would carry the same input on to the next replica. The
    requests that arrive afterwards are refused 503 (`WorkerUnavailable`): those are
    safe to retry elsewhere.
    """

    error_type = "device_failed"


class OutOfMemory(ServiceError):
    """Raised by a backend when a batch does not fit in device memory.

    The worker reacts by shrinking its batch limit and retrying; a caller sees it only
    when a single item does not fit.
    """

    fault = Fault.OVERLOADED
    error_type = "overloaded"


class InvalidRequest(ServiceError):
    """The request is malformed beyond what schema validation catches (bad base64...)."""

    fault = Fault.MALFORMED
    error_type = "invalid_request"


class UnsupportedMediaType(ServiceError):
    """A body in a content type the endpoint does not read."""

    fault = Fault.UNSUPPORTED
    error_type = "unsupported_media_type"


class EmptyInput(InvalidRequest):
    """No items at all, or an empty text, label, template or image (0 bytes)."""

    # Readable but empty: answered as the schema answers an empty list.
    fault = Fault.UNPROCESSABLE


class TooManyItems(ServiceError):
    """More items (or form parts) in one request than `max_items_per_request` allows."""

    fault = Fault.TOO_LARGE
    error_type = "too_many_items"


class BodyTooLarge(ServiceError):
    """The request body is over `max_body_bytes`; refused while it was still arriving."""

    fault = Fault.TOO_LARGE
    error_type = "body_too_large"


class InputTooLong(ServiceError):
    """A text over `max_text_chars`, refused before tokenising."""

    fault = Fault.UNPROCESSABLE
    error_type = "text_too_long"


class InvalidText(ServiceError):
    """A text that is not valid Unicode (lone surrogates can arrive as JSON escapes)."""

    fault = Fault.UNPROCESSABLE
    error_type = "invalid_text"


class ImageTooLarge(ServiceError):
    """An image over the pixel or frame cap, refused from its header before decoding."""

    fault = Fault.TOO_LARGE
    error_type = "image_too_large"


class ImageFormatNotAllowed(ServiceError):
    """An image in a format outside the allow-list, refused before any decoder runs."""

    fault = Fault.UNSUPPORTED
    error_type = "unsupported_image_format"


class UrlNotAllowed(ServiceError):
    """An image URL that is disabled, not http(s), or resolves to a refused address."""

    fault = Fault.MALFORMED
    error_type = "url_not_allowed"


class FetchFailed(ServiceError):
    """An allowed image URL that could not be fetched: timeout, HTTP error, redirects."""

    fault = Fault.UNPROCESSABLE
    error_type = "fetch_failed"


class FetchTooLarge(FetchFailed):
    """An image URL whose body is over `url_max_bytes`."""

    fault = Fault.TOO_LARGE
    error_type = "image_too_large"


class Unauthorized(ServiceError):
    """No API key, or one that is not configured. `presented` says whether one was sent."""

    fault = Fault.UNAUTHENTICATED
    error_type = "unauthorized"

    def __init__(self, presented: bool):
        self.presented = presented
        super().__init__("a valid API key is required: 'Authorization: Bearer <key>'"
                         if not presented else "the API key is not valid")


class RateLimited(ServiceError):
    """The key's request rate is over its limit."""

    fault = Fault.RATE_LIMITED
    error_type = "rate_limited"

    def __init__(self, retry_after: float):
        self.retry_after = retry_after
        super().__init__(f"rate limit reached; retry after {max(1, round(retry_after))} s")


class ModelUnavailable(WorkerUnavailable):
    """A configured model that failed to load; the others serve."""


class BatchStalled(BatchFailed):
    """The batch ran past the watchdog's `stall_timeout_s`; its requests fail, others go on."""


# ---- moderation (service.moderation) ----


class PolicyNotFound(ServiceError):
    """A moderation policy name that no loaded policy file defines."""

    fault = Fault.NOT_FOUND
    error_type = "policy_not_found"


class UnknownCategory(ServiceError):
    """A category that the named policy does not define."""

    fault = Fault.UNPROCESSABLE
    error_type = "unknown_category"

"""Domain errors raised by the serving core (batcher, workers, cache).

They carry no HTTP meaning; the API layer maps them to status codes in one module.
Messages are safe to show a caller: they never echo a payload or an internal traceback.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of every error the serving core raises on purpose."""


class Overloaded(ServiceError):
    """The queue is full; the request was refused whole, before any of it ran."""

    def __init__(self, retry_after: float, message: str | None = None):
        self.retry_after = retry_after
        super().__init__(message or f"server is overloaded; retry after {retry_after:.0f} s")


class RequestTooLarge(ServiceError):
    """A request with more items than the queue can ever hold; retrying will not help."""

    def __init__(self, n_items: int, limit: int):
        self.n_items = n_items
        self.limit = limit
        super().__init__(f"request has {n_items} items; at most {limit} can be queued at once")


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before all of its items were computed."""


class WorkerUnavailable(ServiceError):
    """The model worker is not serving: not started, warming up, stopped or stalled."""


class Draining(WorkerUnavailable):
    """The worker is draining for shutdown and admits no new work."""


class BatchFailed(ServiceError):
    """An item failed inside the model. The cause is logged, not shown."""


class OutOfMemory(ServiceError):
    """Raised by a backend when a batch does not fit in device memory.

    The worker reacts by shrinking its batch limit and retrying; a caller sees it only
    when a single item does not fit.
    """


class InvalidRequest(ServiceError):
    """The request is malformed beyond what schema validation catches (bad base64...)."""


class UnsupportedMediaType(ServiceError):
    """A body in a content type the endpoint does not read."""


class EmptyInput(InvalidRequest):
    """No items at all, or an empty text, label, template or image (0 bytes)."""


class TooManyItems(ServiceError):
    """More items (or form parts) in one request than `max_items_per_request` allows."""


class BodyTooLarge(ServiceError):
    """The request body is over `max_body_bytes`; refused while it was still arriving."""


class InputTooLong(ServiceError):
    """A text over `max_text_chars`, refused before tokenising."""


class InvalidText(ServiceError):
    """A text that is not valid Unicode (lone surrogates can arrive as JSON escapes)."""


class ImageTooLarge(ServiceError):
    """An image over the pixel or frame cap, refused from its header before decoding."""


class ImageFormatNotAllowed(ServiceError):
    """An image in a format outside the allow-list, refused before any decoder runs."""


class UrlNotAllowed(ServiceError):
    """An image URL that is disabled, not http(s), or resolves to a refused address."""


class FetchFailed(ServiceError):
    """An allowed image URL that could not be fetched: timeout, HTTP error, redirects."""


class FetchTooLarge(FetchFailed):
    """An image URL whose body is over `url_max_bytes`."""


class Unauthorized(ServiceError):
    """No API key, or one that is not configured. `presented` says whether one was sent."""

    def __init__(self, presented: bool):
        self.presented = presented
        super().__init__("a valid API key is required: 'Authorization: Bearer <key>'"
                         if not presented else "the API key is not valid")


class RateLimited(ServiceError):
    """The key's request rate is over its limit."""

    def __init__(self, retry_after: float):
        self.retry_after = retry_after
        super().__init__(f"rate limit reached; retry after {max(1, round(retry_after))} s")


class ModelUnavailable(WorkerUnavailable):
    """A configured model that failed to load; the others serve."""


class BatchStalled(BatchFailed):
    """The batch ran past the watchdog's `stall_timeout_s`; its requests fail, others go on."""

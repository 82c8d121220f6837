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


class Cancelled(ServiceError):
    """The caller went away (client disconnected) before the request completed."""


ClientGone = Cancelled


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

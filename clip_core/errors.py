"""Domain errors raised by clip_core.

Each error class says whose fault it is (`Fault`) and names its kind (`error_type`, the
`type` of an error body); subclasses inherit both unless they say otherwise. They carry
no HTTP meaning: the service maps each `Fault` to a status code in one place.
Messages name what went wrong and what to do, and never echo a caller's whole input.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class Fault(enum.Enum):
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


class DomainError(Exception):
    """Base class of every error raised on purpose, here and in the service."""

    fault: ClassVar[Fault] = Fault.OURS
    # "internal_error" is answered with a generic message: the text may hold internals.
    error_type: ClassVar[str] = "internal_error"


class ClipCoreError(DomainError):
    """Base class of every error clip_core raises on purpose."""


class InvalidInput(ClipCoreError):
    """The caller's input cannot be processed (bad image, over-long text...)."""

    fault = Fault.UNPROCESSABLE
    error_type = "invalid_input"


class TextTooLong(InvalidInput):
    """A text needs more tokens than the context length and truncation is off."""

    error_type = "text_too_long"

    def __init__(self, index: int, n_tokens: int, context_length: int):
        self.index = index
        self.n_tokens = n_tokens
        self.context_length = context_length
        super().__init__(
            f"text {index} needs {n_tokens} tokens but the context length is "
            f"{context_length}; shorten it or allow truncation"
        )


class ImageDecodeError(InvalidInput):
    """Bytes that are not an image Pillow can decode."""

    fault = Fault.MALFORMED
    error_type = "invalid_image"


class ModelNotFound(ClipCoreError):
    """A model name that is neither in the registry nor a path on disk."""

    fault = Fault.NOT_FOUND
    error_type = "model_not_found"


class CheckpointError(ClipCoreError):
    """A checkpoint that cannot be read or does not fit the architecture."""


class ChecksumMismatch(CheckpointError):
    """A file whose SHA-256 differs from the registry's."""

    def __init__(self, path: str, expected: str, actual: str):
        self.expected = expected
        self.actual = actual
        super().__init__(f"{path}: SHA-256 is {actual}, expected {expected}")


class WeightsUnavailable(ClipCoreError):
    """Weights are neither cached nor downloadable (offline, or the download failed)."""

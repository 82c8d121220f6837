"""Domain errors raised by clip_core.

They carry no HTTP meaning; the service maps them to status codes in one place.
Messages name what went wrong and what to do, and never echo a caller's whole input.
"""

from __future__ import annotations


class ClipCoreError(Exception):
    """Base class of every error clip_core raises on purpose."""


class InvalidInput(ClipCoreError):
    """The caller's input cannot be processed (bad image, over-long text...)."""


class TextTooLong(InvalidInput):
    """A text needs more tokens than the context length and truncation is off."""

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


class ModelNotFound(ClipCoreError):
    """A model name that is neither in the registry nor a path on disk."""


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

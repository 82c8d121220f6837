"""Domain errors raised by clip_core.

Each error class names its kind (`error_type`, the `type` of an error body) and whose
fault it is (`fault`); subclasses inherit both unless they say otherwise. They carry no
HTTP meaning: the service maps each fault to a status code in one place.
Messages name what went wrong and what to do, and never echo a caller's whole input.
"""

from __future__ import annotations

from typing import ClassVar


class ClipCoreError(Exception):
    """Base class of every error clip_core raises on purpose."""

    # One of the service's faults (service.errors.Fault), named by its value: clip_core
    # imports nothing of the service. "ours": not the caller's doing.
    fault: ClassVar[str] = "ours"
    # "internal_error" is answered with a generic message: the text may hold internals.
    error_type: ClassVar[str] = "internal_error"


class InvalidInput(ClipCoreError):
    """The caller's input cannot be processed (bad image, over-long text...)."""

    fault = "unprocessable"
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

    fault = "malformed"
    error_type = "invalid_image"


class ModelNotFound(ClipCoreError):
    """A model name that is neither in the registry nor a path on disk."""

    fault = "not_found"
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


# ---- moderation (clip_core.moderation) ----
# Policy and head files are the operator's, read at start-up or by the offline tools:
# their errors are "ours" (a server that cannot load them does not start) and name the
# file, so that start-up fails with a message that says what to fix.


class ModerationFileError(ClipCoreError):
    """A policy or head file that cannot be used. `path` names it."""

    def __init__(self, path: object, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class PolicyInvalid(ModerationFileError):
    """A policy file that does not parse or validate; `field` is the dotted path of the
    first offending field (e.g. `categories.red.threshold`), or `(file)` when the file
    itself cannot be read."""

    def __init__(self, path: object, field: str, message: str):
        self.field = field
        super().__init__(path, f"field {field}: {message}")


class HeadInvalid(ModerationFileError):
    """A head file that is not a readable clip-head/1 safetensors file."""


class HeadModelMismatch(ModerationFileError):
    """A head trained on another model's embeddings (its fingerprint differs)."""

    def __init__(self, path: object, expected: str, actual: str):
        self.expected = expected
        self.actual = actual
        super().__init__(
            path, f"head was trained for model fingerprint {actual}, but the model it is "
            f"loaded for has {expected}; retrain it with clip-train-head on that model")

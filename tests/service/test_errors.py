"""Domain errors to HTTP answers: each error class carries its fault and type, and
service/api/errors.py alone turns a fault into a status."""

from __future__ import annotations

import json

import pytest

import clip_core.errors
import service.errors
from clip_core.errors import ClipCoreError
from service.api.errors import STATUS, status_for, to_response
from service.errors import Fault, ServiceError

# Every domain error's answer, written out: what the first-match table answered before
# the errors carried their fault. A class missing here fails the test below, so a new
# error is given its answer on purpose.
EXPECTED: dict[str, tuple[int, str]] = {
    # service.errors
    "ServiceError": (500, "internal_error"),
    "Overloaded": (503, "overloaded"),
    "RequestTooLarge": (413, "too_many_items"),
    "DeadlineExceeded": (504, "deadline_exceeded"),
    "WorkerUnavailable": (503, "unavailable"),
    "Draining": (503, "unavailable"),
    "ModelUnavailable": (503, "unavailable"),
    "BatchFailed": (500, "inference_failed"),
    "BatchStalled": (500, "inference_failed"),
    "DeviceFailed": (500, "device_failed"),
    "OutOfMemory": (503, "overloaded"),
    "InvalidRequest": (400, "invalid_request"),
    "EmptyInput": (422, "invalid_request"),
    "UnsupportedMediaType": (415, "unsupported_media_type"),
    "TooManyItems": (413, "too_many_items"),
    "BodyTooLarge": (413, "body_too_large"),
    "InputTooLong": (422, "text_too_long"),
    "InvalidText": (422, "invalid_text"),
    "ImageTooLarge": (413, "image_too_large"),
    "ImageFormatNotAllowed": (415, "unsupported_image_format"),
    "UrlNotAllowed": (400, "url_not_allowed"),
    "FetchFailed": (422, "fetch_failed"),
    "FetchTooLarge": (413, "image_too_large"),
    "Unauthorized": (401, "unauthorized"),
    "RateLimited": (429, "rate_limited"),
    "PolicyNotFound": (404, "policy_not_found"),
    "UnknownCategory": (422, "unknown_category"),
    # clip_core.errors
    "ClipCoreError": (500, "internal_error"),
    "InvalidInput": (422, "invalid_input"),
    "TextTooLong": (422, "text_too_long"),
    "ImageDecodeError": (400, "invalid_image"),
    "ModelNotFound": (404, "model_not_found"),
    "CheckpointError": (500, "internal_error"),
    "ChecksumMismatch": (500, "internal_error"),
    "WeightsUnavailable": (500, "internal_error"),
    # Policy and head files are the operator's: they end start-up, never reach a caller.
    "ModerationFileError": (500, "internal_error"),
    "PolicyInvalid": (500, "internal_error"),
    "HeadInvalid": (500, "internal_error"),
    "HeadModelMismatch": (500, "internal_error"),
}

# Constructors that take more than a message.
_ARGS: dict[str, tuple] = {
    "Overloaded": (2.3,),
    "RateLimited": (0.4,),
    "RequestTooLarge": (5000, 1024),
    "Unauthorized": (True,),
    "TextTooLong": (0, 90, 77),
    "ChecksumMismatch": ("w.safetensors", "ab", "cd"),
    "ModerationFileError": ("p.yaml", "a message"),
    "PolicyInvalid": ("p.yaml", "categories.red.threshold", "a message"),
    "HeadInvalid": ("h.safetensors", "a message"),
    "HeadModelMismatch": ("h.safetensors", "sha256:ab", "sha256:cd"),
}


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


DOMAIN_ERRORS = sorted(
    {c for c in [ServiceError, ClipCoreError, *_subclasses(ServiceError),
                 *_subclasses(ClipCoreError)]
     if c.__module__ in (service.errors.__name__, clip_core.errors.__name__)},
    key=lambda c: c.__name__,
)


def _instance(cls: type[Exception], like: type[Exception] | None = None) -> Exception:
    return cls(*_ARGS.get((like or cls).__name__, ("a message",)))


def test_every_domain_error_has_a_written_answer():
    assert len(DOMAIN_ERRORS) >= 30
    # clip_core names its faults by value (it imports nothing of the service).
    assert all(Fault(c.fault) for c in DOMAIN_ERRORS)
    missing = [c.__name__ for c in DOMAIN_ERRORS if c.__name__ not in EXPECTED]
    assert not missing, f"give these errors their answer in EXPECTED: {missing}"
    stale = sorted(EXPECTED.keys() - {c.__name__ for c in DOMAIN_ERRORS})
    assert not stale, f"EXPECTED names errors that no longer exist: {stale}"


@pytest.mark.parametrize("cls", DOMAIN_ERRORS, ids=lambda c: c.__name__)
def test_each_domain_error_answers_as_before(cls):
    status, kind = EXPECTED[cls.__name__]
    exc = _instance(cls)
    assert status_for(exc) == (status, kind)
    response = to_response(exc)
    assert response.status_code == status
    body = json.loads(response.body)["error"]
    assert body["type"] == kind
    # Only a bare base class hides its message (it may hold internals).
    assert body["message"] == ("internal error" if kind == "internal_error" else str(exc))
    assert ("retry-after" in response.headers) == (status == 503 or kind == "rate_limited")


@pytest.mark.parametrize("cls", DOMAIN_ERRORS, ids=lambda c: c.__name__)
def test_a_new_subclass_answers_as_its_parent(cls):
    # A first-match table would answer for a subclass of EmptyInput (422) whatever row of
    # InvalidRequest (400) came first; the class attributes cannot be shadowed that way.
    child = type(f"New{cls.__name__}", (cls,), {})
    assert status_for(_instance(child, like=cls)) == EXPECTED[cls.__name__]


def test_a_subclass_that_names_its_own_fault_gets_its_status():
    class Gone(service.errors.InvalidRequest):
        fault = Fault.NOT_FOUND
        error_type = "gone"

    assert status_for(Gone("x")) == (404, "gone")
    assert status_for(service.errors.InvalidRequest("x")) == (400, "invalid_request")


def test_every_fault_has_a_status_and_other_exceptions_are_ours():
    assert set(STATUS) == set(Fault)
    assert status_for(RuntimeError("boom")) == (500, "internal_error")
    r = to_response(KeyError("secret internals"))
    assert r.status_code == 500 and b"secret" not in r.body

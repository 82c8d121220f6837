"""A broken device and errors a backend raises for one input.

A sticky CUDA error (device-side assert, illegal address...) poisons the context: the
worker fails the batch whole without bisecting it, marks itself failed, stops its
threads and refuses everything after, and /healthz asks for a restart. An error that
blames one input (a corrupt JPEG found by the GPU decoder) reaches that input's request
as it is; the batch's other requests are served."""

from __future__ import annotations

import asyncio

import pytest
import torch
from fake_backend import FakeBackend
from refusals import metric, tiny_checkpoint
from refusals import serving as app_serving
from test_batcher import blocked, outstanding, run, serving, until

from clip_core.errors import ImageDecodeError
from service.device_errors import is_sticky_device_error
from service.errors import (
    BatchFailed,
    DeviceFailed,
    ImageFormatNotAllowed,
    OutOfMemory,
    WorkerUnavailable,
    is_callers_fault,
)

# ---- telling sticky errors apart ----


class AcceleratorError(RuntimeError):
    """Named as torch's: the classifier matches types by name, torch unimported."""


@pytest.mark.parametrize("message", [
    "CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`...",
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: unspecified launch failure",
    "CUDA error: uncorrectable ECC error encountered",
    "CUDA error: misaligned address",
    "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, ...)`",
    "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED",
])
def test_sticky_cuda_errors_are_told_by_their_message(message):
    assert is_sticky_device_error(RuntimeError(message))
    assert is_sticky_device_error(AcceleratorError(message))


def test_an_accelerator_error_with_a_sticky_code_is_sticky_whatever_its_message():
    err = AcceleratorError("CUDA error")
    err.error_code = 710  # cudaErrorAssert
    assert is_sticky_device_error(err)
    err.error_code = 1  # cudaErrorInvalidValue: the context is fine
    assert not is_sticky_device_error(err)


@pytest.mark.parametrize("err", [
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: invalid argument"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
    ValueError("an illegal memory access was encountered"),  # not a device runtime's type
    MemoryError(),
])
def test_other_errors_are_not_sticky(err):
    assert not is_sticky_device_error(err)


def test_a_sticky_error_is_found_behind_the_one_raised_from_it():
    try:
        try:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        except RuntimeError as inner:
            raise ValueError("collating failed") from inner
    except ValueError as outer:
        assert is_sticky_device_error(outer)


def test_callers_faults_are_told_from_ours():
    assert is_callers_fault(ImageDecodeError("image 3 does not decode"))  # clip_core's
    assert is_callers_fault(ImageFormatNotAllowed("not allowed"))
    assert not is_callers_fault(BatchFailed("ours"))
    assert not is_callers_fault(OutOfMemory("ours"))
    assert not is_callers_fault(ValueError("anything else"))


# ---- the worker ----


def test_a_broken_device_fails_the_batch_whole_and_the_worker_for_good():
    backend = FakeBackend(break_device_on={"bad"})

    async def scenario():
        async with serving(backend, max_batch_size=4) as worker:
            blocker = await blocked(worker, backend)
            in_batch = [asyncio.create_task(worker.submit("image", p))
                        for p in ("a", "bad", "b", "c")]
            queued = [asyncio.create_task(worker.submit("image", p)) for p in ("d", "e")]
            await until(lambda: outstanding(worker) == 7)
            assert worker.ready and not worker.failed
            backend.resume()
            await blocker
            errors = []
            for task in in_batch:
                with pytest.raises(DeviceFailed) as e:
                    await task
                errors.append(e.value)
            # One failure for the batch, but each request raises an instance of its own,
            # so no request's traceback grows with another's frames.
            assert len({id(e) for e in errors}) == 4
            assert len({str(e) for e in errors}) == 1
            for task in queued:
                with pytest.raises(WorkerUnavailable):
                    await task
            assert worker.failed and not worker.ready
            # Not bisected: one call on the broken device, the whole batch.
            assert [(c.size, c.outcome) for c in backend.calls] == [(1, "ok"),
                                                                    (4, "device_failed")]
            with pytest.raises(WorkerUnavailable):
                await worker.submit("image", "after")
            await until(lambda: not any(t.thread.is_alive() for t in worker._threads))
        assert backend.seen() == {"blocker", "a", "bad", "b", "c"}

    run(scenario)


def test_a_broken_device_stops_every_stream():
    backend = FakeBackend(break_device_on={"bad"})

    async def scenario():
        async with serving(backend, streams=2) as worker:
            assert len(worker._threads) == 2
            with pytest.raises(DeviceFailed):
                await worker.submit("text", "bad")
            await until(lambda: not any(t.thread.is_alive() for t in worker._threads))
            assert worker.failed
            with pytest.raises(WorkerUnavailable):
                await worker.submit("text", "fine")

    run(scenario)


def test_a_callers_error_from_the_backend_reaches_its_request_unchanged():
    corrupt = ImageDecodeError("image 0: the JPEG data is corrupt")
    backend = FakeBackend(refuse={"corrupt": corrupt})

    async def scenario():
        async with serving(backend, max_batch_size=8) as worker:
            blocker = await blocked(worker, backend)
            payloads = [f"ok{i}" for i in range(7)]
            payloads.insert(5, "corrupt")
            tasks = [asyncio.create_task(worker.submit("image", p)) for p in payloads]
            await until(lambda: outstanding(worker) == 9)
            backend.resume()
            await blocker
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert outcomes[5] is corrupt
        assert [r.value for i, r in enumerate(outcomes) if i != 5] == [
            ("image", f"ok{i}") for i in range(7)]
        assert backend.calls[1].size == 8 and backend.calls[1].outcome == "refused"
        assert not worker.failed

    run(scenario)


def test_a_service_error_blaming_the_input_is_kept_too():
    refused = ImageFormatNotAllowed("image 0: this JPEG's subsampling is not decoded")
    backend = FakeBackend(refuse={"odd": refused})

    async def scenario():
        async with serving(backend) as worker:
            with pytest.raises(ImageFormatNotAllowed) as got:
                await worker.submit_many("image", ["odd", "fine"])
            assert got.value is refused
            assert (await worker.submit("image", "fine")).value == ("image", "fine")

    run(scenario)


# ---- the backend and the app ----


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("m"))


def _sticky() -> torch.Tensor:
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_the_backend_raises_device_failed_for_a_sticky_error_only(checkpoint):
    with app_serving(checkpoint) as client:
        backend = client.app.state.engine.models["tiny"].backend
        with pytest.raises(DeviceFailed) as failed:
            backend._guarded("image", 2, _sticky)
        assert is_sticky_device_error(failed.value.__cause__)

        def shapes() -> torch.Tensor:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

        with pytest.raises(RuntimeError, match="shapes"):  # left to the bisection
            backend._guarded("image", 2, shapes)


def test_a_broken_device_makes_healthz_ask_for_a_restart(checkpoint):
    with app_serving(checkpoint) as client:
        assert client.get("/healthz").status_code == 200
        assert metric(client, "clip_model_ready", model="tiny") == 1
        backend = client.app.state.engine.models["tiny"].backend
        backend.run = lambda kind, payloads: backend._guarded(kind, len(payloads), _sticky)

        r = client.post("/embed", json={"texts": ["a photo of a cat"]})
        assert r.status_code == 500, r.text
        assert r.json()["error"]["type"] == "device_failed"
        assert "illegal" not in r.text  # the cause is logged, not shown
        assert metric(client, "clip_errors_total", type="device_failed") == 1

        health = client.get("/healthz")
        assert health.status_code == 503 and health.json()["error"]["type"] == "unavailable"
        assert client.get("/readyz").status_code == 503
        assert metric(client, "clip_model_ready", model="tiny") == 0
        later = client.post("/embed", json={"texts": ["a photo of a dog"]})
        assert later.status_code == 503 and later.json()["error"]["type"] == "unavailable"

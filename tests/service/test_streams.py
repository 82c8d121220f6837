"""Streams: a worker running several batches side by side, each on its share of the cores.

Against the fake model (concurrency, placement, failures of one stream) and against
ClipBackend (each serving thread's torch pool). Every test is bounded in time.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch
from fake_backend import FakeBackend, FakeClock
from test_backend import PREP, tiny_model
from test_batcher import run, serving, until

from clip_core.loader import LoadedModel
from service.admission import Admission
from service.backend import ClipBackend
from service.batcher import BatcherConfig, Request, WorkItem
from service.dispatch import Batch, Dispatcher
from service.errors import BatchStalled, WorkerUnavailable
from service.scheduler import BatchQueue
from service.worker import ModelWorker


class PlacingBackend(FakeBackend):
    """Records, per call, how the worker placed it and how many calls ran at once."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.placed: list[tuple[int, int, bool]] = []  # place() calls, in order
        self.ran: list[tuple[tuple[int, int, bool], tuple[Any, ...]]] = []
        self.running = 0
        self.most_at_once = 0
        self._local = threading.local()
        self._count = threading.Lock()

    def place(self, stream: int, streams: int, alone: bool) -> None:
        self._local.place = (stream, streams, alone)
        with self._count:
            self.placed.append((stream, streams, alone))

    def run(self, kind: str, payloads: list[Any]) -> list[Any]:
        with self._count:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.ran.append((self._local.place, tuple(payloads)))
        try:
            return super().run(kind, payloads)
        finally:
            with self._count:
                self.running -= 1

    def placement_of(self, payload: Any) -> tuple[int, int, bool]:
        with self._count:
            return next(place for place, payloads in self.ran if payload in payloads)


def test_streams_compute_batches_side_by_side():
    backend = PlacingBackend(delay_s=0.05)

    async def scenario():
        async with serving(backend, streams=2, max_batch_size=4) as worker:
            results = await asyncio.gather(*(worker.submit("image", i) for i in range(24)))
        assert [r.value for r in results] == [("image", i) for i in range(24)]
        assert backend.most_at_once == 2
        assert {stream for stream, _, _ in backend.placed} == {0, 1}

    run(scenario)


def test_one_stream_never_overlaps_batches():
    backend = PlacingBackend(delay_s=0.02)

    async def scenario():
        async with serving(backend, max_batch_size=4) as worker:
            await asyncio.gather(*(worker.submit("image", i) for i in range(16)))
        assert backend.most_at_once == 1

    run(scenario)


def test_a_lone_request_runs_alone_on_stream_zero_and_the_next_on_stream_one():
    backend = PlacingBackend(hang_on={"long"})

    async def scenario():
        async with serving(backend, streams=2) as worker:
            (first,) = [r.value for r in [await worker.submit("image", "a")]]
            assert first == ("image", "a")
            assert backend.placement_of("a") == (0, 2, True)
            # Warm-up ran on stream 0 alone, before any request.
            assert backend.placed[0] == (0, 2, True)
            # The answer is posted before stream 0 leaves the books: wait until it has, or
            # the next request would find stream 0 still busy and go to stream 1.
            await until(lambda: not worker.dispatcher.streams.busy)

            long = asyncio.create_task(worker.submit("image", "long"))
            await until(lambda: backend.running == 1)
            # Stream 0 is busy: the next request runs beside it, on its own share.
            result = await asyncio.wait_for(worker.submit("image", "b"), 2)
            assert result.value == ("image", "b")
            assert not long.done()
            assert backend.placement_of("long") == (0, 2, True)
            assert backend.placement_of("b") == (1, 2, False)
            backend.release_hang()
            assert (await long).value == ("image", "long")

    run(scenario)


def _request(name: str, n: int, *, seq0: int, now: float = 0.0) -> tuple[Request, list[WorkItem]]:
    """A request of `n` images named name0..name{n-1}, due in 10 s, not yet admitted."""
    req = Request(name, "image", None, [None] * n, n)  # no future: nobody awaits it here
    items = [WorkItem(seq0 + i, req, i, "image", f"{name}{i}", 1, now + 10, now)
             for i in range(n)]
    return req, items


def test_idle_streams_split_the_queue_evenly():
    """Sixteen queued images and two idle streams: eight each, not sixteen and none."""
    queue = BatchQueue(BatcherConfig(streams=2, max_batch_size=32))
    for k, name in enumerate(("a", "b")):
        queue.add(_request(name, 8, seq0=8 * k)[1])
    both_idle = queue.take("image", 0.0, limit=32, idle=2)
    last_idle = queue.take("image", 0.0, limit=32, idle=1)  # stream 0 busy now
    assert [it.payload for it in both_idle.batch] == [f"a{i}" for i in range(8)]
    assert [it.payload for it in last_idle.batch] == [f"b{i}" for i in range(8)]
    assert queue.empty and queue.outstanding == 16  # taken, not yet answered

    queue.add(_request("c", 8, seq0=16)[1])
    assert len(queue.take("image", 0.0, limit=32, idle=2).batch) == 4


def test_each_idle_stream_takes_its_share_through_the_dispatcher():
    """Stream 0 takes half of what waits, alone no more; stream 1, busy beside it, the rest.
    Stream 1 may not take work while stream 0 is idle."""
    d = Dispatcher(BatcherConfig(streams=2, max_batch_size=32), name="fake",
                   release_hook=None, clock=FakeClock(5.0))
    d.started()
    d.warmed()
    req, items = _request("a", 8, seq0=0, now=5.0)
    assert d.admit(req, items) == 8  # all queued
    first = d.next_step(0, 0)
    assert isinstance(first, Batch)
    assert [it.payload for it in first.taken.batch] == [f"a{i}" for i in range(4)]
    assert first.depth == 4 and first.alone is False  # the rest still waits
    second = d.next_step(1, 0)
    assert isinstance(second, Batch)
    assert [it.payload for it in second.taken.batch] == [f"a{i}" for i in range(4, 8)]
    assert second.alone is False  # stream 0 computes beside it
    assert d.streams.idle() == 1 and d.streams.busy


def test_after_a_device_failure_no_stream_takes_another_batch():
    """Between the failure and the threads' stop, a second stream must not run queued work
    on the broken device: those items are to be refused (retryable), not failed by it."""
    d = Dispatcher(BatcherConfig(streams=2, max_batch_size=4), name="fake",
                   release_hook=None, clock=FakeClock(5.0))
    d.started()
    d.warmed()
    req, items = _request("a", 8, seq0=0, now=5.0)
    d.admit(req, items)
    assert isinstance(d.next_step(0, 0), Batch)  # stream 0 computes; its device breaks
    d.fail()
    assert d.next_step(1, 0) is None  # stream 1 ends instead of taking the rest
    assert d.queue.outstanding == 8 and not d.queue.empty  # left for stop() to refuse


def test_a_stalled_stream_is_replaced_while_the_other_keeps_serving():
    backend = PlacingBackend(hang_on={"stuck"})

    async def scenario():
        async with serving(backend, streams=2, stall_timeout_s=0.3) as worker:
            stuck = asyncio.create_task(worker.submit("image", "stuck"))
            await until(lambda: backend.running == 1)
            served = await asyncio.wait_for(
                asyncio.gather(*(worker.submit("image", i) for i in range(6))), 2)
            assert [r.value for r in served] == [("image", i) for i in range(6)]
            with pytest.raises(BatchStalled):
                await asyncio.wait_for(stuck, 3)
            assert worker.ready and not worker.failed
            # The replacement serves stream 0 again: a lone request runs there.
            await asyncio.sleep(0.05)
            after = await asyncio.wait_for(worker.submit("image", "after"), 2)
            assert after.value == ("image", "after")
            assert backend.placement_of("after")[0] == 0
            backend.release_hang()
            names = {t.name for t in threading.enumerate()}
            assert "model-worker-fake-s0-1" in names

    run(scenario)


def test_one_dead_stream_fails_the_worker_and_stops_the_others():
    backend = PlacingBackend(fatal_on={"boom"})

    async def scenario():
        async with serving(backend, streams=2) as worker:
            threads = [t.thread for t in worker._threads]
            with pytest.raises(WorkerUnavailable):
                await asyncio.wait_for(worker.submit("image", "boom"), 2)
            await until(lambda: worker.failed)
            assert not worker.ready
            with pytest.raises(WorkerUnavailable):
                await worker.submit("image", "later")
            await until(lambda: not any(t.is_alive() for t in threads))

    run(scenario)
    assert [c.outcome for c in backend.calls] == ["fatal"]


def test_drain_stops_every_stream():
    backend = PlacingBackend(delay_s=0.02)

    async def scenario():
        worker = ModelWorker(backend, BatcherConfig(streams=3), name="fake")
        await worker.start()
        threads = [t.thread for t in worker._threads]
        assert len(threads) == 3
        results = await asyncio.gather(*(worker.submit("image", i) for i in range(12)))
        assert len(results) == 12
        assert await worker.drain(timeout=2)
        assert not any(t.is_alive() for t in threads)

    run(scenario)


def _timed(config: BatcherConfig) -> Admission:
    """Admission that has seen image batches take 0.1 s an image (no fixed cost)."""
    admission = Admission(config)
    for _ in range(5):
        admission.costs.observe("image", 4, 0.4)
        admission.costs.observe("image", 8, 0.8)
    return admission


def test_predicted_wait_is_shared_over_streams():
    waits = {streams: _timed(BatcherConfig(streams=streams)).predicted_wait(
                 "image", {"image": 16, "text": 0})
             for streams in (1, 2)}
    assert waits[1] == pytest.approx(1.6)
    assert waits[2] == pytest.approx(0.8)


def test_config_rejects_no_streams():
    with pytest.raises(ValueError, match="streams"):
        BatcherConfig(streams=0)


# ---- ClipBackend: each serving thread sizes its own torch pool ----


def test_place_sizes_the_calling_threads_pool_only():
    model = tiny_model()
    backend = ClipBackend(LoadedModel("tiny", model, PREP, "random"), threads=2)
    seen: dict[str, list[int]] = {}

    def serve(name: str, stream: int) -> None:
        counts = []
        backend.place(stream, 2, alone=False)
        counts.append(torch.get_num_threads())
        backend.place(stream, 2, alone=True)
        counts.append(torch.get_num_threads())
        seen[name] = counts

    for name, stream in (("s0", 0), ("s1", 1)):
        t = threading.Thread(target=serve, args=(name, stream))
        t.start()
        t.join(10)
    assert seen["s0"] == [1, 2]  # its share, then every core when alone
    assert seen["s1"] == [1, 1]  # only stream 0 widens
    three = ClipBackend(LoadedModel("tiny", model, PREP, "random"), threads=3)
    shares = []

    def share(stream: int) -> None:
        three.place(stream, 2, alone=False)
        shares.append(torch.get_num_threads())

    for stream in (0, 1):
        t = threading.Thread(target=share, args=(stream,))
        t.start()
        t.join(10)
    assert shares == [2, 1]


def test_admission_counts_the_batch_a_request_would_join():
    """Wait 0.4 s plus a full 10-image batch of 1 s: over a 1.2 s bound, so refused,
    though the wait alone is well within it."""
    admission = _timed(BatcherConfig(max_batch_size=10, max_queue_wait_s=1.2))
    units = {"image": 4, "text": 0}
    assert admission.predicted_wait("image", units) == pytest.approx(0.4)
    refused = admission.refusal("image", 1, outstanding=4, units=units)
    assert refused is not None and refused.retry_after == pytest.approx(1.0)
    # 0.1 + 1.0 s: within the bound
    assert admission.refusal("image", 1, outstanding=1, units={"image": 1, "text": 0}) is None

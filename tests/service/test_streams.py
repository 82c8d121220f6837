"""Streams: a worker running several batches side by side, each on its share of the cores.

Against the fake model (concurrency, placement, failures of one stream) and against
ClipBackend (each serving thread's torch pool). Every test is bounded in time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch
from fake_backend import FakeBackend
from test_backend import PREP, tiny_model
from test_batcher import run, serving, until

from clip_core.loader import LoadedModel
from service.backend import ClipBackend
from service.batcher import BatcherConfig, Request
from service.errors import BatchStalled, WorkerUnavailable
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


def test_idle_streams_split_the_queue_evenly():
    """Eight queued images and two idle streams: four each, not eight and none."""

    async def scenario():
        worker = ModelWorker(FakeBackend(), BatcherConfig(streams=2, max_batch_size=32))
        worker._loop = asyncio.get_running_loop()
        worker._running = worker._warm = True  # queue by hand, no threads
        now = time.monotonic()
        for name in ("a", "b"):
            req = Request(name, "image", worker._loop.create_future(), [None] * 8, 8)
            with worker._cond:
                assert worker._admit(req, [f"{name}{i}" for i in range(8)], [1] * 8,
                                     now + 10, now) is None
        with worker._cond:
            both_idle, _ = worker._take("image", now)
            worker._current[0] = object()  # stream 0 busy now: stream 1 is the last idle
            last_idle, _ = worker._take("image", now)
        assert [it.payload for it in both_idle] == [f"a{i}" for i in range(8)]
        assert len(last_idle) == 8  # the whole remaining queue

        with worker._cond:
            worker._current.clear()
        req = Request("c", "image", worker._loop.create_future(), [None] * 8, 8)
        with worker._cond:
            worker._admit(req, [f"c{i}" for i in range(8)], [1] * 8, now + 10, now)
            split, _ = worker._take("image", now)
        assert len(split) == 4

    run(scenario)


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
            threads = list(worker._threads)
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
        assert len(worker._threads) == 3
        results = await asyncio.gather(*(worker.submit("image", i) for i in range(12)))
        assert len(results) == 12
        assert await worker.drain(timeout=2)
        assert not any(t.is_alive() for t in worker._threads)

    run(scenario)


def test_predicted_wait_is_shared_over_streams():
    async def scenario():
        waits = {}
        for streams in (1, 2):
            worker = ModelWorker(FakeBackend(), BatcherConfig(streams=streams))
            for _ in range(5):
                worker._costs.observe("image", 4, 0.4)
                worker._costs.observe("image", 8, 0.8)
            worker._units["image"] = 16
            with worker._cond:
                waits[streams] = worker._predicted_wait("image")
        assert waits[1] == pytest.approx(1.6)
        assert waits[2] == pytest.approx(0.8)

    run(scenario)


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

    async def scenario():
        worker = ModelWorker(FakeBackend(), BatcherConfig(max_batch_size=10,
                                                          max_queue_wait_s=1.2))
        for _ in range(5):
            worker._costs.observe("image", 4, 0.4)
            worker._costs.observe("image", 8, 0.8)
        worker._units["image"] = worker._outstanding = 4
        with worker._cond:
            assert worker._predicted_wait("image") == pytest.approx(0.4)
            refused = worker._overloaded("image", 1)
        assert refused is not None and refused.retry_after == pytest.approx(1.0)
        worker._units["image"] = worker._outstanding = 1
        with worker._cond:
            assert worker._overloaded("image", 1) is None  # 0.1 + 1.0 s

    run(scenario)

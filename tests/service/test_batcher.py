"""The batching engine against a fake model: batching, routing, admission, deadlines,
failure isolation, drain and the worker's own death. Every test is bounded in time, and
none asserts on elapsed wall time: timings the policy learns from run on a FakeClock.

The pure units under the worker (the queue, admission, the bisection, the watchdog) have
tests of their own in test_scheduling_units.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from fake_backend import FakeBackend, FakeClock

from service.batcher import BatcherConfig, CostModel, ItemResult, NoEvents, group_by_length
from service.errors import (
    BatchFailed,
    BatchStalled,
    DeadlineExceeded,
    Draining,
    OutOfMemory,
    Overloaded,
    RequestTooLarge,
    WorkerUnavailable,
)
from service.worker import ModelWorker


def run(test: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(test(), timeout)

    return asyncio.run(bounded())


class StallRecorder(NoEvents):
    def __init__(self) -> None:
        self.stalls: list[tuple[Any, ...]] = []

    def stalled(self, kind, size):
        self.stalls.append((kind, size))

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return list(self.stalls) if name == "stalled" else []


class Recorder(NoEvents):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    def _add(self, *event: Any) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, name: str) -> list[tuple[Any, ...]]:
        with self._lock:
            return [e[1:] for e in self.events if e[0] == name]

    def batch_done(self, kind, size, padded_tokens, compute_s):
        self._add("batch_done", kind, size, padded_tokens)

    def items_dropped(self, kind, reason, n):
        self._add("items_dropped", kind, reason, n)

    def rejected(self, kind, n):
        self._add("rejected", kind, n)


@contextlib.asynccontextmanager
async def serving(
    backend: FakeBackend, events: NoEvents | None = None, **config: Any
) -> AsyncIterator[ModelWorker]:
    """A started worker named "fake"; with `backend.clock`, on that simulated clock."""
    clock = {} if backend.clock is None else {"clock": backend.clock}
    worker = ModelWorker(backend, BatcherConfig(**config), name="fake", events=events, **clock)
    await worker.start()
    try:
        yield worker
    finally:
        backend.resume()
        backend.release_hang()
        await worker.drain(timeout=2.0)


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.002)


async def blocked(worker: ModelWorker, backend: FakeBackend, payload: Any = "blocker"):
    """Pause the model with one item on it; everything submitted next stays queued."""
    backend.busy.clear()
    backend.pause()
    task = asyncio.create_task(worker.submit("image", payload))
    await until(backend.busy.is_set)
    return task


def values(results: list[ItemResult]) -> list[Any]:
    return [r.value for r in results]


def outstanding(worker: ModelWorker) -> int:
    """Items admitted and not yet answered, as the worker's queue counts them."""
    return worker.dispatcher.queue.outstanding


# ---- batching ----


def test_batches_form_under_concurrency():
    backend = FakeBackend(delay_s=0.02)

    async def scenario():
        async with serving(backend, max_batch_size=8) as worker:
            results = await asyncio.gather(*(worker.submit("image", i) for i in range(50)))
        assert [r.value for r in results] == [("image", i) for i in range(50)]
        sizes = [c.size for c in backend.batches]
        assert sum(sizes) == 50
        assert max(sizes) <= 8
        assert max(sizes) > 1
        assert len(sizes) <= 12  # ideally 1 + ceil(49 / 8) = 8
        assert all(r.batch_size <= 8 for r in results)

    run(scenario)


def test_an_idle_request_is_not_delayed():
    """An idle worker runs a lone request at once, alone: no time spent queued on the
    worker's clock. (That it is due the instant it is queued is the queue's rule:
    test_scheduling_units.py.)"""
    clock = FakeClock()
    backend = FakeBackend(delay_s=0.02, clock=clock)

    async def scenario():
        async with serving(backend, max_batch_size=32, max_wait_ms=0) as worker:
            for i in range(5):
                result = await worker.submit("image", i)
                assert result.batch_size == 1
                assert result.queue_s == 0.0  # taken at the clock reading it was queued at
                assert result.compute_s == pytest.approx(0.02)
        assert [c.size for c in backend.batches] == [1] * 5

    run(scenario)


def test_max_wait_holds_a_partial_batch_but_not_a_full_one():
    """Two items wait for a third until the oldest has been held 80 ms on the worker's
    clock; three run at once. The clock stands still until the test moves it, so the
    partial batch can only have run because the hold ran out."""
    clock = FakeClock()
    backend = FakeBackend(clock=clock)

    async def scenario():
        async with serving(backend, max_batch_size=3, max_wait_ms=80) as worker:
            held = asyncio.gather(*(worker.submit("image", i) for i in range(2)))
            await until(lambda: outstanding(worker) == 2)
            clock.advance(0.079)
            await asyncio.sleep(0.05)
            assert backend.calls == [] and not held.done()  # 1 ms short of the hold
            clock.advance(0.002)
            first = await held
            assert [r.queue_s for r in first] == [pytest.approx(0.081)] * 2
            full = await asyncio.gather(*(worker.submit("image", i) for i in range(2, 5)))
            assert [r.queue_s for r in full] == [0.0] * 3  # a full batch is not held
        assert [c.size for c in backend.batches] == [2, 3]

    run(scenario)


def test_results_go_to_the_right_request_and_position():
    backend = FakeBackend()
    sizes = [3, 5, 1, 7, 2]

    async def scenario():
        async with serving(backend, max_batch_size=4) as worker:
            blocker = await blocked(worker, backend)
            tasks = [
                asyncio.create_task(
                    worker.submit_many("image", [f"r{r}-{i}" for i in range(n)])
                )
                for r, n in enumerate(sizes)
            ]
            await asyncio.sleep(0.01)
            backend.resume()
            results = await asyncio.gather(*tasks)
            await blocker
        for r, (n, got) in enumerate(zip(sizes, results, strict=True)):
            assert values(got) == [("image", f"r{r}-{i}") for i in range(n)]
            assert all(x.queue_s >= 0 and x.compute_s >= 0 and x.batch_size <= 4 for x in got)
        # 18 items in batches of 4: requests necessarily straddle batches.
        batches = [set(c.payloads) for c in backend.batches[1:]]
        assert [len(b) for b in batches] == [4, 4, 4, 4, 2]
        assert len({i for i, b in enumerate(batches) for p in b if p.startswith("r3-")}) > 1

    run(scenario)


# ---- text: token budget and length grouping ----


def test_text_batches_respect_the_token_budget_and_group_by_length():
    backend = FakeBackend()
    costs = {f"t{i}": (5 if i % 2 else 60) for i in range(20)}  # interleaved short and long

    async def scenario():
        async with serving(backend, max_batch_tokens=200) as worker:
            blocker = await blocked(worker, backend)
            tasks = [asyncio.create_task(worker.submit("text", t, cost)) for t, cost in
                     costs.items()]
            await asyncio.sleep(0.01)
            backend.resume()
            results = await asyncio.gather(*tasks)
            await blocker
        assert [r.value for r in results] == [("text", t) for t in costs]

        text_batches = [c for c in backend.batches if c.kind == "text"]
        padded = [len(c.payloads) * max(costs[p] for p in c.payloads) for c in text_batches]
        assert all(p <= 200 for p in padded)
        # Grouped by length: no batch mixes short and long texts, so padding is nil...
        assert all(len({costs[p] for p in c.payloads}) == 1 for c in text_batches)
        # ...whereas taking them in arrival order pads every short text to 60.
        assert sum(padded) == sum(costs.values())
        assert [c.size for c in text_batches] == [3, 10, 3, 3, 1]

    run(scenario)


def test_group_by_length_prefers_close_lengths_and_keeps_the_oldest():
    from service.batcher import WorkItem

    def item(seq: int, cost: int) -> WorkItem:
        return WorkItem(seq, None, 0, "text", seq, cost, deadline=1e9, enqueued_at=0.0)

    head = item(0, 30)
    others = [item(1, 70), item(2, 10), item(3, 28), item(4, 33), item(5, 31)]
    batch = group_by_length(head, others, max_tokens=140)
    assert [it.seq for it in batch] == [0, 3, 4, 5]  # 4 x 33 = 132 <= 140
    assert [it.seq for it in group_by_length(item(0, 500), others, max_tokens=140)] == [0]


def test_a_text_flood_does_not_starve_an_image():
    backend = FakeBackend()

    async def scenario():
        async with serving(backend, max_batch_tokens=20) as worker:
            blocker = await blocked(worker, backend)  # an image batch runs first
            texts = asyncio.create_task(
                worker.submit_many("text", [f"t{i}" for i in range(100)], [10] * 100)
            )
            await asyncio.sleep(0.005)
            image = asyncio.create_task(worker.submit("image", "late-image"))
            await asyncio.sleep(0.005)
            backend.resume()
            assert (await image).value == ("image", "late-image")
            assert len(await texts) == 100
            await blocker
        order = [c.payloads for c in backend.batches]
        position = next(i for i, p in enumerate(order) if "late-image" in p)
        assert position <= 2  # right after the blocker, or after one text batch at most
        assert len(order) == 1 + 50 + 1

    run(scenario)


# ---- admission ----


def test_overload_refuses_exactly_the_excess():
    backend = FakeBackend()
    events = Recorder()
    sizes = [4, 4, 4, 2, 1]  # cumulative 4, 8, (12), 10, (11) against a limit of 10

    async def scenario():
        async with serving(backend, events, max_queue_items=10) as worker:
            backend.pause()
            tasks = [
                asyncio.create_task(worker.submit_many("image", [f"r{r}-{i}" for i in range(n)]))
                for r, n in enumerate(sizes)
            ]
            outcomes = await asyncio.wait_for(
                asyncio.gather(*tasks[2:3], tasks[4], return_exceptions=True), 1.0
            )
            assert all(isinstance(o, Overloaded) and o.retry_after >= 1.0 for o in outcomes)
            assert outstanding(worker) == 10
            with pytest.raises(RequestTooLarge):
                await worker.submit_many("image", list(range(11)))
            backend.resume()
            for r in (0, 1, 3):
                assert len(await tasks[r]) == sizes[r]
            assert outstanding(worker) == 0
            assert len(await worker.submit_many("image", list(range(10)))) == 10  # room again
        assert events.of("rejected") == [("image", 4), ("image", 1)]  # 5 items refused
        assert not backend.seen() & ({f"r2-{i}" for i in range(4)} | {"r4-0"})

    run(scenario)


# ---- time budgets: batch compute and queue wait ----


def test_the_cost_model_separates_the_cost_of_a_call_from_its_items():
    costs = CostModel()
    assert costs.fit("image") == (0.0, 0.0)  # unknown
    assert costs.cap("image", 32, 0.5) == 32  # no estimate, no bound
    for n in (1, 4, 8, 16, 2, 12, 6):
        costs.observe("image", n, 0.05 + 0.01 * n)
    a, b = costs.fit("image")
    assert a == pytest.approx(0.05) and b == pytest.approx(0.01)
    assert costs.cap("image", 64, 0.15) == 10  # 0.05 + 10 x 0.01
    assert costs.cap("image", 8, 0.15) == 8  # the configured limit still binds
    assert costs.cap("image", 64, 0.01) == 1  # never below one item
    # 25 units in batches of 10: three calls and 25 items.
    assert costs.seconds("image", 25, 10) == pytest.approx(3 * 0.05 + 25 * 0.01)
    assert costs.fit("text") == (0.0, 0.0)  # kinds are learnt apart


def test_the_cost_model_is_proportional_until_batch_sizes_vary():
    costs = CostModel()
    for _ in range(5):
        costs.observe("text", 100, 0.2)
    assert costs.fit("text") == pytest.approx((0.0, 0.002))
    assert costs.cap("text", 10_000, 0.5) == 250


def test_batches_are_sized_to_the_compute_budget():
    # 10 ms a call + 5 ms an item, on the simulated clock: a 60 ms budget fits 10 items,
    # far below the limit.
    backend = FakeBackend(delay_s=0.01, per_item_s=0.005, clock=FakeClock())

    async def scenario():
        async with serving(backend, max_batch_size=64, max_batch_s=0.06) as worker:
            for n in (1, 3, 6, 2, 8):  # varied sizes teach both terms
                await worker.submit_many("image", list(range(n)))
            assert worker.dispatcher.admission.batch_limit("image") == 10
            blocker = await blocked(worker, backend)
            first = len(backend.calls)  # the blocker's call, once it returns
            tasks = [asyncio.create_task(worker.submit("image", i)) for i in range(100)]
            await until(lambda: outstanding(worker) == 101)
            backend.resume()
            results = await asyncio.gather(*tasks)
            await blocker
            assert [r.value for r in results] == [("image", i) for i in range(100)]
            assert backend.batches[first].payloads == ("blocker",)
            assert [c.size for c in backend.batches[first + 1:]] == [10] * 10
            assert worker.dispatcher.admission.batch_limit("image") == 10

    run(scenario)


def test_overload_refuses_by_predicted_wait_and_never_an_idle_worker():
    backend = FakeBackend(per_item_s=0.01, clock=FakeClock())  # 10 ms an image, exactly
    events = Recorder()

    async def scenario():
        async with serving(backend, events, max_queue_wait_s=0.2, max_batch_size=10) as worker:
            for n in (1, 4, 10, 2, 7):
                await worker.submit_many("image", list(range(n)))
            # Idle: even a request far over the budget is taken.
            assert len(await worker.submit_many("image", list(range(60)))) == 60
            task = await blocked(worker, backend)
            # 1 outstanding (~10 ms): admitted; then 30 more items are ~0.3 s of work.
            big = asyncio.create_task(worker.submit_many("image", list(range(30))))
            await until(lambda: outstanding(worker) == 31)
            with pytest.raises(Overloaded) as refused:
                await worker.submit("image", "late")
            assert refused.value.retry_after >= 1.0
            assert events.of("rejected") == [("image", 1)]
            # Texts alternate with image batches: they wait for one, not for all of them.
            text = asyncio.create_task(worker.submit("text", "quick", cost=5))
            await until(lambda: outstanding(worker) == 32)
            backend.resume()
            assert (await text).value == ("text", "quick")
            assert len(await big) == 30
            await task
            assert outstanding(worker) == 0
            assert (await worker.submit("image", "again")).value == ("image", "again")
        assert "late" not in backend.seen()

    run(scenario)


def test_a_new_worker_does_not_refuse_before_it_has_timed_a_few_batches():
    """One batch gives only a proportional fit, and the first batches are slow: a new
    server's first burst is admitted, and refusals start once the fit rests on more."""
    backend = FakeBackend(per_item_s=0.01, clock=FakeClock())  # 10 ms an image, exactly

    async def scenario():
        async with serving(backend, max_queue_wait_s=0.02, max_batch_size=4) as worker:
            await worker.submit("image", "first")  # the fit: 10 ms per image, from 1 batch
            task = await blocked(worker, backend)
            burst = [asyncio.create_task(worker.submit_many("image", [f"b{i}"] * 4))
                     for i in range(3)]
            await until(lambda: outstanding(worker) == 13)  # none refused
            backend.resume()
            await asyncio.gather(task, *burst)
            for n in (1, 2, 3):
                await worker.submit_many("image", list(range(n)))
            task = await blocked(worker, backend)
            with pytest.raises(Overloaded):  # 10 ms waiting + a 40 ms batch > 20 ms
                await worker.submit_many("image", list(range(4)))
            backend.resume()
            await task

    run(scenario)


# ---- deadlines and disconnects ----


def test_expired_items_never_reach_the_model():
    backend = FakeBackend()
    events = Recorder()

    async def scenario():
        async with serving(backend, events) as worker:
            blocker = await blocked(worker, backend)
            doomed = asyncio.create_task(worker.submit_many(
                "image", ["late-0", "late-1", "late-2"], deadline=time.monotonic() + 0.05
            ))
            fine = asyncio.create_task(worker.submit("image", "fine"))
            with pytest.raises(DeadlineExceeded):
                await doomed
            backend.resume()
            assert (await fine).value == ("image", "fine")
            await blocker
            assert events.of("items_dropped") == [("image", "expired", 3)]
            with pytest.raises(DeadlineExceeded):
                await worker.submit("image", "too-late", deadline=time.monotonic() - 1)
        assert not backend.seen() & {"late-0", "late-1", "late-2", "too-late"}
        assert events.of("items_dropped") == [("image", "expired", 3), ("image", "expired", 1)]

    run(scenario)


def test_the_worker_drops_expired_items_even_before_the_loop_notices():
    backend = FakeBackend()
    events = Recorder()

    async def scenario():
        async with serving(backend, events) as worker:
            blocker = await blocked(worker, backend)
            doomed = asyncio.create_task(
                worker.submit_many("image", ["a", "b"], deadline=time.monotonic() + 0.03)
            )
            await asyncio.sleep(0)  # queued
            # Block the loop so the request's deadline timer cannot fire, and let the worker
            # reach the items first.
            time.sleep(0.05)
            backend.resume()
            time.sleep(0.05)
            await blocker
            await until(lambda: events.of("items_dropped") == [("image", "expired", 2)])
            assert worker.dispatcher.queue.depth("image") == 0
            with pytest.raises(DeadlineExceeded):
                await doomed
            assert events.of("items_dropped") == [("image", "expired", 2)]
        assert backend.seen() == {"blocker"}

    run(scenario)


def test_cancelled_items_never_reach_the_model():
    backend = FakeBackend()
    events = Recorder()

    async def scenario():
        async with serving(backend, events) as worker:
            blocker = await blocked(worker, backend)
            gone = asyncio.create_task(worker.submit_many("image", ["x", "y", "z"]))
            stays = asyncio.create_task(worker.submit("image", "kept"))
            await asyncio.sleep(0.01)
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert worker.dispatcher.queue.depth("image") == 1
            backend.resume()
            assert (await stays).value == ("image", "kept")
            await blocker
            assert outstanding(worker) == 0
        assert backend.seen() == {"blocker", "kept"}
        assert events.of("items_dropped") == [("image", "cancelled", 3)]

    run(scenario)


# ---- failure isolation ----


def test_one_poisoned_item_fails_one_request_only():
    backend = FakeBackend(poison={"bad"})

    async def scenario():
        async with serving(backend, max_batch_size=16) as worker:
            blocker = await blocked(worker, backend)
            good = [asyncio.create_task(worker.submit("image", f"ok{i}")) for i in range(6)]
            poisoned = asyncio.create_task(worker.submit_many("image", ["sib", "bad"]))
            more = [asyncio.create_task(worker.submit("image", f"ok{i}")) for i in range(6, 9)]
            await asyncio.sleep(0.01)
            backend.resume()
            with pytest.raises(BatchFailed) as failure:
                await poisoned
            got = await asyncio.gather(*good, *more)
            await blocker
        assert [r.value for r in got] == [("image", f"ok{i}") for i in range(9)]
        assert "poisoned" not in str(failure.value)  # the cause is logged, not shown
        first = backend.calls[1]
        assert first.outcome == "poisoned" and first.size == 11  # they shared a batch

    run(scenario)


def test_out_of_memory_halves_the_batch_and_every_item_succeeds():
    backend = FakeBackend(oom_above=4)

    async def scenario():
        async with serving(backend, max_batch_size=16, oom_regrow_batches=5) as worker:
            blocker = await blocked(worker, backend)
            tasks = [asyncio.create_task(worker.submit("image", i)) for i in range(16)]
            await asyncio.sleep(0.01)
            backend.resume()
            assert [r.value for r in await asyncio.gather(*tasks)] == [
                ("image", i) for i in range(16)
            ]
            await blocker
            assert [c.size for c in backend.calls if c.outcome == "oom"] == [16, 8]
            assert [c.size for c in backend.batches[1:]] == [4, 4, 4, 4]
            assert worker.dispatcher.admission.batch_limit("image") == 4

            # Five good batches after the last shrink, the limit grows back by a quarter.
            await worker.submit("image", "g")
            assert worker.dispatcher.admission.batch_limit("image") == 5

    run(scenario)


def test_out_of_memory_on_text_halves_the_token_budget():
    backend = FakeBackend(oom_above=2)

    async def scenario():
        async with serving(backend, max_batch_tokens=1000) as worker:
            blocker = await blocked(worker, backend)
            texts = [f"t{i}" for i in range(6)]
            task = asyncio.create_task(worker.submit_many("text", texts, [10] * 6))
            await asyncio.sleep(0.01)
            backend.resume()
            assert [r.value for r in await task] == [("text", t) for t in texts]
            await blocker
            assert [c.size for c in backend.calls if c.outcome == "oom"] == [6, 3]
            # 3 x 10 padded tokens, halved
            assert worker.dispatcher.admission.batch_limit("text") == 15

    run(scenario)


def test_an_item_too_large_even_alone_fails_its_request_only():
    backend = FakeBackend(oom_above=0)

    async def scenario():
        async with serving(backend) as worker:
            with pytest.raises(OutOfMemory):
                await worker.submit("image", "huge")
            assert worker.ready

    run(scenario)


def test_a_failing_event_hook_does_not_disturb_serving():
    class Broken(NoEvents):
        def batch_done(self, kind, size, padded_tokens, compute_s):
            raise RuntimeError("metrics are down")

        def queue_depth(self, kind, n):
            raise RuntimeError("metrics are down")

    async def scenario():
        async with serving(FakeBackend(), Broken()) as worker:
            results = await asyncio.gather(*(worker.submit("image", i) for i in range(5)))
            assert [r.value for r in results] == [("image", i) for i in range(5)]
            assert worker.ready

    run(scenario)


# ---- lifecycle ----


def test_drain_completes_accepted_work_and_refuses_new_work():
    backend = FakeBackend()

    async def scenario():
        worker = ModelWorker(backend, BatcherConfig(), name="fake")
        await worker.start()
        assert worker.ready and backend.warmed_up
        blocker = await blocked(worker, backend)
        accepted = [asyncio.create_task(worker.submit("text", f"t{i}", 3)) for i in range(5)]
        await asyncio.sleep(0.01)
        draining = asyncio.create_task(worker.drain(timeout=2.0))
        await asyncio.sleep(0)
        assert not worker.ready
        with pytest.raises(Draining):
            await worker.submit("image", "new")
        backend.resume()
        assert await draining is True
        assert [(await t).value for t in accepted] == [("text", f"t{i}") for i in range(5)]
        await blocker
        assert not worker.ready

    run(scenario)


def test_drain_timeout_fails_what_is_left():
    backend = FakeBackend(hang_on={"stuck"})

    async def scenario():
        worker = ModelWorker(backend, BatcherConfig(), name="fake")
        await worker.start()
        stuck = asyncio.create_task(worker.submit("image", "stuck"))
        await until(backend.busy.is_set)
        queued = asyncio.create_task(worker.submit("image", "queued"))
        await asyncio.sleep(0.01)
        assert await worker.drain(timeout=0.1) is False
        for task in (stuck, queued):
            with pytest.raises(WorkerUnavailable):
                await task
        backend.release_hang()
        assert "queued" not in backend.seen()

    run(scenario)


def test_a_dead_worker_thread_is_not_ready_and_fails_fast():
    backend = FakeBackend(fatal_on={"boom"})
    events = Recorder()

    async def scenario():
        async with serving(backend, events) as worker:
            blocker = await blocked(worker, backend, payload="boom")
            waiting = [asyncio.create_task(worker.submit("image", p)) for p in ("a", "b")]
            await asyncio.sleep(0.01)
            backend.resume()
            for task in (blocker, *waiting):
                with pytest.raises(WorkerUnavailable):
                    await task
            assert not worker.ready
            # Refused on the first step, before anything is queued or awaited.
            attempt = worker.submit("image", "after")
            with pytest.raises(WorkerUnavailable):
                attempt.send(None)
            assert events.of("items_dropped") == [("image", "stopped", 2)]
        assert backend.seen() == {"boom"}

    run(scenario)


def test_a_stalled_batch_fails_alone_and_a_fresh_thread_serves():
    """The watchdog: a batch past stall_timeout_s fails its requests, the queue is served
    by a new thread at once, and the stuck call's late result is thrown away."""
    backend = FakeBackend(hang_on={"slow"})
    events = StallRecorder()

    async def scenario():
        async with serving(backend, events, stall_timeout_s=0.1) as worker:
            slow = asyncio.create_task(worker.submit("image", "slow"))
            await until(backend.busy.is_set)
            with pytest.raises(BatchStalled):
                await slow
            assert worker.ready and not worker.failed
            assert (await worker.submit("image", "next")).value == ("image", "next")
            assert events.of("stalled") == [("image", 1)]
            backend.release_hang()
            await asyncio.sleep(0.1)  # the stuck thread returns and ends quietly
            assert (await worker.submit("text", "after", 3)).value == ("text", "after")
            assert outstanding(worker) == 0

    run(scenario)


def test_too_many_stuck_threads_stop_the_worker_for_good():
    backend = FakeBackend(hang_on={"s1", "s2"})

    async def scenario():
        async with serving(backend, stall_timeout_s=0.05, max_abandoned_threads=1) as worker:
            for payload in ("s1", "s2"):
                with pytest.raises(BatchStalled):
                    await worker.submit("image", payload)
            await until(lambda: worker.failed)
            assert not worker.ready
            with pytest.raises(WorkerUnavailable):
                await worker.submit("image", "after")

    run(scenario)


def test_a_failed_warmup_fails_start():
    class BrokenWarmup(FakeBackend):
        def warmup(self) -> None:
            raise RuntimeError("no device")

    async def scenario():
        worker = ModelWorker(BrokenWarmup(), BatcherConfig(), name="broken")
        with pytest.raises(WorkerUnavailable):
            await worker.start()
        assert not worker.ready
        with pytest.raises(WorkerUnavailable):
            await worker.submit("image", "x")

    run(scenario)


def test_submitting_before_start_fails_fast():
    async def scenario():
        worker = ModelWorker(FakeBackend(), BatcherConfig())
        with pytest.raises(WorkerUnavailable):
            await worker.submit("image", "x")

    run(scenario)


@pytest.mark.parametrize(
    "bad",
    [{"max_batch_size": 0}, {"max_wait_ms": -1}, {"image_share": 0.0}, {"image_share": 1.0},
     {"stall_timeout_s": 0}, {"default_timeout_s": 0}],
)
def test_config_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        BatcherConfig(**bad)


# ---- layering ----


def test_batcher_and_cache_import_neither_torch_nor_fastapi():
    code = (
        "import json, sys\n"
        "import service.batcher, service.worker, service.cache, service.errors\n"
        "import service.scheduler, service.admission, service.isolation, service.dispatch\n"
        "import service.streams, service.watchdog, service.idle, service.replicas\n"
        "import service.device_errors\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=30)
    loaded = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert not loaded & {"torch", "fastapi", "starlette", "numpy", "clip_core"}

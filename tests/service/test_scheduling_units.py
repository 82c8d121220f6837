"""The units under ModelWorker, driven directly: no threads, no sleeps, the clock a number.

The queue (what is due, what a batch takes, the image/text turn), admission (refusals,
Retry-After, the out-of-memory limit), the bisection of a failing batch, the watchdog,
and the events guard.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest
from fake_backend import FakeClock

from service.admission import Admission
from service.batcher import (
    MIN_BATCHES_TO_REFUSE,
    BatcherConfig,
    ItemResult,
    ItemState,
    Kind,
    NoEvents,
    Request,
    SafeEvents,
    WorkItem,
)
from service.dispatch import Batch, Dispatcher
from service.errors import BatchFailed, Draining, OutOfMemory, ServiceError, WorkerUnavailable
from service.isolation import Outcome, first_chunk, run_isolated
from service.scheduler import BatchQueue, Taken, Wait
from service.watchdog import Stall, Watchdog


class Items:
    """Builds requests and their items with increasing `seq`, as admission would."""

    def __init__(self) -> None:
        self.seq = 0

    def request(self, kind: Kind, payloads: Sequence[Any], costs: Sequence[int] | None = None,
                *, now: float = 0.0, deadline: float | None = None,
                attach: bool = True) -> list[WorkItem]:
        """One request's items, due at `deadline` (default: 100 s after `now`). `attach`:
        list them on the request, as `Dispatcher.admit` does when it admits them."""
        n = len(payloads)
        deadline = now + 100.0 if deadline is None else deadline
        req = Request(f"r{self.seq}", kind, None, [None] * n, n)  # nobody awaits it here
        costs = costs or [1] * n
        items = []
        for index, (payload, cost) in enumerate(zip(payloads, costs, strict=True)):
            items.append(WorkItem(self.seq, req, index, kind, payload, cost, deadline, now))
            self.seq += 1
        if attach:
            req.items.extend(items)
        return items


def payloads(items: Sequence[WorkItem]) -> list[Any]:
    return [it.payload for it in items]


LIMITS = {"image": 32, "text": 1000}


# ---- the queue ----


def test_an_idle_queue_runs_a_lone_item_the_instant_it_is_queued():
    queue, make = BatchQueue(BatcherConfig()), Items()
    queue.add(make.request("image", ["a"], now=7.0))
    plan = queue.poll(7.0, LIMITS, idle=1, draining=False)
    assert isinstance(plan, Taken) and payloads(plan.batch) == ["a"]
    assert plan.batch[0].state is ItemState.TAKEN and plan.batch[0].taken_at == 7.0
    assert queue.poll(7.0, LIMITS, idle=1, draining=False) == Wait(None)  # nothing left


def test_max_wait_holds_a_partial_batch_until_its_oldest_item_has_waited():
    queue, make = BatchQueue(BatcherConfig(max_wait_ms=80)), Items()
    queue.add(make.request("image", ["a"], now=1.0))
    queue.add(make.request("image", ["b"], now=1.05))
    assert queue.poll(1.0, LIMITS, idle=1, draining=False) == Wait(pytest.approx(1.08))
    assert queue.poll(1.079, LIMITS, idle=1, draining=False) == Wait(pytest.approx(1.08))
    plan = queue.poll(1.08, LIMITS, idle=1, draining=False)
    assert isinstance(plan, Taken) and payloads(plan.batch) == ["a", "b"]


def test_a_full_batch_or_draining_is_due_at_once():
    make = Items()
    full = BatchQueue(BatcherConfig(max_wait_ms=80))
    full.add(make.request("image", ["a", "b", "c"]))
    plan = full.poll(0.0, {"image": 3, "text": 1000}, idle=1, draining=False)
    assert isinstance(plan, Taken) and len(plan.batch) == 3
    texts = BatchQueue(BatcherConfig(max_wait_ms=80))
    texts.add(make.request("text", ["t0", "t1"], [50, 50]))
    assert isinstance(texts.poll(0.0, {"image": 3, "text": 100}, 1, False), Taken)
    draining = BatchQueue(BatcherConfig(max_wait_ms=80))
    draining.add(make.request("image", ["d"]))
    assert isinstance(draining.poll(0.0, LIMITS, idle=1, draining=False), Wait)
    assert isinstance(draining.poll(0.0, LIMITS, idle=1, draining=True), Taken)


def test_expired_items_are_dropped_on_the_way_and_never_taken():
    queue, make = BatchQueue(BatcherConfig()), Items()
    late = make.request("image", ["late0", "late1"], deadline=5.0)
    queue.add(late)
    queue.add(make.request("image", ["fine"], deadline=50.0))
    queue.add(make.request("text", ["t-late"], [3], deadline=5.0))
    queue.add(make.request("text", ["t-fine"], [3], deadline=50.0))
    assert queue.outstanding == 5
    images = queue.take("image", 5.0, limit=32, idle=1)
    assert payloads(images.batch) == ["fine"] and payloads(images.expired) == ["late0", "late1"]
    assert all(it.state is ItemState.DROPPED for it in late)
    texts = queue.take("text", 5.0, limit=1000, idle=1)
    assert payloads(texts.batch) == ["t-fine"] and payloads(texts.expired) == ["t-late"]
    assert queue.outstanding == 2 and queue.units == {"image": 1, "text": 3}


def test_the_turn_alternates_and_follows_image_share():
    even = BatchQueue(BatcherConfig(image_share=0.5))
    assert [even.take_turn() for _ in range(6)] == ["image", "text"] * 3
    mostly_images = BatchQueue(BatcherConfig(image_share=0.75))
    turns = [mostly_images.take_turn() for _ in range(8)]
    assert turns.count("image") == 6 and turns.count("text") == 2


def test_when_both_kinds_are_due_batches_alternate():
    queue, make = BatchQueue(BatcherConfig()), Items()
    for i in range(3):
        queue.add(make.request("image", [f"i{i}"]))
    queue.add(make.request("text", [f"t{i}" for i in range(3)], [10, 10, 10]))
    kinds = []
    while True:
        plan = queue.poll(0.0, {"image": 1, "text": 10}, idle=1, draining=False)
        if isinstance(plan, Wait):
            break
        kinds.append(plan.kind)
    assert kinds == ["image", "text"] * 3


def test_a_text_batch_groups_by_length_within_the_token_budget():
    queue, make = BatchQueue(BatcherConfig()), Items()
    queue.add(make.request("text", ["a", "long", "b", "c"], [10, 60, 12, 11]))
    plan = queue.take("text", 0.0, limit=40, idle=1)
    assert payloads(plan.batch) == ["a", "b", "c"]  # 3 x 12 = 36 padded tokens
    assert queue.depth("text") == 1 and queue.units["text"] == 93  # taken is not answered
    queue.settle(plan.batch)
    assert queue.units["text"] == 60 and queue.outstanding == 1


def test_a_closed_request_leaves_the_queue_and_the_rest_stays():
    queue, make = BatchQueue(BatcherConfig()), Items()
    gone = make.request("image", ["x", "y"])
    queue.add(gone)
    queue.add(make.request("image", ["kept"]))
    assert payloads(queue.drop_request(gone[0].request)) == ["x", "y"]
    assert queue.depth("image") == 1 and queue.outstanding == 1
    assert {k: payloads(v) for k, v in queue.drop_all().items()} == {"image": ["kept"],
                                                                     "text": []}
    assert queue.empty and queue.outstanding == 0


# ---- admission ----


def _timed(config: BatcherConfig, per_image_s: float = 0.1, batches: int = 5) -> Admission:
    admission = Admission(config)
    for _ in range(batches):
        admission.costs.observe("image", 4, 4 * per_image_s)
        admission.costs.observe("image", 8, 8 * per_image_s)
    return admission


def test_the_queue_bound_refuses_exactly_the_excess():
    admission = Admission(BatcherConfig(max_queue_items=10))
    units = {"image": 8, "text": 0}
    assert admission.refusal("image", 2, outstanding=8, units=units) is None
    refused = admission.refusal("image", 3, outstanding=8, units=units)
    assert refused is not None and refused.retry_after == 1.0  # nothing timed: the minimum


def test_retry_after_is_the_predicted_wait_within_bounds():
    config = BatcherConfig(max_batch_size=10, max_queue_wait_s=1.0)
    admission = _timed(config)
    refused = admission.refusal("image", 1, outstanding=30, units={"image": 30, "text": 0})
    assert refused is not None and refused.retry_after == pytest.approx(3.0)
    flood = admission.refusal("image", 1, outstanding=900, units={"image": 900, "text": 0})
    assert flood is not None and flood.retry_after == 60.0  # MAX_RETRY_AFTER_S


def test_time_never_refuses_an_idle_worker_nor_before_a_few_batches_were_timed():
    config = BatcherConfig(max_batch_size=10, max_queue_wait_s=0.01)
    assert _timed(config).refusal("image", 500, outstanding=0,
                                  units={"image": 0, "text": 0}) is None
    young = Admission(config)
    young.costs.observe("image", 4, 0.4)
    while young.costs.batches("image") < MIN_BATCHES_TO_REFUSE:
        assert young.refusal("image", 1, outstanding=5, units={"image": 5, "text": 0}) is None
        young.costs.observe("image", 8, 0.8)
    assert young.refusal("image", 1, outstanding=5, units={"image": 5, "text": 0}) is not None


def test_the_other_kind_counts_one_batch_per_batch_of_ones_own():
    """A text waits for its own backlog plus the image batches alternating with it, not
    for the images' whole backlog."""
    admission = _timed(BatcherConfig(max_batch_size=10))
    for n in (100, 200):
        admission.costs.observe("text", n, n * 0.001)
    # No text queued: one image batch (1 s) may run before the text's own.
    assert admission.predicted_wait("text", {"image": 100, "text": 0}) == pytest.approx(1.0)
    wait = admission.predicted_wait("text", {"image": 100, "text": 100})
    # 0.1 s of text, plus at most 1 + ceil(100 / 1000) = 2 image batches of 1 s each.
    assert wait == pytest.approx(0.1 + 2 * 1.0)


def test_out_of_memory_halves_the_limit_and_good_batches_grow_it_back():
    make = Items()
    admission = Admission(BatcherConfig(max_batch_size=16, oom_regrow_batches=3))
    batch = make.request("image", list(range(16)))
    assert admission.out_of_memory("image", batch) == 8
    assert admission.out_of_memory("image", batch[:5]) == 2  # below the batch that failed
    assert admission.batch_limit("image") == 2
    for _ in range(3):
        admission.succeeded("image", batch[:2], 0.01)
    assert admission.batch_limit("image") == 3  # +25%, at least one
    texts = make.request("text", ["a", "b", "c"], [10, 30, 20])
    assert admission.out_of_memory("text", texts) == 45  # 3 x 30 padded tokens, halved


def test_the_time_budget_caps_batches_per_stream_share():
    one = _timed(BatcherConfig(max_batch_size=64, max_batch_s=0.5))
    two = _timed(BatcherConfig(max_batch_size=64, max_batch_s=0.5, streams=2))
    assert one.batch_limit("image") == 5
    assert two.batch_limit("image") == 10  # each batch runs on half the cores


# ---- the bisection of a failing batch ----


class Calls:
    """A `BatchCalls` over a fake model: fails on poisoned payloads, out of memory above
    `fits` items; every step recorded."""

    def __init__(self, *, poison: set[Any] = frozenset(), fits: int | None = None,
                 abandon_after: int | None = None, short: bool = False):
        self.poison, self.fits, self.short = poison, fits, short
        self.abandon_after = abandon_after  # calls after which the thread is given up on
        self.clock = FakeClock(0.0)
        self.limit = 1_000
        self.runs: list[list[Any]] = []
        self.delivered: dict[Any, ItemResult | ServiceError] = {}
        self.finished: list[Any] = []
        self.failures: list[tuple[int, str]] = []
        self.done: list[int] = []

    def run(self, kind: Kind, batch: list[Any]) -> Sequence[Any]:
        self.runs.append(batch)
        self.clock.advance(0.5)
        if self.fits is not None and len(batch) > self.fits:
            raise OutOfMemory("fake")
        if set(batch) & self.poison:
            raise ValueError("fake: poisoned")
        return [f"v{p}" for p in batch][: len(batch) - 1 if self.short else None]

    def call_started(self) -> float:
        return self.clock()

    def call_ended(self) -> float | None:
        if self.abandon_after is not None and len(self.runs) >= self.abandon_after:
            return None
        return self.clock()

    def finish(self, items: list[WorkItem]) -> None:
        self.finished += payloads(items)

    def deliver(self, outcomes: list[Outcome]) -> None:
        for item, outcome in outcomes:
            self.delivered[item.payload] = outcome

    def failed(self, kind: Kind, items: list[WorkItem], error: Exception) -> None:
        self.failures.append((len(items), type(error).__name__))

    def out_of_memory(self, kind: Kind, items: list[WorkItem]) -> None:
        self.limit = min(self.limit, len(items) // 2)

    def memory_limit(self, kind: Kind) -> int:
        return self.limit

    def succeeded(self, kind: Kind, items: list[WorkItem], compute_s: float) -> None:
        self.done.append(len(items))


def _taken(make: Items, *requests: list[Any], now: float = 0.0) -> list[WorkItem]:
    items = [it for ps in requests for it in make.request("image", ps)]
    for it in items:
        it.state, it.taken_at = ItemState.TAKEN, now
    return items


def test_a_poisoned_item_fails_alone_and_the_halves_succeed():
    calls, make = Calls(poison={"bad"}), Items()
    assert run_isolated("image", _taken(make, ["a", "b"], ["c", "bad"]), calls) is True
    assert calls.runs == [["a", "b", "c", "bad"], ["a", "b"], ["c", "bad"], ["c"], ["bad"]]
    assert isinstance(calls.delivered["bad"], BatchFailed)
    assert [calls.delivered[p].value for p in "abc"] == ["va", "vb", "vc"]
    assert calls.failures == [(4, "ValueError"), (2, "ValueError"), (1, "ValueError")]


def test_a_result_carries_its_queue_and_compute_time_on_the_clock():
    calls, make = Calls(), Items()
    items = _taken(make, ["a", "b"], now=0.0)
    for it in items:
        it.enqueued_at = -0.25
    run_isolated("image", items, calls)
    assert calls.delivered["a"] == ItemResult("va", 0.25, 0.5, 2)


def test_out_of_memory_rechunks_under_the_shrunk_limit():
    calls, make = Calls(fits=2), Items()
    assert run_isolated("image", _taken(make, list(range(8))), calls) is True
    # 8 fails: limit 4; the first 4 fail: limit 2; then chunks of 2 under it.
    assert [len(r) for r in calls.runs] == [8, 4, 2, 2, 2, 2]
    assert calls.done == [2, 2, 2, 2] and len(calls.delivered) == 8


def test_a_single_item_out_of_memory_fails_alone():
    calls, make = Calls(fits=0), Items()
    run_isolated("image", _taken(make, ["huge"]), calls)
    assert isinstance(calls.delivered["huge"], OutOfMemory)


def test_a_wrong_number_of_results_is_a_failure_to_bisect():
    calls, make = Calls(short=True), Items()
    run_isolated("image", _taken(make, ["a", "b"]), calls)
    assert calls.failures[0] == (2, "RuntimeError")
    assert all(isinstance(calls.delivered[p], BatchFailed) for p in "ab")


def test_items_of_a_closed_request_are_not_computed():
    calls, make = Calls(), Items()
    items = _taken(make, ["gone0", "gone1"], ["kept"])
    items[0].request.closed = True
    run_isolated("image", items, calls)
    assert calls.runs == [["kept"]] and calls.finished == ["gone0", "gone1"]


def test_an_abandoned_thread_stops_without_running_or_delivering_more():
    calls, make = Calls(poison={"bad"}, abandon_after=1), Items()
    assert run_isolated("image", _taken(make, ["a", "bad"]), calls) is False
    assert calls.runs == [["a", "bad"]] and calls.delivered == {} and calls.failures == []


def test_first_chunk_counts_padded_tokens_for_text():
    make = Items()
    texts = make.request("text", ["a", "b", "c", "d"], [10, 20, 5, 40])
    assert payloads(first_chunk("text", texts, 60)) == ["a", "b", "c"]  # 3 x 20
    assert payloads(first_chunk("text", texts, 10)) == ["a"]  # at least one
    assert len(first_chunk("image", texts, 0)) == 1


# ---- the watchdog, on a clock ----


def _dispatcher(clock: FakeClock, **config: Any) -> Dispatcher:
    d = Dispatcher(BatcherConfig(**config), name="m", release_hook=None, clock=clock)
    d.started()
    d.warmed()
    return d


def _take(d: Dispatcher, make: Items, payload: str, stream: int = 0) -> Batch:
    items = make.request("image", [payload], now=d.clock(), attach=False)
    assert d.admit(items[0].request, items) == 1
    step = d.next_step(stream, d.streams.generation(stream))
    assert isinstance(step, Batch) and payloads(step.taken.batch) == [payload]
    return step


def test_the_watchdog_gives_up_on_a_call_past_the_limit_and_not_before():
    # Times that are exact in binary, so "at the limit" is exactly at it.
    clock, make = FakeClock(8.0), Items()
    d = _dispatcher(clock, stall_timeout_s=0.5)
    stalls: list[Stall] = []
    dog = Watchdog("m", 0.5, d.abandon_stalled, lambda s: stalls.append(s) or True, clock=clock)
    _take(d, make, "slow")
    assert dog.check() and stalls == []  # taken, but no backend call running yet
    assert d.call_started(0, 0) == 8.0
    clock.advance(0.5)
    assert dog.check() and stalls == []  # at the limit: not past it
    clock.advance(2 ** -7)
    assert dog.check()
    (stall,) = stalls
    assert (stall.stream, stall.gen, stall.kind, stall.size) == (0, 1, "image", 1)
    assert payloads(stall.stuck) == ["slow"] and not stall.give_up
    assert d.queue.outstanding == 0  # its items left the books; the facade fails them
    # The stuck call returns at last: its thread learns it was abandoned and ends.
    assert d.call_ended(0, 0) is None
    assert d.next_step(0, 0) is None
    assert d.thread_ended(0, 0) is True and d.streams.abandoned == 0
    assert not d.failed


def test_too_many_abandoned_threads_fail_the_worker():
    clock, make = FakeClock(), Items()
    d = _dispatcher(clock, stall_timeout_s=0.1, max_abandoned_threads=1)
    stalls = []
    for gen in (0, 1):
        _take(d, make, f"s{gen}")
        d.call_started(0, gen)
        clock.advance(1.0)
        stalls.append(d.abandon_stalled(clock(), 0.1))
    assert [s.give_up for s in stalls] == [False, True]
    assert d.failed and isinstance(d.refusal(), WorkerUnavailable)


def test_a_draining_dispatcher_refuses_and_says_why():
    d = _dispatcher(FakeClock())
    assert d.refusal() is None
    d.drain()
    assert isinstance(d.refusal(), Draining)


# ---- events ----


def test_events_are_typed_calls_and_a_failing_hook_is_logged(caplog):
    class Hooks(NoEvents):
        def __init__(self) -> None:
            self.seen: list[tuple[Any, ...]] = []

        def batch_done(self, kind, size, padded_tokens, compute_s):
            self.seen.append(("batch_done", kind, size, padded_tokens, compute_s))

        def rejected(self, kind, n):
            raise RuntimeError("metrics are down")

    hooks = Hooks()
    events = SafeEvents(hooks)
    with caplog.at_level(logging.ERROR):
        events.rejected("image", 3)  # raises inside: logged, not raised
    events.batch_done("text", 2, 20, 0.5)
    events.queue_depth("image", 4)  # NoEvents: nothing
    assert hooks.seen == [("batch_done", "text", 2, 20, 0.5)]
    assert "batcher event hook rejected failed" in caplog.text

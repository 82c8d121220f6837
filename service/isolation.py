"""Running a batch so that only the culprits fail: the bisection of a failing batch.

A batch that raises is split in halves down to single items, so one bad input fails one
request. A single item that fails with an error blaming the request (an image the
device cannot decode: `service.errors.is_callers_fault`) gets that error as it is, and
every other with `BatchFailed`. `OutOfMemory` shrinks the batch limit instead and
re-chunks the batch under it; a single item out of memory fails alone. `DeviceFailed`
is not bisected: the device is broken for every item, so the batch fails whole and the
serving thread stops. The function runs on a serving thread and reaches the backend,
the books and the callers only through `BatchCalls`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .batcher import ItemResult, Kind, WorkItem
from .errors import BatchFailed, DeviceFailed, OutOfMemory, is_callers_fault

# An item's answer: its result, or a domain error (ours, or clip_core's blaming the input).
Outcome = tuple[WorkItem, ItemResult | Exception]


class BatchCalls(Protocol):
    """What `run_isolated` needs from the serving thread that runs it."""

    def run(self, kind: Kind, payloads: list[Any]) -> Sequence[Any]:
        """The backend call; raises OutOfMemory, or anything else on failure."""
        ...

    def call_started(self) -> float:
        """A backend call begins (the watchdog times it); the clock's reading."""
        ...

    def call_ended(self) -> float | None:
        """The call returned or raised: the clock's reading, or None when the watchdog
        gave up on this thread meanwhile, and its batch was failed already."""
        ...

    def finish(self, items: list[WorkItem]) -> None:
        """`items` need no answer any more (their request closed): off the books."""

    def deliver(self, outcomes: list[Outcome]) -> None:
        """Answer these items (off the books, then to their callers)."""

    def failed(self, kind: Kind, items: list[WorkItem], error: Exception) -> None:
        """A backend call on `items` raised `error` (logged there when a single item
        fails: its batch was split down to it)."""

    def device_failed(self, kind: Kind, items: list[WorkItem], error: DeviceFailed) -> None:
        """The device broke while computing `items`: fail the whole batch they belong
        to with `error`, and stop serving."""

    def out_of_memory(self, kind: Kind, items: list[WorkItem]) -> None:
        """`items` did not fit in memory together: shrink the limit below them."""

    def memory_limit(self, kind: Kind) -> int:
        """The limit now in force, to re-chunk under (items, or padded text tokens)."""
        ...

    def succeeded(self, kind: Kind, items: list[WorkItem], compute_s: float) -> None:
        """A backend call on `items` returned in `compute_s`."""


def run_isolated(kind: Kind, items: list[WorkItem], calls: BatchCalls) -> bool:
    """Run `items` through `calls.run`; on failure retry in smaller pieces.

    False when the thread was abandoned during a call, or the device failed: nothing
    more is run or delivered, and the caller should stop serving.
    """
    # Items whose caller left or whose sibling failed need no answer. `closed` is read
    # without the lock: a stale False only computes one unwanted item.
    calls.finish([it for it in items if it.request.closed])
    items = [it for it in items if not it.request.closed]
    if not items:
        return True
    start = calls.call_started()
    try:
        values = calls.run(kind, [it.payload for it in items])
    except Exception as err:
        ended = calls.call_ended()
        # A broken device fails the worker even when the watchdog gave up on this call:
        # the thread that replaced it would otherwise serve on the same broken context.
        if isinstance(err, DeviceFailed):
            calls.failed(kind, items, err)
            calls.device_failed(kind, items, err)
            return False
        if ended is None:
            return False
        return _retry(kind, items, err, calls)
    end = calls.call_ended()
    if end is None:
        return False
    if len(values) != len(items):
        mismatch = RuntimeError(f"backend returned {len(values)} results for {len(items)}")
        return _retry(kind, items, mismatch, calls)
    calls.succeeded(kind, items, end - start)
    calls.deliver([
        (it, ItemResult(v, it.taken_at - it.enqueued_at, end - it.taken_at, len(items)))
        for it, v in zip(items, values, strict=True)
    ])
    return True


def _retry(kind: Kind, items: list[WorkItem], err: Exception, calls: BatchCalls) -> bool:
    """`items` failed together with `err`: fail a single item, or run them in pieces."""
    calls.failed(kind, items, err)
    if isinstance(err, OutOfMemory):
        if len(items) == 1:
            calls.deliver([(items[0], OutOfMemory("the input does not fit in memory"))])
            return True
        calls.out_of_memory(kind, items)
        while items:  # re-chunk each time: a piece may shrink the limit further
            chunk = first_chunk(kind, items, calls.memory_limit(kind))
            if not run_isolated(kind, chunk, calls):
                return False
            items = items[len(chunk):]
        return True
    if len(items) == 1:
        answer = err if is_callers_fault(err) else BatchFailed(f"the model failed on this {kind}")
        calls.deliver([(items[0], answer)])
        return True
    half = len(items) // 2
    return run_isolated(kind, items[:half], calls) and run_isolated(kind, items[half:], calls)


def first_chunk(kind: Kind, items: list[WorkItem], limit: int) -> list[WorkItem]:
    """The longest prefix of `items` within `limit` (items for images, padded tokens for
    text); at least one item."""
    if kind == "image":
        return items[: max(1, limit)]
    longest = items[0].cost
    for n, item in enumerate(items[1:], start=2):
        longest = max(longest, item.cost)
        if n * longest > limit:
            return items[: n - 1]
    return items

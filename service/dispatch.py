"""The one owner of a worker's shared state: a lock, and the pure units it guards.

The event loop admits and closes requests, the serving threads take batches and report
them done, the watchdog abandons stalled ones: every one of them goes through a method
here, which takes the lock, asks the policy (`BatchQueue`, `Admission`, `StreamTable`,
`IdleRelease`) and wakes whoever may now proceed. No state is touched anywhere else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .admission import Admission
from .batcher import BatcherConfig, ItemState, Kind, Request, WorkItem
from .errors import Draining, Overloaded, WorkerUnavailable
from .idle import IdleRelease
from .scheduler import BatchQueue, Taken
from .watchdog import Stall, StreamTable


@dataclass(frozen=True)
class Batch:
    """A stream's next batch (possibly empty: all it looked at had expired)."""

    taken: Taken
    depth: int  # items of its kind still queued
    alone: bool  # nothing else computing or queued: the batch may use every core


class Release:
    """A stream's next step is to give memory back (see `IdleRelease`)."""


class Dispatcher:
    def __init__(
        self,
        config: BatcherConfig,
        *,
        name: str,
        release_hook: Callable[[], None] | None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self.clock = clock
        self._cond = threading.Condition()
        self.queue = BatchQueue(config)
        self.admission = Admission(config)
        self.streams = StreamTable(config.streams)
        self.idle = IdleRelease(name, config.release_after_idle_s, release_hook, clock())
        self._max_abandoned = config.max_abandoned_threads
        self._running = False  # threads started and not ended
        self._warm = False
        self._draining = False
        self._stopping = False
        self._failed = False  # a serving thread ended without being asked to

    # ---- lifecycle ----

    def refusal(self) -> WorkerUnavailable | None:
        """Why no work is taken now, or None. Read without the lock: flags only move one
        way, and `admit` asks again under it."""
        if self._draining:
            return Draining(f"model {self.name} is shutting down")
        if not self._running or self._failed:
            return WorkerUnavailable(f"model {self.name} is not running")
        if not self._warm:
            return WorkerUnavailable(f"model {self.name} is warming up")
        return None

    @property
    def failed(self) -> bool:
        return self._failed

    def started(self) -> None:
        with self._cond:
            self._running = True

    def warmed(self) -> None:
        """Stream 0 warmed the backend up: the other streams may serve, and the server is
        idle from here, not from start."""
        with self._cond:
            self._warm = True
            self.idle.batch_ended(self.clock())
            self._cond.notify_all()

    def wait_warm(self) -> None:
        """Streams after 0 wait for the warm-up (or for the end)."""
        with self._cond:
            while not (self._warm or self._stopping or not self._running):
                self._cond.wait()

    def drain(self) -> None:
        """Refuse new work; batches held by max_wait_ms are due at once."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def stopping(self) -> None:
        """Serving threads end once their batch is done."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def fail(self) -> None:
        """The worker cannot serve again (its device failed): refuse work from now on."""
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def load(self, kind: Kind) -> tuple[int, int]:
        """How loaded this worker is for a `kind` request: the units of `kind` admitted
        and not yet answered (items, or text tokens), then every such item."""
        with self._cond:
            return self.queue.units[kind], self.queue.outstanding

    def stop(self) -> dict[Kind, list[WorkItem]]:
        """No thread serves any more: drop what is queued; what was dropped, by kind."""
        with self._cond:
            self._running = False
            self._cond.notify_all()  # the other streams' threads end too
            return self.queue.drop_all()

    def thread_ended(self, stream: int, gen: int) -> bool:
        """A serving thread ends. True when it was abandoned (its call returned at last);
        otherwise a stream ending unasked fails the worker: it does not serve at part speed."""
        with self._cond:
            if not self.streams.is_current(stream, gen):
                self.streams.returned()
                self._cond.notify_all()  # stream 0 may now count an idle spell
                return True
            self._failed = self._failed or (self._warm and not self._stopping)
            return False

    def is_current(self, stream: int, gen: int) -> bool:
        with self._cond:
            return self.streams.is_current(stream, gen)

    # ---- the event loop's side ----

    def admit(self, req: Request, items: list[WorkItem]) -> int:
        """Queue every item of `req`, or none of them: raises WorkerUnavailable when not
        serving, Overloaded when admission refuses. The queue's depth of that kind after."""
        with self._cond:
            refusal = self.refusal()
            if refusal is not None:
                raise refusal
            self._check(req.kind, len(items))
            req.items.extend(items)
            self.queue.add(items)
            self._cond.notify_all()  # with streams, the one to take it may not be the first woken
            return self.queue.depth(req.kind)

    def check(self, kind: Kind, n: int) -> None:
        """Raise Overloaded if admitting `n` items of `kind` would now; reserves nothing."""
        with self._cond:
            self._check(kind, n)

    def overloaded(self, kind: Kind, n: int) -> Overloaded | None:
        """What admitting `n` items of `kind` would be refused with now, or None."""
        with self._cond:
            return self._overloaded(kind, n)

    def _check(self, kind: Kind, n: int) -> None:
        overloaded = self._overloaded(kind, n)
        if overloaded is not None:
            raise overloaded

    def _overloaded(self, kind: Kind, n: int) -> Overloaded | None:
        return self.admission.refusal(kind, n, self.queue.outstanding, self.queue.units)

    def close(self, req: Request) -> tuple[int, int]:
        """`req` is answered, failed or gone: drop its queued items. (dropped, depth)."""
        with self._cond:
            req.closed = True
            dropped = self.queue.drop_request(req)
            return len(dropped), self.queue.depth(req.kind)

    # ---- the serving threads' side ----

    def next_step(self, stream: int, gen: int) -> Batch | Release | None:
        """Wait until `stream` has a batch due, or memory to give back; None when the
        thread should end (stopping, or abandoned).

        A stream waits while a stream before it is idle: that one serves first.
        """
        with self._cond:
            # Not after `fail`: a device that failed computes nothing more, and the queue
            # is answered with WorkerUnavailable (retryable), not with its error.
            while (not self._stopping and self._running and not self._failed
                   and self.streams.is_current(stream, gen)):
                if self.streams.idle_before(stream):
                    self._cond.wait()
                    continue
                now = self.clock()
                plan = self.queue.poll(now, self.admission.batch_limits(), self.streams.idle(),
                                       self._draining)
                if isinstance(plan, Taken):
                    alone = not self.streams.busy and self.queue.empty
                    if plan.batch:
                        self.streams.begin(stream, gen, plan.kind, plan.batch)
                        if self.streams.streams > 1 and not self.queue.empty:
                            self._cond.notify_all()  # the next stream may take what is left
                    return Batch(plan, self.queue.depth(plan.kind), alone)
                wake_at = plan.until
                busy = self.streams.busy or bool(self.streams.abandoned) or not self.queue.empty
                release_at = self.idle.due_at(stream, busy)
                if release_at is not None:
                    if release_at <= now:
                        self.idle.claim()
                        return Release()
                    wake_at = release_at if wake_at is None else min(wake_at, release_at)
                self._cond.wait(None if wake_at is None else wake_at - now)
            return None

    def release_memory(self) -> None:
        """After `next_step` said Release: call the backend's hook, out of the lock."""
        self.idle.release()

    def batch_ended(self, stream: int, gen: int) -> None:
        with self._cond:
            self.streams.end(stream, gen)
            self.idle.batch_ended(self.clock())
            if not self.streams.busy:
                self._cond.notify_all()  # stream 0 may now count an idle spell

    def call_started(self, stream: int, gen: int) -> float:
        now = self.clock()
        with self._cond:
            self.streams.call_started(stream, gen, now)
        return now

    def call_ended(self, stream: int, gen: int) -> float | None:
        """The clock's reading, or None when the thread was abandoned during the call."""
        with self._cond:
            return self.clock() if self.streams.call_ended(stream, gen) else None

    def finish(self, items: list[WorkItem]) -> None:
        """Taken items leave the books: answered, or no longer awaited."""
        if not items:
            return
        with self._cond:
            for item in items:
                item.state = ItemState.DONE
            self.queue.settle(items)

    def out_of_memory(self, kind: Kind, items: list[WorkItem]) -> int:
        with self._cond:
            return self.admission.out_of_memory(kind, items)

    def memory_limit(self, kind: Kind) -> int:
        with self._cond:
            return self.admission.memory_limit(kind)

    def succeeded(self, kind: Kind, items: list[WorkItem], compute_s: float) -> None:
        with self._cond:
            self.admission.succeeded(kind, items, compute_s)

    # ---- the watchdog's side ----

    def abandon_stalled(self, now: float, limit_s: float) -> Stall | None:
        """Give up on a backend call running past `limit_s` at `now`: its thread is
        abandoned, its items leave the books (the caller fails them)."""
        with self._cond:
            stream = self.streams.late(now, limit_s)
            if stream is None:
                return None
            cur = self.streams.abandon(stream)
            self._cond.notify_all()  # the new generation, and stream 0's idle clock
            stuck = [it for it in cur.batch if it.state is ItemState.TAKEN]
            for item in stuck:
                item.state = ItemState.DONE
            self.queue.settle(stuck)
            give_up = self.streams.abandoned > self._max_abandoned
            if give_up:
                self._failed = True
            return Stall(stream, self.streams.generation(stream), cur.kind, len(cur.batch),
                         stuck, give_up)

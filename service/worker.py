"""One worker per model: asyncio callers in front, dedicated threads behind.

Callers on the event loop submit prepared items (pixels, token ids: decoding and
tokenising happen before an item is queued, overlapping the model). A request with ten
images is ten items; they may ride in different batches and the request completes when
all of them have. The worker's serving threads (one per stream) own the backend and each
runs one batch at a time, so the event loop never blocks; results go back with
`loop.call_soon_threadsafe`.

`ModelWorker` is the facade that ties the units together (docs/architecture.md, "The
model worker"): `Dispatcher` owns the shared state, `ServingThread` runs batches,
`Watchdog` gives up on stalled ones. The rules are in `service.batcher`.

This module imports neither torch nor the HTTP layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from .batcher import (
    KINDS,
    Backend,
    BatcherConfig,
    BatcherEvents,
    ItemResult,
    Kind,
    NoEvents,
    Request,
    SafeEvents,
    WorkItem,
)
from .dispatch import Dispatcher
from .errors import (
    BatchStalled,
    DeadlineExceeded,
    Draining,
    Overloaded,
    RequestTooLarge,
    WorkerUnavailable,
)
from .isolation import Outcome
from .streams import ServingThread, StreamContext
from .watchdog import Stall, Watchdog

log = logging.getLogger(__name__)


class ModelWorker:
    """Batches items for one model and runs them on dedicated threads (`config.streams`).

    Bound to the event loop that calls `start`; submit from that loop only. `clock` is
    the clock of deadlines and batch timings (time.monotonic; tests pass a simulated one).
    """

    def __init__(
        self,
        backend: Backend,
        config: BatcherConfig | None = None,
        *,
        name: str = "model",
        events: BatcherEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.backend = backend
        self.config = config or BatcherConfig()
        self.name = name
        self._events = SafeEvents(events or NoEvents())
        self._clock = clock
        # The one owner of the state that threads share: queue, admission, streams.
        self.dispatcher = Dispatcher(self.config, name=name, clock=clock,
                                     release_hook=getattr(backend, "release_memory", None))
        self._serving = StreamContext(
            name=name, streams=self.config.streams, backend=backend,
            dispatcher=self.dispatcher, events=self._events, deliver=self._deliver,
            warmed=lambda error: self._post(self._set_started, error),
            ended=self._thread_ended, device_failed=self._device_failed,
        )
        self._watchdog: Watchdog | None = None
        if self.config.stall_timeout_s is not None:
            self._watchdog = Watchdog(name, self.config.stall_timeout_s,
                                      self.dispatcher.abandon_stalled, self._stalled,
                                      clock=clock)
        self._seq = itertools.count()
        self._threads: list[ServingThread] = []  # the current thread of each stream
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started: asyncio.Future[None] | None = None
        self._live: set[Request] = set()  # awaited requests; touched on the loop only

    # ---- lifecycle (event loop) ----

    async def start(self) -> None:
        """Start the threads and wait for the backend's warm-up; WorkerUnavailable if it
        fails. Stream 0 warms up; the other streams serve once it has."""
        if self._threads:
            raise RuntimeError(f"worker {self.name} was already started")
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.create_future()
        self.dispatcher.started()
        self._threads = [ServingThread(stream, 0, self._serving)
                         for stream in range(self.config.streams)]
        for thread in self._threads:
            thread.start()
        if self._watchdog is not None:
            self._watchdog.start()
        await self._started

    @property
    def ready(self) -> bool:
        """Warm, running and not draining: fit to take work."""
        return self.dispatcher.refusal() is None

    @property
    def failed(self) -> bool:
        """The worker stopped serving on its own (its thread died, too many got stuck, or
        its device failed) and will not recover: a reason to restart the process."""
        return self.dispatcher.failed

    async def drain(self, timeout: float) -> bool:
        """Refuse new work, let accepted work finish within `timeout`, then stop the thread.

        Requests still unanswered at the timeout fail with Draining. True when every
        accepted request finished and the thread stopped.
        """
        end = time.monotonic() + timeout  # real time: it bounds waiting, not the model
        self.dispatcher.drain()
        pending = [r.future for r in self._live]
        finished = True
        if pending:
            _, not_done = await asyncio.wait(pending, timeout=max(0.0, end - time.monotonic()))
            finished = not not_done
        for req in list(self._live):
            self._fail(req, Draining(f"model {self.name} shut down before the request finished"),
                       reason="stopped")
        self.dispatcher.stopping()
        if self._watchdog is not None:
            self._watchdog.stop()
        loop = asyncio.get_running_loop()
        threads = [t.thread for t in self._threads]
        for thread in threads:
            if thread.is_alive():
                await loop.run_in_executor(None, thread.join, max(0.0, end - time.monotonic()))
        return finished and not any(t.is_alive() for t in threads)

    # ---- submission (event loop) ----

    async def submit(
        self, kind: Kind, payload: Any, cost: int = 1, *, deadline: float | None = None
    ) -> ItemResult:
        (result,) = await self.submit_many(kind, [payload], [cost], deadline=deadline)
        return result

    async def submit_many(
        self,
        kind: Kind,
        payloads: Sequence[Any],
        costs: Sequence[int] | None = None,
        *,
        deadline: float | None = None,
        request_id: str | None = None,
    ) -> list[ItemResult]:
        """Queue one request's items; their results in order once all are computed.

        `deadline` is an instant on the worker's clock (default: now + default_timeout_s).
        Raises Overloaded or RequestTooLarge at admission, WorkerUnavailable (Draining)
        when not serving, DeadlineExceeded, or the error of the first item that failed.
        Cancelling the awaiting task drops the items not yet on the model.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        n = len(payloads)
        costs = [1] * n if costs is None else list(costs)
        if len(costs) != n:
            raise ValueError(f"{n} payloads but {len(costs)} costs")
        if any(c < 1 for c in costs):
            raise ValueError("every cost must be >= 1")
        if n == 0:
            return []
        refusal = self.dispatcher.refusal()
        if refusal is not None:
            raise refusal
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError(f"worker {self.name}: submit from the loop that started it")
        if n > self.config.max_queue_items:
            raise RequestTooLarge(n, self.config.max_queue_items)
        now = self._clock()
        if deadline is None:
            deadline = now + self.config.default_timeout_s
        if deadline <= now:
            self._events.items_dropped(kind, "expired", n)
            raise DeadlineExceeded("the request's deadline passed before it was queued")

        req = Request(
            id=request_id or f"{self.name}-{next(self._seq)}",
            kind=kind,
            future=loop.create_future(),
            results=[None] * n,
            remaining=n,
        )
        items = [WorkItem(next(self._seq), req, index, kind, payload, cost, deadline, now)
                 for index, (payload, cost) in enumerate(zip(payloads, costs, strict=True))]
        try:
            depth = self.dispatcher.admit(req, items)
        except Overloaded:
            self._events.rejected(kind, n)
            raise
        self._events.queue_depth(kind, depth)

        self._live.add(req)
        timer = loop.call_later(max(0.0, deadline - self._clock()), self._expire, req)
        try:
            return await req.future
        except asyncio.CancelledError:
            self._purge(req, "cancelled")
            raise
        finally:
            timer.cancel()
            self._live.discard(req)

    def check_admission(self, kind: Kind, n: int) -> None:
        """Raise what submitting `n` items of `kind` would raise now, reserving nothing.

        For callers with costly preparation (decoding images): refusing before it makes
        a 503 under overload cost little, so refusals do not eat the capacity that
        accepted requests need. `submit_many` still decides.
        """
        refusal = self.dispatcher.refusal()
        if refusal is not None:
            raise refusal
        if n > self.config.max_queue_items:
            raise RequestTooLarge(n, self.config.max_queue_items)
        try:
            self.dispatcher.check(kind, n)
        except Overloaded:
            self._events.rejected(kind, n)
            raise

    def overloaded(self, kind: Kind) -> Overloaded | None:
        """What a new one-item request of `kind` would be refused with now for overload,
        or None (also when not serving: the request's own path says why). Reserves
        nothing and counts nothing: for the HTTP layer, to refuse before reading a body."""
        if self.dispatcher.refusal() is not None:
            return None
        return self.dispatcher.overloaded(kind, 1)

    # ---- completion (event loop) ----

    def _resolve(self, outcomes: list[Outcome]) -> None:
        failed_requests: dict[int, set[int]] = {}  # id(error) -> ids of requests it fails
        for item, outcome in outcomes:
            if not isinstance(outcome, ItemResult):
                failed_requests.setdefault(id(outcome), set()).add(id(item.request))
        for item, outcome in outcomes:
            req = item.request
            if req.future.done():
                continue
            if not isinstance(outcome, ItemResult):  # an error: ours, or one the input caused
                shared = len(failed_requests[id(outcome)]) > 1  # one batch's failure
                self._fail(req, own_instance(outcome) if shared else outcome, reason="failed")
                continue
            req.results[item.index] = outcome
            req.remaining -= 1
            if req.remaining == 0:
                req.future.set_result(req.completed())

    def _expire(self, req: Request) -> None:
        n = len(req.items)
        self._fail(req, DeadlineExceeded(
            f"deadline passed with {req.remaining} of {n} items unfinished"), reason="expired")

    def _fail(self, req: Request, error: Exception, reason: str) -> None:
        # `error` must be this request's alone: raising an instance appends the raiser's
        # frames to its traceback, so requests awaiting one shared instance would each
        # grow the others' traceback and keep their frames alive.
        if not req.future.done():
            req.future.set_exception(error)
        self._purge(req, reason)

    def _fail_all(self, message: str) -> None:
        for req in list(self._live):
            self._fail(req, WorkerUnavailable(message), reason="stopped")

    def _purge(self, req: Request, reason: str) -> None:
        """Close a request and drop its items still queued; those on the model finish unused."""
        dropped, depth = self.dispatcher.close(req)
        if dropped:
            self._events.items_dropped(req.kind, reason, dropped)
            self._events.queue_depth(req.kind, depth)

    def _set_started(self, error: BaseException | None) -> None:
        assert self._started is not None
        if self._started.done():
            return
        if error is None:
            self._started.set_result(None)
        else:
            failure = WorkerUnavailable(f"model {self.name} failed to warm up")
            failure.__cause__ = error
            self._started.set_exception(failure)

    # ---- from the threads ----

    def _deliver(self, outcomes: list[Outcome]) -> None:
        """Serving thread: answer items; off the books first, so a caller that hears back
        finds them gone."""
        self.dispatcher.finish([item for item, _ in outcomes])
        self._post(self._resolve, outcomes)

    def _thread_ended(self, stream: int, gen: int) -> None:
        if self.dispatcher.thread_ended(stream, gen):
            log.warning("model %s: a stalled batch returned after all; its thread ends",
                        self.name)
            return
        self._stop_serving()

    def _device_failed(self, error: BaseException) -> None:
        """Serving thread: the device is broken for good (`DeviceFailed`) and the worker
        marked failed (/healthz asks for a restart); the batch was answered. The threads
        stop, and what is queued or waits fails with WorkerUnavailable."""
        self._stop_serving()

    def _stop_serving(self) -> None:
        """No thread serves any more: drop what is queued, fail who waits."""
        if self._watchdog is not None:
            self._watchdog.stop()
        left = self.dispatcher.stop()
        for kind, items in left.items():
            if items:
                self._events.items_dropped(kind, "stopped", len(items))
                self._events.queue_depth(kind, 0)
        self._post(self._fail_all, f"model {self.name} stopped")
        # A worker that stops before its warm-up finished must not leave `start` waiting.
        self._post(self._set_started, WorkerUnavailable(f"model {self.name} stopped"))

    def _stalled(self, stall: Stall) -> bool:
        """Watchdog thread: fail the abandoned batch's requests and let a new thread serve
        its stream, or stop for good. False: stop watching."""
        limit = self.config.stall_timeout_s
        log.error("model %s: a %s batch of %d ran past %g s; its requests fail%s",
                  self.name, stall.kind, stall.size, limit,
                  "; too many stuck threads, the model stops serving" if stall.give_up
                  else "; a new thread serves the queue")
        self._events.stalled(stall.kind, len(stall.stuck))
        error = BatchStalled(f"the model did not finish this {stall.kind} batch within "
                             f"{limit:g} s")
        self._post(self._resolve, [(it, error) for it in stall.stuck])
        if stall.give_up:
            self._stop_serving()
            return False
        thread = ServingThread(stall.stream, stall.gen, self._serving)
        self._threads[stall.stream] = thread
        thread.start()
        return True

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(fn, *args)


def own_instance(error: Exception) -> Exception:
    """A fresh instance of an error a failed batch gave every item it held, with the same
    class, message, attributes and cause, and no traceback yet."""
    try:
        fresh = copy.copy(error)
    except Exception:  # an exception class that cannot be rebuilt from its args
        return error
    if type(fresh) is not type(error) or str(fresh) != str(error):
        return error
    fresh.__cause__ = error.__cause__
    fresh.__suppress_context__ = error.__suppress_context__
    return fresh

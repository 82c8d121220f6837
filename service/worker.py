"""One worker per model: asyncio callers in front, dedicated threads behind.

Callers on the event loop submit prepared items (pixels, token ids: decoding and
tokenising happen before an item is queued, overlapping the model). A request with ten
images is ten items; they may ride in different batches and the request completes when
all of them have. The worker's serving threads (one per stream) own the backend and each
runs one batch at a time, so the event loop never blocks; results go back with
`loop.call_soon_threadsafe`. The rules they apply are in `service.batcher`.

This module imports neither torch nor the HTTP layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .batcher import (
    KINDS,
    MAX_RETRY_AFTER_S,
    MIN_BATCHES_TO_REFUSE,
    MIN_RETRY_AFTER_S,
    Backend,
    BatcherConfig,
    BatcherEvents,
    CostModel,
    ItemResult,
    ItemState,
    Kind,
    NoEvents,
    Request,
    WorkerStats,
    WorkItem,
    group_by_length,
    padded_tokens,
)
from .errors import (
    BatchFailed,
    BatchStalled,
    DeadlineExceeded,
    Draining,
    OutOfMemory,
    Overloaded,
    RequestTooLarge,
    ServiceError,
    WorkerUnavailable,
)

log = logging.getLogger(__name__)


class _Release:
    """`_next_batch`'s answer when, instead of a batch, memory is to be given back."""


class _Abandoned(BaseException):
    """Unwinds a thread the watchdog gave up on; not an Exception, so no handler eats it."""


@dataclass
class _Running:
    """The batch a stream's serving thread of generation `gen` is executing."""

    gen: int
    kind: Kind
    batch: list[WorkItem]
    call_started: float | None = None  # a backend call in progress since then


class ModelWorker:
    """Batches items for one model and runs them on dedicated threads (`config.streams`).

    Bound to the event loop that calls `start`; submit from that loop only.
    """

    def __init__(
        self,
        backend: Backend,
        config: BatcherConfig | None = None,
        *,
        name: str = "model",
        events: BatcherEvents | None = None,
    ):
        self.backend = backend
        self.config = config or BatcherConfig()
        self.name = name
        self._events = events or NoEvents()
        self._cond = threading.Condition()
        self._queues: dict[Kind, OrderedDict[int, WorkItem]] = {k: OrderedDict() for k in KINDS}
        self._queued_tokens = 0  # sum of text costs queued, to tell a full text batch
        self._outstanding = 0  # admitted, not yet answered (queued + on the model)
        self._units: dict[Kind, int] = dict.fromkeys(KINDS, 0)  # their costs, by kind
        self._limits: dict[Kind, int] = {
            "image": self.config.max_batch_size,
            "text": self.config.max_batch_tokens,
        }
        self._ok_since_oom: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._credit: dict[Kind, float] = dict.fromkeys(KINDS, 0.0)
        self._batches: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()
        self._rejected = 0
        self._costs = CostModel()  # for batch sizes, admission and Retry-After
        self._seq = itertools.count()
        self._running = False  # thread started and not ended
        self._warm = False
        self._draining = False
        self._stopping = False
        # Watchdog: each stream's serving thread has a generation; a stalled one is
        # abandoned and a new generation serves that stream. Its own call, when it
        # returns, finds itself stale.
        self._streams = self.config.streams
        self._generation = [0] * self._streams
        self._current: dict[int, _Running] = {}  # by stream: the batches being computed
        # Idle memory release: the backend's hook, when the last batch ended, and whether
        # the hook has run since then.
        self._release_hook: Callable[[], None] | None = getattr(backend, "release_memory", None)
        self._last_batch_end = time.monotonic()
        self._released = False
        self._abandoned = 0  # stuck threads not yet returned
        self._failed = False  # a serving thread ended without being asked to
        self._local = threading.local()
        self._stop_watch = threading.Event()
        self._threads: list[threading.Thread] = []  # the current thread of each stream
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
        self._running = True
        self._threads = [self._thread_for(stream, 0) for stream in range(self._streams)]
        for thread in self._threads:
            thread.start()
        if self.config.stall_timeout_s is not None:
            threading.Thread(target=self._watch, name=f"watchdog-{self.name}",
                             daemon=True).start()
        await self._started

    @property
    def ready(self) -> bool:
        """Warm, running and not draining: fit to take work."""
        return self._refusal() is None

    @property
    def failed(self) -> bool:
        """The worker stopped serving on its own (its thread died, or too many got stuck)
        and will not recover: a reason to restart the process."""
        return self._failed

    async def drain(self, timeout: float) -> bool:
        """Refuse new work, let accepted work finish within `timeout`, then stop the thread.

        Requests still unanswered at the timeout fail with Draining. True when every
        accepted request finished and the thread stopped.
        """
        end = time.monotonic() + timeout
        with self._cond:
            self._draining = True  # also flushes batches held by max_wait_ms
            self._cond.notify_all()
        pending = [r.future for r in self._live]
        finished = True
        if pending:
            _, not_done = await asyncio.wait(pending, timeout=max(0.0, end - time.monotonic()))
            finished = not not_done
        for req in list(self._live):
            self._fail(req, Draining(f"model {self.name} shut down before the request finished"),
                       reason="stopped")
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._stop_watch.set()
        loop = asyncio.get_running_loop()
        for thread in list(self._threads):
            if thread.is_alive():
                await loop.run_in_executor(None, thread.join, max(0.0, end - time.monotonic()))
        return finished and not any(t.is_alive() for t in self._threads)

    def stats(self) -> WorkerStats:
        with self._cond:
            return WorkerStats(
                queued={k: len(q) for k, q in self._queues.items()},
                outstanding=self._outstanding,
                batch_limits={k: self._batch_limit(k) for k in KINDS},
                batches=dict(self._batches),
                dropped=dict(self._dropped),
                rejected=self._rejected,
            )

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

        `deadline` is a time.monotonic() instant (default: now + default_timeout_s).
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
        refusal = self._refusal()
        if refusal is not None:
            raise refusal
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError(f"worker {self.name}: submit from the loop that started it")
        if n > self.config.max_queue_items:
            raise RequestTooLarge(n, self.config.max_queue_items)
        now = time.monotonic()
        if deadline is None:
            deadline = now + self.config.default_timeout_s
        if deadline <= now:
            self._count_dropped(kind, "expired", n)
            raise DeadlineExceeded("the request's deadline passed before it was queued")

        req = Request(
            id=request_id or f"{self.name}-{next(self._seq)}",
            kind=kind,
            future=loop.create_future(),
            results=[None] * n,
            remaining=n,
        )
        with self._cond:
            error = self._admit(req, payloads, costs, deadline, now)
            depth = len(self._queues[kind])
        if error is not None:
            if isinstance(error, Overloaded):
                self._emit("rejected", kind, n)
            raise error
        self._emit("queue_depth", kind, depth)

        self._live.add(req)
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._expire, req)
        try:
            return await req.future
        except asyncio.CancelledError:
            self._purge(req, "cancelled")
            raise
        finally:
            timer.cancel()
            self._live.discard(req)

    def _refusal(self) -> WorkerUnavailable | None:
        if self._draining:
            return Draining(f"model {self.name} is shutting down")
        if not self._running or self._failed:
            return WorkerUnavailable(f"model {self.name} is not running")
        if not self._warm:
            return WorkerUnavailable(f"model {self.name} is warming up")
        return None

    def _admit(
        self,
        req: Request,
        payloads: Sequence[Any],
        costs: Sequence[int],
        deadline: float,
        now: float,
    ) -> ServiceError | None:
        """Lock held. Queue every item of `req`, or none of them and say why."""
        refusal = self._refusal()
        if refusal is not None:
            return refusal
        n = len(payloads)
        overloaded = self._overloaded(req.kind, n)
        if overloaded is not None:
            return overloaded
        for index, (payload, cost) in enumerate(zip(payloads, costs, strict=True)):
            item = WorkItem(next(self._seq), req, index, req.kind, payload, cost, deadline, now)
            req.items.append(item)
            self._queues[req.kind][item.seq] = item
            if req.kind == "text":
                self._queued_tokens += cost
            self._units[req.kind] += cost
        self._outstanding += n
        self._cond.notify_all()  # with streams, the one to take it may not be the first woken
        return None

    def check_admission(self, kind: Kind, n: int) -> None:
        """Raise what submitting `n` items of `kind` would raise now, reserving nothing.

        For callers with costly preparation (decoding images): refusing before it makes
        a 503 under overload cost little, so refusals do not eat the capacity that
        accepted requests need. `submit_many` still decides.
        """
        refusal = self._refusal()
        if refusal is not None:
            raise refusal
        if n > self.config.max_queue_items:
            raise RequestTooLarge(n, self.config.max_queue_items)
        with self._cond:
            overloaded = self._overloaded(kind, n)
        if overloaded is not None:
            self._emit("rejected", kind, n)
            raise overloaded

    def _overloaded(self, kind: Kind, n: int) -> Overloaded | None:
        """Lock held. Overloaded (counted as rejected) when `n` more items of `kind` may
        not be admitted now, else None.

        The time bound covers the wait and the batch the request would join (a full one,
        as under overload): with streams a batch runs on a share of the cores and takes
        a large part of the bound by itself.
        """
        wait_s = self._predicted_wait(kind)
        if self._outstanding + n > self.config.max_queue_items or self._too_slow(kind, wait_s):
            self._rejected += n
            return Overloaded(min(max(wait_s, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S))
        return None

    def _too_slow(self, kind: Kind, wait_s: float) -> bool:
        """Lock held. Would a request wait `wait_s` and then its batch past the time bound?"""
        limit_s = self.config.max_queue_wait_s
        if (limit_s is None or not self._outstanding
                or self._costs.batches(kind) < MIN_BATCHES_TO_REFUSE):
            return False
        cap = self._batch_limit(kind)
        return wait_s + self._costs.seconds(kind, cap, cap) > limit_s

    # ---- completion (event loop) ----

    def _resolve(self, outcomes: list[tuple[WorkItem, ItemResult | ServiceError]]) -> None:
        for item, outcome in outcomes:
            req = item.request
            if req.future.done():
                continue
            if isinstance(outcome, ServiceError):
                self._fail(req, outcome, reason="failed")
                continue
            req.results[item.index] = outcome
            req.remaining -= 1
            if req.remaining == 0:
                req.future.set_result(req.results)

    def _expire(self, req: Request) -> None:
        n = len(req.items)
        self._fail(req, DeadlineExceeded(
            f"deadline passed with {req.remaining} of {n} items unfinished"), reason="expired")

    def _fail(self, req: Request, error: ServiceError, reason: str) -> None:
        if not req.future.done():
            req.future.set_exception(error)
        self._purge(req, reason)

    def _fail_all(self, message: str) -> None:
        for req in list(self._live):
            self._fail(req, WorkerUnavailable(message), reason="stopped")

    def _purge(self, req: Request, reason: str) -> None:
        """Close a request and drop its items still queued; those on the model finish unused."""
        with self._cond:
            req.closed = True
            dropped = [it for it in req.items if it.state is ItemState.QUEUED]
            for item in dropped:
                self._drop(item, reason)
            depth = len(self._queues[req.kind])
        if dropped:
            self._emit("items_dropped", req.kind, reason, len(dropped))
            self._emit("queue_depth", req.kind, depth)

    # ---- the worker thread ----

    def _thread_for(self, stream: int, gen: int) -> threading.Thread:
        suffix = "" if self._streams == 1 else f"-s{stream}"
        suffix += "" if gen == 0 else f"-{gen}"
        return threading.Thread(target=self._main, args=(stream, gen),
                                name=f"model-worker-{self.name}{suffix}", daemon=True)

    def _main(self, stream: int = 0, gen: int = 0) -> None:
        """A serving thread: stream 0's first generation warms the backend up first, and
        the other streams wait for it."""
        self._local.stream = stream
        self._local.gen = gen
        try:
            if stream == 0 and gen == 0:
                try:
                    self._place(alone=True)
                    self.backend.warmup()
                except Exception as err:
                    log.exception("model %s: warm-up failed", self.name)
                    self._post(self._set_started, err)
                    return
                with self._cond:
                    self._warm = True
                    self._last_batch_end = time.monotonic()  # idle from here, not from start
                    self._cond.notify_all()
                self._post(self._set_started, None)
            else:
                with self._cond:
                    while not (self._warm or self._stopping or not self._running):
                        self._cond.wait()
            self._serve()
        except _Abandoned:
            pass
        except BaseException:  # the thread ends either way; say so and let nobody wait on it
            log.critical("model %s: worker thread stopped unexpectedly", self.name, exc_info=True)
        finally:
            self._thread_ended(stream, gen)

    def _thread_ended(self, stream: int, gen: int) -> None:
        with self._cond:
            if gen != self._generation[stream]:  # abandoned, and its call returned at last
                self._abandoned -= 1
                self._cond.notify_all()  # stream 0 may now count an idle spell
                log.warning("model %s: a stalled batch returned after all; its thread ends",
                            self.name)
                return
            # One stream ending unasked fails the worker: it does not serve at part speed.
            self._failed = self._failed or (self._warm and not self._stopping)
        self._stop_serving()

    def _stop_serving(self) -> None:
        """No thread serves any more: drop what is queued, fail who waits."""
        self._stop_watch.set()
        with self._cond:
            self._running = False
            self._cond.notify_all()  # the other streams' threads end too
            left = {kind: list(queue.values()) for kind, queue in self._queues.items()}
            for item in itertools.chain(*left.values()):
                self._drop(item, "stopped")
        for kind, items in left.items():
            if items:
                self._emit("items_dropped", kind, "stopped", len(items))
                self._emit("queue_depth", kind, 0)
        self._post(self._fail_all, f"model {self.name} stopped")

    # ---- the watchdog thread ----

    def _watch(self) -> None:
        limit = self.config.stall_timeout_s
        assert limit is not None
        while not self._stop_watch.wait(min(limit / 4, 1.0)):
            now = time.monotonic()
            with self._cond:
                late = [(stream, cur) for stream, cur in self._current.items()
                        if cur.call_started is not None and now - cur.call_started > limit]
                if not late:
                    continue
                # Give up on the stuck thread: its batch fails, a new generation serves.
                stream, cur = late[0]
                self._generation[stream] += 1
                self._abandoned += 1
                del self._current[stream]
                self._cond.notify_all()  # the new generation, and stream 0's idle clock
                stuck = [it for it in cur.batch if it.state is ItemState.TAKEN]
                for item in stuck:
                    item.state = ItemState.DONE
                self._settle(stuck)
                give_up = self._abandoned > self.config.max_abandoned_threads
                if give_up:
                    self._failed = True
                gen = self._generation[stream]
            log.error("model %s: a %s batch of %d ran past %g s; its requests fail%s",
                      self.name, cur.kind, len(cur.batch), limit,
                      "; too many stuck threads, the model stops serving" if give_up
                      else "; a new thread serves the queue")
            self._emit("stalled", cur.kind, len(stuck))
            error = BatchStalled(f"the model did not finish this {cur.kind} batch within "
                                 f"{limit:g} s")
            self._post(self._resolve, [(it, error) for it in stuck])
            if give_up:
                self._stop_serving()
                return
            thread = self._thread_for(stream, gen)
            self._threads[stream] = thread
            thread.start()

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

    def _serve(self) -> None:
        stream, gen = self._local.stream, self._local.gen
        while True:
            with self._cond:
                if gen != self._generation[stream]:
                    return
                step = self._next_batch(stream)
                if step is None:
                    return
                if isinstance(step, _Release):
                    self._released = True
                else:
                    kind, batch, dropped = step
                    depth = len(self._queues[kind])
                    # Alone: nothing else computing or queued, so the batch may use every core.
                    alone = not self._current and not any(self._queues.values())
                    if batch:
                        self._current[stream] = _Running(gen, kind, batch)
                        if self._streams > 1 and any(self._queues.values()):
                            self._cond.notify_all()  # the next stream may take what is left
            if isinstance(step, _Release):
                self._release_memory()
                continue
            if dropped:
                self._emit("items_dropped", kind, "expired", len(dropped))
            self._emit("queue_depth", kind, depth)
            if batch:
                self._execute(kind, batch, alone)

    def _next_batch(
        self, stream: int = 0
    ) -> tuple[Kind, list[WorkItem], list[WorkItem]] | _Release | None:
        """Wait until a batch is due for `stream` and take it, with the expired items
        dropped on the way. A stream waits while a stream before it is idle: that one
        serves first, so a lone request runs on stream 0. `_Release` instead when it is
        time to give memory back (see `_release_due`).

        Holds the lock (waiting releases it). None when the worker is stopping.
        """
        while not self._stopping:
            if not self._running:
                return None
            if any(s not in self._current for s in range(stream)):
                self._cond.wait()
                continue
            now = time.monotonic()
            due: list[Kind] = []
            wake_at: float | None = None
            for kind in KINDS:
                queue = self._queues[kind]
                if not queue:
                    continue
                hold_until = next(iter(queue.values())).enqueued_at + self.config.max_wait_ms / 1e3
                if hold_until <= now or self._draining or self._full(kind):
                    due.append(kind)
                else:
                    wake_at = hold_until if wake_at is None else min(wake_at, hold_until)
            if due:
                kind = due[0] if len(due) == 1 else self._take_turn()
                batch, dropped = self._take(kind, now)
                return kind, batch, dropped
            release_at = self._release_due(stream)
            if release_at is not None:
                if release_at <= now:
                    return _Release()
                wake_at = release_at if wake_at is None else min(wake_at, release_at)
            self._cond.wait(None if wake_at is None else wake_at - now)
        return None

    def _release_due(self, stream: int) -> float | None:
        """Lock held. When stream 0 should call the backend's `release_memory`: once per
        idle spell, `release_after_idle_s` after the last batch ended with nothing left
        computing or queued, and no abandoned call still inside the backend. None when it
        should not."""
        after = self.config.release_after_idle_s
        if (stream != 0 or after is None or self._release_hook is None or self._released
                or self._current or self._abandoned or any(self._queues.values())):
            return None
        return self._last_batch_end + after

    def _release_memory(self) -> None:
        """On stream 0's thread, out of the lock. A request that arrives meanwhile waits
        for it (milliseconds: see ClipBackend.release_memory)."""
        assert self._release_hook is not None
        start = time.perf_counter()
        try:
            self._release_hook()
        except Exception:  # a failed clean-up is not a reason to stop serving
            log.exception("model %s: giving memory back failed", self.name)
            return
        log.debug("model %s: idle, gave memory back in %.1f ms", self.name,
                  (time.perf_counter() - start) * 1e3)

    def _full(self, kind: Kind) -> bool:
        if kind == "image":
            return len(self._queues["image"]) >= self._batch_limit("image")
        return self._queued_tokens >= self._batch_limit("text")

    def _batch_limit(self, kind: Kind) -> int:
        """Lock held. Units per batch now: the memory limit, within the time budget.

        The budget bounds the latency a batch adds per stream's share of the cores: with
        n streams each batch runs on 1/n of them, so it may take n times as long.
        """
        budget = self.config.max_batch_s
        return self._costs.cap(kind, self._limits[kind],
                               None if budget is None else budget * self._streams)

    def _predicted_wait(self, kind: Kind) -> float:
        """Lock held. Seconds until a new `kind` request's first batch would start.

        Its own kind's outstanding work, plus the other kind's batches that alternate
        with it (one per batch of `kind` still to run, at most the other's whole backlog),
        shared out over the streams that compute it side by side.
        """
        costs = self._costs
        other: Kind = "text" if kind == "image" else "image"
        own_cap, other_cap = self._batch_limit(kind), self._batch_limit(other)
        own = costs.seconds(kind, self._units[kind], own_cap)
        other_backlog = costs.seconds(other, self._units[other], other_cap)
        if other_backlog == 0.0:
            return own / self._streams
        batches = 1 + math.ceil(self._units[kind] / own_cap)
        alternating = min(other_backlog, batches * costs.seconds(other, other_cap, other_cap))
        return (own + alternating) / self._streams

    def _take_turn(self) -> Kind:
        # Smooth weighted round robin over batches: with image_share 0.5, strict alternation.
        share: dict[Kind, float] = {"image": self.config.image_share,
                                    "text": 1 - self.config.image_share}
        for kind in KINDS:
            self._credit[kind] += share[kind]
        kind = max(KINDS, key=self._credit.__getitem__)
        self._credit[kind] -= 1.0
        return kind

    def _take(self, kind: Kind, now: float) -> tuple[list[WorkItem], list[WorkItem]]:
        queue = self._queues[kind]
        dropped: list[WorkItem] = []
        idle = max(1, self._streams - len(self._current))  # this stream included
        if kind == "image":
            batch: list[WorkItem] = []
            # With idle streams, an even share each: side by side beats one after another.
            limit = min(self._batch_limit("image"), -(-len(queue) // idle))
            while queue and len(batch) < limit:
                item = next(iter(queue.values()))
                if item.deadline <= now:
                    self._drop(item, "expired")
                    dropped.append(item)
                else:
                    self._remove(item)
                    batch.append(item)
        else:
            window: list[WorkItem] = []
            for item in itertools.islice(queue.values(), self.config.length_lookahead):
                (dropped if item.deadline <= now else window).append(item)
            for item in dropped:
                self._drop(item, "expired")
            share = -(-self._queued_tokens // idle) + max((it.cost for it in window), default=0)
            batch = (group_by_length(window[0], window[1:],
                                     min(self._batch_limit("text"), share))
                     if window else [])
            for item in batch:
                self._remove(item)
        for item in batch:
            item.state = ItemState.TAKEN
            item.taken_at = now
        return batch, dropped

    def _remove(self, item: WorkItem) -> None:
        del self._queues[item.kind][item.seq]
        if item.kind == "text":
            self._queued_tokens -= item.cost

    def _drop(self, item: WorkItem, reason: str) -> None:
        """Lock held. A queued item leaves without an answer."""
        self._remove(item)
        item.state = ItemState.DROPPED
        self._settle([item])
        self._dropped[reason] += 1

    def _execute(self, kind: Kind, batch: list[WorkItem], alone: bool) -> None:
        """Run a batch that `_serve` registered as this stream's current one."""
        stream, gen = self._local.stream, self._local.gen
        try:
            self._place(alone)
            self._run_isolated(kind, batch)
        except Exception:  # a bug in the batcher itself: fail this batch, keep serving
            log.exception("model %s: unexpected error running a %s batch", self.name, kind)
            left = [it for it in batch if it.state is ItemState.TAKEN]
            self._deliver([(it, BatchFailed("internal error while computing")) for it in left])
        finally:
            with self._cond:
                cur = self._current.get(stream)
                if cur is not None and cur.gen == gen:
                    del self._current[stream]
                self._last_batch_end = time.monotonic()
                self._released = False
                if not self._current:
                    self._cond.notify_all()  # stream 0 may now count an idle spell

    def _place(self, alone: bool) -> None:
        """Tell a backend that shares out cores which stream runs next, and whether alone."""
        place = getattr(self.backend, "place", None)
        if place is not None:
            place(self._local.stream, self._streams, alone)

    def _run_isolated(self, kind: Kind, items: list[WorkItem]) -> None:
        """Run `items`; on failure retry in smaller pieces so only the culprits fail."""
        # Items whose caller left or whose sibling failed need no answer. `closed` is read
        # without the lock: a stale False only computes one unwanted item.
        self._finish([it for it in items if it.request.closed])
        items = [it for it in items if not it.request.closed]
        if not items:
            return
        start = self._call_starts()
        try:
            try:
                values = self.backend.run(kind, [it.payload for it in items])
            finally:
                self._call_ended()  # raises _Abandoned in a thread the watchdog gave up on
            if len(values) != len(items):
                raise RuntimeError(f"backend returned {len(values)} results for {len(items)}")
        except OutOfMemory as err:
            self._emit("batch_failed", kind, len(items), type(err).__name__)
            if len(items) == 1:
                self._deliver([(items[0], OutOfMemory("the input does not fit in memory"))])
                return
            self._shrink(kind, items)
            while items:  # re-chunk each time: a piece may shrink the limit further
                chunk = _first_chunk(kind, items, self._limits[kind])
                self._run_isolated(kind, chunk)
                items = items[len(chunk):]
            return
        except Exception as err:
            self._emit("batch_failed", kind, len(items), type(err).__name__)
            if len(items) == 1:
                log.warning("model %s: a %s item of request %s failed", self.name, kind,
                            items[0].request.id, exc_info=err)
                self._deliver([(items[0], BatchFailed(f"the model failed on this {kind}"))])
                return
            half = len(items) // 2
            self._run_isolated(kind, items[:half])
            self._run_isolated(kind, items[half:])
            return
        end = time.monotonic()
        compute_s = end - start
        self._succeeded(kind, items, compute_s)
        self._emit("batch_done", kind, len(items), padded_tokens(kind, items), compute_s)
        self._deliver([
            (it, ItemResult(v, it.taken_at - it.enqueued_at, end - it.taken_at, len(items)))
            for it, v in zip(items, values, strict=True)
        ])

    def _call_starts(self) -> float:
        now = time.monotonic()
        with self._cond:
            cur = self._current.get(self._local.stream)
            if cur is not None and cur.gen == self._local.gen:
                cur.call_started = now
        return now

    def _call_ended(self) -> None:
        with self._cond:
            if self._local.gen != self._generation[self._local.stream]:
                raise _Abandoned
            cur = self._current.get(self._local.stream)
            if cur is not None:
                cur.call_started = None

    def _shrink(self, kind: Kind, items: list[WorkItem]) -> None:
        size = len(items) if kind == "image" else padded_tokens(kind, items)
        limit = max(1, min(self._limits[kind], size // 2))
        with self._cond:
            self._limits[kind] = limit
            self._ok_since_oom[kind] = 0
        log.warning("model %s: out of memory on a %s batch of %d; limit now %d %s",
                    self.name, kind, len(items), limit, "items" if kind == "image" else "tokens")

    def _succeeded(self, kind: Kind, items: list[WorkItem], compute_s: float) -> None:
        configured = self.config.max_batch_size if kind == "image" else self.config.max_batch_tokens
        units = len(items) if kind == "image" else padded_tokens(kind, items)
        with self._cond:
            self._costs.observe(kind, units, compute_s)
            self._batches[kind] += 1
            limit = self._limits[kind]
            if limit >= configured:
                return
            self._ok_since_oom[kind] += 1
            if self._ok_since_oom[kind] >= self.config.oom_regrow_batches:
                self._limits[kind] = min(configured, limit + max(1, limit // 4))
                self._ok_since_oom[kind] = 0

    def _deliver(self, outcomes: list[tuple[WorkItem, ItemResult | ServiceError]]) -> None:
        self._finish([item for item, _ in outcomes])
        self._post(self._resolve, outcomes)

    def _finish(self, items: list[WorkItem]) -> None:
        """Taken items leave the worker's books: answered, or no longer awaited."""
        if not items:
            return
        with self._cond:
            for item in items:
                item.state = ItemState.DONE
            self._settle(items)

    def _settle(self, items: list[WorkItem]) -> None:
        """Lock held. `items` are no longer outstanding."""
        self._outstanding -= len(items)
        for item in items:
            self._units[item.kind] -= item.cost

    # ---- plumbing ----

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(fn, *args)

    def _count_dropped(self, kind: Kind, reason: str, n: int) -> None:
        with self._cond:
            self._dropped[reason] += n
        self._emit("items_dropped", kind, reason, n)

    def _emit(self, hook: str, *args: Any) -> None:
        try:
            getattr(self._events, hook)(*args)
        except Exception:
            log.exception("batcher event hook %s failed", hook)


def _first_chunk(kind: Kind, items: list[WorkItem], limit: int) -> list[WorkItem]:
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

"""A stream's serving thread: takes batches from the dispatcher and runs them.

With `streams > 1`, that many threads each run batches of their own at the same time (see
`service.batcher`). Stream 0's first thread warms the backend up first; the others wait
for it. A thread the watchdog abandoned finds itself stale when its call returns and
ends normally: nothing is raised to unwind it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .batcher import Backend, BatcherEvents, ItemState, Kind, WorkItem, padded_tokens
from .dispatch import Batch, Dispatcher, Release
from .errors import BatchFailed, DeviceFailed, OutOfMemory, is_callers_fault
from .isolation import Outcome, run_isolated

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamContext:
    """What every serving thread of one worker shares."""

    name: str  # the model's
    streams: int
    backend: Backend
    dispatcher: Dispatcher
    events: BatcherEvents  # safe: a hook that raises is logged
    deliver: Callable[[list[Outcome]], None]  # answers items (off the books, to the loop)
    warmed: Callable[[BaseException | None], None]  # the warm-up's outcome, for start()
    ended: Callable[[int, int], None]  # a thread (stream, gen) ends, whyever it does
    # The device broke (service.errors.DeviceFailed), the batch is answered: stop serving.
    device_failed: Callable[[BaseException], None]


class ServingThread:
    """The thread serving `stream` in generation `gen`; it is the `BatchCalls` of the
    batches it runs."""

    def __init__(self, stream: int, gen: int, ctx: StreamContext):
        self.stream = stream
        self.gen = gen
        self._ctx = ctx
        self._batch: list[WorkItem] = []  # the batch `_execute` runs now
        suffix = "" if ctx.streams == 1 else f"-s{stream}"
        suffix += "" if gen == 0 else f"-{gen}"
        self.thread = threading.Thread(target=self._main, name=f"model-worker-{ctx.name}{suffix}",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        ctx, d = self._ctx, self._ctx.dispatcher
        try:
            if self.stream == 0 and self.gen == 0:
                try:
                    self._place(alone=True)
                    ctx.backend.warmup()
                except Exception as err:
                    log.exception("model %s: warm-up failed", ctx.name)
                    ctx.warmed(err)
                    return
                d.warmed()
                ctx.warmed(None)
            else:
                d.wait_warm()
            self._serve()
        except BaseException:  # the thread ends either way; say so and let nobody wait on it
            if d.is_current(self.stream, self.gen):  # an abandoned thread just ends
                log.critical("model %s: worker thread stopped unexpectedly", ctx.name,
                             exc_info=True)
        finally:
            ctx.ended(self.stream, self.gen)

    def _serve(self) -> None:
        ctx = self._ctx
        while True:
            step = ctx.dispatcher.next_step(self.stream, self.gen)
            if step is None:
                return
            if isinstance(step, Release):
                ctx.dispatcher.release_memory()
                continue
            taken = step.taken
            if taken.expired:
                ctx.events.items_dropped(taken.kind, "expired", len(taken.expired))
            ctx.events.queue_depth(taken.kind, step.depth)
            if taken.batch:
                self._execute(step)

    def _execute(self, step: Batch) -> None:
        """Run a batch that `next_step` registered as this stream's current one."""
        kind, batch = step.taken.kind, step.taken.batch
        self._batch = batch
        try:
            self._place(step.alone)
            # False when abandoned or the device failed: next_step then says end.
            run_isolated(kind, batch, self)
        except Exception:  # a bug in the batcher itself: fail this batch, keep serving
            log.exception("model %s: unexpected error running a %s batch", self._ctx.name, kind)
            left = [it for it in batch if it.state is ItemState.TAKEN]
            self.deliver([(it, BatchFailed("internal error while computing")) for it in left])
        finally:
            self._batch = []
            self._ctx.dispatcher.batch_ended(self.stream, self.gen)

    def _place(self, alone: bool) -> None:
        """Tell a backend that shares out cores which stream runs next, and whether alone."""
        place = getattr(self._ctx.backend, "place", None)
        if place is not None:
            place(self.stream, self._ctx.streams, alone)

    # ---- BatchCalls, for run_isolated ----

    def run(self, kind: Kind, payloads: list[Any]) -> Sequence[Any]:
        return self._ctx.backend.run(kind, payloads)

    def call_started(self) -> float:
        return self._ctx.dispatcher.call_started(self.stream, self.gen)

    def call_ended(self) -> float | None:
        return self._ctx.dispatcher.call_ended(self.stream, self.gen)

    def finish(self, items: list[WorkItem]) -> None:
        self._ctx.dispatcher.finish(items)

    def deliver(self, outcomes: list[Outcome]) -> None:
        self._ctx.deliver(outcomes)

    def failed(self, kind: Kind, items: list[WorkItem], error: Exception) -> None:
        self._ctx.events.batch_failed(kind, len(items), type(error).__name__)
        if len(items) != 1 or isinstance(error, (OutOfMemory, DeviceFailed)):
            return
        if is_callers_fault(error):  # the input's doing: answered as it is, no traceback
            log.info("model %s: a %s item of request %s was refused by the model: %s",
                     self._ctx.name, kind, items[0].request.id, error)
        else:
            log.warning("model %s: a %s item of request %s failed", self._ctx.name, kind,
                        items[0].request.id, exc_info=error)

    def device_failed(self, kind: Kind, items: list[WorkItem], error: DeviceFailed) -> None:
        # Every item of the batch still unanswered fails, not only the piece that ran:
        # the bisection stops here, and nothing on this device can compute them.
        log.critical("model %s: the device failed on a %s batch of %d; the worker stops",
                     self._ctx.name, kind, len(self._batch or items), exc_info=error)
        # Failed before anyone hears back, so that a caller answered with this error
        # finds the worker failed (/healthz 503) at once.
        self._ctx.dispatcher.fail()
        try:
            left = [it for it in (self._batch or items) if it.state is ItemState.TAKEN]
            self.deliver([(it, error) for it in left])
        finally:  # whatever happens above, nothing more is computed on this device
            self._ctx.device_failed(error)

    def out_of_memory(self, kind: Kind, items: list[WorkItem]) -> None:
        limit = self._ctx.dispatcher.out_of_memory(kind, items)
        log.warning("model %s: out of memory on a %s batch of %d; limit now %d %s",
                    self._ctx.name, kind, len(items), limit,
                    "items" if kind == "image" else "tokens")

    def memory_limit(self, kind: Kind) -> int:
        return self._ctx.dispatcher.memory_limit(kind)

    def succeeded(self, kind: Kind, items: list[WorkItem], compute_s: float) -> None:
        self._ctx.dispatcher.succeeded(kind, items, compute_s)
        self._ctx.events.batch_done(kind, len(items), padded_tokens(kind, items), compute_s)

"""Which stream computes what, and the watchdog that gives up on a batch that hangs.

Each stream's serving thread has a generation. When a backend call runs past
`stall_timeout_s`, the watchdog abandons that thread: its batch fails, the stream's
generation moves on and a fresh thread serves it. The stuck thread keeps its old
generation; when its call returns at last it finds itself stale and ends quietly.

`StreamTable` is pure bookkeeping (no lock, no thread), owned by
`service.dispatch.Dispatcher`; `Watchdog` is the thread that looks, on a clock it is given.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .batcher import Kind, WorkItem

log = logging.getLogger(__name__)


@dataclass
class Running:
    """The batch a stream's serving thread of generation `gen` is executing."""

    gen: int
    kind: Kind
    batch: list[WorkItem]
    call_started: float | None = None  # a backend call in progress since then


@dataclass(frozen=True)
class Stall:
    """A batch the watchdog gave up on."""

    stream: int
    gen: int  # the generation that serves the stream from now on
    kind: Kind
    size: int  # items in the abandoned batch
    stuck: list[WorkItem] = field(default_factory=list)  # those still awaiting an answer
    give_up: bool = False  # too many threads stuck: the worker stops serving


class StreamTable:
    """The batch each stream computes, each stream's generation, the threads abandoned."""

    def __init__(self, streams: int):
        self.streams = streams
        self._generation = [0] * streams
        self._current: dict[int, Running] = {}
        self.abandoned = 0  # stuck threads whose call has not returned yet

    def generation(self, stream: int) -> int:
        return self._generation[stream]

    def is_current(self, stream: int, gen: int) -> bool:
        return gen == self._generation[stream]

    @property
    def busy(self) -> bool:
        """Some stream is computing."""
        return bool(self._current)

    def idle_before(self, stream: int) -> bool:
        """A stream before `stream` is idle: it serves first, so a lone request runs on 0."""
        return any(s not in self._current for s in range(stream))

    def idle(self) -> int:
        """Streams not computing (at least 1: the one asking)."""
        return max(1, self.streams - len(self._current))

    def begin(self, stream: int, gen: int, kind: Kind, batch: list[WorkItem]) -> None:
        self._current[stream] = Running(gen, kind, batch)

    def end(self, stream: int, gen: int) -> None:
        """The batch of `stream`'s generation `gen` is over (a stale thread's is gone)."""
        cur = self._current.get(stream)
        if cur is not None and cur.gen == gen:
            del self._current[stream]

    def call_started(self, stream: int, gen: int, now: float) -> None:
        cur = self._current.get(stream)
        if cur is not None and cur.gen == gen:
            cur.call_started = now

    def call_ended(self, stream: int, gen: int) -> bool:
        """False when the thread was abandoned during the call."""
        if not self.is_current(stream, gen):
            return False
        cur = self._current.get(stream)
        if cur is not None:
            cur.call_started = None
        return True

    def late(self, now: float, limit_s: float) -> int | None:
        """A stream whose backend call has run longer than `limit_s` at `now`, if any."""
        for stream, cur in self._current.items():
            if cur.call_started is not None and now - cur.call_started > limit_s:
                return stream
        return None

    def abandon(self, stream: int) -> Running:
        """Give up on `stream`'s thread: a new generation serves it; its batch, returned."""
        self._generation[stream] += 1
        self.abandoned += 1
        return self._current.pop(stream)

    def returned(self) -> None:
        """An abandoned thread's call returned and the thread ended."""
        self.abandoned -= 1


class Watchdog:
    """A thread that looks for stalled batches every `min(limit_s / 4, 1 s)`.

    `find(now, limit_s)` abandons a stalled batch and describes it; `on_stall` handles it
    and says whether to keep watching. `check` is one look, for tests to call with a
    clock of their own.
    """

    def __init__(
        self,
        name: str,
        limit_s: float,
        find: Callable[[float, float], Stall | None],
        on_stall: Callable[[Stall], bool],
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self.limit_s = limit_s
        self._find = find
        self._on_stall = on_stall
        self._clock = clock
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._watch, name=f"watchdog-{self.name}", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> bool:
        """Look once; False when the watchdog should stop."""
        stall = self._find(self._clock(), self.limit_s)
        return stall is None or self._on_stall(stall)

    def _watch(self) -> None:
        while not self._stop.wait(min(self.limit_s / 4, 1.0)):
            if not self.check():
                return

"""A backend that obeys the worker's protocol without torch, and records every call.

Each result is `(kind, payload)`, so a test can tell which input produced it. Behaviour
is chosen per payload (poisoned, hanging, fatal, refused with the caller's error, or
breaking the device for good) or per batch (out of memory above a size, a fixed sleep), and `pause()` holds every call at its start until `resume()`, so a
test can fill the queue while the worker is busy and know exactly what is queued.

With a `FakeClock` (given to the worker too), a call takes its time on that clock instead
of sleeping: the worker measures exactly `delay_s + per_item_s x batch size`, so what it
learns from timings, and the policy that follows, is the same on any machine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from service.errors import DeviceFailed, OutOfMemory


class FakeClock:
    """Simulated monotonic time: stands still until advanced (by a test or a FakeBackend)."""

    def __init__(self, start: float = 100.0):
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class Poisoned(ValueError):
    """What the fake model raises on a poisoned payload."""


class Fatal(BaseException):
    """Not an Exception: escapes every `except Exception`, as a bug that kills a thread."""


@dataclass(frozen=True)
class Call:
    kind: str
    payloads: tuple[Any, ...]
    outcome: str  # "ok", "poisoned", "oom", "fatal", "refused", "device_failed"

    @property
    def size(self) -> int:
        return len(self.payloads)


class FakeBackend:
    def __init__(
        self,
        delay_s: float = 0.0,
        *,
        per_item_s: float = 0.0,
        poison: Iterable[Any] = (),
        oom_above: int | None = None,
        hang_on: Iterable[Any] = (),
        fatal_on: Iterable[Any] = (),
        refuse: dict[Any, Exception] | None = None,
        break_device_on: Iterable[Any] = (),
        clock: FakeClock | None = None,
    ):
        self.delay_s = delay_s
        self.per_item_s = per_item_s  # a call sleeps delay_s + per_item_s x batch size
        self.poison = set(poison)
        self.oom_above = oom_above
        self.hang_on = set(hang_on)
        self.fatal_on = set(fatal_on)
        # payload -> the error that payload alone raises (a caller's fault found on the
        # device, as a corrupt JPEG the GPU decoder rejects); the whole call raises it.
        self.refuse = dict(refuse or {})
        # A payload that breaks the device (a sticky CUDA error): this call and every
        # later one raise DeviceFailed, as every launch on a poisoned context fails.
        self.break_device_on = set(break_device_on)
        self.device_broken = False
        self.clock = clock  # None: calls take their time in real sleeps
        self.calls: list[Call] = []
        self.warmed_up = False
        self.busy = threading.Event()  # set when a call starts
        self._gate = threading.Event()
        self._gate.set()
        self._unhang = threading.Event()
        self._lock = threading.Lock()

    # ---- the Backend protocol ----

    def warmup(self) -> None:
        self.warmed_up = True

    def run(self, kind: str, payloads: list[Any]) -> list[Any]:
        self.busy.set()
        if not self._gate.wait(timeout=10):
            raise TimeoutError("FakeBackend was paused and never resumed")
        if self.oom_above is not None and len(payloads) > self.oom_above:
            self._record(kind, payloads, "oom")
            raise OutOfMemory(f"fake: {len(payloads)} > {self.oom_above}")
        if self.device_broken or any(p in self.break_device_on for p in payloads):
            self.device_broken = True
            self._record(kind, payloads, "device_failed")
            raise DeviceFailed("fake: an illegal memory access was encountered")
        if any(p in self.fatal_on for p in payloads):
            self._record(kind, payloads, "fatal")
            raise Fatal("fake: the worker thread dies")
        if any(p in self.poison for p in payloads):
            self._record(kind, payloads, "poisoned")
            raise Poisoned("fake: poisoned input")
        refused = [p for p in payloads if p in self.refuse]
        if refused:
            self._record(kind, payloads, "refused")
            raise self.refuse[refused[0]]
        self._record(kind, payloads, "ok")
        if any(p in self.hang_on for p in payloads):
            self._unhang.wait(timeout=10)
        took = self.delay_s + self.per_item_s * len(payloads)
        if self.clock is not None:
            self.clock.advance(took)
        elif took:
            time.sleep(took)
        return [(kind, p) for p in payloads]

    # ---- test controls ----

    def pause(self) -> None:
        self._gate.clear()

    def resume(self) -> None:
        self._gate.set()

    def release_hang(self) -> None:
        self._unhang.set()

    def now(self) -> float:
        """The time calls take place on: the fake clock's, or the real monotonic one."""
        return self.clock() if self.clock is not None else time.monotonic()

    def _record(self, kind: str, payloads: list[Any], outcome: str) -> None:
        with self._lock:
            self.calls.append(Call(kind, tuple(payloads), outcome))

    # ---- views for assertions ----

    @property
    def batches(self) -> list[Call]:
        """Calls that returned results."""
        with self._lock:
            return [c for c in self.calls if c.outcome == "ok"]

    def seen(self) -> set[Any]:
        """Every payload that reached the model, whether or not its call succeeded."""
        with self._lock:
            return {p for c in self.calls for p in c.payloads}

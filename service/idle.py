"""Idle memory release: once per idle spell, ask the backend to give memory back.

A burst's largest batches leave memory that allocators keep; an idle server need not hold
it. The rule (`due_at`) is pure, over clock readings passed in, and runs under
`service.dispatch.Dispatcher`'s lock; `release` calls the backend's hook on stream 0's
thread, out of the lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class IdleRelease:
    def __init__(self, name: str, after_s: float | None, hook: Callable[[], None] | None,
                 now: float):
        self.name = name
        self.after_s = after_s
        self._hook = hook
        self._last_batch_end = now
        self._released = False  # the hook has run since the last batch ended

    def batch_ended(self, now: float) -> None:
        """A new idle spell may begin at `now`."""
        self._last_batch_end = now
        self._released = False

    def due_at(self, stream: int, busy: bool) -> float | None:
        """When `stream` should release: stream 0 only, once per idle spell, `after_s`
        after the last batch ended. `busy`: something computes or is queued, or an
        abandoned call is still inside the backend. None: not in this spell."""
        if (stream != 0 or self.after_s is None or self._hook is None or self._released
                or busy):
            return None
        return self._last_batch_end + self.after_s

    def claim(self) -> None:
        """The caller releases now; not again in this spell."""
        self._released = True

    def release(self) -> None:
        """Call the hook. A request that arrives meanwhile waits for it (milliseconds:
        see ClipBackend.release_memory)."""
        assert self._hook is not None
        start = time.perf_counter()
        try:
            self._hook()
        except Exception:  # a failed clean-up is not a reason to stop serving
            log.exception("model %s: giving memory back failed", self.name)
            return
        log.debug("model %s: idle, gave memory back in %.1f ms", self.name,
                  (time.perf_counter() - start) * 1e3)

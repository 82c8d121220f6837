"""When to retry a refused request, and how long to wait first: a pure policy, so tests
drive it with a fake clock and a seeded random source.

A 429 or 503 is retried after the server's Retry-After (it knows how long its queue
or the caller's rate bucket needs), stretched by a random fraction so callers refused
together do not come back together; without the header, after an exponential backoff
with full jitter. No retry is started that could not begin before the call's deadline.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import RETRYABLE_STATUSES


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 10  # requests in all, the first included
    deadline_s: float = 120.0  # for a whole call: every chunk, every retry
    backoff_s: float = 0.5  # first wait without Retry-After; doubles each attempt
    max_backoff_s: float = 30.0
    jitter: float = 0.25  # Retry-After x (1 + U(0, jitter))

    def delay(self, attempt: int, status: int, retry_after: float | None, now: float,
              deadline: float, random: Callable[[], float]) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, after attempt `attempt` (0-based)
        was answered `status`; None: give up and raise the error."""
        if status not in RETRYABLE_STATUSES or attempt + 1 >= self.max_attempts:
            return None
        if retry_after is not None:
            wait = retry_after * (1.0 + self.jitter * random())
        else:
            wait = random() * min(self.max_backoff_s, self.backoff_s * 2.0 ** attempt)
        if now + wait >= deadline:
            return None
        return wait


def parse_retry_after(value: str | None, now_epoch: Callable[[], float] = time.time
                      ) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent or
    unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now_epoch())

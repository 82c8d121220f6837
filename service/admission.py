"""Admission and batch limits: who may queue, for how long to come back, how big a batch.

Pure policy over the cost model and the queue's totals, passed in: no lock, no thread.
`service.dispatch.Dispatcher` owns the one instance and calls it under its lock.

- A request is refused (`Overloaded`) when the items admitted and not yet answered would
  exceed `max_queue_items`, or, with `max_queue_wait_s`, when the work admitted before it
  plus the batch it would join is predicted to take longer than that. `Retry-After` is
  the predicted wait, within [MIN_RETRY_AFTER_S, MAX_RETRY_AFTER_S].
- A batch holds at most the memory limit (`max_batch_size` images, `max_batch_tokens`
  padded tokens), and with `max_batch_s` no more than is predicted to take that long.
- Out of memory halves the memory limit below the failing batch's size; it grows back by
  a quarter after `oom_regrow_batches` good batches in a row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .batcher import (
    KINDS,
    MAX_RETRY_AFTER_S,
    MIN_BATCHES_TO_REFUSE,
    MIN_RETRY_AFTER_S,
    BatcherConfig,
    CostModel,
    Kind,
    WorkItem,
    padded_tokens,
)
from .errors import Overloaded


class Admission:
    def __init__(self, config: BatcherConfig):
        self._config = config
        self.costs = CostModel()  # learnt from finished batches
        self._configured: dict[Kind, int] = {"image": config.max_batch_size,
                                             "text": config.max_batch_tokens}
        self._memory = dict(self._configured)  # shrunk by out-of-memory, grows back
        self._ok_since_oom: dict[Kind, int] = dict.fromkeys(KINDS, 0)

    # ---- batch limits ----

    def memory_limit(self, kind: Kind) -> int:
        """Units per batch that fit in memory, as far as out-of-memory errors tell."""
        return self._memory[kind]

    def batch_limit(self, kind: Kind) -> int:
        """Units per batch now: the memory limit, within the time budget.

        The budget bounds the latency a batch adds per stream's share of the cores: with
        n streams each batch runs on 1/n of them, so it may take n times as long.
        """
        budget = self._config.max_batch_s
        return self.costs.cap(kind, self._memory[kind],
                              None if budget is None else budget * self._config.streams)

    def batch_limits(self) -> dict[Kind, int]:
        return {kind: self.batch_limit(kind) for kind in KINDS}

    def out_of_memory(self, kind: Kind, items: Sequence[WorkItem]) -> int:
        """A batch of `items` did not fit: halve the memory limit below it; the new limit."""
        size = len(items) if kind == "image" else padded_tokens(kind, items)
        self._memory[kind] = max(1, min(self._memory[kind], size // 2))
        self._ok_since_oom[kind] = 0
        return self._memory[kind]

    def succeeded(self, kind: Kind, items: Sequence[WorkItem], compute_s: float) -> None:
        """A batch of `items` took `compute_s`: learn from it, and regrow a shrunk limit."""
        units = len(items) if kind == "image" else padded_tokens(kind, items)
        self.costs.observe(kind, units, compute_s)
        limit, configured = self._memory[kind], self._configured[kind]
        if limit >= configured:
            return
        self._ok_since_oom[kind] += 1
        if self._ok_since_oom[kind] >= self._config.oom_regrow_batches:
            self._memory[kind] = min(configured, limit + max(1, limit // 4))
            self._ok_since_oom[kind] = 0

    # ---- admission ----

    def predicted_wait(self, kind: Kind, units: Mapping[Kind, int]) -> float:
        """Seconds until a new `kind` request's first batch would start, with `units`
        (by kind) admitted and not yet answered.

        Its own kind's outstanding work, plus the other kind's batches that alternate
        with it (one per batch of `kind` still to run, at most the other's whole backlog),
        shared out over the streams that compute it side by side.
        """
        costs, streams = self.costs, self._config.streams
        other: Kind = "text" if kind == "image" else "image"
        own_cap, other_cap = self.batch_limit(kind), self.batch_limit(other)
        own = costs.seconds(kind, units[kind], own_cap)
        other_backlog = costs.seconds(other, units[other], other_cap)
        if other_backlog == 0.0:
            return own / streams
        batches = 1 + math.ceil(units[kind] / own_cap)
        alternating = min(other_backlog, batches * costs.seconds(other, other_cap, other_cap))
        return (own + alternating) / streams

    def refusal(
        self, kind: Kind, n: int, outstanding: int, units: Mapping[Kind, int]
    ) -> Overloaded | None:
        """Overloaded when `n` more items of `kind` may not be admitted now, else None.

        The time bound covers the wait and the batch the request would join (a full one,
        as under overload): with streams a batch runs on a share of the cores and takes a
        large part of the bound by itself. Never refused by time when nothing is
        outstanding, nor before `MIN_BATCHES_TO_REFUSE` batches of `kind` were timed.
        """
        wait_s = self.predicted_wait(kind, units)
        if outstanding + n > self._config.max_queue_items or self._too_slow(kind, wait_s,
                                                                            outstanding):
            return Overloaded(min(max(wait_s, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S))
        return None

    def _too_slow(self, kind: Kind, wait_s: float, outstanding: int) -> bool:
        limit_s = self._config.max_queue_wait_s
        if (limit_s is None or not outstanding
                or self.costs.batches(kind) < MIN_BATCHES_TO_REFUSE):
            return False
        cap = self.batch_limit(kind)
        return wait_s + self.costs.seconds(kind, cap, cap) > limit_s

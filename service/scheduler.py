"""The batch queue: what is waiting, what is due, and what the next batch takes.

Pure policy over the queued items and a clock reading `now` passed in: no lock, no
thread. `service.dispatch.Dispatcher` owns the one instance and calls it under its lock.
The rules themselves are described in `service.batcher`.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .batcher import KINDS, BatcherConfig, ItemState, Kind, Request, WorkItem, group_by_length


@dataclass(frozen=True)
class Taken:
    """A batch taken from the queue, and the expired items dropped on the way."""

    kind: Kind
    batch: list[WorkItem]  # possibly empty: every item looked at had expired
    expired: list[WorkItem]


@dataclass(frozen=True)
class Wait:
    """Nothing is due: look again at `until` (a clock reading), or when something changes."""

    until: float | None


class BatchQueue:
    """Items admitted and not yet answered: those queued by kind, and the totals that
    admission reads (`outstanding`, `units`), which count items on the model too."""

    def __init__(self, config: BatcherConfig):
        self._config = config
        self._queues: dict[Kind, OrderedDict[int, WorkItem]] = {k: OrderedDict() for k in KINDS}
        self._queued_tokens = 0  # sum of text costs queued, to tell a full text batch
        self.outstanding = 0  # admitted, not yet answered (queued + on the model)
        self.units: dict[Kind, int] = dict.fromkeys(KINDS, 0)  # their costs, by kind
        self._credit: dict[Kind, float] = dict.fromkeys(KINDS, 0.0)  # the image/text turn

    def depth(self, kind: Kind) -> int:
        """Items of `kind` waiting."""
        return len(self._queues[kind])

    @property
    def empty(self) -> bool:
        return not any(self._queues.values())

    def add(self, items: Iterable[WorkItem]) -> None:
        """Queue admitted items, in `seq` order."""
        for item in items:
            self._queues[item.kind][item.seq] = item
            if item.kind == "text":
                self._queued_tokens += item.cost
            self.units[item.kind] += item.cost
            self.outstanding += 1

    def settle(self, items: Iterable[WorkItem]) -> None:
        """`items` (taken or dropped) are no longer outstanding."""
        for item in items:
            self.outstanding -= 1
            self.units[item.kind] -= item.cost

    def drop(self, item: WorkItem) -> None:
        """A queued item leaves without an answer."""
        self._remove(item)
        item.state = ItemState.DROPPED
        self.settle([item])

    def drop_request(self, req: Request) -> list[WorkItem]:
        """Drop `req`'s items still queued; those on the model are left to finish."""
        dropped = [it for it in req.items if it.state is ItemState.QUEUED]
        for item in dropped:
            self.drop(item)
        return dropped

    def drop_all(self) -> dict[Kind, list[WorkItem]]:
        """Empty the queue: what was waiting, by kind."""
        left = {kind: list(queue.values()) for kind, queue in self._queues.items()}
        for item in itertools.chain(*left.values()):
            self.drop(item)
        return left

    def full(self, kind: Kind, limit: int) -> bool:
        """Is a whole batch waiting? `limit`: images, or padded tokens for text."""
        if kind == "image":
            return len(self._queues["image"]) >= limit
        return self._queued_tokens >= limit

    def poll(self, now: float, limits: Mapping[Kind, int], idle: int, draining: bool) -> Taken | Wait:
        """Take the batch that is due at `now`, or say when to look again.

        A kind is due when its oldest item has been held `max_wait_ms`, when a whole batch
        waits (`limits`, units per batch), or when draining. With both due, the turn
        decides. `idle`: streams not computing, the caller's included.
        """
        due: list[Kind] = []
        wake_at: float | None = None
        hold_s = self._config.max_wait_ms / 1e3
        for kind in KINDS:
            queue = self._queues[kind]
            if not queue:
                continue
            hold_until = next(iter(queue.values())).enqueued_at + hold_s
            if hold_until <= now or draining or self.full(kind, limits[kind]):
                due.append(kind)
            else:
                wake_at = hold_until if wake_at is None else min(wake_at, hold_until)
        if not due:
            return Wait(wake_at)
        kind = due[0] if len(due) == 1 else self.take_turn()
        return self.take(kind, now, limits[kind], idle)

    def take_turn(self) -> Kind:
        """Which kind runs next when both are due: a smooth weighted round robin over
        batches; with image_share 0.5, strict alternation."""
        share: dict[Kind, float] = {"image": self._config.image_share,
                                    "text": 1 - self._config.image_share}
        for kind in KINDS:
            self._credit[kind] += share[kind]
        kind = max(KINDS, key=self._credit.__getitem__)
        self._credit[kind] -= 1.0
        return kind

    def take(self, kind: Kind, now: float, limit: int, idle: int) -> Taken:
        """The next `kind` batch, at most `limit` units, with expired items dropped.

        With `idle` streams free, each takes an even share: side by side beats one after
        another. Images go oldest first; the oldest text goes with the queued texts
        closest to it in length (`group_by_length`, over `length_lookahead` texts).
        """
        queue = self._queues[kind]
        expired: list[WorkItem] = []
        idle = max(1, idle)
        if kind == "image":
            batch: list[WorkItem] = []
            limit = min(limit, -(-len(queue) // idle))
            while queue and len(batch) < limit:
                item = next(iter(queue.values()))
                if item.deadline <= now:
                    self.drop(item)
                    expired.append(item)
                else:
                    self._remove(item)
                    batch.append(item)
        else:
            window: list[WorkItem] = []
            for item in itertools.islice(queue.values(), self._config.length_lookahead):
                (expired if item.deadline <= now else window).append(item)
            for item in expired:
                self.drop(item)
            share = -(-self._queued_tokens // idle) + max((it.cost for it in window), default=0)
            batch = group_by_length(window[0], window[1:], min(limit, share)) if window else []
            for item in batch:
                self._remove(item)
        for item in batch:
            item.state = ItemState.TAKEN
            item.taken_at = now
        return Taken(kind, batch, expired)

    def _remove(self, item: WorkItem) -> None:
        del self._queues[item.kind][item.seq]
        if item.kind == "text":
            self._queued_tokens -= item.cost

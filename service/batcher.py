"""Dynamic batching policy: what a batch is, and the contracts around the worker.

The config, the backend and events protocols, the queue item and result types, and the
pure rules that form batches (length grouping, padded-token cost). The thread that applies
them is `service.worker.ModelWorker`.

Batching policy:
- An idle worker starts at once with whatever is queued; while it computes, new items
  queue, so batches grow with load. `max_wait_ms > 0` holds a partial batch that long
  (from its oldest item) for throughput-first deployments.
- Image batches hold at most `max_batch_size` items. Text batches are bounded by padded
  tokens (items x longest item): the oldest text goes first and is joined by the queued
  texts closest to it in length, so little padding is computed and no text waits longer
  than the texts queued before it.
- When both modalities wait, batches alternate by `image_share`; neither starves.
- Admission counts items admitted and not yet answered (queued or on the model); a request
  that would exceed `max_queue_items` is refused whole with `Overloaded`.
- Items whose deadline passed or whose caller went away are dropped before the model.
- A failing batch is split in halves down to single items, so one bad input fails one
  request; `OutOfMemory` also shrinks the batch limit, which grows back slowly.

This module imports neither torch nor the HTTP layer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

Kind = Literal["image", "text"]
KINDS: tuple[Kind, ...] = ("image", "text")

MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 32  # images per batch
    max_batch_tokens: int = 64 * 77  # per text batch: items x longest item's token count
    max_queue_items: int = 1024  # items admitted and not yet answered, both modalities
    max_wait_ms: float = 0.0  # hold a partial batch this long for more items; 0: never
    default_timeout_s: float = 30.0  # deadline of a submission that names none
    image_share: float = 0.5  # of batches, when both modalities are waiting
    length_lookahead: int = 512  # queued texts considered when grouping by length
    oom_regrow_batches: int = 100  # successful batches before a shrunk limit grows 25%
    # A batch running longer is abandoned: its requests fail (WorkerStalled) and a fresh
    # thread serves the queue; the stuck one exits when its call returns.
    stall_timeout_s: float | None = None
    max_abandoned_threads: int = 2  # stuck threads tolerated before the worker stops

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_queue_items",
                     "length_lookahead", "oom_regrow_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.default_timeout_s <= 0:
            raise ValueError(f"default_timeout_s must be > 0, got {self.default_timeout_s}")
        if not 0 < self.image_share < 1:
            raise ValueError(f"image_share must be in (0, 1) so neither modality starves, "
                             f"got {self.image_share}")
        if self.stall_timeout_s is not None and self.stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")


class Backend(Protocol):
    """The model as the worker drives it; both methods run on the worker thread.

    Payloads arrive prepared: callers decode, preprocess and tokenise in their own thread
    pool before submitting, so that CPU work overlaps the model. `run` only collates,
    runs the model and splits the output. Payloads and results are opaque to the worker.
    """

    def warmup(self) -> None:
        """Run a first batch (compile kernels, allocate). The worker is ready after it."""

    def run(self, kind: Kind, payloads: list[Any]) -> list[Any]:
        """One result per payload, in order. Raise OutOfMemory when the batch does not fit."""
        ...


class BatcherEvents(Protocol):
    """Observability hooks, called from the worker thread or the event loop; keep them fast.

    An exception raised by a hook is logged and otherwise ignored.
    """

    def batch_done(self, kind: Kind, size: int, padded_tokens: int, compute_s: float) -> None:
        """A backend call succeeded. padded_tokens: items x longest for text, 0 for images."""

    def batch_failed(self, kind: Kind, size: int, error: str) -> None:
        """A backend call raised; `error` is the exception's class name."""

    def stalled(self, kind: Kind, size: int) -> None:
        """A batch of `size` items ran past stall_timeout_s; its requests were failed."""

    def items_dropped(self, kind: Kind, reason: str, n: int) -> None:
        """Items removed before reaching the model: expired, cancelled, failed, stopped."""

    def queue_depth(self, kind: Kind, n: int) -> None:
        """Items of this kind now waiting."""

    def rejected(self, kind: Kind, n: int) -> None:
        """A request of n items refused at admission."""


class NoEvents(BatcherEvents):
    """Every hook does nothing; subclass it and override the hooks you need."""


@dataclass(frozen=True)
class ItemResult:
    value: Any
    queue_s: float  # enqueued -> taken into a batch
    compute_s: float  # taken into a batch -> result ready (retries after a failure included)
    batch_size: int  # items in the backend call that produced it


class ItemState(enum.Enum):
    QUEUED = "queued"
    TAKEN = "taken"  # in a batch on the worker thread
    DONE = "done"  # outcome posted to the loop
    DROPPED = "dropped"


@dataclass(eq=False)
class WorkItem:
    seq: int  # admission order across the worker, the queue key
    request: Request
    index: int  # position within its request
    kind: Kind
    payload: Any
    cost: int  # token count for text, 1 for images
    deadline: float  # time.monotonic()
    enqueued_at: float
    taken_at: float = 0.0
    state: ItemState = ItemState.QUEUED


@dataclass(eq=False)
class Request:
    id: str
    kind: Kind
    future: asyncio.Future[list[ItemResult]]
    results: list[ItemResult | None]
    remaining: int
    items: list[WorkItem] = field(default_factory=list)
    closed: bool = False  # failed, expired or cancelled: its queued items are gone


@dataclass(frozen=True)
class WorkerStats:
    queued: dict[str, int]
    outstanding: int
    batch_limits: dict[str, int]  # now in force: images per batch, padded tokens per text batch
    batches: dict[str, int]
    dropped: dict[str, int]  # by reason
    rejected: int  # items refused at admission


def group_by_length(head: WorkItem, others: Sequence[WorkItem], max_tokens: int) -> list[WorkItem]:
    """`head` plus the items of `others` closest to it in length, within the token budget.

    Padded tokens are len(batch) x longest cost. A head over the budget runs alone.
    """
    batch, longest = [head], head.cost
    for item in sorted(others, key=lambda it: (abs(it.cost - head.cost), it.seq)):
        grown = max(longest, item.cost)
        if (len(batch) + 1) * grown > max_tokens:
            if item.cost <= longest:
                break  # not even an item that leaves the longest as is fits
            continue
        batch.append(item)
        longest = grown
    return sorted(batch, key=lambda it: it.seq)


def padded_tokens(kind: Kind, items: Sequence[WorkItem]) -> int:
    return len(items) * max(it.cost for it in items) if kind == "text" else 0



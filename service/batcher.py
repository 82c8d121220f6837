"""Dynamic batching policy: what a batch is, and the contracts around the worker.

The config, the backend and events protocols, the queue item and result types, the cost
model and the rules that form batches (length grouping, padded-token cost). The units that
apply them are described in docs/architecture.md ("The model worker"); the facade callers
use is `service.worker.ModelWorker`.

Batching policy:
- An idle worker starts at once with whatever is queued; while it computes, new items
  queue, so batches grow with load. `max_wait_ms > 0` holds a partial batch that long
  (from its oldest item) for throughput-first deployments.
- Image batches hold at most `max_batch_size` items. Text batches are bounded by padded
  tokens (items x longest item): the oldest text goes first and is joined by the queued
  texts closest to it in length, so little padding is computed and no text waits longer
  than the texts queued before it.
- With `max_batch_s`, a batch is also sized so that its predicted compute time stays
  within it: on a CPU, where a large model's batch of 32 takes seconds and buys little
  over a batch of 8, this bounds the latency a batch adds without costing throughput;
  on a GPU the configured limits bind first.
- When both modalities wait, batches alternate by `image_share`; neither starves.
- With `streams > 1`, that many threads each run batches of their own at the same time
  (the backend gives each its share of the cores). A stream takes work only while every
  stream before it is busy, so a lone request always runs on stream 0, which may then use
  every core. Idle streams split the queue evenly. On a small CPU a single-threaded
  batch never waits at a barrier for a thread that the HTTP layer, the image decoders or
  the hypervisor took a core from, and small ops run without synchronisation at all.
- Admission counts items admitted and not yet answered (queued or on the model); a request
  that would exceed `max_queue_items` is refused whole with `Overloaded`. With
  `max_queue_wait_s`, a request is also refused when the work admitted before it, plus
  the batch it would join, is predicted to take longer than that: under overload,
  callers get a prompt 503 and a Retry-After instead of a queue that grows until their
  deadlines pass. A request is
  never refused by this rule when nothing is outstanding, nor before the worker has
  timed `MIN_BATCHES_TO_REFUSE` batches of its kind.
- Predictions come from `CostModel`, a batch's time as a fixed cost plus a cost per unit
  of work (an image; a padded text token), fitted over recent batches.
- Items whose deadline passed or whose caller went away are dropped before the model.
- A failing batch is split in halves down to single items, so one bad input fails one
  request; `OutOfMemory` also shrinks the batch limit, which grows back slowly.
- Once nothing has been computing or queued for `release_after_idle_s`, stream 0 asks
  the backend, once per idle spell, to give back the memory the last burst left cached.

This module imports neither torch nor the HTTP layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

Kind = Literal["image", "text"]
KINDS: tuple[Kind, ...] = ("image", "text")

MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 60.0
# Batches of a kind seen before its predicted wait may refuse a request. One batch gives
# only a proportional fit, and the first batches after start (fresh threads, cold
# caches) are slow: it would refuse the first burst a new server meets.
MIN_BATCHES_TO_REFUSE = 3


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
    # A batch running longer is abandoned: its requests fail (BatchStalled) and a fresh
    # thread serves the queue; the stuck one exits when its call returns.
    stall_timeout_s: float | None = None
    max_abandoned_threads: int = 2  # stuck threads tolerated before the worker stops
    max_batch_s: float | None = None  # predicted compute time per batch; None: no bound
    max_queue_wait_s: float | None = None  # predicted wait before admission; None: no bound
    streams: int = 1  # threads running batches at the same time
    # Idle this long after a batch (nothing computing or queued), the backend is asked
    # once to give memory back (see Backend); None: never.
    release_after_idle_s: float | None = 2.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_queue_items",
                     "length_lookahead", "oom_regrow_batches", "streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.default_timeout_s <= 0:
            raise ValueError(f"default_timeout_s must be > 0, got {self.default_timeout_s}")
        if not 0 < self.image_share < 1:
            raise ValueError(f"image_share must be in (0, 1) so neither modality starves, "
                             f"got {self.image_share}")
        for name in ("stall_timeout_s", "max_batch_s", "max_queue_wait_s",
                     "release_after_idle_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")


class Backend(Protocol):
    """The model as the worker drives it; its methods run on the worker's serving threads.

    Payloads arrive prepared: callers decode, preprocess and tokenise in their own thread
    pool before submitting, so that CPU work overlaps the model. `run` only collates,
    runs the model and splits the output. Payloads and results are opaque to the worker.
    With `streams > 1`, `run` is called from that many threads at once.

    A backend may also define `place(stream: int, streams: int, alone: bool) -> None`.
    The worker then calls it on the serving thread before the warm-up (stream 0, alone)
    and before each batch: `alone` means no other stream is computing and nothing else is
    queued, so the batch may use every core; otherwise it gets its stream's share.

    And `release_memory() -> None`, which the worker calls on stream 0's thread once per
    idle spell, `release_after_idle_s` after the last batch: a burst's largest batches
    leave memory that allocators keep, and an idle server need not hold it. It must be
    quick: the watchdog does not watch it, and a request arriving meanwhile waits for it.
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
    """Every hook does nothing; subclass it and override the hooks you need.

    Spelled out because a type checker reads the protocol's body-less hooks as abstract.
    """

    def batch_done(self, kind: Kind, size: int, padded_tokens: int, compute_s: float) -> None:
        pass

    def batch_failed(self, kind: Kind, size: int, error: str) -> None:
        pass

    def stalled(self, kind: Kind, size: int) -> None:
        pass

    def items_dropped(self, kind: Kind, reason: str, n: int) -> None:
        pass

    def queue_depth(self, kind: Kind, n: int) -> None:
        pass

    def rejected(self, kind: Kind, n: int) -> None:
        pass


@contextlib.contextmanager
def _hook(name: str) -> Iterator[None]:
    try:
        yield
    except Exception:  # metrics going wrong must not disturb serving
        log.exception("batcher event hook %s failed", name)


class SafeEvents(BatcherEvents):
    """Forwards each hook to `inner`; a hook that raises is logged and otherwise ignored."""

    def __init__(self, inner: BatcherEvents):
        self._inner = inner

    def batch_done(self, kind: Kind, size: int, padded_tokens: int, compute_s: float) -> None:
        with _hook("batch_done"):
            self._inner.batch_done(kind, size, padded_tokens, compute_s)

    def batch_failed(self, kind: Kind, size: int, error: str) -> None:
        with _hook("batch_failed"):
            self._inner.batch_failed(kind, size, error)

    def stalled(self, kind: Kind, size: int) -> None:
        with _hook("stalled"):
            self._inner.stalled(kind, size)

    def items_dropped(self, kind: Kind, reason: str, n: int) -> None:
        with _hook("items_dropped"):
            self._inner.items_dropped(kind, reason, n)

    def queue_depth(self, kind: Kind, n: int) -> None:
        with _hook("queue_depth"):
            self._inner.queue_depth(kind, n)

    def rejected(self, kind: Kind, n: int) -> None:
        with _hook("rejected"):
            self._inner.rejected(kind, n)


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

    def completed(self) -> list[ItemResult]:
        """The results in order, once every item has one (`remaining == 0`)."""
        done = [r for r in self.results if r is not None]
        if len(done) != len(self.results):
            raise RuntimeError(f"request {self.id} completed with {self.remaining} items left")
        return done


class CostModel:
    """How long a batch takes, learnt from finished batches: t = a + b*n for each kind.

    n counts units of work: images, or the padded tokens of a text batch (items x
    longest). a is the fixed cost of a call (weights read once per batch, Python and
    kernel launches), b the cost per unit. A proportional estimate (a = 0) would take a
    burst after quiet, small batches for far more work than it is; with both terms the
    wait for n queued units is predicted for the batch sizes they will actually run in.

    Fitted by least squares over the recent batches (exponentially weighted, `memory`
    batches), falling back to the proportional estimate until the batch sizes vary.
    Everything is 0 until a batch of that kind has run, meaning "unknown".
    """

    def __init__(self, memory: float = 20.0):
        self._keep = 1.0 - 1.0 / memory
        # Per kind: decayed sums of 1, n, t, n*n, n*t.
        self._sums: dict[Kind, list[float]] = {k: [0.0] * 5 for k in KINDS}

    def observe(self, kind: Kind, units: int, seconds: float) -> None:
        if units <= 0 or seconds <= 0:
            return
        s = self._sums[kind]
        for i, x in enumerate((1.0, units, seconds, units * units, units * seconds)):
            s[i] = s[i] * self._keep + x

    def batches(self, kind: Kind) -> float:
        """How many batches of `kind` the fit rests on (decayed: at most `memory`)."""
        return self._sums[kind][0]

    def fit(self, kind: Kind) -> tuple[float, float]:
        """(a, b): seconds per call and per unit, both >= 0; (0, 0) when unknown."""
        w, sn, st, snn, snt = self._sums[kind]
        if w == 0.0:
            return 0.0, 0.0
        mean_n, mean_t = sn / w, st / w
        var_n = snn / w - mean_n * mean_n
        if var_n > 0.01 * mean_n * mean_n:  # sizes vary enough to separate a from b
            b = (snt / w - mean_n * mean_t) / var_n
            a = mean_t - b * mean_n
            if a >= 0.0 and b > 0.0:
                return a, b
        return 0.0, mean_t / mean_n

    def seconds(self, kind: Kind, units: int, per_batch: int) -> float:
        """Predicted time to compute `units` in batches of at most `per_batch` units."""
        if units <= 0:
            return 0.0
        a, b = self.fit(kind)
        return math.ceil(units / max(1, per_batch)) * a + b * units

    def cap(self, kind: Kind, limit: int, target_s: float | None) -> int:
        """Units per batch: at most `limit`, and predicted to take at most `target_s`."""
        a, b = self.fit(kind)
        if target_s is None or b == 0.0:
            return limit
        return max(1, min(limit, int((target_s - a) / b + 1e-9)))  # 1e-9: float rounding


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



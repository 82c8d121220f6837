"""Every Prometheus metric the service exports, defined here and nowhere else.

Each app gets its own registry, so several apps (tests) can live in one process.
`WorkerMetrics` plugs the batcher's events into these metrics for one model on one device
(its series carry `device`); gauges read from state rather than tracked (readiness, CUDA
memory) are set by the functions given to `on_scrape`, before every render.

With several server processes (CLIP_PROCESSES > 1, service.processes) the values live in
prometheus-client's per-process files under PROMETHEUS_MULTIPROC_DIR, and /metrics, in
whichever process answers it, renders their merge: counters and histograms summed over
every process that ever ran, gauges by their `multiprocess_mode` (ignored in one
process). A process's gauges read from state are published every PUBLISH_INTERVAL_S
(`publish`), so another process's scrape sees them at most that old.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (re-export)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector

from .batcher import Kind, NoEvents

# Latency buckets from 5 ms to 30 s: CPU requests live at the top, GPU ones at the bottom.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Several processes: how often each writes its gauges read from state to its file.
PUBLISH_INTERVAL_S = 1.0

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, multiprocess: bool = False) -> None:
        """`multiprocess`: this is one of several server processes, whose metrics are
        merged from PROMETHEUS_MULTIPROC_DIR (set before prometheus_client was imported)."""
        if multiprocess and not getattr(prometheus_values.ValueClass, "_multiprocess", False):
            raise RuntimeError("several server processes need PROMETHEUS_MULTIPROC_DIR set "
                               "before prometheus_client is imported (service.processes)")
        self.multiprocess = multiprocess
        self._on_scrape: list[Callable[[], None]] = []
        self.registry = r = CollectorRegistry()
        # What /metrics renders: this registry, or every process's files merged.
        self._exposed = r
        if multiprocess:
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed)
        self.requests = Counter(
            "clip_requests", "HTTP requests answered", ["endpoint", "model", "status"], registry=r
        )
        self.request_latency = Histogram(
            "clip_request_latency_seconds", "Time from request to response",
            ["endpoint"], buckets=_LATENCY, registry=r,
        )
        self.items = Counter(
            "clip_items", "Items embedded by the model", ["model", "modality", "device"],
            registry=r,
        )
        self.batch_size = Histogram(
            "clip_batch_size", "Items per model batch", ["model", "modality", "device"],
            buckets=_BATCH, registry=r,
        )
        self.padded_tokens = Counter(
            "clip_text_padded_tokens", "Token positions computed for text batches (items x longest)",
            ["model", "device"], registry=r,
        )
        self.queue_depth = Gauge(
            "clip_queue_depth", "Items waiting for the model", ["model", "modality", "device"],
            registry=r, multiprocess_mode="livesum",
        )
        self.queue_wait = Histogram(
            "clip_queue_wait_seconds", "Time an item waited before its batch ran",
            ["model", "modality"], buckets=_LATENCY, registry=r,
        )
        self.compute = Histogram(
            "clip_compute_seconds", "Model time per batch", ["model", "modality", "device"],
            buckets=_LATENCY, registry=r,
        )
        self.batch_failures = Counter(
            "clip_batch_failures", "Model batches that raised",
            ["model", "modality", "error", "device"],
            registry=r,
        )
        self.rejected = Counter(
            "clip_rejected_items", "Items refused at admission (overload)",
            ["model", "modality", "device"], registry=r,
        )
        self.dropped = Counter(
            "clip_dropped_items", "Items removed before reaching the model",
            ["model", "modality", "reason", "device"], registry=r,
        )
        self.cache_hits = Counter("clip_cache_hits", "Text embeddings served from cache",
                                  ["model"], registry=r)
        self.cache_misses = Counter("clip_cache_misses", "Text embeddings computed",
                                    ["model"], registry=r)
        self.model_info = Gauge(
            "clip_model_info",
            "Loaded models (value 1), with their device, dtype and engine (service.engines)",
            ["model", "device", "dtype", "engine"], registry=r, multiprocess_mode="max",
        )
        # Several processes: 1 only while the model serves in every live one.
        self.model_ready = Gauge("clip_model_ready", "1 when the model serves", ["model"],
                                 registry=r, multiprocess_mode="livemin")
        self.errors = Counter(
            "clip_errors", "Requests answered with an error, by the error body's type",
            ["type"], registry=r,
        )
        self.url_fetches = Counter(
            "clip_url_fetches", "Image URL fetches: ok, blocked, too_large, timeout, failed",
            ["outcome"], registry=r,
        )
        self.stalls = Counter(
            "clip_worker_stalls", "Batches abandoned by the watchdog (stall_timeout_s)",
            ["model", "modality", "device"], registry=r,
        )
        self.in_flight = Gauge(
            "clip_requests_in_flight", "Requests accepted and not yet answered", registry=r,
            multiprocess_mode="livesum",
        )
        # Labels come from the operator's policy files (policy and category names), never
        # from a request: a caller cannot grow the series. flagged: "true" or "false".
        self.moderation_items = Counter(
            "clip_moderation_items", "Items moderated, per policy category and decision",
            ["policy", "category", "flagged"], registry=r,
        )
        self.cuda_memory = Gauge(
            "clip_cuda_memory_allocated_bytes", "CUDA memory held by tensors", ["device"],
            registry=r, multiprocess_mode="livesum",  # every process's model on the device
        )
        if multiprocess:
            # One series per process (a `pid` label): how the kernel spread the work.
            self.process_requests = Gauge(
                "clip_process_requests", "HTTP requests this server process has answered",
                registry=r, multiprocess_mode="all",
            )
            self.on_scrape(lambda: self.process_requests.set(_answered(self.requests)))

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        """Call `refresh` before each render: it sets the gauges that are read, not tracked."""
        self._on_scrape.append(refresh)

    def count_in_flight(self, read: Callable[[], int]) -> None:
        """`clip_requests_in_flight` is `read()`: at each render, or with several processes
        also as each publishes (a callback gauge is not written to the process's file)."""
        if self.multiprocess:
            self.on_scrape(lambda: self.in_flight.set(read()))
        else:
            self.in_flight.set_function(read)

    def refresh(self) -> None:
        for refresh in self._on_scrape:
            refresh()

    def render(self) -> bytes:
        self.refresh()
        return generate_latest(self._exposed)

    async def publish(self, interval_s: float = PUBLISH_INTERVAL_S) -> None:
        """Several processes: write this process's gauges read from state every
        `interval_s` until cancelled, so a scrape answered by another process sees them."""
        while True:
            try:
                self.refresh()
            except Exception:  # a failing hook must not end the loop; it says why
                log.exception("refreshing the metrics failed")
            await asyncio.sleep(interval_s)

    def for_worker(self, model: str, device: str) -> WorkerMetrics:
        return WorkerMetrics(self, model, device)


def _answered(requests: Counter) -> float:
    """This process's count of answered requests, all labels together."""
    return sum(s.value for family in requests.collect() for s in family.samples
               if s.name.endswith("_total"))


class WorkerMetrics(NoEvents):
    """The batcher's events for one model's worker on one device, recorded as metrics.

    The worker's series carry a `device` label (the replica's, see service.replicas):
    with a model on several devices each has its own queue depth and batch sizes, and
    `sum by (model, ...)` adds them up as with one.
    """

    def __init__(self, metrics: Metrics, model: str, device: str):
        self.m = metrics
        self.model = model
        self.device = device

    def batch_done(self, kind: Kind, size: int, padded_tokens: int, compute_s: float) -> None:
        self.m.items.labels(self.model, kind, self.device).inc(size)
        self.m.batch_size.labels(self.model, kind, self.device).observe(size)
        self.m.compute.labels(self.model, kind, self.device).observe(compute_s)
        if kind == "text":
            self.m.padded_tokens.labels(self.model, self.device).inc(padded_tokens)

    def batch_failed(self, kind: Kind, size: int, error: str) -> None:
        self.m.batch_failures.labels(self.model, kind, error, self.device).inc()

    def items_dropped(self, kind: Kind, reason: str, n: int) -> None:
        self.m.dropped.labels(self.model, kind, reason, self.device).inc(n)

    def stalled(self, kind: Kind, size: int) -> None:
        self.m.stalls.labels(self.model, kind, self.device).inc()

    def queue_depth(self, kind: Kind, n: int) -> None:
        self.m.queue_depth.labels(self.model, kind, self.device).set(n)

    def rejected(self, kind: Kind, n: int) -> None:
        self.m.rejected.labels(self.model, kind, self.device).inc(n)

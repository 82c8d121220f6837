"""One model on several devices: a worker per device, each request to the least loaded.

`CLIP_DEVICE=cuda:0,cuda:1` (or `cuda:all`) gives each model one backend and one
`ModelWorker` per device; `Replicas` stands in front of them with the worker's own
interface (`submit_many`, `check_admission`, `ready`, `failed`, `drain`), so the engine
does not know how many there are. A single device is the same code with one replica.

- Routing. A request goes whole to one replica: the ready one with the fewest units of
  its kind admitted and not yet answered (images, or text tokens; queued and on the
  device alike), then the fewest items of any kind, then the lowest index. Counts, not
  the admission's predicted wait: the replicas run the same model on like devices, so a
  unit costs about the same on each, and the counts are exact from the first request,
  whereas the cost model predicts no wait at all until it has timed a few batches and
  would send a first burst to one replica. A replica that refuses (Overloaded) is not
  retried on another: the others were at least as loaded when it was picked.
- Failure. A failed replica (its device broke, or its thread died) is skipped, and it
  makes the model not alive: /healthz answers 503 and the orchestrator restarts the
  process. A sticky CUDA error poisons that GPU's context for the life of the process,
  so serving on at part capacity would only postpone the restart that recovers it.
  Ready means every replica is ready, for the same reason.
- CPU replicas (`cpu,cpu`, for tests and for machines with many cores) share the
  weights and split the cores evenly (`service.tuning.thread_share`); each replica then
  shares its part out over its own streams.

This module imports neither torch nor the HTTP layer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .batcher import ItemResult, Kind
from .errors import Overloaded
from .worker import ModelWorker

log = logging.getLogger(__name__)


def resolve_devices(device: str, cuda_devices: int) -> list[str]:
    """The devices a validated `Settings.device` names, given how many CUDA devices are
    visible: "auto" is cuda when there is one, else cpu; "cuda:all" every CUDA device."""
    if device == "auto":
        return ["cuda" if cuda_devices else "cpu"]
    if device == "cuda:all":
        if not cuda_devices:
            raise ValueError("device cuda:all: no CUDA device is visible")
        return [f"cuda:{i}" for i in range(cuda_devices)]
    devices = device.split(",")
    for d in devices:
        if d.startswith("cuda:") and int(d.removeprefix("cuda:")) >= cuda_devices:
            raise ValueError(f"device {d}: {cuda_devices} CUDA device(s) visible")
    return devices


def replica_labels(devices: Sequence[str]) -> list[str]:
    """A distinct name per replica, for metrics and logs: the device, with "#k" for the
    k-th of a device listed more than once ("cpu#0", "cpu#1")."""
    repeated = {d for d, n in Counter(devices).items() if n > 1}
    seen: Counter[str] = Counter()
    labels = []
    for d in devices:
        labels.append(f"{d}#{seen[d]}" if d in repeated else d)
        seen[d] += 1
    return labels


class Replicas:
    """A model's workers, one per device (`devices`, in the same order)."""

    def __init__(self, workers: Sequence[ModelWorker], devices: Sequence[str]):
        if not workers or len(workers) != len(devices):
            raise ValueError(f"{len(workers)} workers for {len(devices)} devices")
        self.workers = list(workers)
        self.devices = list(devices)

    async def start(self) -> None:
        """Warm every replica up; if one fails, those started stop and its
        WorkerUnavailable propagates (a model is served whole or not at all).

        CUDA replicas warm up side by side, each on its own device (graph capture of every
        bucket would otherwise make start-up grow with the number of GPUs); CPU replicas
        one after the other, as they share the cores."""
        if len(self.workers) > 1 and all(d.startswith("cuda") for d in self.devices):
            results = await asyncio.gather(*(w.start() for w in self.workers),
                                           return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                warm = [w for w, r in zip(self.workers, results, strict=True)
                        if not isinstance(r, BaseException)]
                await asyncio.gather(*(w.drain(0.0) for w in warm), return_exceptions=True)
                raise errors[0]
            return
        started: list[ModelWorker] = []
        try:
            for worker in self.workers:
                await worker.start()
                started.append(worker)
        except BaseException:
            await asyncio.gather(*(w.drain(0.0) for w in started), return_exceptions=True)
            raise

    @property
    def ready(self) -> bool:
        return all(w.ready for w in self.workers)

    @property
    def failed(self) -> bool:
        """A replica stopped for good: the process needs a restart (see the module)."""
        return any(w.failed for w in self.workers)

    def pick(self, kind: Kind) -> ModelWorker:
        """The least-loaded ready replica for a `kind` request; with none ready, the first,
        whose refusal (warming up, draining, failed) then answers."""
        ready = [(w.dispatcher.load(kind), i) for i, w in enumerate(self.workers) if w.ready]
        return self.workers[min(ready)[1]] if ready else self.workers[0]

    def check_admission(self, kind: Kind, n: int) -> None:
        """`ModelWorker.check_admission` on the replica a request would go to now."""
        self.pick(kind).check_admission(kind, n)

    def overloaded(self, kind: Kind) -> Overloaded | None:
        """`ModelWorker.overloaded` of the replica a request would go to now."""
        return self.pick(kind).overloaded(kind)

    async def submit_many(
        self,
        kind: Kind,
        payloads: Sequence[Any],
        costs: Sequence[int] | None = None,
        *,
        deadline: float | None = None,
        request_id: str | None = None,
    ) -> list[ItemResult]:
        """`ModelWorker.submit_many` on the least-loaded replica."""
        return await self.pick(kind).submit_many(kind, payloads, costs, deadline=deadline,
                                                 request_id=request_id)

    async def drain(self, timeout: float) -> bool:
        """Drain every replica at once; True when each finished its accepted work."""
        return all(await asyncio.gather(*(w.drain(timeout) for w in self.workers)))

from __future__ import annotations

import asyncio

import pytest
from fake_backend import FakeBackend
from prometheus_client.parser import text_string_to_metric_families

from service.batcher import BatcherConfig
from service.errors import Overloaded
from service.metrics import Metrics
from service.worker import ModelWorker


def _samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_worker_events_become_metrics():
    metrics = Metrics()

    async def main():
        backend = FakeBackend()
        worker = ModelWorker(backend, BatcherConfig(max_queue_items=4), name="m",
                             events=metrics.for_worker("m"))
        await worker.start()
        await worker.submit_many("image", [1, 2, 3])
        await worker.submit_many("text", ["a", "bb"], costs=[3, 5])
        backend.pause()  # hold the model so the queue fills
        held = asyncio.create_task(worker.submit_many("image", [4, 5, 6]))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await worker.submit_many("image", [7, 8])  # 3 + 2 > 4 admitted items
        backend.resume()
        await held
        await worker.drain(5)

    asyncio.run(asyncio.wait_for(main(), 10))
    s = _samples(metrics)
    assert s[("clip_items_total", (("modality", "image"), ("model", "m")))] == 6
    assert s[("clip_items_total", (("modality", "text"), ("model", "m")))] == 2
    assert s[("clip_text_padded_tokens_total", (("model", "m"),))] == 10  # 2 items x 5 tokens
    assert s[("clip_batch_size_count", (("modality", "image"), ("model", "m")))] >= 2
    assert s[("clip_rejected_items_total", (("modality", "image"), ("model", "m")))] == 2


def test_each_app_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.requests.labels("/embed", "m", "200").inc()
    assert ("clip_requests_total", (("endpoint", "/embed"), ("model", "m"), ("status", "200"))) \
        in _samples(a)
    assert not any(k[0] == "clip_requests_total" for k in _samples(b))

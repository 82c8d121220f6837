from __future__ import annotations

import asyncio

import pytest
from fake_backend import FakeBackend
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from refusals import metric, tiny_checkpoint

from service.app import create_app
from service.batcher import BatcherConfig
from service.errors import Overloaded
from service.metrics import Metrics
from service.settings import Settings
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
                             events=metrics.for_worker("m", "cpu"))
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
    cpu = ("device", "cpu")
    assert s[("clip_items_total", (cpu, ("modality", "image"), ("model", "m")))] == 6
    assert s[("clip_items_total", (cpu, ("modality", "text"), ("model", "m")))] == 2
    assert s[("clip_text_padded_tokens_total", (cpu, ("model", "m")))] == 10  # 2 x 5 tokens
    assert s[("clip_batch_size_count", (cpu, ("modality", "image"), ("model", "m")))] >= 2
    assert s[("clip_rejected_items_total", (cpu, ("modality", "image"), ("model", "m")))] == 2


def test_each_app_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.requests.labels("/embed", "m", "200").inc()
    assert ("clip_requests_total", (("endpoint", "/embed"), ("model", "m"), ("status", "200"))) \
        in _samples(a)
    assert not any(k[0] == "clip_requests_total" for k in _samples(b))


def test_gauges_read_from_state_are_set_before_every_render():
    metrics = Metrics()
    memory = iter([100, 250])
    metrics.on_scrape(lambda: metrics.cuda_memory.labels("cuda:0").set(next(memory)))
    device = (("device", "cuda:0"),)
    assert _samples(metrics)[("clip_cuda_memory_allocated_bytes", device)] == 100
    assert _samples(metrics)[("clip_cuda_memory_allocated_bytes", device)] == 250


def test_model_ready_goes_to_zero_when_the_worker_dies(tmp_path):
    app = create_app(Settings(models=[str(tiny_checkpoint(tmp_path))], log_format="text"))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert metric(c, "clip_model_ready", model="tiny") == 1
        backend = app.state.engine.model("tiny").backend

        def dies(kind, payloads):
            raise SystemExit("the serving thread dies")  # escapes every except Exception

        backend.run = dies
        assert c.post("/embed", json={"texts": ["x"]}).status_code == 503
        assert c.get("/healthz").status_code == 503
        assert metric(c, "clip_model_ready", model="tiny") == 0


def test_model_ready_goes_to_zero_while_draining(tmp_path):
    app = create_app(Settings(models=[str(tiny_checkpoint(tmp_path))], log_format="text"))
    with TestClient(app) as c:
        assert metric(c, "clip_model_ready", model="tiny") == 1
        app.state.engine.models.stop_admitting()
        assert metric(c, "clip_model_ready", model="tiny") == 0

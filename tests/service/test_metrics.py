from __future__ import annotations

import asyncio

import pytest
from fake_backend import FakeBackend
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from refusals import metric, tiny_checkpoint

from service.app import create_app
from service.batcher import BatcherConfig
from service.errors import Overloaded
from service.metrics import Metrics, observe_all
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


def _registry_samples(registry: CollectorRegistry) -> dict[tuple, float]:
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families for s in f.samples if not s.name.endswith("_created")}


def test_observe_all_counts_as_one_observe_per_amount():
    # Bounds themselves (le is inclusive), between them, past the last, repeats, zero.
    amounts = [0.005, 0.005, 0.007, 0.0, 30.0, 31.0, 31.0, 0.2, 0.005, 1e-9, 2.0] * 3
    one_by_one, at_once = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("wait", "w", ["model"], buckets=(0.005, 0.01, 0.25, 1, 30),
                   registry=one_by_one)
    h2 = Histogram("wait", "w", ["model"], buckets=(0.005, 0.01, 0.25, 1, 30),
                   registry=at_once)
    for a in amounts:
        h1.labels("m").observe(a)
    observe_all(h2.labels("m"), amounts[:7])
    observe_all(h2.labels("m"), amounts[7:])
    expected, got = _registry_samples(one_by_one), _registry_samples(at_once)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key[0] == "wait_sum":  # count x amount, not repeated adds: the same to rounding
            assert got[key] == pytest.approx(value, rel=1e-12)
        else:
            assert got[key] == value, key
    assert got[("wait_count", (("model", "m"),))] == len(amounts)


class ObserveOnly:
    def __init__(self):
        self.seen: list[float] = []

    def observe(self, amount: float) -> None:
        self.seen.append(amount)


def test_observe_all_falls_back_to_observe_without_the_value_cells():
    h = ObserveOnly()
    observe_all(h, [0.1, 0.2, 0.1])  # type: ignore[arg-type]
    assert sorted(h.seen) == [0.1, 0.1, 0.2]
    parent = Histogram("wait", "w", ["model"], registry=CollectorRegistry())
    with pytest.raises(ValueError):  # as observe: a labelled histogram needs .labels()
        observe_all(parent, [0.1])

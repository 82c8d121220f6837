"""One model on several devices (service.replicas): each request goes to the least-loaded
ready replica, drain stops them all, and one that fails makes /healthz ask for a
restart. Driven on the CPU with fake backends and "cpu,cpu" through the same code that
serves cuda:0,cuda:1; which replica gets a request is decided by gates, not timing."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fake_backend import FakeBackend
from refusals import metric, tiny_checkpoint
from refusals import serving as app_serving
from test_batcher import run, until

from service.batcher import BatcherConfig
from service.errors import DeviceFailed, Draining, WorkerUnavailable
from service.replicas import Replicas, replica_labels, resolve_devices
from service.worker import ModelWorker

# ---- devices ----


@pytest.mark.parametrize("device, cuda, devices", [
    ("auto", 0, ["cpu"]), ("auto", 2, ["cuda"]), ("cuda:all", 3, ["cuda:0", "cuda:1", "cuda:2"]),
    ("cuda:0,cuda:1", 2, ["cuda:0", "cuda:1"]), ("cpu,cpu", 0, ["cpu", "cpu"]),
    ("cuda", 1, ["cuda"]),
])
def test_devices_resolve_against_the_visible_cuda_devices(device, cuda, devices):
    assert resolve_devices(device, cuda) == devices


@pytest.mark.parametrize("device, cuda", [("cuda:all", 0), ("cuda:2", 2), ("cuda:0,cuda:1", 1)])
def test_devices_that_are_not_there_are_refused(device, cuda):
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_devices(device, cuda)


def test_replicas_are_named_by_device_and_repeats_are_numbered():
    assert replica_labels(["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]
    assert replica_labels(["cpu", "cuda:0", "cpu"]) == ["cpu#0", "cuda:0", "cpu#1"]


# ---- routing, drain and failure, on fake backends ----


async def _replicas(*backends: FakeBackend) -> Replicas:
    workers = [ModelWorker(b, BatcherConfig(max_batch_size=64), name=f"fake@cpu#{i}")
               for i, b in enumerate(backends)]
    replicas = Replicas(workers, [f"cpu#{i}" for i in range(len(backends))])
    await replicas.start()
    return replicas


class _Rendezvous(FakeBackend):
    """Each warm-up waits until every replica's warm-up has begun: it passes only if they
    run side by side, and fails (after a bounded wait) if they run one after another."""

    def __init__(self, barrier: threading.Barrier, fail: bool = False):
        super().__init__()
        self._barrier, self._fail = barrier, fail

    def warmup(self) -> None:
        self._barrier.wait(timeout=10)
        if self._fail:
            raise RuntimeError("fake: warm-up failed on this device")
        super().warmup()


def test_cuda_replicas_warm_up_side_by_side():
    barrier = threading.Barrier(2)
    backends = [_Rendezvous(barrier), _Rendezvous(barrier)]

    async def scenario():
        workers = [ModelWorker(b, BatcherConfig(), name=f"fake@cuda:{i}")
                   for i, b in enumerate(backends)]
        replicas = Replicas(workers, ["cuda:0", "cuda:1"])
        await replicas.start()  # one after another would break the barrier
        assert all(b.warmed_up for b in backends) and replicas.ready
        assert await replicas.drain(2.0)

    run(scenario)


def test_a_cuda_replica_that_fails_to_warm_up_stops_the_others():
    barrier = threading.Barrier(2)
    backends = [_Rendezvous(barrier), _Rendezvous(barrier, fail=True)]

    async def scenario():
        workers = [ModelWorker(b, BatcherConfig(), name=f"fake@cuda:{i}")
                   for i, b in enumerate(backends)]
        replicas = Replicas(workers, ["cuda:0", "cuda:1"])
        with pytest.raises(WorkerUnavailable):
            await replicas.start()
        assert not workers[0].ready  # started, then stopped again
        with pytest.raises(WorkerUnavailable):
            await replicas.submit_many("image", ["x"])

    run(scenario)


def test_a_request_goes_to_the_less_loaded_replica():
    first, second = FakeBackend(), FakeBackend()

    async def scenario():
        replicas = await _replicas(first, second)
        first.pause()  # replica 0 holds one image on its model
        held = asyncio.create_task(replicas.submit_many("image", ["held"]))
        await until(first.busy.is_set)
        assert (await replicas.submit_many("image", ["next"]))[0].value == ("image", "next")
        assert second.seen() == {"next"}
        first.resume()
        await held
        assert first.seen() == {"held"}
        # Idle again: a tie goes to the lowest index.
        await replicas.submit_many("text", ["t"])
        assert "t" in first.seen()
        assert await replicas.drain(2.0)

    run(scenario)


def test_concurrent_requests_are_shared_out_between_replicas():
    first, second = FakeBackend(), FakeBackend()

    async def scenario():
        replicas = await _replicas(first, second)
        first.pause()
        second.pause()  # nothing completes: the split follows from the counts alone
        tasks = [asyncio.create_task(replicas.submit_many("image", [i])) for i in range(40)]
        await until(lambda: all(w.dispatcher.queue.outstanding == 20
                                for w in replicas.workers))
        first.resume()
        second.resume()
        results = await asyncio.gather(*tasks)
        assert [r[0].value for r in results] == [("image", i) for i in range(40)]
        assert first.seen() | second.seen() == set(range(40))
        assert len(first.seen()) == len(second.seen()) == 20
        assert await replicas.drain(2.0)

    run(scenario)


def test_drain_stops_every_replica():
    backends = FakeBackend(delay_s=0.01), FakeBackend(delay_s=0.01)

    async def scenario():
        replicas = await _replicas(*backends)
        work = [asyncio.create_task(replicas.submit_many("image", [i])) for i in range(6)]
        await asyncio.sleep(0)
        assert await replicas.drain(5.0)
        assert len(await asyncio.gather(*work)) == 6  # accepted work finished first
        assert not replicas.ready
        for worker in replicas.workers:
            assert not any(t.thread.is_alive() for t in worker._threads)
        with pytest.raises(Draining):
            await replicas.submit_many("image", ["late"])

    run(scenario)


def test_a_failed_replica_is_skipped_and_marks_the_model_failed():
    broken, healthy = FakeBackend(break_device_on={"bad"}), FakeBackend()

    async def scenario():
        replicas = await _replicas(broken, healthy)
        assert replicas.ready and not replicas.failed
        with pytest.raises(DeviceFailed):
            await replicas.submit_many("image", ["bad"])  # a tie: replica 0
        assert replicas.failed and not replicas.ready
        for i in range(3):  # replica 0 is skipped
            assert (await replicas.submit_many("image", [i]))[0].value == ("image", i)
        assert healthy.seen() == {0, 1, 2}
        await replicas.drain(2.0)

    run(scenario)


def test_with_no_replica_ready_the_first_refuses():
    async def scenario():
        replicas = await _replicas(FakeBackend(), FakeBackend())
        await replicas.drain(2.0)
        with pytest.raises(WorkerUnavailable):
            replicas.check_admission("image", 1)

    run(scenario)


# ---- two CPU replicas through the app ----


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("m"))


def _sticky():
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_two_cpu_replicas_serve_one_model(checkpoint):
    with app_serving(checkpoint, device="cpu,cpu", torch_threads=2) as client:
        served = client.app.state.engine.models["tiny"]
        workers = served.worker.workers
        assert [w.name for w in workers] == ["tiny@cpu#0", "tiny@cpu#1"]
        # The cores are split between the replicas, then over each one's streams.
        assert [w.backend.cpu_threads for w in workers] == [1, 1]
        (card,) = client.get("/v1/models").json()["data"]
        assert card["name"] == "tiny" and card["devices"] == ["cpu", "cpu"]
        assert card["device"] == "cpu,cpu" and card["status"] == "ready"

        # Hold replica 0 inside a backend call: the next request goes to replica 1.
        gate, entered = threading.Event(), threading.Event()
        first = workers[0].backend
        real = first.run

        def held(kind, payloads):
            entered.set()
            assert gate.wait(10)
            return real(kind, payloads)

        first.run = held
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.post, "/embed", json={"texts": ["held"]})
            assert entered.wait(10)
            r = client.post("/embed", json={"texts": ["the other replica"]})
            assert r.status_code == 200, r.text
            assert metric(client, "clip_items_total", device="cpu#1") == 1
            assert metric(client, "clip_items_total", device="cpu#0") == 0
            gate.set()
            assert waiting.result(10).status_code == 200
        assert metric(client, "clip_items_total", device="cpu#0") == 1
        first.run = real

        # A sticky error on replica 0 (idle: a tie goes to it) fails the model's health.
        assert client.get("/healthz").status_code == 200
        first.run = lambda kind, payloads: first._guarded(kind, len(payloads), _sticky)
        r = client.post("/embed", json={"texts": ["breaks replica 0"]})
        assert r.status_code == 500 and r.json()["error"]["type"] == "device_failed"
        assert client.get("/healthz").status_code == 503
        assert client.get("/readyz").status_code == 503
        assert metric(client, "clip_model_ready", model="tiny") == 0
        # Until the restart, replica 1 still answers.
        assert client.post("/embed", json={"texts": ["replica 1"]}).status_code == 200
        assert metric(client, "clip_items_total", device="cpu#1") == 2

"""Faults inside the service: a model that cannot load, an exception in a batch, out of
memory, a forward pass that hangs. Only the affected requests fail; the rest are served."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from refusals import b64, metric, png, served, tiny_checkpoint

from service.app import create_app
from service.backend import ClipBackend
from service.errors import OutOfMemory
from service.settings import Settings

POISON = (13, 13, 13)  # an image of this one colour is what the broken model chokes on


def _poisoned(payloads) -> bool:
    return any(isinstance(p, torch.Tensor) and int(p.min()) == int(p.max()) == 13
               for p in payloads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("m"))


def _app(checkpoint, **settings):
    settings.setdefault("log_format", "text")
    return create_app(Settings(models=[str(checkpoint)], **settings))


def _patch_run(client: TestClient, wrapper) -> None:
    backend = client.app.state.engine.models["tiny"].backend
    real = backend.run
    backend.run = lambda kind, payloads: wrapper(real, kind, payloads)


def _images(*colors) -> dict:
    return {"images": [b64(png(color=c)) for c in colors]}


def test_a_model_that_cannot_load_stops_start_up_by_default(checkpoint, tmp_path):
    app = create_app(Settings(models=[str(checkpoint), str(tmp_path / "missing.pt")]))
    with TestClient(app):
        assert app.state.startup_error and "missing.pt" in app.state.startup_error


def test_serve_others_keeps_a_broken_model_out_whole(checkpoint, tmp_path):
    missing = str(tmp_path / "missing.pt")
    app = create_app(Settings(models=[str(checkpoint), missing],
                              on_model_load_failure="serve_others", log_format="text"))
    with TestClient(app) as c:
        assert app.state.startup_error is None
        engine = app.state.engine
        assert list(engine.models) == ["tiny"] and missing in engine.models.unavailable
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["unavailable"] == [missing]
        cards = {m["name"]: m["status"] for m in c.get("/v1/models").json()["data"]}
        assert cards == {"tiny": "ready", missing: "unavailable"}
        assert metric(c, "clip_model_ready", model=missing) == 0
        before = metric(c, "clip_errors_total", type="unavailable")
        r = c.post("/embed", json={"texts": ["x"], "model": missing})
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
        assert r.headers["Retry-After"] and missing not in r.text
        assert metric(c, "clip_errors_total", type="unavailable") == before + 1
        served(c)


def test_a_warm_up_that_fails_is_not_half_loaded(checkpoint, monkeypatch):
    broken = checkpoint.with_name("broken.safetensors")
    shutil.copy(checkpoint, broken)
    real = ClipBackend.warmup

    def warmup(self):
        if self.info.name == "broken":
            raise RuntimeError("warm-up blew up")
        real(self)

    monkeypatch.setattr(ClipBackend, "warmup", warmup)
    app = create_app(Settings(models=[str(broken), str(checkpoint)], log_format="text",
                              on_model_load_failure="serve_others"))
    with TestClient(app) as c:
        engine = app.state.engine
        assert list(engine.models) == ["tiny"] and list(engine.models.unavailable) == [str(broken)]
        assert c.get("/readyz").status_code == 200
        r = c.post("/embed", json={"texts": ["x"]})  # the default model is the broken one
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
        assert c.post("/embed", json={"texts": ["x"], "model": "tiny"}).status_code == 200
    for models in ([str(broken)], [str(broken), str(checkpoint)]):
        # Nothing left to serve, or the default mode: clip-serve exits 1.
        mode = "serve_others" if len(models) == 1 else "exit"
        app = create_app(Settings(models=models, on_model_load_failure=mode))
        with TestClient(app):
            assert "broken" in app.state.startup_error


def test_an_exception_in_a_batch_fails_only_its_request(checkpoint):
    # One stream, and a batch of 4 held until full: the three requests' four images share
    # one batch whatever the order and pace they arrive in (10 s is only a backstop).
    with TestClient(_app(checkpoint, max_batch_size=4, max_wait_ms=10_000, streams=1)) as c:
        sizes = []

        def run(real, kind, payloads):
            sizes.append(len(payloads))
            if _poisoned(payloads):
                raise RuntimeError("a kernel failed")
            return real(kind, payloads)

        _patch_run(c, run)
        before = metric(c, "clip_batch_failures_total", error="RuntimeError")
        bodies = [_images((1, 2, 3), POISON), _images((200, 0, 0)), _images((0, 0, 200))]
        with ThreadPoolExecutor(3) as pool:
            bad, good1, good2 = pool.map(lambda b: c.post("/embed", json=b), bodies)
        # One batch of all four failed, then halves, then the poisoned half's two singles.
        assert sizes[0] == 4 and sorted(sizes) == [1, 1, 2, 2, 4]
        assert bad.status_code == 500
        assert bad.json() == {"error": {"type": "inference_failed",
                                        "message": "the model failed on this image"}}
        assert good1.status_code == 200 and good2.status_code == 200
        assert metric(c, "clip_batch_failures_total", error="RuntimeError") > before
        assert metric(c, "clip_errors_total", type="inference_failed") >= 1
        served(c)


def test_out_of_memory_shrinks_batches_and_fails_only_what_never_fits(checkpoint):
    with TestClient(_app(checkpoint, max_batch_size=8)) as c:
        def run(real, kind, payloads):
            if kind == "image" and (len(payloads) > 2 or _poisoned(payloads)):
                raise OutOfMemory(f"fake: a batch of {len(payloads)}")
            return real(kind, payloads)

        _patch_run(c, run)
        before = metric(c, "clip_batch_failures_total", error="OutOfMemory")
        r = c.post("/embed", json=_images(*[(i, 0, 0) for i in range(6)]))
        assert r.status_code == 200 and len(r.json()["images"]) == 6
        assert metric(c, "clip_batch_failures_total", error="OutOfMemory") > before
        r = c.post("/embed", json=_images(POISON))
        assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded"
        assert "Retry-After" in r.headers
        served(c)


def test_a_hung_forward_pass_fails_its_request_and_the_worker_goes_on(checkpoint):
    release = threading.Event()
    with TestClient(_app(checkpoint, stall_timeout_s=0.3)) as c:
        def run(real, kind, payloads):
            if _poisoned(payloads):
                release.wait(20)  # a forward pass that never ends (until the test ends)
            return real(kind, payloads)

        _patch_run(c, run)
        try:
            start = time.perf_counter()
            r = c.post("/embed", json=_images(POISON))
            assert time.perf_counter() - start < 3
            assert r.status_code == 500 and r.json()["error"]["type"] == "inference_failed"
            assert "0.3 s" in r.json()["error"]["message"]
            assert metric(c, "clip_worker_stalls_total", model="tiny", modality="image") == 1
            served(c)
            assert c.post("/embed", json=_images((5, 6, 7))).status_code == 200
            assert c.get("/readyz").status_code == 200 and c.get("/healthz").status_code == 200
        finally:
            release.set()
        time.sleep(0.2)
        served(c)


def test_a_worker_that_dies_fails_liveness(checkpoint):
    with TestClient(_app(checkpoint)) as c:
        def run(real, kind, payloads):
            if _poisoned(payloads):
                raise SystemExit("the thread dies")  # escapes every except Exception
            return real(kind, payloads)

        _patch_run(c, run)
        r = c.post("/embed", json=_images(POISON))
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
        assert c.get("/readyz").status_code == 503
        assert c.get("/healthz").status_code == 503  # an orchestrator restarts the process

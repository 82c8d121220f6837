"""Overload, oversize and deadline answers through the real app (413, 503, 504)."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import random_clip
from fastapi.testclient import TestClient
from PIL import Image
from test_api import PREP, TINY

from clip_core.checkpoint import save_checkpoint
from service.app import create_app
from service.settings import Settings


def _img() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def slow_client(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    save_checkpoint(random_clip(TINY, seed=5), path, PREP)
    app = create_app(Settings(models=[str(path)], max_queue_items=4, max_batch_size=2))
    with TestClient(app) as client:
        backend = app.state.engine.models["tiny"].backend
        run = backend.run

        def slow_run(kind, payloads):
            time.sleep(0.3)  # every batch takes a while, so the queue fills
            return run(kind, payloads)

        backend.run = slow_run
        yield client


def test_more_items_than_the_queue_can_ever_hold_is_413(slow_client):
    r = slow_client.post("/embed", json={"images": [_img()] * 5})
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "too_many_items"


def test_overload_refuses_the_excess_with_503_and_retry_after(slow_client):
    body = {"images": [_img()] * 2}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: slow_client.post("/embed", json=body), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    refused = [r for r in responses if r.status_code == 503]
    assert all(r.json()["error"]["type"] == "overloaded" for r in refused)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    # the accepted ones were answered in full
    assert all(len(r.json()["images"]) == 2 for r in responses if r.status_code == 200)


def test_deadline_passed_is_504(slow_client):
    r = slow_client.post("/embed", json={"images": [_img()] * 2},
                         headers={"X-Request-Timeout": "0.05"})
    assert r.status_code == 504
    assert r.json()["error"]["type"] == "deadline_exceeded"
    assert slow_client.post("/embed", json={"texts": ["next"]}).status_code == 200

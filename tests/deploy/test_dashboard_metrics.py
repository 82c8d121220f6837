"""Every metric the Grafana dashboard plots is really exported: a test app takes the
kinds of traffic the panels show (answers, refusals, a deadline that passes in the
queue, repeated texts), and each `clip_*` series a panel queries must then have a
sample in /metrics. A metric that is defined but never set has none."""

from __future__ import annotations

import base64
import io
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import TINY_VIT, random_clip
from deploy_helpers import dashboard_queries
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import service.models
from clip_core.checkpoint import save_checkpoint
from clip_core.config import PreprocessConfig
from service.app import create_app
from service.settings import Settings


def _png(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _dashboard_series() -> set[str]:
    return {name for expr in dashboard_queries()
            for name in re.findall(r"\bclip_[a-z0-9_]+", expr)}


def _exported(exposition: str) -> dict[str, float]:
    """Each series name with at least one sample, and the largest of its values."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            out[s.name] = max(out.get(s.name, s.value), s.value)
    return out


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(random_clip(TINY_VIT, seed=11), path, PreprocessConfig(image_size=32))
    return path


# A prompt-only policy for the tiny model (named after its checkpoint's file): the
# moderation panel's series is counted by /moderate.
POLICY = """\
name: demo
version: 1
model: tiny
categories:
  dark: {threshold: 0.0, prompts: {positive: [dark], negative: [light]}}
"""


def test_every_series_the_dashboard_queries_is_exported_after_traffic(checkpoint, monkeypatch,
                                                                      tmp_path):
    if not torch.cuda.is_available():
        # The tiny model runs on the CPU here: stand in for the CUDA allocator's answer,
        # as a GPU host would give it. The gauge itself is set by the server.
        monkeypatch.setattr(service.models, "cuda_memory_allocated",
                            lambda: {"cuda:0": 4096})
    # One stream and three queued items at most, so that a held batch of two images
    # leaves room for one text and refuses two more images.
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "demo.yaml").write_text(POLICY)
    app = create_app(Settings(models=[str(checkpoint)], streams=1, max_queue_items=3,
                              max_queue_wait_s=None, log_format="text",
                              policies=tmp_path / "policies"))
    with TestClient(app) as c, ThreadPoolExecutor(1) as pool:
        backend = app.state.engine.model(None).backend
        run, entered, gate = backend.run, threading.Event(), threading.Event()

        def held(kind, payloads):
            entered.set()
            assert gate.wait(30), "the test never released the model"
            return run(kind, payloads)

        for _ in range(2):  # the second time from the cache
            assert c.post("/embed", json={"texts": ["a photo"]}).status_code == 200
        assert c.post("/classify", json={"images": [_png((9, 9, 9))], "labels": ["dark", "light"],
                                         "templates": ["a {} photo"]}).status_code == 200
        assert c.post("/moderate", json={"policy": "demo", "images": [_png((9, 9, 9))]}
                      ).status_code == 200
        backend.run = held
        try:
            busy = pool.submit(c.post, "/embed",
                               json={"images": [_png((200, 0, 0)), _png((0, 200, 0))]})
            assert entered.wait(30)
            # Queued behind the held batch until its deadline passes: dropped unanswered.
            late = c.post("/embed", json={"texts": ["too late"]},
                          headers={"X-Request-Timeout": "0.2"})
            assert late.status_code == 504, late.text
            refused = c.post("/embed", json={"images": [_png((1, 2, 3)), _png((4, 5, 6))]})
            assert refused.status_code == 503, refused.text
        finally:
            gate.set()
        assert busy.result(30).status_code == 200
        exported = _exported(c.get("/metrics").text)

    queried = _dashboard_series()
    assert "clip_cuda_memory_allocated_bytes" in queried
    missing = queried - set(exported)
    assert not missing, f"the dashboard queries series the server never exported: {missing}"
    for name in queried:
        if name.endswith(("_total", "_count", "_bucket", "_sum")):
            assert exported[name] > 0, f"{name} is exported but never counted anything"

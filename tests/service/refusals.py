"""Shared by the hardening tests: one tiny model's checkpoint, apps built on it, and the
four things every refusal must show (status, JSON error, metric, the next caller served)."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from conftest import TINY_VIT, metric_total, random_clip
from fastapi.testclient import TestClient
from PIL import Image

from clip_core.checkpoint import save_checkpoint
from clip_core.config import PreprocessConfig
from service.app import create_app
from service.settings import Settings

PREP = PreprocessConfig(image_size=32)

# What an error body must never hold: a traceback, an exception's class, a source path.
LEAK = re.compile(r"Traceback|\b[A-Z]\w*(Error|Exception|Warning)\b|File \"|\.py\b")


def tiny_checkpoint(folder: Path, seed: int = 7) -> Path:
    path = folder / "tiny.safetensors"
    if not path.exists():
        save_checkpoint(random_clip(TINY_VIT, seed=seed), path, PREP)
    return path


@contextmanager
def serving(checkpoint: Path, **settings) -> Iterator[TestClient]:
    settings.setdefault("log_format", "text")
    app = create_app(Settings(models=[str(checkpoint)], **settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def png(size=(40, 30), color=(120, 30, 200), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG", **save)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def metric(client: TestClient | httpx.Client, name: str, **labels) -> float:
    return metric_total(client.get("/metrics").text, name, **labels)


def served(client: TestClient, headers: dict | None = None) -> None:
    """The next caller is answered correctly."""
    r = client.post("/embed", json={"texts": ["still answering"]}, headers=headers or {})
    assert r.status_code == 200, r.text
    assert len(r.json()["texts"][0]["embedding"]) == TINY_VIT.embed_dim


def refused(client: TestClient, send: Callable[[], httpx.Response], status: int, kind: str,
            *, headers: dict | None = None, metric_name: str = "clip_errors_total",
            **metric_labels) -> httpx.Response:
    """`send()` is answered `status` with error type `kind`, counted, echoing nothing
    internal, and the service then serves the next caller."""
    labels = metric_labels or {"type": kind}
    before = metric(client, metric_name, **labels)
    r = send()
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == kind, error
    assert isinstance(error["message"], str) and error["message"]
    assert not LEAK.search(r.text), r.text
    assert metric(client, metric_name, **labels) > before, (metric_name, labels)
    served(client, headers)
    return r

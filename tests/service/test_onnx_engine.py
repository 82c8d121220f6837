"""CLIP_ENGINE=onnxruntime: a model served from its ONNX export answers as the torch engine
does (1e-5 on normalised embeddings), /v1/models and the metrics name the engine, and an
engine whose package is missing ends start-up with exit 1 and one line naming it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from conftest import TINY_VIT, random_clip
from fastapi.testclient import TestClient

from clip_core.checkpoint import save_checkpoint
from clip_core.config import PreprocessConfig
from service import __main__ as entry
from service.app import create_app
from service.settings import Settings

ENGINE = "onnxruntime"
PACKAGE = "onnxruntime"


def shared_model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny checkpoint and an export cache, shared by the exported engines' test modules
    (the second engine's export starts from the first one's fp32 ONNX)."""
    root = tmp_path_factory.getbasetemp() / "exported-engines"
    root.mkdir(exist_ok=True)
    path = root / "tiny.safetensors"
    if not path.exists():
        save_checkpoint(random_clip(TINY_VIT, seed=3), path, PreprocessConfig(image_size=32))
    return path, root / "cache"


def embeddings(client: TestClient, model: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    import base64
    import io

    from PIL import Image

    images = []
    for _ in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append(base64.b64encode(buf.getvalue()).decode())
    texts = ["a cat", "a photograph of a very small dog sitting on a red sofa by a window",
             "x", "two birds"]
    r = client.post("/embed", json={"texts": texts, "images": images, "model": model})
    assert r.status_code == 200, r.text
    body = r.json()
    return (np.array([t["embedding"] for t in body["texts"]]),
            np.array([i["embedding"] for i in body["images"]]))


def serves_like_torch(engine: str, tmp_path_factory, **extra) -> None:
    path, cache = shared_model(tmp_path_factory)
    with TestClient(create_app(Settings(models=[str(path)], device="cpu", log_format="text",
                                        cache_dir=cache))) as c:
        ref_texts, ref_images = embeddings(c, "tiny")
        torch_fingerprint = c.get("/v1/models").json()["data"][0]["fingerprint"]
    with TestClient(create_app(Settings(models=[f"{engine}:{path}"], device="cpu",
                                        log_format="text", cache_dir=cache, **extra))) as c:
        texts, images = embeddings(c, "tiny")
        card = c.get("/v1/models").json()["data"][0]
        assert card["engine"] == engine
        # The same weights' embeddings within 1e-5: heads trained on torch apply here.
        assert card["fingerprint"] == torch_fingerprint
        assert f'engine="{engine}"' in c.get("/metrics").text  # clip_model_info's label
    assert np.abs(texts - ref_texts).max() <= 1e-5
    assert np.abs(images - ref_images).max() <= 1e-5


def a_missing_package_ends_start_up(engine: str, package: str, monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # its import now fails at once
    monkeypatch.delitem(sys.modules, f"service.engines.{engine}_engine".replace(
        "onnxruntime_engine", "onnx_engine"), raising=False)
    app = create_app(Settings(models=[f"{engine}:clip-shapes"], device="cpu",
                              log_format="text", cache_dir=tmp_path))
    with TestClient(app):
        error = app.state.startup_error
    assert error is not None and "\n" not in error
    assert f"'{package}'" in error and "pip install" in error
    # clip-serve itself: exit status 1
    monkeypatch.setenv("CLIP_MODELS", f"{engine}:clip-shapes")
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path))
    assert entry.main(["--host", "127.0.0.1", "--port", "0"]) == 1


def test_serves_like_the_torch_engine(tmp_path_factory):
    serves_like_torch(ENGINE, tmp_path_factory)


def test_a_missing_onnxruntime_ends_start_up_with_exit_1(monkeypatch, tmp_path):
    a_missing_package_ends_start_up(ENGINE, PACKAGE, monkeypatch, tmp_path)


def test_bf16_is_refused_with_a_clear_line(tmp_path_factory):
    path, cache = shared_model(tmp_path_factory)
    app = create_app(Settings(models=[f"{ENGINE}:{path}"], device="cpu", dtype="bf16",
                              log_format="text", cache_dir=cache))
    with TestClient(app):
        assert "fp32" in app.state.startup_error and "bf16" in app.state.startup_error


def test_int8_serves_close_to_fp32(tmp_path_factory):
    path, cache = shared_model(tmp_path_factory)
    with TestClient(create_app(Settings(models=[f"{ENGINE}:{path}"], device="cpu",
                                        log_format="text", cache_dir=cache))) as c:
        ref_texts, ref_images = embeddings(c, "tiny")
    with TestClient(create_app(Settings(models=[f"{ENGINE}:{path}"], device="cpu", int8=True,
                                        log_format="text", cache_dir=cache))) as c:
        texts, images = embeddings(c, "tiny")
        card = c.get("/v1/models").json()["data"][0]
        assert card["engine"] == ENGINE and card["fingerprint"].endswith("+onnxruntime-int8")
    assert (texts * ref_texts).sum(1).min() >= 0.99
    assert (images * ref_images).sum(1).min() >= 0.99

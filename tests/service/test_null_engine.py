"""The null engine (CLIP_ENGINE=null): deterministic vectors of the model's shapes, no
weights, no model; the setting; /v1/models says so; and a real server answers with it."""

from __future__ import annotations

import base64
import io
import logging

import httpx
import numpy as np
import pytest
import torch
from conftest import TINY_VIT, random_clip
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError
from serverproc import ServerProcess

from clip_core.checkpoint import save_checkpoint
from clip_core.config import PreprocessConfig, load_architecture
from clip_core.errors import ModelNotFound
from clip_core.registry import get_entry
from service.app import create_app
from service.null_backend import NullBackend, model_shape
from service.prepare import EncodedImage
from service.settings import Settings


def _jpeg(color, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vit_b32() -> NullBackend:
    return NullBackend(model_shape("ViT-B-32"))


def _pixels(seed: int, s: int = 224) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, s, s), dtype=torch.uint8, generator=g)


def test_the_shapes_come_from_the_named_model_without_weights():
    shape = model_shape("ViT-B/32")  # an alias: the registry's entry, never fetched
    entry = get_entry("ViT-B/32")
    assert shape.name == entry.name == "openai/ViT-B-32"
    assert shape.config == load_architecture("ViT-B-32") and shape.preprocess == entry.preprocess
    assert model_shape("RN-Tiny-64").config.embed_dim == load_architecture("RN-Tiny-64").embed_dim
    with pytest.raises(ModelNotFound):
        model_shape("no-such-model")


def test_a_checkpoint_gives_its_own_shapes(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(random_clip(TINY_VIT), path, PreprocessConfig(image_size=32))
    backend = NullBackend(model_shape(str(path)))
    assert (backend.info.name, backend.info.embed_dim, backend.info.image_size) == ("tiny", 64, 32)


def test_vectors_are_unit_length_deterministic_and_differ_by_input(vit_b32):
    info = vit_b32.info
    assert (info.embed_dim, info.image_size, info.context_length) == (512, 224, 77)
    assert info.engine == "null" and info.dtype == "float32"
    a, b, a2 = vit_b32.run("image", [_pixels(0), _pixels(1), _pixels(0)])
    assert a.shape == (512,) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm([a, b], axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, a2)
    assert float(a @ b) < 0.5  # random directions in 512 dimensions are near orthogonal
    # Another backend (another process, replica) gives the same input the same vector.
    np.testing.assert_array_equal(NullBackend(model_shape("ViT-B-32")).run("image", [_pixels(0)])[0], a)
    t1, t2, t1b = vit_b32.run("text", [[49406, 320, 49407], [49406, 321, 49407],
                                       (49406, 320, 49407)])
    np.testing.assert_array_equal(t1, t1b)
    assert not np.array_equal(t1, t2) and t1.shape == (512,)
    # Each vector is its own buffer, as ClipBackend's are: a cached row frees alone.
    assert t1.base is None or t1.base is not t2.base


def test_payloads_are_checked_as_the_model_would(vit_b32):
    with pytest.raises(ValueError, match="image payload 1"):
        vit_b32.run("image", [_pixels(0), _pixels(0, s=32)])
    with pytest.raises(ValueError, match="image payload 0"):
        vit_b32.run("image", [EncodedImage(_jpeg("red"), 0)])  # only with preprocess=device
    with pytest.raises(ValueError, match="text payload 0"):
        vit_b32.run("text", [[1] * 78])
    with pytest.raises(ValueError, match="text payload 0"):
        vit_b32.run("text", [[1]])
    with pytest.raises(ValueError, match="unknown kind"):
        vit_b32.run("audio", [b""])
    assert vit_b32.run("image", []) == []
    on_device = NullBackend(model_shape("ViT-B-32"), preprocess="device")
    jpeg = EncodedImage(_jpeg("red"), 0)
    x, y = on_device.run("image", [jpeg, _pixels(0)])
    np.testing.assert_array_equal(x, on_device.run("image", [EncodedImage(jpeg.data, 5)])[0])
    assert not np.array_equal(x, y)


def test_the_device_sizes_the_streams_as_the_model_would():
    shape = model_shape("ViT-B-32")
    # A CUDA device is only named: nothing is put on it, so this runs without one.
    assert NullBackend(shape, device="cuda:1").info.device == "cuda:1"
    assert NullBackend(shape, threads=3).cpu_threads == 3


def test_the_setting(monkeypatch):
    assert Settings().engine == "torch"  # never the default
    monkeypatch.setenv("CLIP_ENGINE", "null")
    assert Settings().engine == "null"
    monkeypatch.setenv("CLIP_ENGINE", "onnx")
    with pytest.raises(ValidationError):
        Settings()


def test_the_app_serves_the_null_engine_and_says_so(caplog):
    settings = Settings(models=["ViT-B-32"], engine="null", device="cpu", log_format="text")
    with caplog.at_level(logging.WARNING, logger="service.models"), \
            TestClient(create_app(settings)) as c:
        card, = c.get("/v1/models").json()["data"]
        assert card["engine"] == "null" and card["name"] == "openai/ViT-B-32"
        assert card["dimension"] == 512 and card["status"] == "ready"
        body = {"texts": ["a cat", "a dog", "a cat"],
                "images": [base64.b64encode(_jpeg("red")).decode()]}
        r = c.post("/embed", json=body)
        assert r.status_code == 200, r.text
        texts = np.array([t["embedding"] for t in r.json()["texts"]])
        assert texts.shape == (3, 512)
        np.testing.assert_allclose(texts[0], texts[2])
        assert not np.allclose(texts[0], texts[1])
        assert len(r.json()["images"][0]["embedding"]) == 512
        r = c.post("/classify", json={"images": body["images"], "labels": ["red", "blue"]})
        assert r.status_code == 200, r.text
    assert any("null engine" in m and "mean nothing" in m for m in caplog.messages)


def test_the_torch_engine_says_torch(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(random_clip(TINY_VIT), path, PreprocessConfig(image_size=32))
    with TestClient(create_app(Settings(models=[str(path)], log_format="text"))) as c:
        card, = c.get("/v1/models").json()["data"]
        assert card["engine"] == "torch"


def test_a_server_process_with_the_null_engine_embeds_images_and_texts():
    env = {"CLIP_ENGINE": "null", "CLIP_MODELS": "ViT-B-32", "CLIP_DEVICE": "cpu",
           "CLIP_LOG_FORMAT": "text", "CLIP_LOG_LEVEL": "warning"}
    with ServerProcess([], env) as server:
        server.wait_ready(120)
        jpegs = [base64.b64encode(_jpeg(c)).decode() for c in ("red", "green", "red")]
        r = httpx.post(server.url + "/embed", json={"images": jpegs, "texts": ["a", "b"],
                                                    "encoding": "base64"}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["dimension"] == 512
        images = [np.frombuffer(base64.b64decode(e["embedding"]), "<f4")
                  for e in body["images"]]
        assert [v.shape for v in images] == [(512,)] * 3
        np.testing.assert_array_equal(images[0], images[2])
        assert not np.array_equal(images[0], images[1])
        assert len(body["texts"]) == 2
        models = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
        assert [m["engine"] for m in models] == ["null"]

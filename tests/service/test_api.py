"""The HTTP API on a tiny random model, through the real app, lifespan and worker."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, random_clip
from fastapi.testclient import TestClient
from PIL import Image

from clip_core.checkpoint import save_checkpoint
from clip_core.config import PreprocessConfig
from clip_core.preprocess import ImageTransform
from clip_core.tokenizer import Tokenizer
from clip_core.zeroshot import DEFAULT_TEMPLATES, build_classifier
from service.api.errors import to_response
from service.app import create_app
from service.errors import Overloaded
from service.settings import Settings

TINY = TINY_VIT
PREP = PreprocessConfig(image_size=32)


def _png(color, size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def model():
    return random_clip(TINY, seed=3)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """An app serving `model`'s weights (the same seed), one per module that imports it."""
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    save_checkpoint(random_clip(TINY, seed=3), path, PREP)
    app = create_app(Settings(models=[str(path)], log_format="text"))
    with TestClient(app) as c:
        yield c


def _direct_texts(model, texts):
    with torch.no_grad():
        return model.encode_text(Tokenizer()(texts).ids, normalize=True).numpy()


def _direct_images(model, images: list[bytes]):
    t = ImageTransform(PREP)
    with torch.no_grad():
        px = torch.stack([t(Image.open(io.BytesIO(b))) for b in images])
        return model.encode_image(px, normalize=True).numpy()


def test_embed_texts_and_images_equal_direct_clip_core(client, model):
    images = [_png((200, 10, 10)), _png((10, 10, 200), (30, 60))]
    r = client.post("/embed", json={"texts": ["a cat", "a red circle on grey"],
                                    "images": [_b64(images[0]), "data:image/png;base64," + _b64(images[1])]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["dimension"] == 64
    got_t = np.array([t["embedding"] for t in body["texts"]])
    got_i = np.array([i["embedding"] for i in body["images"]])
    np.testing.assert_allclose(got_t, _direct_texts(model, ["a cat", "a red circle on grey"]), atol=1e-5)
    np.testing.assert_allclose(got_i, _direct_images(model, images), atol=1e-5)
    assert [t["n_tokens"] for t in body["texts"]] == [4, 7]


def test_base64_encoding_is_little_endian_float32(client):
    floats = client.post("/embed", json={"texts": ["x y"]}).json()["texts"][0]["embedding"]
    b64 = client.post("/embed", json={"texts": ["x y"], "encoding": "base64"}).json()
    raw = np.frombuffer(base64.b64decode(b64["texts"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(raw, floats, atol=1e-7)


def test_normalize_false_returns_raw_embeddings(client):
    body = client.post("/embed", json={"texts": ["hello"], "normalize": False}).json()
    assert abs(np.linalg.norm(body["texts"][0]["embedding"]) - 1) > 1e-3


def test_truncation_flag_and_strict_mode(client):
    long = "word " * 100
    body = client.post("/embed", json={"texts": [long, "short"]}).json()
    assert [t["truncated"] for t in body["texts"]] == [True, False]
    assert body["texts"][0]["n_tokens"] == 102
    r = client.post("/embed", json={"texts": ["short", long], "truncate": False})
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "text_too_long"
    assert "word word" not in r.text


@pytest.mark.parametrize(
    ("payload", "status", "kind"),
    [
        ({"images": ["not base64!!"]}, 400, "invalid_request"),
        ({"images": [_b64(b"\x00" * 64)]}, 400, "invalid_image"),
        ({"images": ["data:text/plain;base64," + _b64(b"hi")]}, 400, "invalid_request"),
        ({"texts": ["a"], "model": "nope"}, 404, "model_not_found"),
        ({}, 422, "invalid_request"),
        ({"texts": ["a"], "surprise": 1}, 422, "invalid_request"),
        ({"texts": "not a list"}, 422, "invalid_request"),
    ],
)
def test_caller_errors(client, payload, status, kind):
    r = client.post("/embed", json=payload)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind
    assert "Traceback" not in r.text


def test_service_still_answers_after_errors(client, model):
    client.post("/embed", json={"images": [_b64(b"garbage")]})
    body = client.post("/embed", json={"texts": ["after"]}).json()
    np.testing.assert_allclose(body["texts"][0]["embedding"], _direct_texts(model, ["after"])[0], atol=1e-5)


def test_classify_matches_zero_shot_helpers(client, model):
    labels = ["red", "green", "blue", "yellow"]
    img = _png((220, 20, 20))
    r = client.post("/classify", json={"images": [_b64(img), _b64(img)], "labels": labels})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 2 and len(res[0]["labels"]) == 4
    probs = [x["probability"] for x in res[0]["labels"]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
    with torch.no_grad():
        clf = build_classifier(model, Tokenizer(), labels, DEFAULT_TEMPLATES)
        img_emb = torch.from_numpy(_direct_images(model, [img]))
        cos = (img_emb @ clf.t())[0]
        expected = (model.logit_scale.exp() * cos).softmax(-1)
    got = {x["label"]: (x["probability"], x["cosine"]) for x in res[0]["labels"]}
    for j, label in enumerate(labels):
        assert abs(got[label][0] - expected[j].item()) < 1e-4
        assert abs(got[label][1] - cos[j].item()) < 1e-5
    top = client.post("/classify", json={"images": [_b64(img)], "labels": labels, "top_k": 2})
    assert [x["label"] for x in top.json()["results"][0]["labels"]] == [
        x["label"] for x in res[0]["labels"][:2]]


def test_classify_refuses_duplicate_labels_and_bad_templates(client):
    img = _b64(_png((1, 2, 3)))
    r = client.post("/classify", json={"images": [img], "labels": ["a", "a"]})
    assert r.status_code == 400
    r = client.post("/classify", json={"images": [img], "labels": ["a"], "templates": ["no slot"]})
    assert r.status_code == 400


def test_similarity_any_modalities(client, model):
    img = _png((5, 200, 5))
    r = client.post("/similarity", json={"queries": {"images": [_b64(img)]},
                                         "candidates": {"texts": ["green", "a dog"]}})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = _direct_images(model, [img]) @ _direct_texts(model, ["green", "a dog"]).T
    np.testing.assert_allclose(body["cosine"], expected, atol=1e-5)
    scale = model.logit_scale.exp().item()
    np.testing.assert_allclose(body["logits"], np.array(body["cosine"]) * scale, rtol=1e-5)
    tt = client.post("/similarity", json={"queries": {"texts": ["a", "b"]},
                                          "candidates": {"texts": ["a", "b"]}}).json()
    np.testing.assert_allclose(np.diag(tt["cosine"]), [1, 1], atol=1e-5)
    bad = client.post("/similarity", json={"queries": {"texts": ["a"], "images": [_b64(img)]},
                                           "candidates": {"texts": ["b"]}})
    assert bad.status_code == 422


def test_models_health_ready_metrics(client):
    models = client.get("/v1/models").json()["data"]
    assert models[0]["name"] == "tiny" and models[0]["dimension"] == 64
    assert models[0]["status"] == "ready" and models[0]["device"] == "cpu"
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    client.post("/embed", json={"texts": ["count me"]})
    text = client.get("/metrics").text
    assert 'clip_requests_total{endpoint="/embed",model="tiny",status="200"}' in text
    assert "clip_batch_size_bucket" in text and "clip_cache_hits_total" in text


def test_every_openapi_example_runs(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, name in [("/embed", "EmbedRequest"), ("/classify", "ClassifyRequest"),
                       ("/similarity", "SimilarityRequest")]:
        example = schemas[name]["examples"][0]
        r = client.post(path, json=example)
        assert r.status_code == 200, (path, r.text)


def test_overload_maps_to_503_with_retry_after():
    r = to_response(Overloaded(2.3))
    assert r.status_code == 503 and r.headers["Retry-After"] == "3"


def test_request_timeout_header_is_validated(client):
    r = client.post("/embed", json={"texts": ["a"]}, headers={"X-Request-Timeout": "-1"})
    assert r.status_code == 422




def test_requests_read_no_model_parameter(client, monkeypatch):
    """logit_scale is read once, at load, as a float: on CUDA every read of the parameter
    would be a device sync on the event loop."""
    img = _b64(_png((30, 160, 90)))
    before = client.post("/similarity", json={"queries": {"images": [img]},
                                              "candidates": {"texts": ["a", "b"]}}).json()
    monkeypatch.setattr(client.app.state.engine.model(None).backend.model, "logit_scale", None)
    after = client.post("/similarity", json={"queries": {"images": [img]},
                                             "candidates": {"texts": ["a", "b"]}})
    assert after.status_code == 200, after.text
    assert after.json()["logits"] == before["logits"]
    r = client.post("/classify", json={"images": [img], "labels": ["a", "b"]})
    assert r.status_code == 200, r.text

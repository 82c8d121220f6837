"""The shipped default model through the real server: generated scenes come back with the
right labels, over JSON and multipart, and match clip_core's own answer."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from test_server import Server

from clip_core.loader import load
from clip_core.preprocess import ImageTransform, open_image
from clip_core.registry import DEFAULT_MODEL
from clip_core.scenes import COLOURS, SHAPES, SceneGenerator, with_article
from clip_core.tokenizer import Tokenizer
from clip_core.zeroshot import build_classifier, classify
from service.settings import Settings

LABELS = [with_article(f"{c} {s}") for c in COLOURS for s in SHAPES]  # 48 labels
CASES = [("red", "circle"), ("blue", "square"), ("green", "star"), ("yellow", "triangle"),
         ("white", "ring"), ("purple", "cross"), ("pink", "circle"), ("orange", "square")]


def _png(colour: str, shape: str, seed: int) -> bytes:
    # Larger than the model's input, so the server's resize runs too.
    gen = SceneGenerator(192, split="all")
    rng = np.random.default_rng([seed, list(COLOURS).index(colour), SHAPES.index(shape)])
    img = gen.render(gen.scene(rng, combo=(colour, shape)), rng)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    s = Server("clip-shapes")
    yield s
    assert s.stop() == 0


def test_generated_scenes_get_their_labels_over_json_and_multipart(server):
    pngs = [_png(c, s, 5) for c, s in CASES]
    expected = [with_article(f"{c} {s}") for c, s in CASES]
    body = {"images": [base64.b64encode(p).decode() for p in pngs], "labels": LABELS,
            "templates": ["{}", "a photo of {}", "a picture of {}", "a drawing of {}"],
            "top_k": 3}
    r = httpx.post(server.url + "/classify", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "builtin/clip-shapes"
    assert [res["labels"][0]["label"] for res in r.json()["results"]] == expected

    files = [("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
    data = {"labels": LABELS, "templates": body["templates"], "top_k": "3"}
    m = httpx.post(server.url + "/classify", files=files, data=data, timeout=60)
    assert m.status_code == 200, m.text
    # The same labels; the numbers up to rounding, since the two requests' images may meet
    # the model in batches of other sizes (two CPU streams), which moves the last bits.
    for a, b in zip(m.json()["results"], r.json()["results"], strict=True):
        assert [x["label"] for x in a["labels"]] == [x["label"] for x in b["labels"]]
        for key in ("probability", "cosine"):
            assert [x[key] for x in a["labels"]] == pytest.approx(
                [x[key] for x in b["labels"]], rel=1e-5, abs=1e-6)

    # The server's probabilities are clip_core's, computed here in-process.
    loaded = load("clip-shapes")
    with torch.no_grad():
        img = loaded.model.encode_image(
            ImageTransform(loaded.preprocess).batch([open_image(p) for p in pngs]))
        clf = build_classifier(loaded.model, Tokenizer(), LABELS, body["templates"])
        probs, _ = classify(loaded.model, img, clf)
    for row, res in zip(probs, r.json()["results"], strict=True):
        top = res["labels"][0]
        assert top["probability"] == pytest.approx(float(row.max()), abs=1e-4)


def test_texts_and_images_meet_in_one_space(server):
    png = _png("red", "circle", 9)
    body = {"queries": {"images": [base64.b64encode(png).decode()]},
            "candidates": {"texts": ["a red circle", "a blue square", "two green stars"]}}
    r = httpx.post(server.url + "/similarity", json=body, timeout=60)
    assert r.status_code == 200, r.text
    cosine = r.json()["cosine"][0]
    assert int(np.argmax(cosine)) == 0, cosine


def test_it_is_what_the_service_serves_when_nothing_is_configured(monkeypatch):
    monkeypatch.delenv("CLIP_MODELS", raising=False)
    assert Settings().models == [DEFAULT_MODEL] == ["builtin/clip-shapes"]

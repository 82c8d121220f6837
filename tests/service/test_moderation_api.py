"""/moderate and /v1/policies on the shipped default model (builtin/clip-shapes), through
the real app, lifespan and worker; scores checked against clip_core computed directly.
And policies at start-up: each is checked against the served models, and a bad one ends
start-up naming the file (and the field); `clip-serve` then exits 1."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from clip_core.errors import HeadModelMismatch, PolicyInvalid
from clip_core.loader import load
from clip_core.moderation import (
    Head,
    PolicyScorer,
    load_policy,
    load_policy_heads,
    model_fingerprint,
    save_head,
)
from clip_core.preprocess import ImageTransform
from clip_core.registry import DEFAULT_MODEL
from clip_core.scenes import SceneGenerator
from clip_core.tokenizer import Tokenizer
from service.app import create_app
from service.metrics import Metrics
from service.moderation import Moderation
from service.settings import Settings

POLICY = """\
name: shapes
version: 3
model: {model}
description: red things, and stars by a head
categories:
  red:
    threshold: {red_threshold}
    description: anything red
    prompts:
      positive: [red]
      negative: [blue, green]
      templates: ["a photo of a {{}} shape", "a {{}} shape"]
  stars:
    threshold: 0.5
    head: {{path: stars.safetensors, class: star}}
"""


@pytest.fixture(scope="module")
def reference():
    """The default model loaded directly, as clip-train-head and clip-calibrate load it."""
    loaded = load(DEFAULT_MODEL)
    return loaded, model_fingerprint(loaded.model, loaded.preprocess)


def _scene_png(seed: int, index: int, combo=None) -> bytes:
    gen = SceneGenerator(split="all")
    rng = np.random.default_rng([seed, index])
    image = gen.render(gen.scene(rng, combo), rng)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _star_head(model, fingerprint: str) -> Head:
    """A linear head whose "star" logit is the cosine with the text "a star", scaled:
    meaningful enough to separate stars, exact enough to check the server against."""
    tok = Tokenizer()
    with torch.no_grad():
        t = model.encode_text(tok(["a photo of a star", "a photo of a circle"]).ids,
                              normalize=True).double().numpy()
    weight = 30 * np.stack([t[1] - t[0], t[0] - t[1]])  # classes: circle, star
    return Head(kind="linear", multi_label=True, classes=["circle", "star"],
                model=DEFAULT_MODEL, fingerprint=fingerprint, tensors={
                    "weight": weight, "bias": np.zeros(2)})


def write_policy(directory, model_name: str, fingerprint: str, model, red_threshold=2.0):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "shapes.yaml").write_text(
        POLICY.format(model=model_name, red_threshold=red_threshold))
    save_head(directory / "stars.safetensors", _star_head(model, fingerprint))
    return directory / "shapes.yaml"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, reference):
    loaded, fp = reference
    d = tmp_path_factory.mktemp("policies")
    write_policy(d, loaded.name, fp, loaded.model)
    return d


@pytest.fixture(scope="module")
def client(policy_dir):
    app = create_app(Settings(policies=policy_dir, log_format="text", streams=1))
    with TestClient(app) as c:
        yield c


def _direct_scorer(reference, policy_dir) -> PolicyScorer:
    """The policy scored by clip_core alone: the model's own text tower, no server."""
    loaded, fp = reference
    policy = load_policy(policy_dir / "shapes.yaml")
    tok = Tokenizer()

    def encode(texts):
        with torch.no_grad():
            return loaded.model.encode_text(tok(texts).ids, normalize=True).numpy()

    scale = float(loaded.model.logit_scale.detach().float().exp())
    return PolicyScorer(policy, encode, load_policy_heads(policy, fp), scale)


def _direct_images(reference, pngs: list[bytes]) -> np.ndarray:
    loaded, _ = reference
    t = ImageTransform(loaded.preprocess)
    with torch.no_grad():
        x = t.batch([Image.open(io.BytesIO(p)) for p in pngs])
        return loaded.model.encode_image(x, normalize=True).numpy()


def test_policies_are_listed_and_models_name_their_fingerprint(client, reference):
    loaded, fp = reference
    body = client.get("/v1/policies").json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert (card["name"], card["version"], card["model"]) == ("shapes", 3, loaded.name)
    assert card["categories"] == {
        "red": {"kind": "prompts", "threshold": 2.0, "description": "anything red",
                "applies_to": ["image", "text"]},
        "stars": {"kind": "head", "threshold": 0.5, "description": "",
                  "applies_to": ["image"]},
    }
    models = client.get("/v1/models").json()["data"]
    assert [m["fingerprint"] for m in models] == [fp]


def test_images_and_texts_are_scored_as_clip_core_scores_them(client, reference, policy_dir):
    pngs = [_scene_png(1, 0, ("red", "star")), _scene_png(1, 1, ("blue", "circle")),
            _scene_png(1, 2, ("green", "star"))]
    texts = ["a red square", "a blue ring"]
    r = client.post("/moderate", json={"policy": "shapes", "images": [_b64(p) for p in pngs],
                                       "texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["policy"], body["version"], body["fingerprint"]) == ("shapes", 3, reference[1])
    assert body["model"] == reference[0].name and body["categories"] == ["red", "stars"]
    scorer = _direct_scorer(reference, policy_dir)
    want_img = scorer.score(_direct_images(reference, pngs), "image")
    tok = Tokenizer()
    with torch.no_grad():
        text_emb = reference[0].model.encode_text(tok(texts).ids, normalize=True).numpy()
    want_txt = scorer.score(text_emb, "text")
    for items, want in ((body["images"], want_img), (body["texts"], want_txt)):
        for i, item in enumerate(items):
            assert set(item["categories"]) == set(want)  # texts: no image-only head
            for c, got in item["categories"].items():
                assert got["score"] == pytest.approx(want[c][i], rel=1e-4, abs=1e-4)
                assert got["threshold"] == scorer.policy.categories[c].threshold
                assert got["flagged"] == (got["score"] >= got["threshold"])
            assert item["flagged"] == any(g["flagged"] for g in item["categories"].values())
            assert item["error"] is None
    # The policy means something on this model: red scores above blue, stars above circles.
    red = [i["categories"]["red"]["score"] for i in body["images"]]
    star = [i["categories"]["stars"]["score"] for i in body["images"]]
    assert red[0] > red[1] and star[0] > star[1] and star[2] > star[1]


def test_a_subset_of_categories_and_the_errors(client):
    png = _b64(_scene_png(2, 0))
    r = client.post("/moderate", json={"policy": "shapes", "images": [png],
                                       "categories": ["stars"]})
    assert r.status_code == 200, r.text
    assert r.json()["categories"] == ["stars"]
    assert list(r.json()["images"][0]["categories"]) == ["stars"]

    r = client.post("/moderate", json={"policy": "nope", "images": [png]})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "policy_not_found"
    assert "shapes" in r.json()["error"]["message"] and "nope" not in r.json()["error"]["message"]

    r = client.post("/moderate", json={"policy": "shapes", "images": [png],
                                       "categories": ["red", "weapons"]})
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "unknown_category"
    assert "red, stars" in r.json()["error"]["message"]

    for bad in ({"policy": "shapes"}, {"policy": "shapes", "texts": ["x"], "categories": []},
                {"images": [png]}, {"policy": "shapes", "texts": ["x"], "extra": 1}):
        assert client.post("/moderate", json=bad).status_code == 422, bad


def test_multipart_gives_the_json_answer(client):
    pngs = [_scene_png(3, 0), _scene_png(3, 1)]
    as_json = client.post("/moderate", json={
        "policy": "shapes", "images": [_b64(p) for p in pngs], "texts": ["a red star"],
        "categories": ["red", "stars"]}).json()
    r = client.post("/moderate", data={"policy": "shapes", "texts": ["a red star"],
                                       "categories": ["red", "stars"]},
                    files=[("images", ("a.png", pngs[0], "image/png")),
                           ("images", ("b.png", pngs[1], "image/png"))])
    assert r.status_code == 200, r.text
    assert r.json() == as_json
    # The same limits and errors as /embed: a text file part is refused.
    r = client.post("/moderate", data={"policy": "shapes"},
                    files=[("texts", ("t.txt", b"hello", "text/plain"))])
    assert r.status_code == 400


def test_an_image_that_does_not_decode_fails_only_its_own_item(client):
    good = [_scene_png(4, i) for i in range(2)]
    alone = client.post("/moderate", json={"policy": "shapes",
                                           "images": [_b64(p) for p in good]}).json()
    r = client.post("/moderate", json={"policy": "shapes", "images": [
        _b64(good[0]), _b64(b"\x89PNG\r\n\x1a\n" + b"broken" * 10), "not base64!",
        _b64(good[1])]})
    assert r.status_code == 200, r.text
    items = r.json()["images"]
    assert [i["flagged"] is None for i in items] == [False, True, True, False]
    assert items[1]["error"]["type"] == "invalid_image" and "image 1" in items[1]["error"]["message"]
    assert items[2]["error"]["type"] == "invalid_request" and items[2]["categories"] == {}
    for got, want in zip([items[0], items[3]], alone["images"], strict=True):
        for c in want["categories"]:
            assert got["categories"][c]["score"] == pytest.approx(
                want["categories"][c]["score"], abs=1e-6)
    # Not the image's fault: the request fails whole, as on /embed.
    r = client.post("/moderate", json={"policy": "shapes", "images": ["http://x/a.png"]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "url_not_allowed"


def test_scores_and_decisions_do_not_depend_on_the_batch(client, reference, tmp_path):
    """The same images alone, in one batch, and in batches of other sizes and company:
    each score within 1e-6 of the embedding's units, and each decision the same wherever
    the score is further than that from its threshold. The red threshold is set at the
    median score so that both decisions occur.

    Scoring itself is exactly row by row (tests/clip_core/test_moderation_scoring.py);
    what differs is the model's fp32 arithmetic, whose kernels change with the batch's
    size (measured ~1e-7 per embedding component on this model). A head's score is a
    probability, bounded by 1e-6 as it is; a prompt score is logit_scale x a cosine
    margin, so its bound is 1e-6 x logit_scale (29 on this model)."""
    pngs = [_scene_png(5, i) for i in range(8)]
    loaded, fp = reference
    scale = float(loaded.model.logit_scale.detach().float().exp())
    tolerance = {"red": 1e-6 * scale, "stars": 1e-6}
    first = client.post("/moderate", json={"policy": "shapes",
                                           "images": [_b64(p) for p in pngs]}).json()
    median = float(np.median([i["categories"]["red"]["score"] for i in first["images"]]))
    d = tmp_path / "median"
    write_policy(d, loaded.name, fp, loaded.model, red_threshold=median)
    app = create_app(Settings(policies=d, log_format="text", streams=1, max_batch_size=3))
    with TestClient(app) as server:
        def run(idx):
            r = server.post("/moderate", json={"policy": "shapes",
                                          "images": [_b64(pngs[i]) for i in idx]})
            assert r.status_code == 200, r.text
            return dict(zip(idx, r.json()["images"], strict=True))

        whole = run(list(range(8)))  # batches of 3, 3, 2
        groupings = [[i] for i in range(8)] + [[7, 3], [0, 5, 1, 6, 2]]
        flags = {c: [whole[i]["categories"][c]["flagged"] for i in range(8)]
                 for c in ("red", "stars")}
        assert True in flags["red"] and False in flags["red"]
        for group in groupings:
            for i, item in run(group).items():
                for c, got in item["categories"].items():
                    want = whole[i]["categories"][c]
                    assert abs(got["score"] - want["score"]) <= tolerance[c], (i, c, group)
                    if abs(want["score"] - want["threshold"]) > tolerance[c]:
                        assert got["flagged"] == want["flagged"]


def test_decisions_are_counted_by_policy_category_and_decision(client):
    def counts():
        out = {}
        for fam in text_string_to_metric_families(client.get("/metrics").text):
            for s in fam.samples:
                if s.name == "clip_moderation_items_total":
                    out[(s.labels["policy"], s.labels["category"], s.labels["flagged"])] = s.value
        return out

    before = counts()
    body = client.post("/moderate", json={"policy": "shapes", "texts": ["a red star", "blue"],
                                          "images": [_b64(_scene_png(6, 0))]}).json()
    after = counts()
    expected: dict = {}
    for item in body["texts"] + body["images"]:
        for c, v in item["categories"].items():
            key = ("shapes", c, "true" if v["flagged"] else "false")
            expected[key] = expected.get(key, 0) + 1
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} \
        == expected
    assert sum(expected.values()) == 4  # two texts x red, one image x (red, stars)


# ---- start-up ----


def _start(client, directory) -> Moderation:
    """A second set of policies checked against the served model, as start-up does."""
    mod = Moderation(Settings(policies=directory), client.app.state.engine, Metrics())
    client.portal.call(mod.start)
    return mod


def test_a_good_policy_loads_with_prompt_vectors_from_the_served_model(client, reference,
                                                                       tmp_path):
    loaded, fp = reference
    write_policy(tmp_path, loaded.name, fp, loaded.model)
    mod = _start(client, tmp_path)
    assert list(mod.policies) == ["shapes"]
    assert mod.policies["shapes"].fingerprint == fp
    # Computed through the server's text path, cached like any text.
    assert client.app.state.engine.cache.lookup(loaded.name, ["a photo of a red shape"]).missing == []


@pytest.mark.parametrize("edit, field", [
    (lambda t: t.replace("version: 3", "version: zero"), "version"),
    (lambda t: t.replace("threshold: 0.5", "thresold: 0.5"), "categories.stars.threshold"),  # missing
    (lambda t: t.replace("class: star", "class: moon"), "categories.stars.head.class"),
    (lambda t: t.replace("model: builtin/clip-shapes", "model: ViT-B-32"), "model"),
])
def test_an_invalid_policy_names_the_file_and_the_field(client, reference, tmp_path, edit,
                                                        field):
    loaded, fp = reference
    path = write_policy(tmp_path, loaded.name, fp, loaded.model)
    path.write_text(edit(path.read_text()))
    with pytest.raises(PolicyInvalid) as e:
        _start(client, tmp_path)
    assert e.value.field == field and str(path) in str(e.value)


def test_a_head_trained_for_another_model_is_refused(client, reference, tmp_path):
    loaded, fp = reference
    write_policy(tmp_path, loaded.name, "sha256:" + "0" * 64, loaded.model)
    with pytest.raises(HeadModelMismatch) as e:
        _start(client, tmp_path)
    assert str(tmp_path / "stars.safetensors") in str(e.value) and fp in str(e.value)


def test_clip_serve_exits_1_naming_the_file_and_the_field(tmp_path):
    (tmp_path / "bad.yaml").write_text(POLICY.format(model=DEFAULT_MODEL, red_threshold="high"))
    proc = subprocess.run(
        [sys.executable, "-m", "service", "--port", "0", "--log-format", "text"],
        capture_output=True, text=True, timeout=120,
        env={"CLIP_POLICIES": str(tmp_path), "CLIP_STREAMS": "1", "PATH": "/usr/bin:/bin",
             "PYTHONPATH": ":".join(sys.path)},
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line]
    assert len(errors) == 1, errors
    assert str(tmp_path / "bad.yaml") in errors[0] and "categories.red.threshold" in errors[0]

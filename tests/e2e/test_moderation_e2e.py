"""The moderation proof through the real server: the example policy, its head trained and
its thresholds calibrated on generated scenes (`clip_core.moderation.shapes_demo`, small),
served with CLIP_POLICIES; fresh scenes posted to /moderate get the decisions the offline
tools compute for them. Every number is computed here, at run time, from whatever the
shipped default model is."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from test_server import Server

from clip_core.loader import load
from clip_core.moderation.calibrate import Target
from clip_core.moderation.embed import Embedder
from clip_core.moderation.heads import load_policy_heads
from clip_core.moderation.policy import load_policy
from clip_core.moderation.scoring import PolicyScorer
from clip_core.moderation.shapes_demo import run

SEEDS = {"train": 71, "calibrate": 72, "evaluate": 73}
# Server and offline embeddings differ in the last bits (batch composition, two streams):
# a prompt margin is logit_scale (~30) times a cosine difference.
SCORE_TOL = 1e-3


@pytest.fixture(scope="module")
def embedder():
    return Embedder(load("builtin/clip-shapes"), progress=False)


@pytest.fixture(scope="module")
def proof(embedder, tmp_path_factory):
    return run(tmp_path_factory.mktemp("moderation"), embedder, n_train=160, n_calibrate=160,
               n_evaluate=24, epochs=40, target=Target("precision", 0.9), seeds=SEEDS,
               plots=False)


@pytest.fixture(scope="module")
def server(proof):
    s = Server("builtin/clip-shapes", env={"CLIP_POLICIES": str(proof.policies)})
    yield s
    assert s.stop() == 0


def test_the_calibrated_policy_is_served(server, proof):
    r = httpx.get(server.url + "/v1/policies", timeout=30)
    assert r.status_code == 200, r.text
    (card,) = r.json()["data"]
    assert (card["name"], card["version"]) == ("shapes", 2)
    policy = load_policy(proof.policies / "shapes.yaml")
    for name, cat in card["categories"].items():
        assert cat["threshold"] == policy.categories[name].threshold


def test_moderate_agrees_with_offline_scoring(server, proof, embedder):
    folder = proof.policies.parent / "scenes" / "evaluate"
    paths = sorted(folder.glob("*.png"))
    assert len(paths) == 24
    body = {"policy": "shapes",
            "images": [base64.b64encode(p.read_bytes()).decode() for p in paths],
            "texts": ["a red star", "two blue squares"]}
    r = httpx.post(server.url + "/moderate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["policy"], answer["version"]) == ("shapes", 2)
    assert answer["fingerprint"] == embedder.fingerprint

    policy = load_policy(proof.policies / "shapes.yaml")
    scorer = PolicyScorer(policy, embedder.texts,
                          load_policy_heads(policy, embedder.fingerprint), embedder.logit_scale)
    offline = scorer.score(embedder.images(paths), "image")
    flagged_any = np.zeros(len(paths), bool)
    for name, cat in policy.categories.items():
        served = np.array([item["categories"][name]["score"] for item in answer["images"]])
        flags = np.array([item["categories"][name]["flagged"] for item in answer["images"]])
        assert served == pytest.approx(offline[name], abs=SCORE_TOL)
        # Decisions agree wherever the score is not within the numeric noise of the threshold.
        clear = np.abs(offline[name] - cat.threshold) > SCORE_TOL
        assert clear.sum() >= len(paths) - 2
        assert np.array_equal(flags[clear], (offline[name] >= cat.threshold)[clear])
        assert all(item["categories"][name]["threshold"] == cat.threshold
                   for item in answer["images"])
        flagged_any |= flags
    assert [item["flagged"] for item in answer["images"]] == flagged_any.tolist()

    # Texts: the prompt category only (the head was trained on image embeddings).
    text_scores = scorer.score(embedder.texts(body["texts"]), "text")
    assert set(text_scores) == {"red_shapes"}
    for item, score in zip(answer["texts"], text_scores["red_shapes"], strict=True):
        assert set(item["categories"]) == {"red_shapes"}
        assert item["categories"]["red_shapes"]["score"] == pytest.approx(score, abs=SCORE_TOL)


def test_the_served_decisions_give_the_proofs_precision_and_recall(server, proof):
    """Over multipart, the evaluation scenes' decisions; counted, they give the proof's own
    evaluation numbers (up to items within numeric noise of a threshold)."""
    folder = proof.policies.parent / "scenes" / "evaluate"
    rows = [r.split(",") for r in (folder / "categories.csv").read_text().split()]
    files = [("images", (r[0], (folder / r[0]).read_bytes(), "image/png")) for r in rows]
    r = httpx.post(server.url + "/moderate", files=files, data={"policy": "shapes"},
                   timeout=120)
    assert r.status_code == 200, r.text
    policy = load_policy(proof.policies / "shapes.yaml")
    for name, metrics in proof.evaluation.metrics.items():
        truth = np.array([name in row[1:] for row in rows])
        served = np.array([item["categories"][name]["flagged"] for item in r.json()["images"]])
        offline = proof.evaluation.scores[name] >= policy.categories[name].threshold
        assert (int((offline & truth).sum()), int((offline & ~truth).sum())) == (
            round(metrics["recall"] * metrics["positives"]),
            round(metrics["fpr"] * metrics["negatives"]))
        unclear = np.abs(proof.evaluation.scores[name] - policy.categories[name].threshold
                         ) <= SCORE_TOL
        assert np.array_equal(served[~unclear], offline[~unclear])
        assert int((served != offline).sum()) <= int(unclear.sum())

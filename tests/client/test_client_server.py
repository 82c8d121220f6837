"""The client against a real server on the default model: limits read from the server,
calls split and merged back in order, the numbers clip_core computes, typed errors, and
the retry path against a server that refuses (a per-key rate limit of one a second)."""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest
from client_support import KEY, Reference, png, scene, start_all
from PIL import Image

from clip_client import AsyncClient, Client, RetryPolicy, errors

MAX_ITEMS = 8
CASES = [("red", "circle"), ("blue", "square"), ("green", "star"), ("yellow", "triangle"),
         ("white", "ring"), ("purple", "cross"), ("pink", "circle")]
LABELS = ["a red circle", "a blue square", "a green star", "a yellow triangle",
          "a white ring", "a purple cross"]


# A moderation policy by prompts: red shapes against blue ones (clip_core.moderation).
POLICY = """
name: reds
version: 1
model: builtin/clip-shapes
categories:
  red:
    threshold: 0.0
    prompts:
      positive: ["a red circle", "a red square", "a red triangle"]
      negative: ["a blue circle", "a blue square", "a blue triangle"]
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers, started side by side: a plain one (with a moderation policy), and
    one that refuses (a per-key rate limit of one request a second)."""
    policies = tmp_path_factory.mktemp("policies")
    (policies / "reds.yaml").write_text(POLICY)
    plain = {"CLIP_MAX_ITEMS_PER_REQUEST": str(MAX_ITEMS), "CLIP_API_KEYS": KEY,
             "CLIP_POLICIES": str(policies)}
    both = start_all([plain, {**plain, "CLIP_RATE_LIMIT_PER_S": "1",
                              "CLIP_RATE_LIMIT_BURST": "1"}])
    yield both
    assert [s.stop() for s in both] == [0, 0]


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def reference():
    return Reference()


@pytest.fixture(scope="module")
def pngs():
    return [png(scene(c, s, seed=3)) for c, s in CASES]


def test_embeddings_split_by_the_servers_limits_match_clip_core(server, reference, pngs,
                                                                tmp_path, capsys):
    paths = []
    for i, p in enumerate(pngs[:3]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(p)
    images = [*paths, *pngs[3:5], *(Image.open(io.BytesIO(p)) for p in pngs[5:])]
    texts = [f"a photo of {n} things" for n in range(2 * MAX_ITEMS + 3)]  # three requests
    with Client(server.url, api_key=KEY, progress=True) as c:
        assert c.limits().max_items_per_request == MAX_ITEMS
        got_t = c.embed_texts(texts)
        got_i = c.embed_images(images)
    assert got_t.dtype == np.float32 and got_t.shape == (len(texts), 128)
    np.testing.assert_allclose(got_t, reference.texts(texts), atol=1e-5)
    np.testing.assert_allclose(got_i, reference.images(pngs), atol=1e-5)
    assert f"{len(texts)}/{len(texts)}" in capsys.readouterr().err  # tqdm's bar


def test_moderate_answers_per_item_from_the_servers_policy(server, reference, pngs):
    red, blue = pngs[0], pngs[1]  # a red circle, a blue square
    with Client(server.url, api_key=KEY) as c:
        out = c.moderate("reds", images=[red, blue], texts=["a red square"])
        with pytest.raises(errors.CallerError):
            c.moderate("no-such-policy", texts=["x"])
    assert (out["policy"], out["version"], out["model"]) == ("reds", 1, "builtin/clip-shapes")
    scores = [item["categories"]["red"]["score"] for item in out["images"]]
    # The policy's score, recomputed from clip_core's embeddings in this process.
    pos = reference.texts(["a red circle", "a red square", "a red triangle"]).mean(0)
    neg = reference.texts(["a blue circle", "a blue square", "a blue triangle"]).mean(0)
    pos, neg = pos / np.linalg.norm(pos), neg / np.linalg.norm(neg)
    margin = reference.images([red, blue]) @ (pos - neg)
    np.testing.assert_allclose(np.array(scores) / margin, scores[0] / margin[0], rtol=1e-4)
    assert [item["flagged"] for item in out["images"]] == [s >= 0.0 for s in scores]
    assert scores[0] > 0 > scores[1] and out["texts"][0]["flagged"] is True


def test_classify_and_similarity_over_several_requests(server, pngs):
    with Client(server.url, api_key=KEY) as c:
        # 6 labels leave 2 images a request: 4 requests for 7 images.
        results = c.classify(pngs, LABELS, top_k=3)
        sim = c.similarity(query_images=pngs, candidate_texts=LABELS)
        img, txt = c.embed_images(pngs), c.embed_texts(LABELS)
    assert [r.top.label for r in results[:6]] == LABELS
    assert all(len(r.labels) == 3 and r.labels[0].probability >= r.labels[1].probability
               for r in results)
    assert sim.cosine.shape == (7, 6)
    np.testing.assert_allclose(sim.cosine, img @ txt.T, atol=1e-5)
    assert list(sim.cosine[:6].argmax(axis=1)) == list(range(6))


def test_the_async_client_gives_the_same_answers(server, pngs):
    async def go():
        async with AsyncClient(server.url, api_key=KEY) as c:
            return await asyncio.gather(c.embed_images(pngs), c.classify(pngs[:2], LABELS))

    with Client(server.url, api_key=KEY) as c:
        want = c.embed_images(pngs)
    got, results = asyncio.run(go())
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [r.top.label for r in results] == LABELS[:2]


def test_server_errors_arrive_typed(server):
    with Client(server.url) as c, pytest.raises(errors.Unauthorized) as raised:
        c.embed_texts(["no key"])
    assert raised.value.status == 401
    with Client(server.url, api_key=KEY) as c:
        with pytest.raises(errors.ModelNotFound):
            c.embed_texts(["x"], model="no-such-model")
        with pytest.raises(errors.TextTooLong):
            c.embed_texts(["word " * 100], truncate=False)
        with pytest.raises(errors.InvalidImage):
            c.embed_images([b"not an image at all"])


@pytest.fixture(scope="module")
def refusing(servers):
    return servers[1]


def test_refused_requests_are_retried_after_retry_after_until_they_pass(refusing, reference):
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        time.sleep(s)

    texts = [f"{n} red circles" for n in range(MAX_ITEMS + 2)]  # two requests, and limits
    with Client(refusing.url, api_key=KEY, sleep=sleep, retry=RetryPolicy(jitter=0.1)) as c:
        got = c.embed_texts(texts)
    np.testing.assert_allclose(got, reference.texts(texts), atol=1e-5)
    # Two requests sent together within one token a second: at least one was refused
    # with Retry-After: 1, and each wait honoured it (plus at most 10 % jitter).
    assert len(slept) >= 1
    assert all(1.0 <= s <= 1.1 for s in slept), slept


def test_a_retry_past_the_deadline_raises_the_refusal(refusing):
    slept: list[float] = []
    with Client(refusing.url, api_key=KEY, sleep=slept.append,
                retry=RetryPolicy(deadline_s=0.5)) as c, \
            pytest.raises(errors.RateLimited) as raised:
        # Two requests sent together within one token a second: one is refused.
        c.embed_texts(["a blue square"] * (MAX_ITEMS + 1))
    assert raised.value.status == 429 and raised.value.retry_after >= 1
    assert slept == []

"""/v1/embeddings through the official openai client, against /embed on the same app."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
from test_api import (
    _b64,
    _png,
    client,  # noqa: F401  (the same tiny model's app, per module)
)


@pytest.fixture(scope="module")
def oai(client):
    # TestClient is an httpx client whose transport is the app itself.
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client,
                         max_retries=0)


def _embed(client, **body) -> dict:
    r = client.post("/embed", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_string_and_list_equal_embed(oai, client):
    texts = ["a photo of a cat", "a red circle on grey"]
    expected = np.array([t["embedding"] for t in _embed(client, texts=texts)["texts"]])
    one = oai.embeddings.create(model="tiny", input=texts[0], encoding_format="float")
    assert one.object == "list" and one.model == "tiny"
    assert [d.index for d in one.data] == [0] and one.data[0].object == "embedding"
    np.testing.assert_allclose(one.data[0].embedding, expected[0], atol=1e-5)
    many = oai.embeddings.create(model="tiny", input=texts, encoding_format="float")
    assert [d.index for d in many.data] == [0, 1]
    got = np.array([d.embedding for d in many.data])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_usage_counts_clip_tokens(oai, client):
    texts = ["a cat", "a red circle on grey"]
    n_tokens = [t["n_tokens"] for t in _embed(client, texts=texts)["texts"]]
    r = oai.embeddings.create(model="tiny", input=texts)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(n_tokens) == 11


def test_base64_is_little_endian_float32(oai, client):
    texts = ["x y", "z"]
    floats = oai.embeddings.create(model="tiny", input=texts, encoding_format="float")
    # Asked for explicitly, the client hands the base64 strings back untouched.
    raw = oai.embeddings.create(model="tiny", input=texts, encoding_format="base64")
    for f, b in zip(floats.data, raw.data, strict=True):
        assert isinstance(b.embedding, str)
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(b.embedding), "<f4"),
                                   f.embedding, atol=1e-7)
    # Left unset, the client asks for base64 and decodes it into floats itself.
    default = oai.embeddings.create(model="tiny", input=texts)
    for f, d in zip(floats.data, default.data, strict=True):
        np.testing.assert_allclose(d.embedding, f.embedding, atol=1e-7)
    sent = client.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
    assert isinstance(sent.json()["data"][0]["embedding"], str)


def test_image_modality(oai, client):
    images = [_png((200, 10, 10)), _png((10, 10, 200), (30, 60))]
    expected = np.array([i["embedding"] for i in
                         _embed(client, images=[_b64(b) for b in images])["images"]])
    r = oai.embeddings.create(
        model="tiny", input=[_b64(images[0]), "data:image/png;base64," + _b64(images[1])],
        extra_body={"modality": "image"})
    np.testing.assert_allclose(np.array([d.embedding for d in r.data]), expected, atol=1e-5)
    assert r.usage.prompt_tokens == 0


def test_dimensions_equal_to_the_model_are_accepted(oai):
    r = oai.embeddings.create(model="tiny", input="a", dimensions=64)
    assert len(r.data[0].embedding) == 64


def test_unknown_model_is_not_found(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.embeddings.create(model="text-embedding-3-small", input="a")
    assert e.value.body["type"] == "model_not_found"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"input": [[1, 2, 3]]}, openai.BadRequestError),  # token arrays
        ({"input": [1, 2, 3]}, openai.BadRequestError),
        ({"input": "a", "dimensions": 32}, openai.BadRequestError),
        ({"input": ["not base64!!"], "extra_body": {"modality": "image"}},
         openai.BadRequestError),
        ({"input": [_b64(b"\x00" * 64)], "extra_body": {"modality": "image"}},
         openai.BadRequestError),
        ({"input": []}, openai.UnprocessableEntityError),
        ({"input": "a", "extra_body": {"modality": "video"}}, openai.UnprocessableEntityError),
        ({"input": "a", "extra_body": {"surprise": 1}}, openai.UnprocessableEntityError),
    ],
)
def test_caller_errors(oai, kwargs, error):
    with pytest.raises(error) as e:
        oai.embeddings.create(model="tiny", **kwargs)
    assert set(e.value.body) == {"type", "message"}


def test_model_may_be_left_out_and_the_openapi_example_runs(client):
    spec = client.get("/openapi.json").json()
    example = spec["components"]["schemas"]["OpenAIEmbeddingRequest"]["examples"][0]
    r = client.post("/v1/embeddings", json=example)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny" and len(r.json()["data"]) == len(example["input"])

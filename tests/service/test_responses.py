"""Response bodies from numpy (service/api/responses.py) equal the pydantic models' bodies
byte for byte, and the event loop hands large inputs off: base64 images to the decode
pool, large JSON bodies to a worker thread."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image
from pydantic import TypeAdapter
from test_api import (
    client,  # noqa: F401  (the same tiny model's app, per module)
)

from service.api import inputs, responses, routes
from service.api.schemas import (
    Classification,
    ClassifyResponse,
    EmbedResponse,
    ImageEmbedding,
    LabelScore,
    OpenAIEmbedding,
    OpenAIEmbeddingResponse,
    OpenAIUsage,
    SimilarityResponse,
    TextEmbedding,
)
from service.core import TextEmbeddings
from service.errors import EmptyInput, InvalidRequest
from service.prepare import Base64Image


def _vectors(n: int, e: int, seed: int) -> np.ndarray:
    """(n, e) fp32 with the values JSON writers disagree on most: signed zero, subnormal,
    huge and tiny exponents, NaN and infinities."""
    v = np.random.default_rng(seed).standard_normal((n, e)).astype(np.float32)
    v *= np.float32(10.0) ** np.random.default_rng(seed + 1).integers(-12, 12, (n, e)).astype(np.float32)
    v.flat[:7] = [0.0, -0.0, 1e-45, 3e38, np.nan, np.inf, -np.inf]
    return v


def _old_rows(vectors: np.ndarray, encoding: str) -> list:
    """What the routes built before: a Python float per value, or base64 per row."""
    if encoding == "base64":
        return [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    return vectors.tolist()


def _dumped(model_type, value) -> bytes:
    """The body FastAPI wrote from a response model."""
    return TypeAdapter(model_type).dump_json(value)


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embed_body_is_the_models_body_byte_for_byte(encoding):
    t, i = _vectors(3, 16, 1), _vectors(2, 16, 2)
    texts = TextEmbeddings(t, [4, 77, 9], [False, True, False])
    old = EmbedResponse(
        model="m", dimension=16, encoding=encoding,
        texts=[TextEmbedding(embedding=e, n_tokens=n, truncated=x)
               for e, n, x in zip(_old_rows(t, encoding), texts.n_tokens, texts.truncated,
                                  strict=True)],
        images=[ImageEmbedding(embedding=e) for e in _old_rows(i, encoding)])
    new = responses.embed("m", 16, encoding, texts, i)
    assert new.body == _dumped(EmbedResponse, old)
    assert new.media_type == "application/json"
    finite = np.nan_to_num(i, posinf=0, neginf=0)  # null (NaN) is no float to the model
    only_images = responses.embed("m", 16, encoding, None, finite).body
    assert json.loads(only_images)["texts"] == []
    EmbedResponse.model_validate_json(only_images)


@pytest.mark.parametrize("dim", [1, 2, 3, 511, 512, 513, 768])  # 4E % 3: 1, 2, 0, ...
def test_base64_rows_are_each_rows_standard_base64(dim):
    vectors = np.random.default_rng(dim).standard_normal((5, dim)).astype(np.float32)
    vectors[0, 0] = np.nan
    expected = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
                for row in vectors]
    assert responses.rows(vectors, "base64") == expected
    assert responses.rows(vectors[:, ::-1], "base64")[1:] == [  # not C-contiguous
        base64.b64encode(np.ascontiguousarray(r).astype("<f4").tobytes()).decode()
        for r in vectors[1:, ::-1]]


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_openai_body_is_the_models_body_byte_for_byte(encoding):
    v = _vectors(4, 8, 3)
    old = OpenAIEmbeddingResponse(
        data=[OpenAIEmbedding(index=k, embedding=e) for k, e in enumerate(_old_rows(v, encoding))],
        model="m", usage=OpenAIUsage(prompt_tokens=12, total_tokens=12))
    assert responses.openai_embeddings("m", v, encoding, 12).body == _dumped(
        OpenAIEmbeddingResponse, old)


def test_similarity_body_is_the_models_body_byte_for_byte():
    c = _vectors(3, 5, 4)
    old = SimilarityResponse(model="m", cosine=c.tolist(), logits=(0.5 * c).tolist())
    assert responses.similarity("m", c, 0.5 * c).body == _dumped(SimilarityResponse, old)


@pytest.mark.parametrize("top_k", [None, 1, 3, 50])
def test_classify_body_is_the_models_body_byte_for_byte(top_k):
    labels = ["red", "green", "blue", "a \"quoted\" label", "ünïcode"]
    rng = np.random.default_rng(6)
    probs = rng.random((4, 5)).astype(np.float32)
    probs[1] = probs[1, 0]  # ties keep the labels' order
    probs[2, 3] = np.nan
    cos = _vectors(4, 5, 7)
    k = min(top_k or len(labels), len(labels))
    old = ClassifyResponse(model="m", results=[
        Classification(labels=[LabelScore(label=labels[j], probability=float(p[j]),
                                          cosine=float(c[j]))
                               for j in np.argsort(-p, kind="stable")[:k]])
        for p, c in zip(probs, cos, strict=True)])
    assert responses.classify("m", labels, probs, cos, top_k).body == _dumped(
        ClassifyResponse, old)


def test_float_rows_parse_back_to_the_same_float32():
    v = _vectors(5, 32, 5)
    body = json.loads(responses.embed("m", 32, "float", None, v).body)
    got = np.array([[np.nan if x is None else x for x in img["embedding"]]
                    for img in body["images"]], dtype=np.float32)
    finite = np.isfinite(v)
    assert np.array_equal(got[finite], v[finite])  # exactly, as float32
    assert np.array_equal(np.signbit(got[finite]), np.signbit(v[finite]))  # -0.0 stays


def test_base64_rows_decode_to_the_same_float32_rows():
    v = _vectors(7, 13, 6)  # 52 bytes a row: rows do not fall on base64's 3-byte groups
    rows = responses.rows(v, "base64")
    got = np.stack([np.frombuffer(base64.b64decode(r), "<f4") for r in rows])
    assert got.tobytes() == v.astype("<f4").tobytes()
    strided = v[:, ::2]  # not contiguous: still one row per row
    got = np.stack([np.frombuffer(base64.b64decode(r), "<f4")
                    for r in responses.rows(strided, "base64")])
    assert got.tobytes() == np.ascontiguousarray(strided).tobytes()


# ---- base64 images are decoded in the pool ----

def test_base64_image_decodes_as_the_field_did():
    raw = b"\x89PNG\r\n\x1a\n-some-bytes"
    text = base64.b64encode(raw).decode()
    assert Base64Image(f"  {text}\n").decode(0) == raw
    uri = "data:image/png;base64," + text
    assert Base64Image(uri, uri.index(",") + 1).decode(0) == raw
    with pytest.raises(InvalidRequest, match=r"^image 3: not valid base64$"):
        Base64Image("not base64!!").decode(3)
    with pytest.raises(InvalidRequest, match="image 1: not valid base64"):
        Base64Image("ä" + text).decode(1)
    with pytest.raises(EmptyInput, match="image 2 is empty"):
        Base64Image("data:image/png;base64,", 22).decode(2)


def test_the_loop_only_reads_an_image_fields_prefix():
    text = base64.b64encode(b"x" * 3000).decode()
    src = inputs.image_source("data:image/png;base64," + text, 0)
    assert isinstance(src, Base64Image) and src.text[src.start:] == text
    plain = inputs.image_source(text, 0)
    assert isinstance(plain, Base64Image) and plain.text is text and plain.start == 0
    assert inputs.image_source(" https://example.com/a.png", 0) == "https://example.com/a.png"
    with pytest.raises(InvalidRequest, match="not an image"):
        inputs.image_source("data:text/plain;base64," + text, 0)


def _big_png(pixels: int = 300) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (pixels, pixels, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    return buf.getvalue()  # ~270 kB: incompressible noise


class _Threads:
    """The threads a function ran on, by name of what ran."""

    def __init__(self):
        self.seen: dict[str, set[int]] = {}

    def wrap(self, name: str, fn):
        def recorded(*args, **kwargs):
            self.seen.setdefault(name, set()).add(threading.get_ident())
            return fn(*args, **kwargs)
        return recorded


def test_a_large_base64_image_body_is_decoded_off_the_loop(client, monkeypatch):
    threads = _Threads()
    # image_sources runs on the event loop (load_images calls it there)
    monkeypatch.setattr(inputs, "image_sources", threads.wrap("loop", inputs.image_sources))
    monkeypatch.setattr(Base64Image, "decode", threads.wrap("b64", Base64Image.decode))
    monkeypatch.setattr(routes, "parse_json", threads.wrap("json", routes.parse_json))
    png = _big_png()
    r = client.post("/embed", json={"images": [base64.b64encode(png).decode(),
                                               "data:image/png;base64," + base64.b64encode(png).decode()],
                                    "encoding": "base64"})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2
    (loop,) = threads.seen["loop"]
    assert threads.seen["b64"] and loop not in threads.seen["b64"]
    assert threads.seen["json"] and loop not in threads.seen["json"]


def test_a_small_json_body_is_parsed_on_the_loop(client, monkeypatch):
    threads = _Threads()
    monkeypatch.setattr(inputs, "image_sources", threads.wrap("loop", inputs.image_sources))
    monkeypatch.setattr(routes, "parse_json", threads.wrap("json", routes.parse_json))
    png = base64.b64encode(_big_png(8)).decode()
    assert client.post("/embed", json={"images": [png]}).status_code == 200
    assert threads.seen["json"] == threads.seen["loop"]  # a thread hop would cost more


def test_bad_base64_still_answers_400_naming_the_image(client):
    good = base64.b64encode(_big_png(8)).decode()
    r = client.post("/embed", json={"images": [good, good[:-3] + "!!!"]})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request"
    assert r.json()["error"]["message"] == "image 1: not valid base64"


# ---- JSON request bodies ----

@pytest.mark.parametrize("body", [
    b'{"a": [1, 2.5, -0.0, "\\u00e9", null, true]}',
    b'[NaN, Infinity, 1e400]',  # the stdlib's extensions: orjson refuses, the stdlib reads
    b'"\\ud800"',  # a lone surrogate: the stdlib keeps it (the route's check refuses it)
    '{"x": "é"}'.encode("utf-16"),
    b'{"a": 1, "a": 2}',
])
def test_parse_json_reads_what_the_stdlib_reads(body):
    got, want = routes.parse_json(body), json.loads(body)
    assert json.dumps(got) == json.dumps(want)


@pytest.mark.parametrize("body", [b'{"a": ', b"{'a': 1}", b'\xff\xfe\x00'])
def test_parse_json_fails_as_the_stdlib_fails(body):
    with pytest.raises(Exception) as want:
        json.loads(body)
    with pytest.raises(type(want.value)) as got:
        routes.parse_json(body)
    assert str(got.value) == str(want.value)


def test_an_invalid_json_body_answers_as_before(client):
    r = client.post("/embed", content=b'{"texts": ["a"', headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "JSON decode error" in r.text


@pytest.mark.parametrize("sizes", [[10], [100, 0, 200, 300], [200_000, 0, 200_000, 5]])
def test_a_body_in_chunks_is_read_whole_once(sizes):
    """Small bodies are joined on the loop, large ones in a thread; either way the bytes
    the stream gave, and the same object on a second read."""
    chunks = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    messages.append({"type": "http.request", "body": b"", "more_body": False})

    async def receive():
        return messages.pop(0)

    async def read():
        request = routes._OrjsonRequest({"type": "http", "method": "POST", "headers": []},
                                        receive)
        return await request.body(), await request.body()

    first, again = asyncio.run(read())
    assert first == b"".join(chunks) and again is first
    assert not messages  # the stream was read to its end

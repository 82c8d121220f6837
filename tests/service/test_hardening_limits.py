"""Request limits: the body cap while reading, items, form parts, characters per text,
and one answer for empty inputs (422 invalid_request)."""

from __future__ import annotations

import asyncio
import time

import pytest
from refusals import b64, metric, png, refused, served, serving, tiny_checkpoint

from service.api.middleware import BodyLimit

LIMITS = {"max_body_bytes": 64 * 1024, "max_items_per_request": 8, "max_form_parts": 6,
          "max_text_chars": 300}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with serving(tiny_checkpoint(tmp_path_factory.mktemp("m")), **LIMITS) as c:
        yield c


def test_a_declared_content_length_over_the_cap_is_413(client):
    body = b'{"texts": ["' + b"a" * (70 * 1024) + b'"]}'
    r = refused(client, lambda: client.post(
        "/embed", content=body, headers={"content-type": "application/json"}),
        413, "body_too_large")
    assert "65536" in r.json()["error"]["message"]
    assert metric(client, "clip_requests_total", endpoint="/embed", status="413") >= 1


def test_a_chunked_body_over_the_cap_is_413(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 4096  # no Content-Length: counted as it arrives

    refused(client, lambda: client.post("/embed", content=chunks(),
                                        headers={"content-type": "application/json"}),
            413, "body_too_large")
    files = [("images", (f"{i}.png", b"\0" * 20_000, "image/png")) for i in range(4)]
    refused(client, lambda: client.post("/embed", files=files), 413, "body_too_large")


def test_the_body_cap_stops_reading_at_the_first_byte_past_it():
    """The middleware on its own: a 1 MB chunked body against a 10 kB cap is answered
    after the third 4 kB chunk, and the rest is never pulled from the server."""
    pulled = 0
    sent: list[dict] = []

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        raise AssertionError("the app must not see the whole body")

    async def receive():
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 4096, "more_body": pulled < 256}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/embed", "headers": []}
    asyncio.run(BodyLimit(app, limit=10_000)(scope, receive, send))
    assert pulled == 3
    assert sent[0]["status"] == 413


def test_bodies_under_the_cap_pass(client):
    r = client.post("/embed", json={"texts": ["ok"], "images": [b64(png())]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path, body", [
    ("/embed", {"texts": ["t"] * 5, "images": [b64(png())] * 4}),
    ("/classify", {"images": [b64(png())] * 2, "labels": [f"l{i}" for i in range(7)]}),
    ("/similarity", {"queries": {"texts": ["a"] * 5}, "candidates": {"texts": ["b"] * 4}}),
    ("/v1/embeddings", {"input": ["x"] * 9}),
])
def test_more_items_than_the_cap_is_413(client, path, body):
    refused(client, lambda: client.post(path, json=body), 413, "too_many_items")


def test_too_many_form_parts_is_413(client):
    files = [("images", (f"{i}.png", png(), "image/png")) for i in range(7)]
    refused(client, lambda: client.post("/embed", files=files), 413, "too_many_items")


def test_a_text_over_the_character_cap_is_refused_before_tokenising(client):
    refused(client, lambda: client.post("/embed", json={"texts": ["ok", "w" * 301]}),
            422, "text_too_long")
    refused(client, lambda: client.post(
        "/classify", json={"images": [b64(png())], "labels": ["a", "b" * 301]}),
        422, "text_too_long")
    refused(client, lambda: client.post("/v1/embeddings", json={"input": "z" * 301}),
            422, "text_too_long")


def test_a_one_megabyte_string_is_refused_in_under_100_ms(tmp_path):
    with serving(tiny_checkpoint(tmp_path), max_body_bytes=4 * 2**20) as c:
        body = {"texts": ["megabyte " * 116_509]}  # 1,048,581 characters
        c.post("/embed", json={"texts": ["warm"]})
        start = time.perf_counter()
        r = c.post("/embed", json=body)
        elapsed = time.perf_counter() - start
        assert r.status_code == 422 and r.json()["error"]["type"] == "text_too_long"
        assert "megabyte" not in r.text
        assert elapsed < 0.1, elapsed
        served(c)


@pytest.mark.parametrize("path, body", [
    ("/embed", {}),
    ("/embed", {"texts": [], "images": []}),
    ("/embed", {"texts": [""]}),
    ("/embed", {"images": [""]}),
    ("/embed", {"images": ["data:image/png;base64,"]}),
    ("/classify", {"images": [], "labels": ["a"]}),
    ("/classify", {"images": [b64(png())], "labels": []}),
    ("/classify", {"images": [b64(png())], "labels": [""]}),
    ("/classify", {"images": [b64(png())], "labels": ["a"], "templates": [""]}),
    ("/similarity", {"queries": {"texts": []}, "candidates": {"texts": ["a"]}}),
    ("/similarity", {"queries": {"texts": [""]}, "candidates": {"texts": ["a"]}}),
    ("/v1/embeddings", {"input": []}),
    ("/v1/embeddings", {"input": ""}),
    ("/v1/embeddings", {"input": [""]}),
])
def test_every_empty_input_is_422_invalid_request(client, path, body):
    refused(client, lambda: client.post(path, json=body), 422, "invalid_request")


def test_an_empty_body_and_an_empty_file_are_422_too(client):
    refused(client, lambda: client.post("/embed", content=b"",
                                        headers={"content-type": "application/json"}),
            422, "invalid_request")
    refused(client, lambda: client.post(
        "/embed", files=[("images", ("e.png", b"", "image/png"))]), 422, "invalid_request")

"""The client's calls against a fake server: long lists split within the limits the
server publishes and merged back in order, typed errors, /moderate's body."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from fake_server import DIM, FakeClock, FakeServer, b64, error, vector
from PIL import Image

from clip_client import AsyncClient, Client, errors
from clip_client.wire import Limits, decode_vectors, encode_image, similarity_plan, split


def client(server: FakeServer, **kw) -> Client:
    clock = FakeClock()
    return Client("http://fake", transport=httpx.MockTransport(server), clock=clock,
                  sleep=clock.sleep, random=lambda: 0.5, **kw)


def test_runs_respect_both_the_item_and_the_byte_limit():
    assert split([1] * 10, 4, None) == [range(0, 4), range(4, 8), range(8, 10)]
    assert split([5, 5, 5, 5], None, 10) == [range(0, 2), range(2, 4)]
    # An item larger than the byte budget on its own still goes, alone.
    assert split([3, 20, 3], 10, 10) == [range(0, 1), range(1, 2), range(2, 3)]
    assert split([1, 2, 3], None, None) == [range(0, 3)]
    for sizes in ([7] * 33, list(range(1, 40)), [1, 50, 1, 1, 50]):
        runs = split(sizes, 5, 60)
        assert [i for r in runs for i in r] == list(range(len(sizes)))  # all, in order
        assert all(len(r) <= 5 for r in runs)
        assert all(sum(sizes[i] for i in r) <= 60 or len(r) == 1 for r in runs)


def test_a_long_list_is_split_by_the_server_limits_and_comes_back_in_order():
    server = FakeServer(limits={"max_items_per_request": 4, "max_body_bytes": 1 << 20})
    texts = [f"text {i}" for i in range(10)]
    with client(server, max_concurrency=3) as c:
        got = c.embed_texts(texts)
    assert got.dtype == np.float32 and got.shape == (10, DIM)
    np.testing.assert_array_equal(got, np.stack([vector(t) for t in texts]))
    bodies = server.posts("/embed")
    assert sorted(len(b["texts"]) for b in bodies) == [2, 4, 4]
    assert all(b["encoding"] == "base64" for b in bodies)
    assert [p for p, _ in server.requests].count("/v1/limits") == 1  # read once


def test_the_async_client_splits_and_orders_the_same_way():
    server = FakeServer(limits={"max_items_per_request": 3, "max_body_bytes": 1 << 20})
    texts = [f"t{i}" for i in range(8)]

    async def go():
        clock = FakeClock()
        async with AsyncClient("http://fake", transport=httpx.MockTransport(server),
                               clock=clock, sleep=clock.asleep) as c:
            return await asyncio.gather(c.embed_texts(texts), c.embed_texts(texts[:2]))

    many, few = asyncio.run(go())
    np.testing.assert_array_equal(many, np.stack([vector(t) for t in texts]))
    np.testing.assert_array_equal(few, many[:2])
    assert [p for p, _ in server.requests].count("/v1/limits") == 1


def test_images_are_split_by_body_size_too(tmp_path):
    pngs = []
    for i in range(6):
        buf = io.BytesIO()
        Image.effect_noise((40, 40), 50 + i).save(buf, "PNG")
        pngs.append(buf.getvalue())
    one = len(base64.b64encode(pngs[0]))
    # Room for about two images a body, whatever the item limit says.
    server = FakeServer(limits={"max_items_per_request": 100,
                                "max_body_bytes": 2 * one + 1024 + 200})
    paths = []
    for i, p in enumerate(pngs[:2]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(p)
    inputs = [*paths, pngs[2], Image.open(io.BytesIO(pngs[3])), *pngs[4:]]
    with client(server) as c:
        got = c.embed_images(inputs)
    assert got.shape == (6, DIM)
    bodies = server.posts("/embed")
    assert len(bodies) == 3 and all(len(b["images"]) == 2 for b in bodies)
    sent = [s for b in bodies for s in b["images"]]
    assert [base64.b64decode(s) for s in sent[:3]] == pngs[:3]  # paths and bytes as given
    reread = Image.open(io.BytesIO(base64.b64decode(sent[3])))  # the PIL image, as PNG
    assert np.array_equal(np.asarray(reread), np.asarray(Image.open(io.BytesIO(pngs[3]))))
    np.testing.assert_array_equal(got[0], vector(sent[0]))


def test_an_older_server_without_limits_gets_calls_whole():
    server = FakeServer(limits=None)
    with client(server) as c:
        c.embed_texts([f"x{i}" for i in range(50)])
    assert c.limits() == Limits()
    assert [len(b["texts"]) for b in server.posts("/embed")] == [50]


def test_classify_keeps_room_for_the_labels_and_merges_results():
    def classify(body):
        return httpx.Response(200, json={"model": "fake", "results": [
            {"labels": [{"label": body["labels"][len(s) % 2], "probability": 0.9,
                         "cosine": 0.3},
                        {"label": body["labels"][1 - len(s) % 2], "probability": 0.1,
                         "cosine": 0.1}]} for s in body["images"]]})

    server = FakeServer(limits={"max_items_per_request": 5, "max_body_bytes": 1 << 20},
                        handlers={"/classify": classify})
    images = [b"x" * n for n in range(1, 8)]
    with client(server) as c:
        out = c.classify(images, ["even", "odd"], templates=["{}"], top_k=2)
    bodies = server.posts("/classify")
    # 5 items a request: 2 labels + 1 template leave 2 images each.
    assert [len(b["images"]) for b in bodies] == [2, 2, 2, 1]
    assert all(b["templates"] == ["{}"] and b["top_k"] == 2 for b in bodies)
    want = ["even" if len(encode_image(i)) % 2 == 0 else "odd" for i in images]
    assert [r.top.label for r in out] == want


def test_similarity_splits_into_blocks_of_the_whole_matrix():
    def similarity(body):
        q, c = body["queries"]["texts"], body["candidates"]["texts"]
        cos = [[float(vector(a) @ vector(b)) for b in c] for a in q]
        return httpx.Response(200, json={"model": "fake", "cosine": cos,
                                         "logits": [[100 * x for x in r] for r in cos]})

    server = FakeServer(limits={"max_items_per_request": 6, "max_body_bytes": 1 << 20},
                        handlers={"/similarity": similarity})
    qs, cs = [f"q{i}" for i in range(5)], [f"c{i}" for i in range(7)]
    with client(server) as c:
        got = c.similarity(query_texts=qs, candidate_texts=cs)
    want = np.stack([vector(q) for q in qs]) @ np.stack([vector(x) for x in cs]).T
    np.testing.assert_allclose(got.cosine, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.logits, 100 * want, rtol=1e-5)
    assert all(len(b["queries"]["texts"]) + len(b["candidates"]["texts"]) <= 6
               for b in server.posts("/similarity"))
    # Within the limits, one request.
    plan = similarity_plan(("texts", qs[:2]), ("texts", cs[:3]), Limits(6, 1 << 20), model=None)
    assert len(plan.bodies) == 1


def test_moderate_posts_the_policy_categories_and_base64_images():
    seen = {}

    def moderate(body):
        seen.clear()
        seen.update(body)
        return httpx.Response(200, json={"policy": "strict", "images": [
            {"flagged": False, "categories": {"violence": {"score": 0.01}}}]})

    server = FakeServer(handlers={"/moderate": moderate})
    with client(server) as c:
        out = c.moderate("strict", images=[b"\x89PNG fake"], texts=["hello"],
                         categories=["violence"])
    assert seen == {"policy": "strict", "categories": ["violence"],
                    "images": [base64.b64encode(b"\x89PNG fake").decode()],
                    "texts": ["hello"]}
    assert out["images"][0]["categories"]["violence"]["score"] == 0.01
    with client(FakeServer(handlers={"/moderate": moderate})) as c:
        c.moderate("strict", texts=["only text"])
    assert seen == {"policy": "strict", "texts": ["only text"]}  # nothing not given
    with pytest.raises(ValueError):
        c.moderate("strict")


@pytest.mark.parametrize("status, kind, cls", [
    (422, "text_too_long", errors.TextTooLong),
    (413, "too_many_items", errors.TooManyItems),
    (404, "model_not_found", errors.ModelNotFound),
    (401, "unauthorized", errors.Unauthorized),
    (400, "invalid_image", errors.InvalidImage),
    (500, "internal_error", errors.InternalError),
    (500, "device_failed", errors.DeviceFailed),
    (504, "deadline_exceeded", errors.DeadlineExceeded),
    (418, "something_new", errors.CallerError),  # a type this client does not know yet
    (502, "something_new", errors.ServerFault),
])
def test_errors_are_typed_by_the_server_error_type(status, kind, cls):
    server = FakeServer(script={"/embed": [error(status, kind)]})
    with client(server) as c, pytest.raises(cls) as raised:
        c.embed_texts(["a"])
    assert type(raised.value) is cls
    assert raised.value.status == status and raised.value.type == kind
    assert raised.value.message == f"{kind} here"
    assert len(server.posts("/embed")) == 1  # not retried


def test_an_error_page_that_is_not_json_is_typed_by_status():
    server = FakeServer(script={"/embed": [httpx.Response(502, text="<html>bad gateway")]})
    with client(server) as c, pytest.raises(errors.ServerFault) as raised:
        c.embed_texts(["a"])
    assert raised.value.type == "http_error" and "bad gateway" in raised.value.message


def test_every_error_type_the_server_answers_has_its_class():
    """The client mirrors the server's error types; a new server type fails here."""
    from clip_core.errors import ClipCoreError
    from service.errors import ServiceError

    def subclasses(cls):
        return {cls, *(s for c in cls.__subclasses__() for s in subclasses(c))}

    server_types = {c.error_type for base in (ServiceError, ClipCoreError)
                    for c in subclasses(base)}
    # The HTTP layer's own: validation, unknown routes and methods, not ready.
    server_types |= {"invalid_request", "not_found", "method_not_allowed", "unavailable"}
    assert server_types - errors.BY_TYPE.keys() == set()
    from service.api.errors import STATUS, status_for
    for base in (ServiceError, ClipCoreError):
        for c in subclasses(base):
            status = STATUS[status_for.__globals__["Fault"](c.fault)]
            client_cls = errors.BY_TYPE[c.error_type]
            if status in (429, 503):
                assert issubclass(client_cls, errors.RetryableError), c
            elif status >= 500:
                assert issubclass(client_cls, errors.ServerFault), c
            else:
                assert issubclass(client_cls, errors.CallerError), c


def test_vectors_decode_from_base64_or_floats():
    v = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    np.testing.assert_array_equal(decode_vectors([{"embedding": b64(r)} for r in v]), v)
    np.testing.assert_array_equal(decode_vectors([{"embedding": r.tolist()} for r in v]), v)


def test_the_key_is_sent_as_a_bearer_token():
    seen = []

    def handler(request):
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"object": "list", "data": []})

    with Client("http://fake", api_key="k" * 20, transport=httpx.MockTransport(handler)) as c:
        assert c.models() == []
    assert seen == ["Bearer " + "k" * 20]

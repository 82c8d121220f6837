"""Retries of 429 and 503 on a fake clock: Retry-After honoured with jitter, backoff
without it, the call's deadline, and nothing else retried."""

from __future__ import annotations

import asyncio
import random

import httpx
import numpy as np
import pytest
from fake_server import FakeClock, FakeServer, error, vector

from clip_client import AsyncClient, Client, RetryPolicy, errors
from clip_client.retry import parse_retry_after


def test_the_policy_waits_retry_after_stretched_by_jitter():
    p = RetryPolicy(jitter=0.25)
    assert p.delay(0, 503, 2.0, now=0, deadline=100, random=lambda: 0.0) == 2.0
    assert p.delay(0, 503, 2.0, now=0, deadline=100, random=lambda: 1.0) == 2.5
    rng = random.Random(7)
    waits = [p.delay(0, 429, 4.0, 0, 100, rng.random) for _ in range(200)]
    assert all(w is not None and 4.0 <= w <= 5.0 for w in waits)
    assert len(set(waits)) > 100  # spread out, not in lock step


def test_without_retry_after_the_backoff_doubles_within_its_cap():
    p = RetryPolicy(backoff_s=0.5, max_backoff_s=3.0, max_attempts=20)
    top = [p.delay(a, 503, None, 0, 1e9, lambda: 1.0) for a in range(6)]
    assert top == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert p.delay(2, 503, None, 0, 1e9, lambda: 0.25) == 0.5  # full jitter: U(0, 2)


def test_the_policy_gives_up_at_the_deadline_the_attempt_cap_and_other_statuses():
    p = RetryPolicy(max_attempts=3)
    assert p.delay(0, 503, 5.0, now=10, deadline=15, random=lambda: 0.0) is None
    assert p.delay(0, 503, 5.0, now=10, deadline=15.01, random=lambda: 0.0) == 5.0
    assert p.delay(2, 503, 1.0, 0, 100, lambda: 0.0) is None  # a third retry: no
    for status in (400, 413, 500, 504):
        assert p.delay(0, status, 1.0, 0, 100, lambda: 0.0) is None


def test_retry_after_reads_seconds_and_http_dates():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT",
                             now_epoch=lambda: 1445412480.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def _client(server, clock, **kw):
    return Client("http://fake", transport=httpx.MockTransport(server), clock=clock,
                  sleep=clock.sleep, random=lambda: 0.5, **kw)


def test_refused_chunks_are_retried_after_retry_after_and_the_call_succeeds():
    server = FakeServer(limits={"max_items_per_request": 2, "max_body_bytes": 1 << 20},
                        script={"/embed": [error(503, "overloaded", "2"),
                                           error(429, "rate_limited", "1"),
                                           error(503, "overloaded", None)]})
    clock = FakeClock()
    texts = ["a", "b", "c", "d", "e"]
    with _client(server, clock, max_concurrency=1, retry=RetryPolicy(jitter=0.2,
                                                                     backoff_s=0.5)) as c:
        got = c.embed_texts(texts)
    np.testing.assert_array_equal(got, np.stack([vector(t) for t in texts]))
    # 2 s and 1 s stretched by 0.2 x 0.5; then no header: U(0, 0.5 x 2^2) at 0.5.
    assert clock.sleeps == pytest.approx([2.2, 1.1, 1.0])
    assert len(server.posts("/embed")) == 3 + 3


def test_a_retry_that_cannot_start_before_the_deadline_raises_the_typed_error():
    server = FakeServer(script={"/embed": [error(503, "overloaded", "5")] * 10})
    clock = FakeClock()
    with _client(server, clock, retry=RetryPolicy(deadline_s=12.0, jitter=0.0)) as c, \
            pytest.raises(errors.Overloaded) as raised:
        c.embed_texts(["a"])
    assert clock.sleeps == [5.0, 5.0]  # a third wait would end past 12 s
    assert raised.value.retry_after == 5.0 and raised.value.status == 503


def test_the_async_client_retries_on_its_injected_sleep():
    server = FakeServer(script={"/embed": [error(429, "rate_limited", "3")]})
    clock = FakeClock()

    async def go():
        async with AsyncClient("http://fake", transport=httpx.MockTransport(server),
                               clock=clock, sleep=clock.asleep, random=lambda: 0.0) as c:
            return await c.embed_texts(["x"])

    np.testing.assert_array_equal(asyncio.run(go()), vector("x")[None])
    assert clock.sleeps == [3.0]


def test_one_failing_chunk_fails_the_call_with_its_error():
    server = FakeServer(limits={"max_items_per_request": 1, "max_body_bytes": 1 << 20},
                        script={"/embed": [error(422, "text_too_long")]})
    with _client(server, FakeClock(), max_concurrency=1) as c, \
            pytest.raises(errors.TextTooLong):
        c.embed_texts(["a", "b", "c"])


def test_the_async_client_cancels_the_other_chunks_when_one_fails():
    server = FakeServer(limits={"max_items_per_request": 1, "max_body_bytes": 1 << 20},
                        script={"/embed": [error(413, "too_many_items")]})

    async def handler(request):
        await asyncio.sleep(0)  # a request takes a turn of the loop, as on a socket
        return server(request)

    async def go():
        async with AsyncClient("http://fake", transport=httpx.MockTransport(handler),
                               max_concurrency=1) as c:
            with pytest.raises(errors.TooManyItems):
                await c.embed_texts(["a", "b", "c", "d"])
            return asyncio.all_tasks()

    left = asyncio.run(go())
    assert len(left) == 1  # only the test's own task: no chunk left running
    assert len(server.posts("/embed")) < 4  # the rest never went out

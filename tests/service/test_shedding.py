"""Shedding load: refusals decided from the headers, paced, and only for what would wait
past the bound. Fake clocks and controlled sleeps: nothing here waits on the wall clock."""

from __future__ import annotations

import asyncio
import types
from types import SimpleNamespace

import pytest
from fake_backend import FakeClock
from fastapi.testclient import TestClient
from refusals import b64, metric, png, tiny_checkpoint

from service.api.errors import answer
from service.api.shedding import ROUTE_KINDS, Pacing, Shedding, early_refusal
from service.app import create_app
from service.batcher import BatcherConfig, Request, WorkItem
from service.dispatch import Batch, Dispatcher
from service.errors import Overloaded
from service.settings import Settings

# ---- the policy, pure ----


def test_pacing_holds_for_the_delay_at_most_the_retry_after_and_at_most_max_held():
    pacing = Pacing(delay_s=0.5, max_held=2)
    assert pacing.hold(3.0) == 0.5
    assert pacing.hold(0.2) == 0.2  # never past what the answer itself says
    assert pacing.held == 2
    assert pacing.hold(3.0) == 0.0 and pacing.held == 2  # full: answered at once
    pacing.release()
    assert pacing.hold(3.0) == 0.5
    assert Pacing(delay_s=None, max_held=8).hold(3.0) == 0.0


def test_early_refusal_needs_every_kind_the_route_may_carry_refused():
    image_only = {"image": Overloaded(4.0), "text": None}
    assert early_refusal(("image", "text"), image_only.get) is None
    assert early_refusal(("image",), image_only.get).retry_after == 4.0
    both = {"image": Overloaded(4.0), "text": Overloaded(2.0)}
    assert early_refusal(("image", "text"), both.get).retry_after == 2.0  # the soonest
    assert ROUTE_KINDS["/classify"] == ("image",)


def test_every_route_that_takes_work_can_be_refused_from_its_headers():
    # A new inference route left out of ROUTE_KINDS would read and parse every body a
    # retry storm sends before refusing it.
    app = create_app(Settings(log_format="text"))
    posts = {path for path, ops in app.openapi()["paths"].items() if "post" in ops}
    assert posts == set(ROUTE_KINDS)


def test_the_dispatcher_answers_whether_a_request_would_be_refused_without_admitting_it():
    d = Dispatcher(BatcherConfig(max_batch_size=10, max_queue_wait_s=1.5), name="m",
                   release_hook=None, clock=FakeClock(100.0))
    d.started()
    d.warmed()
    for _ in range(5):
        d.admission.costs.observe("image", 4, 0.4)
        d.admission.costs.observe("image", 8, 0.8)
    assert d.overloaded("image", 1) is None  # nothing outstanding: never refused
    req = Request("r", "image", None, [None] * 10, 10)
    items = [WorkItem(i, req, i, "image", i, 1, 200.0, 100.0) for i in range(10)]
    d.admit(req, items)
    assert isinstance(d.next_step(0, 0), Batch)
    refusal = d.overloaded("image", 1)  # 1 s of work ahead + a full 1 s batch > 1.5 s
    assert refusal is not None and refusal.retry_after == pytest.approx(1.0)
    assert d.queue.outstanding == 10  # asking reserved nothing
    assert d.overloaded("text", 1) is None  # texts wait for one image batch, not a backlog


# ---- the middleware, on a stub app ----


class _Models(dict):
    """One loaded model, none failed: what `ServedModels` shows the middleware."""

    unavailable = types.MappingProxyType({})


def _scope(path: str, overloaded) -> dict:
    worker = SimpleNamespace(overloaded=overloaded)
    models = _Models(tiny=SimpleNamespace(worker=worker))
    app = SimpleNamespace(state=SimpleNamespace(engine=SimpleNamespace(models=models),
                                                metrics=None))
    return {"type": "http", "method": "POST", "path": path, "headers": [], "app": app}


class _Gate:
    """A sleep that returns when the test says so, recording what was asked."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.open = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        await self.open.wait()


async def _call(mw: Shedding, scope: dict) -> list[dict]:
    """The messages sent; `scope["reads"]`: how often the body was asked for."""
    sent: list[dict] = []
    reads = 0

    async def receive() -> dict:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await mw(scope, receive, send)
    scope["reads"] = reads
    return sent


async def _never_called(scope, receive, send) -> None:
    raise AssertionError("the app ran")


def test_held_refusals_are_bounded_and_the_rest_answered_at_once():
    async def go() -> None:
        gate = _Gate()
        mw = Shedding(_never_called, delay_s=0.5, max_held=2, sleep=gate)
        refuse = {"image": Overloaded(3.0)}.get
        scopes = [_scope("/classify", refuse) for _ in range(3)]
        held = [asyncio.ensure_future(_call(mw, scope)) for scope in scopes[:2]]
        await asyncio.sleep(0)
        assert mw.pacing.held == 2 and gate.asked == [0.5, 0.5]
        assert not any(t.done() for t in held)
        at_once = await _call(mw, scopes[2])  # the gate is still shut
        assert at_once[0]["status"] == 503
        gate.open.set()
        for t in held:
            sent = await t
            assert sent[0]["status"] == 503
            assert (b"retry-after", b"3") in sent[0]["headers"]
        assert mw.pacing.held == 0
        assert [s["reads"] for s in scopes] == [0, 0, 0]

    asyncio.run(go())


def test_a_refusal_from_the_route_is_paced_too():
    async def route(scope, receive, send) -> None:
        await receive()
        await answer(scope, Overloaded(0.25))(scope, receive, send)

    async def go() -> None:
        gate = _Gate()
        gate.open.set()
        mw = Shedding(route, delay_s=0.5, max_held=4, sleep=gate)
        # /embed with texts admitted: not refused early, so the route reads and refuses.
        scope = _scope("/embed", {"image": Overloaded(3.0)}.get)
        sent = await _call(mw, scope)
        assert sent[0]["status"] == 503 and gate.asked == [0.25]
        assert scope["reads"] == 1

    asyncio.run(go())


# ---- through the whole app ----


class _ReceiveSpy:
    """Wraps the app: counts the calls to `receive` of each HTTP request."""

    def __init__(self, app) -> None:
        self.app = app
        self.reads = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def spy():
            self.reads += 1
            return await receive()

        await self.app(scope, spy, send)


def test_an_overloaded_model_answers_from_the_headers_and_reads_no_body(tmp_path):
    app = create_app(Settings(models=[str(tiny_checkpoint(tmp_path))], log_format="text",
                              refusal_delay_s=None))
    spy = _ReceiveSpy(app)
    with TestClient(spy, raise_server_exceptions=False) as client:
        (model,) = app.state.engine.models.values()
        dispatcher = model.worker.workers[0].dispatcher
        image = {"images": [b64(png())], "labels": ["a", "b"]}
        r = client.post("/classify", json=image)
        assert r.status_code == 200, r.text  # under the bound: admitted, body read
        assert spy.reads > 0

        dispatcher.overloaded = lambda kind, n: Overloaded(7.0) if kind == "image" else None
        before = metric(client, "clip_errors_total", type="overloaded")
        spy.reads = 0
        r = client.post("/classify", json=image)
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["type"] == "overloaded"
        assert spy.reads == 0  # refused from the headers
        assert metric(client, "clip_errors_total", type="overloaded") == before + 1
        # /embed may carry texts, which the images' backlog does not hold up.
        r = client.post("/embed", json={"texts": ["still answering"]})
        assert r.status_code == 200, r.text
        assert spy.reads > 0

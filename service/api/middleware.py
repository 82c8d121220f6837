"""ASGI middleware for the request lifecycle: draining, in-flight counting, disconnects.

Pure ASGI (not BaseHTTPMiddleware) because it must see the raw `receive` channel: once a
request body has been read, the next message a server sends is `http.disconnect`, and
that is how we learn a caller went away while its items still wait for the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import Draining
from ..metrics import Metrics
from .errors import to_response

log = logging.getLogger(__name__)

# Paths that keep answering while draining: probes must see the drain, metrics its end.
_ALWAYS_OPEN = ("/healthz", "/readyz", "/metrics")


class Lifecycle:
    """Whether the app takes new requests, and how many it is still answering."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


class RequestLifecycle:
    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, metrics: Metrics):
        self.app = app
        self.lifecycle = lifecycle
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _ALWAYS_OPEN:
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            response = to_response(Draining("the server is shutting down; retry elsewhere"))
            await response(scope, receive, send)
            return

        body_read = asyncio.Event()
        finished = False

        async def receive_body() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read.set()
            return message

        async def send_tracking(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        self.lifecycle.enter()
        handler = asyncio.ensure_future(self.app(scope, receive_body, send_tracking))
        gone = False

        async def watch_disconnect() -> None:
            nonlocal gone
            await body_read.wait()
            message = await receive()
            if message["type"] == "http.disconnect" and not finished:
                gone = True
                handler.cancel()

        watcher = asyncio.ensure_future(watch_disconnect())
        start = time.perf_counter()
        try:
            await handler
        except asyncio.CancelledError:
            if not gone:
                raise
            # Nobody is left to answer; the worker has already dropped the queued items.
            log.info("client left %s after %.3f s", scope["path"], time.perf_counter() - start)
            self.metrics.requests.labels(scope["path"], "", "499").inc()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self.lifecycle.leave()

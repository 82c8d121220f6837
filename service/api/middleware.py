"""ASGI middleware for the request lifecycle: draining, in-flight counting, disconnects;
and the body size cap, enforced while the body arrives.

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

from ..errors import BodyTooLarge, Draining
from ..metrics import Metrics
from .errors import answer, status_for

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
            response = answer(scope, Draining("the server is shutting down; retry elsewhere"))
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


class RequestMetrics:
    """Counts each answered request by route template, model and status, and its latency.

    Route templates, not raw paths, so unknown URLs cannot grow the label set; a request
    refused before routing (body cap, access) still has a known path. Probes and /metrics
    are not counted, nor a request whose caller left (RequestLifecycle counts that, 499).
    """

    _UNCOUNTED = frozenset(_ALWAYS_OPEN)

    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.known = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._UNCOUNTED:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status, _ = status_for(RuntimeError())  # what an app that raises answers

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception as e:
            self._count(scope, status_for(e)[0], start)
            raise
        self._count(scope, status, start)

    def _count(self, scope: Scope, status: int, start: float) -> None:
        route = scope.get("route")
        path = scope["path"]
        endpoint = getattr(route, "path", None) or (path if path in self.known else "unmatched")
        model = scope.get("state", {}).get("model", "") or ""
        self.metrics.requests.labels(endpoint, model, str(status)).inc()
        self.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - start)


class _Overflow(Exception):
    """Raised into the app from `receive` when the body passes the cap."""


class BodyLimit:
    """413 for a body over `limit` bytes, before it is buffered whole.

    A declared Content-Length over the limit is refused before a byte is read. A chunked
    (or understated) body is counted as it arrives; at the first byte past the limit,
    `receive` raises into the app, whatever the app then answers is replaced by the 413,
    and the rest of the body is never read.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = BodyTooLarge(f"the request body is over {self.limit} bytes")
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await answer(scope, error)(scope, receive, send)
                return

        seen = 0
        overflowed = False
        started = False

        async def counting_receive() -> Message:
            nonlocal seen, overflowed
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    overflowed = True
                    scope["clip.body_overflow"] = True  # the app's answer is not counted
                    raise _Overflow
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if overflowed:
                return  # the app's answer to the exception; ours goes instead
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not overflowed:
                raise
        if overflowed and not started:
            del scope["clip.body_overflow"]
            await answer(scope, error)(scope, receive, send)

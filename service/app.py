"""`create_app(settings)`: the FastAPI application, its lifespan and middleware."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .api import errors
from .api.access import Access
from .api.info import info
from .api.middleware import BodyLimit, Lifecycle, RequestLifecycle, RequestMetrics
from .api.moderation import moderation as moderation_routes
from .api.playground import Playground
from .api.routes import health, inference
from .api.shedding import Shedding
from .core import Engine
from .metrics import Metrics
from .moderation import Moderation
from .ratelimit import RateLimiter
from .settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics(multiprocess=settings.processes > 1)
    lifecycle = Lifecycle()
    metrics.count_in_flight(lambda: lifecycle.inflight)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = Engine(settings, metrics)
        metrics.on_scrape(engine.models.refresh_gauges)
        app.state.engine = engine
        # The moderation policies (CLIP_POLICIES), checked against the served models.
        app.state.moderation = moderation = Moderation(settings, engine, metrics)
        app.state.startup_error = None
        try:
            try:
                moderation.read()  # a bad policy file fails before the models load
                await engine.start()
                await moderation.start()
            except Exception as e:
                # One line that says what to fix; clip-serve sees it and exits non-zero.
                # A failed warm-up says why in its cause, logged by the worker.
                log.error("cannot start: %s", e)
                app.state.startup_error = str(e)
            yield
        finally:
            await drain(app, settings.drain_timeout_s)

    app = FastAPI(
        title="clip-server",
        summary="CLIP embeddings, zero-shot labels and image-text similarity",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    errors.install(app)
    app.include_router(inference)
    app.include_router(health)
    app.include_router(moderation_routes)
    app.include_router(info)

    # Outermost last: CORS, lifecycle, request metrics, access, shedding, body cap, the
    # routes. Shedding after access: a caller without a valid key learns nothing of load.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Shedding, delay_s=settings.refusal_delay_s,
                       max_held=settings.max_held_refusals)
    limiter = (RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
               if settings.rate_limit_per_s is not None else None)
    app.add_middleware(Access, keys=settings.api_keys, metrics_auth=settings.metrics_auth,
                       limiter=limiter)
    if settings.playground:  # outside Access: the page asks for the key its calls send
        app.add_middleware(Playground)

    routers = (inference, health, moderation_routes, info)
    paths = (getattr(r, "path", None) for router in routers for r in router.routes)
    known = frozenset(p for p in paths if isinstance(p, str))
    # Pure ASGI middleware throughout: Starlette's BaseHTTPMiddleware runs each request in
    # an extra task and re-streams its response, a cost paid on every small request.
    app.add_middleware(RequestMetrics, metrics=metrics, known_paths=known)
    app.add_middleware(RequestLifecycle, lifecycle=lifecycle, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Timeout"],
            max_age=600,
        )
    return app


async def drain(app: FastAPI, timeout: float) -> bool:
    """Readiness off and new requests refused at once; answer the accepted ones within
    `timeout`; then stop the workers. True when nothing accepted was cut short."""
    end = time.monotonic() + timeout
    lifecycle: Lifecycle = app.state.lifecycle
    lifecycle.draining = True
    engine: Engine | None = getattr(app.state, "engine", None)
    if engine is not None:
        engine.models.stop_admitting()
    answered = await lifecycle.wait_idle(max(0.0, end - time.monotonic()))
    if engine is not None:
        await engine.drain(max(0.0, end - time.monotonic()))
    return answered

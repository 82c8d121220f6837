"""Shedding load without starving the model: refuse before the body, and pace refusals.

A refusal costs little (admission runs before images are decoded), but callers that
retry a 503 at once send hundreds a second, and each one still pays for reading and
parsing its body. Two levers, as pure ASGI middleware (`Shedding`), after access checks:

- **Refuse before reading the body.** For a POST to an inference route, when every kind
  of input that route's body may carry (`ROUTE_KINDS`) would be refused now for
  overload, the request is answered 503 + Retry-After from its headers; its body is
  never read (uvicorn discards it and keeps the connection open). A route that takes
  texts or images is refused early only when both would be: the kind is in the body,
  and a text is not held up by an image backlog (it waits for one image batch, not for
  all of them), so refusing it on the images' account would refuse what the bound lets
  in. Early refusal applies when one model is served: the model a body names is not
  known either, and with one model any other name is refused anyway.
- **Pace refusals.** Every overload refusal, early or from the route, is held
  `delay_s` (at most its Retry-After) before it is answered, so a caller spinning on
  503 sends a couple a second, not hundreds. Holding is an asyncio sleep: a coroutine
  and an open connection, no thread. At most `max_held` are held at once; the next
  are answered at once.

`early_refusal` and `Pacing` are the policy, pure; the middleware applies it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..batcher import Kind
from ..errors import Overloaded
from .errors import answer

# The kinds of input each inference route's body may carry. /classify embeds images
# (its labels' classifier is built from texts once per label set, then cached).
ROUTE_KINDS: dict[str, tuple[Kind, ...]] = {
    "/embed": ("image", "text"),
    "/classify": ("image",),
    "/similarity": ("image", "text"),
    "/v1/embeddings": ("image", "text"),
    "/moderate": ("image", "text"),
}


def early_refusal(kinds: Iterable[Kind],
                  overloaded: Callable[[Kind], Overloaded | None]) -> Overloaded | None:
    """The refusal for a request that may carry any of `kinds`, when each of them would be
    refused now (`overloaded(kind)`); the soonest Retry-After among them. Else None."""
    refusals = []
    for kind in kinds:
        refusal = overloaded(kind)
        if refusal is None:
            return None
        refusals.append(refusal)
    return min(refusals, key=lambda r: r.retry_after) if refusals else None


@dataclass
class Pacing:
    """How long to hold an overload refusal before answering it, with at most `max_held`
    held at once. `hold` counts a held refusal in; `release` counts it out."""

    delay_s: float | None
    max_held: int
    held: int = 0

    def hold(self, retry_after_s: float) -> float:
        """Seconds to hold a refusal that says `retry_after_s`; 0: answer at once (not
        counted as held)."""
        if not self.delay_s or self.held >= self.max_held:
            return 0.0
        self.held += 1
        return min(self.delay_s, retry_after_s)

    def release(self) -> None:
        self.held -= 1


class Shedding:
    """Early refusals and paced overload answers; see the module.

    `sleep` is how a refusal is held (asyncio.sleep; tests pass one they control).
    """

    def __init__(self, app: ASGIApp, *, delay_s: float | None, max_held: int,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.app = app
        self.pacing = Pacing(delay_s, max_held)
        self._sleep = sleep

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kinds = ROUTE_KINDS.get(scope["path"]) if scope["type"] == "http" else None
        if kinds is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        served = _single_model(scope)
        refusal = early_refusal(kinds, served[1].overloaded) if served is not None else None
        if refusal is not None:
            scope.setdefault("state", {})["model"] = served[0]
            response = answer(scope, refusal)
            await self._held(refusal)
            await response(scope, receive, send)
            return

        async def paced_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                refused = scope.get("clip.overloaded")  # set by errors.answer
                if refused is not None:
                    await self._held(refused)
            await send(message)

        await self.app(scope, receive, paced_send)

    async def _held(self, refusal: Overloaded) -> None:
        delay = self.pacing.hold(refusal.retry_after)
        if not delay:
            return
        try:
            await self._sleep(delay)
        finally:
            self.pacing.release()


def _single_model(scope: Scope):
    """(name, its Replicas) when the app serves exactly one model and nothing failed to
    load; else None (no early refusal)."""
    app = scope.get("app")
    engine = getattr(getattr(app, "state", None), "engine", None)
    if engine is None:
        return None
    models = engine.models
    if len(models) != 1 or models.unavailable:
        return None
    (name, model), = models.items()
    return name, model.worker

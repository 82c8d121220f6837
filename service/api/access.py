"""API keys and per-key rate limits, as pure ASGI middleware in front of every route.

With keys configured, a request needs `Authorization: Bearer <key>`; the presented key
is compared with every configured key in constant time (SHA-256 digests, so length
leaks nothing either). Probes stay open, and so do the API's description and /metrics
unless `metrics_auth`. Keys are never logged; a key is named by its id, the first 8 hex
digits of its SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import RateLimited, Unauthorized
from ..ratelimit import RateLimiter
from .errors import answer

log = logging.getLogger(__name__)

_OPEN = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc",
                   "/openapi.json"})


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class Access:
    def __init__(self, app: ASGIApp, keys: list[SecretStr], *, metrics_auth: bool = False,
                 limiter: RateLimiter | None = None):
        self.app = app
        self._digests = [(hashlib.sha256(k.get_secret_value().encode()).digest(),
                          key_id(k.get_secret_value())) for k in keys]
        self._open = _OPEN if metrics_auth else _OPEN | {"/metrics"}
        self._limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self._digests or scope["path"] in self._open
                or scope["method"] == "OPTIONS"):  # CORS preflights carry no credentials
            await self.app(scope, receive, send)
            return
        presented = _bearer(scope)
        who = self._identify(presented) if presented is not None else None
        if who is None:
            await answer(scope, Unauthorized(presented is not None))(scope, receive, send)
            return
        scope.setdefault("state", {})["key_id"] = who
        if self._limiter is not None:
            wait = self._limiter.take(who)
            if wait > 0:
                await answer(scope, RateLimited(wait))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _identify(self, presented: str) -> str | None:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for known, ident in self._digests:  # every key compared: time does not say which
            if hmac.compare_digest(digest, known):
                found = ident
        return found


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""  # presented, but not a bearer token
    return None

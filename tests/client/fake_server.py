"""A scripted stand-in for the server behind httpx.MockTransport, and a fake clock whose
sleeps only move time forward: the client's splitting and retries, tested without
sockets or waiting."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np

DIM = 8


def vector(text: str) -> np.ndarray:
    """A unit vector that depends only on the text: the fake model."""
    rng = np.random.default_rng(list(text.encode()) or [0])
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def b64(v: np.ndarray) -> str:
    return base64.b64encode(v.astype("<f4").tobytes()).decode()


def error(status: int, kind: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, headers=headers,
                          json={"error": {"type": kind, "message": f"{kind} here"}})


@dataclass
class FakeServer:
    """Answers /v1/limits with `limits` and /embed with `vector` of each item; `script`
    (path -> responses) is answered first, one per request, before the normal answer."""

    limits: dict | None = field(default_factory=lambda: {"max_items_per_request": 4,
                                                         "max_body_bytes": 1 << 20})
    script: dict[str, list[httpx.Response]] = field(default_factory=dict)
    requests: list[tuple[str, dict | None]] = field(default_factory=list)
    handlers: dict[str, Callable[[dict], httpx.Response]] = field(default_factory=dict)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        self.requests.append((path, body))
        if self.script.get(path):
            return self.script[path].pop(0)
        if path == "/v1/limits":
            return (httpx.Response(200, json=self.limits) if self.limits is not None
                    else error(404, "not_found"))
        if path in self.handlers:
            return self.handlers[path](body)
        if path == "/embed":
            kind = "texts" if body.get("texts") else "images"
            rows = [{"embedding": b64(vector(x))} for x in body[kind]]
            return httpx.Response(200, json={"model": "fake", "dimension": DIM,
                                             "encoding": "base64", "texts": [], "images": [],
                                             kind: rows})
        return error(404, "not_found")

    def posts(self, path: str) -> list[dict]:
        return [b for p, b in self.requests if p == path and b is not None]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    async def asleep(self, s: float) -> None:
        self.sleep(s)

"""The event loop's CPU per request item, in process: no server, no sockets, no load tool.

The real app (`create_app`, its middleware, routes and engine) answers pre-built ASGI
requests one at a time on this thread's event loop; `time.thread_time()` around them is
the CPU the loop itself spent, while the decode pool and the model's serving threads
spend theirs elsewhere. The model is the built-in one with `ClipBackend.run` replaced by a
lookup of fixed random (E,) rows, E = 512 as ViT-B/32's, so answers are sized as in
production and cost no compute. Texts differ between requests (the text cache would
otherwise answer them without the worker).

Cases (per request): 64 JPEGs (each ~100 kB, like a 640x480 photo, but 64x64 pixels plus
a comment segment, so that the pool's decoding stays cheap while the body is as large as
a real one) as multipart file parts to /embed (base64 out; the body in one ASGI message,
as an in-process client sends it, or in 256 KiB messages, as uvicorn hands on a socket's),
as JSON base64 to /classify (3 labels) and to /embed; 64 texts, 1 text; /embed with float
and base64 output.

    python loadtests/loop_costs.py [--requests 30] [--only multipart] [--json]

It uses only `create_app` and `Settings`, so the same file measures an older commit:
copy it into a worktree of that commit and run it there.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

E = 512
IMAGES = 64
IMAGE_BYTES = 100_000


def _jpeg(i: int) -> bytes:
    """A 64x64 JPEG padded with a COM segment to about IMAGE_BYTES."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (i % 256, 80, 160)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    pad = b""
    while len(data) + len(pad) < IMAGE_BYTES:  # COM segments hold at most 65,533 bytes
        chunk = min(65_533, IMAGE_BYTES - len(data) - len(pad))
        pad += b"\xff\xfe" + (chunk + 2).to_bytes(2, "big") + bytes([i % 251]) * chunk
    return data[:2] + pad + data[2:]  # after SOI


def _null_run(self, kind, payloads):
    rows = _ROWS[len(payloads) % len(_ROWS):] if kind == "text" else _ROWS
    return [rows[i % len(rows)] for i in range(len(payloads))]


_ROWS = list(np.random.default_rng(0).standard_normal((256, E), dtype=np.float32))


class AsgiCaller:
    """Sends one request through the app's ASGI callable and collects the answer."""

    def __init__(self, app):
        self.app = app

    async def post(self, path: str, body: bytes | list[bytes],
                   content_type: str) -> tuple[int, bytes]:
        """One request; its body in one ASGI message, or a list: one message each, as a
        server reading a socket hands it on (cut beforehand: the cutting is no loop cost)."""
        size = len(body) if isinstance(body, bytes) else sum(len(p) for p in body)
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", content_type.encode()),
                        (b"content-length", str(size).encode())],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
            "state": dict(self.state),
        }
        pieces = list(reversed(body)) if isinstance(body, list) else [body]
        done = asyncio.Event()

        async def receive():
            if pieces:
                piece = pieces.pop()
                return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
            await done.wait()
            return {"type": "http.disconnect"}

        status, chunks = 0, []

        async def send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    done.set()

        await self.app(scope, receive, send)
        done.set()
        return status, b"".join(chunks)

    async def startup(self) -> None:
        self.state: dict = {}
        self._events: asyncio.Queue = asyncio.Queue()
        started = asyncio.get_running_loop().create_future()
        self._events.put_nowait({"type": "lifespan.startup"})

        async def receive():
            return await self._events.get()

        async def send(message):
            if message["type"].startswith("lifespan.startup") and not started.done():
                started.set_result(message)
            if message["type"].startswith("lifespan.shutdown"):
                self._shut.set()

        self._shut = asyncio.Event()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": self.state}
        self._task = asyncio.ensure_future(self.app(scope, receive, send))
        message = await started
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"startup failed: {message}")

    async def shutdown(self) -> None:
        self._events.put_nowait({"type": "lifespan.shutdown"})
        await self._shut.wait()
        await self._task


BOUNDARY = "loopcosts7d1f0a9e"
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
UVICORN_CHUNK = 256 * 1024  # about what uvicorn hands the app per receive() on a fast socket


def _multipart(images: list[bytes], fields: dict[str, str]) -> bytes:
    """Each image a JPEG file part in `images`, then the text fields, as a browser sends."""
    out = []
    for i, data in enumerate(images):
        out.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; '
                   f'filename="{i}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode())
        out += [data, b"\r\n"]
    for name, value in fields.items():
        out.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                   f'{value}\r\n'.encode())
    out.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(out)


def _cut(body: bytes, size: int) -> list[bytes]:
    return [body[i:i + size] for i in range(0, len(body), size)] or [b""]


@dataclass
class Case:
    name: str
    items: int
    path: str
    body: Callable[[int], bytes]  # request number -> body
    content_type: str = "application/json"
    chunk: int | None = None  # None: the body in one ASGI message


def _cases(jpegs: list[bytes]):
    images_b64 = [base64.b64encode(j).decode() for j in jpegs]

    def texts(n: int, r: int) -> list[str]:
        return [f"a photo of thing {r} number {i}" for i in range(n)]

    def as_json(make):
        return lambda r: json.dumps(make(r)).encode()

    form = _multipart(jpegs, {"encoding": "base64"})
    for chunk, how in ((None, "one message"), (UVICORN_CHUNK, "256 KiB chunks")):
        yield Case(f"64 images multipart, base64 out, {how}", IMAGES, "/embed",
                   lambda r: form, FORM_TYPE, chunk)
    yield Case("64 images JSON base64, /classify", IMAGES, "/classify",
               as_json(lambda r: {"images": images_b64, "labels": ["red", "green", "blue"]}))
    for enc in ("float", "base64"):
        yield Case(f"64 images JSON base64, {enc} out", IMAGES, "/embed",
                   as_json(lambda r, enc=enc: {"images": images_b64, "encoding": enc}))
        yield Case(f"64 texts, {enc} out", 64, "/embed",
                   as_json(lambda r, enc=enc: {"texts": texts(64, r), "encoding": enc}))
        yield Case(f"1 text, {enc} out", 1, "/embed",
                   as_json(lambda r, enc=enc: {"texts": texts(1, r), "encoding": enc}))


async def measure(requests: int, only: str = "") -> list[dict]:
    from service.app import create_app
    from service.backend import ClipBackend
    from service.settings import Settings

    ClipBackend.run = _null_run  # type: ignore[method-assign]
    app = create_app(Settings(models=["builtin/clip-shapes"], log_format="text",
                              cache_size=0, max_items_per_request=256))
    caller = AsgiCaller(app)
    await caller.startup()
    rows = []
    try:
        for case in _cases([_jpeg(i) for i in range(IMAGES)]):
            if only not in case.name:
                continue
            bodies = [case.body(r) for r in range(requests + 3)]
            per_request = []
            for r, body in enumerate(bodies):
                sent = _cut(body, case.chunk) if case.chunk else body
                t0 = time.thread_time()
                status, answer = await caller.post(case.path, sent, case.content_type)
                spent = time.thread_time() - t0
                if status != 200:
                    raise RuntimeError(f"{case.name}: {status} {answer[:300]!r}")
                if r >= 3:  # the first requests warm caches and code paths
                    per_request.append(spent)
            med = statistics.median(per_request)
            rows.append({"case": case.name, "items": case.items,
                         "body_bytes": len(bodies[0]), "loop_ms_per_request": med * 1e3,
                         "loop_us_per_item": med * 1e6 / case.items})
    finally:
        await caller.shutdown()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=30, help="measured requests per case")
    p.add_argument("--only", default="", help="measure only the cases whose name holds this")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    rows = asyncio.run(measure(args.requests, args.only))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'case':<50} {'body kB':>8} {'loop ms/req':>12} {'loop us/item':>13}")
    for r in rows:
        print(f"{r['case']:<50} {r['body_bytes'] / 1e3:>8.0f} "
              f"{r['loop_ms_per_request']:>12.2f} {r['loop_us_per_item']:>13.1f}")


if __name__ == "__main__":
    main()

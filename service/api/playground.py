"""The playground: a static page at /playground (and / redirecting to it) that calls the
API from the browser: zero-shot bars per image and an image x text similarity heatmap.

Pure ASGI in front of the API-key check: the page and its script hold no secrets, and a
visitor must see the page to type the key that its API calls then send. Only the page's
own files are answered here (read once, at start-up, from service/static/playground);
every other path goes on to the API untouched. Each answer carries a
Content-Security-Policy that allows scripts and styles from this origin only: no inline
script, no eval, nothing from another host, so the page works offline as it does
online and an injected label cannot run as code.
"""

from __future__ import annotations

from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

STATIC = Path(__file__).resolve().parents[1] / "static" / "playground"
PAGE = "/playground"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def _files(root: Path) -> dict[str, tuple[bytes, str]]:
    """URL path -> (body, content type): index.html at /playground, the rest under it."""
    files = {}
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix in _TYPES:
            url = PAGE if p.name == "index.html" else f"{PAGE}/{p.name}"
            files[url] = (p.read_bytes(), _TYPES[p.suffix])
    if PAGE not in files:
        raise FileNotFoundError(f"no index.html in {root}")
    return files


class Playground:
    def __init__(self, app: ASGIApp, root: Path = STATIC):
        self.app = app
        self.files = _files(root)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in ("/", PAGE + "/"):
            await self._send(send, scope, 307, b"", "text/plain", [(b"location", PAGE.encode())])
        elif path in self.files:
            body, kind = self.files[path]
            await self._send(send, scope, 200, body, kind, [])
        else:
            await self.app(scope, receive, send)

    @staticmethod
    async def _send(send: Send, scope: Scope, status: int, body: bytes, kind: str,
                    extra: list[tuple[bytes, bytes]]) -> None:
        headers = [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode()),
                   (b"content-security-policy", CSP.encode()),
                   (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                   (b"cache-control", b"no-cache"), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})

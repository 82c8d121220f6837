"""The body cap against a real server: 413 arrives while the body is still being sent,
for a declared Content-Length and for a chunked body that never ends."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from test_server import Server, _metric, checkpoint, model  # noqa: F401 (fixtures)

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint, env={"CLIP_MAX_BODY_BYTES": str(LIMIT)})
    yield s
    assert s.stop() == 0


def _answer(sock: socket.socket) -> tuple[int, dict]:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ")[1]), json.loads(body[:length])


def test_a_declared_length_over_the_cap_is_refused_before_any_body(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 104857600\r\n\r\n")  # 100 MB promised, none sent
        status, body = _answer(sock)
    assert status == 413 and body["error"]["type"] == "body_too_large"


def test_an_endless_chunked_body_is_refused_once_past_the_cap(server):
    chunk = b"x" * 16384
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        while sent <= LIMIT + len(chunk):  # just past the cap; the end chunk never comes
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        status, body = _answer(sock)
    assert status == 413 and body["error"]["type"] == "body_too_large"
    assert sent < 2 * LIMIT
    assert _metric(server.url, "clip_errors_total", type="body_too_large") >= 1
    r = httpx.post(server.url + "/embed", json={"texts": ["next"]}, timeout=10)
    assert r.status_code == 200

"""Image URLs: off by default; when on, only http(s) to global addresses (or networks the
operator allows), every redirect re-checked, a deadline for the whole fetch and a byte
cap on the body. The servers are ours, on 127.0.0.1; nothing else is ever connected to."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from typing import ClassVar

import pytest
from refusals import metric, png, refused, served, serving, tiny_checkpoint

from service.fetch import address_allowed

IMAGE = png((20, 20), color=(9, 200, 9))


class Origin(BaseHTTPRequestHandler):
    """What a hostile (or just broken) image host can do."""

    hits: ClassVar[list[str]] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        port = self.server.server_address[1]
        route = {
            "/img": lambda: self._send(IMAGE),
            "/to-img": lambda: self._redirect("/img"),
            "/to-private": lambda: self._redirect(f"http://10.0.0.5:{port}/img"),
            "/to-metadata": lambda: self._redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-loopback": lambda: self._redirect(f"http://127.0.0.2:{port}/img"),
            "/to-file": lambda: self._redirect("file:///etc/passwd"),
            "/loop": lambda: self._redirect("/loop"),
            "/endless": self._endless,
            "/trickle": self._trickle,
            "/declared-huge": self._declared_huge,
            "/gzip": lambda: self._send(gzip.compress(IMAGE), {"Content-Encoding": "gzip"}),
            "/missing": lambda: self._send(b"no", status=404),
        }.get(self.path)
        if route is None:
            self._send(b"?", status=404)
        else:
            route()

    def _send(self, body: bytes, headers: dict | None = None, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _endless(self) -> None:
        self.send_response(200)
        self.end_headers()  # no length: the body goes on until we are cut off
        end = time.monotonic() + 10
        try:
            while time.monotonic() < end:
                self.wfile.write(b"\0" * 16384)
        except OSError:
            pass

    def _trickle(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        try:
            for _ in range(20):  # a byte a second, bounded
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(1)
        except OSError:
            pass

    def _declared_huge(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 30))
        self.end_headers()


@pytest.fixture(scope="module")
def origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """A safety net under the guard: any connection off 127.0.0.1 fails the test."""
    real = asyncio.BaseEventLoop.create_connection

    async def checked(self, protocol_factory, host=None, port=None, *args, **kwargs):
        assert host is not None and ip_address(host).is_loopback, f"connect to {host}"
        return await real(self, protocol_factory, host, port, *args, **kwargs)

    monkeypatch.setattr(asyncio.BaseEventLoop, "create_connection", checked)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("m"))


ON = {"url_inputs": True, "url_allow_networks": ["127.0.0.1/32"], "url_timeout_s": 2.0,
      "url_max_bytes": 64 * 1024, "url_max_redirects": 2}


@pytest.fixture(scope="module")
def client(checkpoint):
    with serving(checkpoint, **ON) as c:
        yield c


@pytest.fixture(scope="module")
def guarded(checkpoint):
    """URL inputs on, nothing allowed beyond global addresses (the production shape)."""
    with serving(checkpoint, url_inputs=True, url_timeout_s=2.0) as c:
        yield c


def _embed(client, url: str):
    return client.post("/embed", json={"images": [url]})


def test_urls_are_off_by_default(checkpoint, origin):
    base, _ = origin
    Origin.hits.clear()
    with serving(checkpoint) as c:
        r = refused(c, lambda: _embed(c, base + "/img"), 400, "url_not_allowed")
        assert "not enabled" in r.json()["error"]["message"]
    assert Origin.hits == []


def test_an_allowed_url_is_fetched_and_equals_the_bytes(client, origin):
    base, _ = origin
    before = metric(client, "clip_url_fetches_total", outcome="ok")
    by_url = _embed(client, base + "/img").json()["images"][0]["embedding"]
    from refusals import b64
    by_bytes = client.post("/embed", json={"images": [b64(IMAGE)]}).json()["images"][0]
    assert by_url == by_bytes["embedding"]
    assert metric(client, "clip_url_fetches_total", outcome="ok") == before + 1
    assert _embed(client, base + "/to-img").status_code == 200  # a same-host redirect


@pytest.mark.parametrize("path", ["/to-private", "/to-metadata", "/to-loopback"])
def test_a_redirect_to_a_refused_address_is_refused(client, origin, path):
    base, _ = origin
    refused(client, lambda: _embed(client, base + path), 400, "url_not_allowed",
            metric_name="clip_url_fetches_total", outcome="blocked")


def test_a_redirect_to_another_scheme_and_redirect_loops_are_refused(client, origin):
    base, _ = origin
    refused(client, lambda: _embed(client, base + "/to-file"), 400, "url_not_allowed")
    r = refused(client, lambda: _embed(client, base + "/loop"), 422, "fetch_failed")
    assert "redirects" in r.json()["error"]["message"]


def test_an_endless_body_stops_at_the_byte_cap(checkpoint, origin):
    base, _ = origin
    # A deadline far away, so it is the byte cap that ends the fetch, however loaded
    # the machine running the test.
    with serving(checkpoint, **{**ON, "url_timeout_s": 60.0}) as client:
        start = time.perf_counter()
        refused(client, lambda: _embed(client, base + "/endless"), 413, "image_too_large",
                metric_name="clip_url_fetches_total", outcome="too_large")
        assert time.perf_counter() - start < 30
        refused(client, lambda: _embed(client, base + "/declared-huge"), 413,
                "image_too_large")


def test_a_byte_a_second_body_ends_at_the_total_timeout(client, origin):
    base, _ = origin
    start = time.perf_counter()
    refused(client, lambda: _embed(client, base + "/trickle"), 422, "fetch_failed",
            metric_name="clip_url_fetches_total", outcome="timeout")
    # url_timeout_s=2 ends it, though each byte comes well within the read timeout and
    # the whole body would take 100 s.
    assert time.perf_counter() - start < 15


def test_http_errors_and_compressed_bodies_are_refused(client, origin):
    base, _ = origin
    refused(client, lambda: _embed(client, base + "/missing"), 422, "fetch_failed")
    refused(client, lambda: _embed(client, base + "/gzip"), 422, "fetch_failed")


def test_numeric_spellings_of_loopback_are_resolved_then_refused(guarded, origin):
    _, port = origin
    Origin.hits.clear()
    for host in ("127.0.0.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1", "127.1",
                 "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::1]", "localhost", "0.0.0.0"):
        r = refused(guarded, lambda h=host: _embed(guarded, f"http://{h}:{port}/img"), 400,
                    "url_not_allowed")
        assert str(port) not in r.json()["error"]["message"]  # the URL is not echoed
    assert Origin.hits == []


def test_a_numeric_spelling_of_an_allowed_address_is_the_same_address(client, origin):
    _, port = origin
    assert _embed(client, f"http://2130706433:{port}/img").status_code == 200


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.png", "file:///etc/passwd",
                                 "gopher://127.0.0.1:70/", "http://", "http:///img"])
def test_only_http_and_https_urls_with_a_host(client, url):
    refused(client, lambda: _embed(client, url), 400, "url_not_allowed")


@pytest.mark.parametrize(("address", "allowed"), [
    ("93.184.215.14", True), ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("127.0.0.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("255.255.255.255", False),
    ("::1", False), ("fe80::1", False), ("fd00:ec2::254", False), ("::", False),
    ("::ffff:10.0.0.1", False), ("::ffff:93.184.215.14", True),
    ("64:ff9b::a00:1", False), ("2002:a00:1::", False), ("2001::1", False),
    ("ff02::1", False),
])
def test_which_addresses_a_fetch_may_reach(address, allowed):
    assert address_allowed(ip_address(address)) is allowed


def test_an_allowed_network_opens_exactly_that_network():
    from ipaddress import ip_network
    nets = [ip_network("127.0.0.1/32")]
    assert address_allowed(ip_address("127.0.0.1"), nets)
    assert address_allowed(ip_address("::ffff:127.0.0.1"), nets)
    assert not address_allowed(ip_address("127.0.0.2"), nets)


def test_url_images_work_in_classify_and_openai_image_mode(client, origin):
    base, _ = origin
    r = client.post("/classify", json={"images": [base + "/img"], "labels": ["a", "b"]})
    assert r.status_code == 200, r.text
    r = client.post("/v1/embeddings", json={"input": [base + "/img"], "modality": "image"})
    assert r.status_code == 200, r.text
    served(client)

"""clip_core.hub against a real HTTP server on 127.0.0.1 started by each test."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from clip_core.errors import ChecksumMismatch, WeightsUnavailable
from clip_core.hub import (
    DownloadError,
    default_cache_dir,
    fetch,
    sha256_file,
    sha256_in_url,
)

GOOD = bytes(range(256)) * 12_000  # 3 MB: more than one read chunk, still fast on loopback
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
TIMEOUT = 5.0


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    send_only: int | None = None  # bytes actually sent, to fake a dropped connection


class Server:
    def __init__(self) -> None:
        self.routes: dict[str, Reply] = {}
        self.requests: list[str] = []
        routes, requests = self.routes, self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                reply = routes.get(self.path, Reply(status=404, body=b"not found"))
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                body = reply.body if reply.send_only is None else reply.body[: reply.send_only]
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(timeout=5)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # trust_env=False: a proxy set in the environment must not intercept 127.0.0.1.
    with httpx.Client(trust_env=False, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_good_file_is_downloaded_verified_and_then_served_from_cache(server, client, cache):
    server.routes["/m/ViT-B-32.pt"] = Reply(body=GOOD)
    url = server.url("/m/ViT-B-32.pt")

    path = fetch(url, GOOD_SHA, cache, client=client, progress=False, timeout=TIMEOUT)

    assert path == cache / "ViT-B-32.pt"
    assert path.read_bytes() == GOOD
    assert leftovers(cache) == ["ViT-B-32.pt"]
    assert len(server.requests) == 1

    again = fetch(url, GOOD_SHA, cache, client=client, progress=False, timeout=TIMEOUT)
    assert again == path
    assert len(server.requests) == 1


def test_explicit_filename_and_uppercase_hash(server, client, cache):
    server.routes["/download?id=7"] = Reply(body=GOOD)
    path = fetch(
        server.url("/download?id=7"),
        GOOD_SHA.upper(),
        cache,
        "weights.bin",
        client=client,
        progress=False,
        timeout=TIMEOUT,
    )
    assert path == cache / "weights.bin"
    assert path.read_bytes() == GOOD


def test_corrupt_download_raises_checksum_mismatch_and_leaves_nothing(server, client, cache):
    server.routes["/m.pt"] = Reply(body=GOOD[:-1] + b"\x00")

    with pytest.raises(ChecksumMismatch) as info:
        fetch(server.url("/m.pt"), GOOD_SHA, cache, client=client, progress=False, timeout=TIMEOUT)

    assert info.value.expected == GOOD_SHA
    assert info.value.actual == hashlib.sha256(GOOD[:-1] + b"\x00").hexdigest()
    assert leftovers(cache) == []


def test_truncated_transfer_raises_download_error_and_leaves_nothing(server, client, cache):
    server.routes["/m.pt"] = Reply(body=GOOD, send_only=len(GOOD) // 2)

    with pytest.raises(DownloadError) as info:
        fetch(server.url("/m.pt"), GOOD_SHA, cache, client=client, progress=False, timeout=TIMEOUT)

    assert server.url("/m.pt") in str(info.value)
    assert leftovers(cache) == []


def test_truncated_transfer_is_caught_without_a_checksum(server, client, cache):
    # With no hash to check, only the length tells a short body from a whole one.
    server.routes["/m.pt"] = Reply(body=GOOD, send_only=len(GOOD) // 2)

    with pytest.raises(DownloadError):
        fetch(server.url("/m.pt"), None, cache, client=client, progress=False, timeout=TIMEOUT)

    assert leftovers(cache) == []


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_status_raises_download_error_naming_url_and_target(
    server, client, cache, status
):
    server.routes["/m.pt"] = Reply(status=status, body=b"nope")
    url = server.url("/m.pt")

    with pytest.raises(DownloadError) as info:
        fetch(url, GOOD_SHA, cache, client=client, progress=False, timeout=TIMEOUT)

    message = str(info.value)
    assert url in message
    assert str(status) in message
    assert str(cache / "m.pt") in message
    assert isinstance(info.value, WeightsUnavailable)
    assert leftovers(cache) == []


def test_cached_file_with_wrong_hash_is_fetched_again_and_replaced(server, client, cache):
    cache.mkdir()
    (cache / "m.pt").write_bytes(b"stale or damaged")
    server.routes["/m.pt"] = Reply(body=GOOD)

    path = fetch(
        server.url("/m.pt"), GOOD_SHA, cache, client=client, progress=False, timeout=TIMEOUT
    )

    assert len(server.requests) == 1
    assert path.read_bytes() == GOOD
    assert leftovers(cache) == ["m.pt"]


def test_cached_file_with_wrong_hash_is_not_returned_when_refetch_fails(server, client, cache):
    cache.mkdir()
    (cache / "m.pt").write_bytes(b"stale or damaged")
    server.routes["/m.pt"] = Reply(status=500)

    with pytest.raises(DownloadError):
        fetch(server.url("/m.pt"), GOOD_SHA, cache, client=client, progress=False, timeout=TIMEOUT)

    assert leftovers(cache) == ["m.pt"]  # no .part left beside it


def test_offline_and_missing_names_file_directory_and_url(server, cache):
    url = server.url("/models/abc/RN50.pt")

    with pytest.raises(WeightsUnavailable) as info:
        fetch(url, GOOD_SHA, cache, offline=True, progress=False)

    message = str(info.value)
    assert "RN50.pt" in message
    assert str(cache) in message
    assert url in message
    assert not isinstance(info.value, DownloadError)
    assert server.requests == []
    assert not cache.exists()


def test_offline_with_valid_cached_file_returns_it_without_network(server, cache):
    cache.mkdir()
    (cache / "m.pt").write_bytes(GOOD)

    path = fetch(server.url("/m.pt"), GOOD_SHA, cache, offline=True, progress=False)

    assert path == cache / "m.pt"
    assert server.requests == []


def test_offline_with_corrupt_cached_file_refuses_it(server, cache):
    cache.mkdir()
    (cache / "m.pt").write_bytes(b"damaged")

    with pytest.raises(WeightsUnavailable) as info:
        fetch(server.url("/m.pt"), GOOD_SHA, cache, offline=True, progress=False)

    assert str(cache / "m.pt") in str(info.value)
    assert "corrupt" in str(info.value)
    assert server.requests == []


def test_without_checksum_any_cached_file_is_used(server, cache):
    cache.mkdir()
    (cache / "m.pt").write_bytes(b"whatever")

    assert fetch(server.url("/m.pt"), None, cache, progress=False) == cache / "m.pt"
    assert server.requests == []


def test_connection_refused_raises_download_error_quickly(client, cache):
    # A bound socket that never listens makes connections to its port fail at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/m.pt"
        start = time.monotonic()
        with pytest.raises(DownloadError) as info:
            fetch(url, GOOD_SHA, cache, client=client, progress=False, timeout=TIMEOUT)
        elapsed = time.monotonic() - start

    assert elapsed < TIMEOUT
    assert url in str(info.value)
    assert leftovers(cache) == []


def test_redirect_is_followed(server, client, cache):
    server.routes["/old/m.pt"] = Reply(status=302, headers={"Location": "/new/blob"})
    server.routes["/new/blob"] = Reply(body=GOOD)

    path = fetch(
        server.url("/old/m.pt"), GOOD_SHA, cache, client=client, progress=False, timeout=TIMEOUT
    )

    assert server.requests == ["/old/m.pt", "/new/blob"]
    assert path == cache / "m.pt"  # named after the URL asked for, not the redirect
    assert path.read_bytes() == GOOD


def test_default_client_with_progress_bar(server, cache, monkeypatch):
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    server.routes["/m.pt"] = Reply(body=GOOD)

    path = fetch(server.url("/m.pt"), GOOD_SHA, cache, progress=True, timeout=TIMEOUT)

    assert path.read_bytes() == GOOD


@pytest.mark.parametrize("name", ["..", "../evil.pt", "a/b.pt"])
def test_unsafe_filenames_are_rejected(cache, name):
    with pytest.raises(ValueError):
        fetch("http://127.0.0.1:9/m.pt", None, cache, name, offline=True)


def test_malformed_checksum_is_rejected(cache):
    with pytest.raises(ValueError):
        fetch("http://127.0.0.1:9/m.pt", "abc", cache, offline=True)


def test_sha256_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(GOOD)
    assert sha256_file(path) == GOOD_SHA


def test_sha256_in_url():
    digest = "af" * 32
    assert sha256_in_url(f"https://example.invalid/clip/models/{digest}/ViT-B-32.pt") == digest
    assert sha256_in_url(f"https://example.invalid/{digest.upper()}/x.pt") == digest
    assert sha256_in_url("https://example.invalid/clip/models/ViT-B-32.pt") is None


def test_default_cache_dir_honours_absolute_xdg_only(tmp_path):
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "clip-server"
    home_default = Path.home() / ".cache" / "clip-server"
    assert default_cache_dir({"XDG_CACHE_HOME": "relative/dir"}) == home_default
    assert default_cache_dir({}) == home_default


def test_concurrent_fetches_of_one_file_both_succeed(server, cache):
    server.routes["/m.pt"] = Reply(body=GOOD)
    results: list[Path | BaseException] = []
    start = threading.Barrier(2)

    def worker() -> None:
        with httpx.Client(trust_env=False, timeout=TIMEOUT) as c:
            start.wait(timeout=TIMEOUT)
            try:
                results.append(
                    fetch(server.url("/m.pt"), GOOD_SHA, cache, client=c, progress=False)
                )
            except BaseException as exc:
                results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3 * TIMEOUT)

    assert results == [cache / "m.pt", cache / "m.pt"]
    assert (cache / "m.pt").read_bytes() == GOOD
    assert leftovers(cache) == ["m.pt"]

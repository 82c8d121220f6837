"""`clip-fetch` against a real HTTP server on 127.0.0.1 started by each test."""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from clip_core import fetch
from clip_core.config import PreprocessConfig
from clip_core.errors import ModelNotFound
from clip_core.registry import ModelEntry

WEIGHTS = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(WEIGHTS).hexdigest()


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path) -> Iterator[str]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "tiny.pt").write_bytes(WEIGHTS)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=root))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def registry(monkeypatch, server):
    """A registry of two entries served by `server`, one with a wrong checksum, and one
    built-in entry with nothing to download."""
    entries = {
        "tiny": ModelEntry("test/tiny", "ViT-B-32", f"{server}/tiny.pt", SHA,
                           PreprocessConfig(image_size=224)),
        "corrupt": ModelEntry("test/corrupt", "ViT-B-32", f"{server}/tiny.pt", "0" * 64,
                              PreprocessConfig(image_size=224)),
        "builtin": ModelEntry("test/builtin", "ViT-B-32", "", "",
                              PreprocessConfig(image_size=224)),
    }

    def get_entry(name: str) -> ModelEntry:
        if name not in entries:
            raise ModelNotFound(f"unknown model {name!r}")
        return entries[name]

    monkeypatch.setattr(fetch, "get_entry", get_entry)
    return entries


def test_downloads_and_verifies_into_the_cache(registry, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert fetch.main(["tiny", "--cache-dir", str(cache), "--quiet"]) == 0
    target = cache / "tiny.pt"
    assert target.read_bytes() == WEIGHTS
    assert str(target) in capsys.readouterr().out
    # A second run finds the verified file and downloads nothing.
    mtime = target.stat().st_mtime_ns
    assert fetch.main(["tiny", "--cache-dir", str(cache), "--quiet"]) == 0
    assert target.stat().st_mtime_ns == mtime


def test_checksum_mismatch_fails_and_leaves_nothing(registry, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert fetch.main(["corrupt", "--cache-dir", str(cache), "--quiet"]) == 1
    assert "SHA-256" in capsys.readouterr().err
    assert list(cache.iterdir()) == []


def test_unknown_model_fails(registry, tmp_path, capsys):
    assert fetch.main(["nope", "--cache-dir", str(tmp_path), "--quiet"]) == 1
    assert "unknown model" in capsys.readouterr().err


def test_cache_dir_from_clip_cache_dir_and_comma_lists(registry, tmp_path, monkeypatch, capsys):
    # The same variable clip-serve reads, so an init container and the server agree.
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "shared"))
    assert fetch.main(["tiny,builtin", "--quiet"]) == 0
    assert (tmp_path / "shared" / "tiny.pt").read_bytes() == WEIGHTS
    assert "nothing to download" in capsys.readouterr().out


def test_real_registry_names_resolve_without_downloading(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fetch.hub, "fetch", lambda *a, **k: calls.append(a) or Path(a[2]))
    assert fetch.main(["ViT-B/32", "--cache-dir", str(tmp_path), "--quiet"]) == 0
    ((url, sha, cache, filename),) = calls
    assert url.startswith("https://") and sha in url and filename == "ViT-B-32.pt"
    assert cache == tmp_path


def test_console_script_is_installed():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "clip-fetch"]
    assert script.value == "clip_core.fetch:main"

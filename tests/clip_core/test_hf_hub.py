"""Weights from the Hugging Face hub through huggingface_hub, against a server on 127.0.0.1
that answers like the hub's resolve endpoint (HEAD and GET `/{repo}/resolve/{rev}/{file}`).

The environment variables users set (HF_ENDPOINT, HF_HUB_OFFLINE) are read by
huggingface_hub when it is imported, so the tests that prove them run `clip-fetch` in a
fresh process with those variables; the rest call the library in-process with its endpoint
constant pointed at the server.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT, random_clip

from clip_core import hub
from clip_core.checkpoint import CheckpointError, save_checkpoint
from clip_core.config import PreprocessConfig, load_architecture
from clip_core.errors import ChecksumMismatch, WeightsUnavailable
from clip_core.loader import load
from clip_core.registry import _ALIASES, OPEN_CLIP_FILES, REGISTRY, ModelEntry, register

ROOT = Path(__file__).resolve().parents[2]
LAION_B32 = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"  # the registry's ViT-B-32/laion2b_s34b_b79k


@dataclass
class FakeHub:
    """Files by (repo, name); `commit` is what `main` resolves to. Counts every request."""

    files: dict[tuple[str, str], bytes] = field(default_factory=dict)
    commit: str = "a" * 40
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def publish(self, repo: str, name: str, data: bytes, commit: str) -> None:
        self.files[(repo, name)] = data
        self.commit = commit


def _handler(fake: FakeHub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, body: bool) -> None:
            fake.requests.append(f"{self.command} {self.path}")
            # /{org}/{name}/resolve/{revision}/{file}
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) != 5 or parts[2] != "resolve":
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = fake.files.get(("/".join(parts[:2]), parts[4]))
            if data is None:
                # What the hub says for a file a repository does not have.
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", fake.commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

    return Handler


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    fake = FakeHub()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def endpoint(fake_hub, monkeypatch) -> FakeHub:
    """huggingface_hub in this process pointed at the fake hub, as HF_ENDPOINT would."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return fake_hub


def clip_fetch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`clip-fetch ARGS` in a fresh process, so huggingface_hub reads `env` at import."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CLIP_"))}
    full.update(env, PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "clip_core.fetch", "--quiet", *args],
                          env=full, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_clip_fetch_through_hf_endpoint_offline_and_a_changed_file(fake_hub, tmp_path):
    """One cache folder through a model's life: the first download through HF_ENDPOINT (the
    repository lacks the safetensors file, so the pickle is taken), HF_HUB_OFFLINE=1 served
    from that folder without a request, then the mirror's file changing under the same name
    refused by the hash recorded at the first download."""
    cache = tmp_path / "models"
    weights = b"weights, first version" * 100
    fake_hub.publish(LAION_B32, "open_clip_pytorch_model.bin", weights, "1" * 40)
    env = {"HF_ENDPOINT": fake_hub.url}

    done = clip_fetch(["ViT-B-32/laion2b_s34b_b79k", "--cache-dir", str(cache)], env)
    assert done.returncode == 0, done.stderr
    snapshot = (cache / "huggingface" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
                / "snapshots" / ("1" * 40))
    path = Path(done.stdout.strip().split(": ", 1)[1])
    assert path == snapshot / "open_clip_pytorch_model.bin"
    assert path.read_bytes() == weights
    assert any(r.startswith("GET ") and r.endswith("/open_clip_pytorch_model.bin")
               for r in fake_hub.requests)
    record = json.loads((cache / hub.SHA256_RECORD).read_text())
    key = f"{LAION_B32}/open_clip_pytorch_model.bin"
    assert record[key] == {"sha256": hashlib.sha256(weights).hexdigest(), "commit": "1" * 40}

    seen = len(fake_hub.requests)
    offline = clip_fetch(["hf-hub:" + LAION_B32, "--cache-dir", str(cache)],
                         {**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert Path(offline.stdout.strip().split(": ", 1)[1]) == path
    assert len(fake_hub.requests) == seen  # not one request

    missing = clip_fetch(["ViT-B-16/laion2b_s34b_b88k", "--cache-dir", str(cache)],
                         {**env, "HF_HUB_OFFLINE": "1"})
    assert missing.returncode == 1
    assert "clip-fetch hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K" in missing.stderr
    assert len(fake_hub.requests) == seen

    fake_hub.publish(LAION_B32, "open_clip_pytorch_model.bin", b"something else", "2" * 40)
    changed = clip_fetch(["ViT-B-32/laion2b_s34b_b79k", "--cache-dir", str(cache)], env)
    assert changed.returncode == 1
    assert "SHA-256" in changed.stderr and hub.SHA256_RECORD in changed.stderr
    assert json.loads((cache / hub.SHA256_RECORD).read_text()) == record  # not overwritten


def test_safetensors_is_preferred_when_the_repository_has_it(endpoint, tmp_path):
    endpoint.publish("org/both", "open_clip_pytorch_model.bin", b"pickle", "3" * 40)
    endpoint.publish("org/both", "open_clip_model.safetensors", b"safe", "3" * 40)
    path = hub.fetch_hf("org/both", OPEN_CLIP_FILES, None, tmp_path, record_dir=tmp_path,
                        progress=False)
    assert path.name == "open_clip_model.safetensors" and path.read_bytes() == b"safe"
    assert not any("pytorch_model.bin" in r for r in endpoint.requests)


def test_a_cache_damaged_on_disk_is_fetched_again_online_and_refused_offline(endpoint, tmp_path):
    data = b"good bytes" * 50
    sha = hashlib.sha256(data).hexdigest()
    endpoint.publish("org/model", "w.bin", data, "4" * 40)
    path = hub.fetch_hf("org/model", ["w.bin"], sha, tmp_path, record_dir=tmp_path,
                        progress=False)
    blob = path.resolve()
    blob.chmod(0o644)
    blob.write_bytes(b"bit rot")
    with pytest.raises(ChecksumMismatch, match="registry's"):
        hub.fetch_hf("org/model", ["w.bin"], sha, tmp_path, record_dir=tmp_path, offline=True)
    again = hub.fetch_hf("org/model", ["w.bin"], sha, tmp_path, record_dir=tmp_path,
                         progress=False)
    assert again.read_bytes() == data
    # A known hash is the registry's: nothing is recorded for it.
    assert not (tmp_path / hub.SHA256_RECORD).exists()


def test_a_registry_hash_the_hub_file_does_not_have_is_refused(endpoint, tmp_path):
    endpoint.publish("org/model", "w.bin", b"these bytes", "5" * 40)
    with pytest.raises(ChecksumMismatch, match="SHA-256 is"):
        hub.fetch_hf("org/model", ["w.bin"], "0" * 64, tmp_path, record_dir=tmp_path,
                     progress=False)


def test_a_repository_without_any_of_the_files(endpoint, tmp_path):
    with pytest.raises(WeightsUnavailable, match="not in the repository"):
        hub.fetch_hf("org/empty", OPEN_CLIP_FILES, None, tmp_path, record_dir=tmp_path,
                     progress=False)


@pytest.fixture
def hub_entry():
    """A registry entry on the fake hub, on the built-in model's small architecture."""
    entry = ModelEntry(
        name="test/hub-tiny", architecture="RN-Tiny-64", url="", sha256="",
        preprocess=PreprocessConfig(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3),
        act="gelu", hf_repo="test/hub-tiny", hf_files=OPEN_CLIP_FILES,
    )
    register(entry)
    try:
        yield entry
    finally:
        REGISTRY.pop(entry.name, None)
        _ALIASES.pop(entry.name, None)


def test_loader_takes_registry_weights_from_the_hub(endpoint, hub_entry, tmp_path):
    cfg = hub_entry.config()
    assert cfg.act == "gelu" != load_architecture("RN-Tiny-64").act  # the entry's activation
    source = random_clip(cfg, seed=4)
    save_checkpoint(source, tmp_path / "w.safetensors")
    endpoint.publish("test/hub-tiny", "open_clip_model.safetensors",
                     (tmp_path / "w.safetensors").read_bytes(), "6" * 40)
    loaded = load("test/hub-tiny", cache_dir=tmp_path / "cache", progress=False)
    assert loaded.name == "test/hub-tiny" and loaded.preprocess == hub_entry.preprocess
    assert loaded.model.config == cfg
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(images),
                                   source.encode_image(images), rtol=0, atol=0)


def test_hub_weights_that_do_not_fit_the_architecture_get_the_strict_message(
        endpoint, hub_entry, tmp_path):
    # A small ViT's weights where the entry names a ResNet.
    torch.save(random_clip(TINY_VIT, seed=1).state_dict(), tmp_path / "w.bin")
    endpoint.publish("test/hub-tiny", "open_clip_pytorch_model.bin",
                     (tmp_path / "w.bin").read_bytes(), "7" * 40)
    with pytest.raises(CheckpointError, match=r"does not fit the architecture; missing keys: "
                       r".*unexpected keys: .*visual.class_embedding"):
        load("test/hub-tiny", cache_dir=tmp_path / "cache", progress=False)

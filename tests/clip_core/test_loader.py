"""From a model name to a ready model: registry, download, any checkpoint path, dtypes."""

from __future__ import annotations

import http.server
import threading

import pytest
import torch
from conftest import random_clip
from test_checkpoint import TINY_VIT

from clip_core.checkpoint import save_checkpoint
from clip_core.config import PreprocessConfig
from clip_core.errors import ModelNotFound, WeightsUnavailable
from clip_core.hub import sha256_file
from clip_core.loader import load, resolve_dtype
from clip_core.registry import _ALIASES, REGISTRY, ModelEntry, get_entry, register


def test_random_weights_for_a_registry_name_keep_its_preprocessing():
    loaded = load("RN50x4", random_weights=True)
    assert loaded.source == "random"
    assert loaded.name == "RN50x4-random"  # never passed off as OpenAI's weights
    assert loaded.preprocess.image_size == 288
    assert loaded.model.config.vision.image_size == 288


def test_unknown_name_is_model_not_found():
    with pytest.raises(ModelNotFound, match="unknown model 'ViT-X-99'"):
        load("ViT-X-99")
    with pytest.raises(ModelNotFound, match="unknown architecture"):
        load("ViT-X-99", random_weights=True)


def test_offline_without_cache_names_file_and_place(tmp_path):
    with pytest.raises(WeightsUnavailable) as e:
        load("ViT-B/32", offline=True, cache_dir=tmp_path)
    assert "ViT-B-32.pt" in str(e.value) and str(tmp_path) in str(e.value)


def test_checkpoint_path_with_its_preprocessing_and_dtype(tmp_path):
    model = random_clip(TINY_VIT)
    prep = PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    save_checkpoint(model, tmp_path / "tiny.safetensors", prep)
    loaded = load(str(tmp_path / "tiny.safetensors"), dtype="bf16")
    assert loaded.preprocess == prep
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.name == "tiny"


def test_dtype_resolution():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_registry_model_is_downloaded_verified_and_loaded(tmp_path):
    """The whole path a user takes, against a file server on 127.0.0.1."""
    model = random_clip(TINY_VIT)
    served = tmp_path / "served"
    served.mkdir()
    torch.save(model.state_dict(), served / "tiny.pt")
    sha = sha256_file(served / "tiny.pt")

    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(served), **kw
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    entry = ModelEntry(
        name="test/tiny",
        # Only shipped architectures can be registered. A tiny checkpoint under a ViT-B-32
        # entry shows the file is fetched and verified first, then refused by strict loading.
        architecture="ViT-B-32",
        url=f"http://127.0.0.1:{server.server_address[1]}/tiny.pt",
        sha256=sha,
        preprocess=PreprocessConfig(image_size=32),
    )
    try:
        register(entry)
        cache = tmp_path / "cache"
        with pytest.raises(Exception, match="does not fit the architecture"):
            load("test/tiny", cache_dir=cache, progress=False)  # ViT-B-32 shape != tiny
        assert (cache / "tiny.pt").is_file()  # downloaded and verified before building
        assert sha256_file(cache / "tiny.pt") == sha
        loaded = load(str(cache / "tiny.pt"))
        images = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model.encode_image(images),
                                       model.encode_image(images), rtol=0, atol=0)
    finally:
        REGISTRY.pop("test/tiny", None)
        _ALIASES.pop("test/tiny", None)
        server.shutdown()
        server.server_close()
    with pytest.raises(ModelNotFound):
        get_entry("test/tiny")

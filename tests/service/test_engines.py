"""Engines chosen per model (service.engines): a spec's prefix or Settings.engine, a
loader imported only when named, and one clear line when an engine cannot run here."""

from __future__ import annotations

import sys

import pytest
from conftest import TINY_VIT, random_clip
from fastapi.testclient import TestClient

from clip_core.checkpoint import save_checkpoint
from clip_core.config import PreprocessConfig
from service.app import create_app
from service.engines import ENGINE_NAMES, loader, require, split_engine
from service.errors import EngineUnavailable
from service.settings import Settings


def test_a_spec_names_its_engine_by_prefix_and_a_path_keeps_its_colon():
    assert split_engine("null:ViT-B-32", "torch") == ("null", "ViT-B-32")
    assert split_engine("ViT-B-32", "null") == ("null", "ViT-B-32")
    # Not an engine's name: the whole spec is the model (a Windows path, a URL-like name).
    assert split_engine("C:/models/tiny.safetensors", "torch") == (
        "torch", "C:/models/tiny.safetensors")
    assert split_engine("hf-hub:org/model", "torch") == ("torch", "hf-hub:org/model")


def test_every_named_engine_has_a_loader_and_an_unknown_one_is_refused():
    for name in ENGINE_NAMES:
        assert callable(loader(name))
    with pytest.raises(EngineUnavailable, match="unknown engine 'tensorrt'"):
        loader("tensorrt")


def test_a_missing_optional_package_names_the_package_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "absent_runtime_pkg", None)  # import fails at once
    with pytest.raises(EngineUnavailable) as e:
        require("absent_runtime_pkg", "onnx", "onnxruntime")
    assert "'absent_runtime_pkg'" in str(e.value) and "clip-server[onnx]" in str(e.value)


def test_models_of_one_server_can_run_on_different_engines(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(random_clip(TINY_VIT), path, PreprocessConfig(image_size=32))
    settings = Settings(models=[str(path), "null:ViT-B-32"], device="cpu", log_format="text")
    with TestClient(create_app(settings)) as c:
        cards = {card["name"]: card for card in c.get("/v1/models").json()["data"]}
        assert cards["tiny"]["engine"] == "torch"
        assert cards["openai/ViT-B-32"]["engine"] == "null"
        r = c.post("/embed", json={"texts": ["a cat"], "model": "openai/ViT-B-32"})
        assert r.status_code == 200 and len(r.json()["texts"][0]["embedding"]) == 512


def test_an_engine_that_cannot_run_stops_start_up_naming_it(monkeypatch):
    async def unavailable(settings, spec, devices):
        raise EngineUnavailable("the fake engine needs the package 'fakert'")

    monkeypatch.setattr("service.models.loader", lambda name: unavailable)
    app = create_app(Settings(models=["ViT-B-32"], device="cpu", log_format="text"))
    with TestClient(app):  # the process exits 1 on a start-up error (service.__main__)
        assert "'fakert'" in app.state.startup_error

"""CLIP_ENGINE=openvino: served from its OpenVINO IR as the torch engine serves (1e-5 on
normalised embeddings, fp32 pinned although this CPU would pick bf16), bf16 on request,
and a missing openvino ends start-up with exit 1 and one line naming it."""

from __future__ import annotations

from fastapi.testclient import TestClient
from test_onnx_engine import (
    a_missing_package_ends_start_up,
    embeddings,
    serves_like_torch,
    shared_model,
)

from service.app import create_app
from service.settings import Settings

ENGINE = "openvino"


def test_serves_like_the_torch_engine(tmp_path_factory):
    serves_like_torch(ENGINE, tmp_path_factory)


def test_a_missing_openvino_ends_start_up_with_exit_1(monkeypatch, tmp_path):
    a_missing_package_ends_start_up(ENGINE, "openvino", monkeypatch, tmp_path)


def test_bf16_computes_close_to_fp32(tmp_path_factory):
    path, cache = shared_model(tmp_path_factory)
    with TestClient(create_app(Settings(models=[f"{ENGINE}:{path}"], device="cpu",
                                        log_format="text", cache_dir=cache))) as c:
        ref_texts, ref_images = embeddings(c, "tiny")
    with TestClient(create_app(Settings(models=[f"{ENGINE}:{path}"], device="cpu",
                                        dtype="bf16", log_format="text",
                                        cache_dir=cache))) as c:
        texts, images = embeddings(c, "tiny")
        assert c.get("/v1/models").json()["data"][0]["engine"] == ENGINE
    assert (texts * ref_texts).sum(1).min() >= 0.99
    assert (images * ref_images).sum(1).min() >= 0.99

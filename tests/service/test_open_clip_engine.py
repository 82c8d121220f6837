"""The open_clip engine (service.engines.open_clip_engine): specs, local weights, the
tokenizer folder, preprocessing equal to open_clip's own transform, sigmoid scoring in
/classify and /v1/models, and the bad inputs (an unknown architecture, a missing extra).

The API tests serve a tiny SigLIP-shaped architecture registered with open_clip here (a
sigmoid-trained model with a logit bias, a T5-style SentencePiece tokenizer trained in the
test): every code path of the real ones at a fraction of a second. Real sizes are in
tests/parity/test_open_clip_engine_parity.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import shutil
import sys

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sentencepiece_support import save_siglip_tokenizer

from clip_core.errors import ModelNotFound
from clip_core.preprocess import ImageTransform
from service.app import create_app
from service.engines import loader
from service.engines.open_clip_engine import (
    OpenClipSpec,
    open_clip_preprocess,
    preprocess_config,
)
from service.errors import EngineUnavailable
from service.settings import Settings

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("sentencepiece")  # sentencepiece_support trains with it
pytest.importorskip("transformers")

TINY = "Tiny-Test-SigLIP"
TINY_CFG = {
    "embed_dim": 32,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {
        "context_length": 16, "vocab_size": 512, "hf_tokenizer_name": "not/downloaded",
        "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 32, "heads": 2,
        "layers": 1, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
    },
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A model folder as the hub lays one out: the weights and a SigLIP tokenizer
    (SentencePiece model trained here, saved by transformers' SiglipTokenizer)."""
    root = tmp_path_factory.mktemp("tiny_siglip")
    cfg_path = root / f"{TINY}.json"
    cfg_path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_path)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghik") for _ in range(rng.randint(2, 6)))
             for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(2000)]
    folder = save_siglip_tokenizer(lines, 300, root, root / "model")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY)
    with torch.no_grad():
        model.logit_bias.fill_(-3.0)  # a bias the random init would not give
        model.logit_scale.fill_(np.log(7.0))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return folder


def _settings(*models: str, **kw) -> Settings:
    return Settings(models=list(models), device="cpu", log_format="text",
                    max_batch_size=4, **kw)


def _load(spec: str, **kw):
    return asyncio.run(loader("open_clip")(_settings(f"open_clip:{spec}", **kw), spec, ["cpu"]))


def _png(seed: int, size=(40, 30)) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def test_specs_parse_architecture_tag_and_path(tmp_path):
    assert OpenClipSpec.parse("ViT-B-16-SigLIP2/webli") == OpenClipSpec("ViT-B-16-SigLIP2", "webli")
    spec = OpenClipSpec.parse(f"MobileCLIP-S1/datacompdr@{tmp_path}")
    assert (spec.architecture, spec.tag, spec.path) == ("MobileCLIP-S1", "datacompdr", tmp_path)
    assert spec.name == "MobileCLIP-S1/datacompdr"
    with pytest.raises(ModelNotFound, match="ARCH"):
        OpenClipSpec.parse("ViT-B-16@")


def test_an_unknown_architecture_or_tag_lists_close_matches():
    with pytest.raises(ModelNotFound) as e:
        _load("ViT-B-16-SigLIP3/webli", random_weights=True)
    assert "close matches" in str(e.value) and "ViT-B-16-SigLIP2" in str(e.value)
    with pytest.raises(ModelNotFound, match=r"no pretrained tag 'laion'.*webli"):
        _load("ViT-B-16-SigLIP/laion", random_weights=True)


def test_a_missing_extra_ends_start_up_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(EngineUnavailable, match=r"'timm'.*clip-server\[open_clip\]"):
        _load("MobileCLIP-S1/datacompdr", random_weights=True)
    app = create_app(_settings("open_clip:MobileCLIP-S1/datacompdr", random_weights=True))
    with TestClient(app):  # the process exits 1 on a start-up error (service.__main__)
        assert "'timm'" in app.state.startup_error


def test_device_preprocessing_is_refused_at_start_up():
    with pytest.raises(EngineUnavailable, match="CLIP_PREPROCESS=device"):
        _load("ViT-B-16-SigLIP/webli", random_weights=True, preprocess="device")


@pytest.mark.parametrize(("spec", "missing"), [
    ("ViT-B-16-SigLIP2/webli", "tokenizer \\(timm/ViT-B-16-SigLIP2\\)"),
    ("MobileCLIP-S1/datacompdr", "'apple/MobileCLIP-S1-OpenCLIP'.*open_clip_model.safetensors"),
])
def test_offline_without_the_files_in_the_cache_names_what_is_missing(tmp_path, spec, missing):
    with pytest.raises(ModelNotFound, match=f"{missing}.*offline"):
        _load(spec, offline=True, cache_dir=tmp_path)


@pytest.mark.parametrize("spec", ["ViT-B-16-SigLIP2/webli", "ViT-B-16-SigLIP/webli",
                                  "MobileCLIP-S1/datacompdr", "MobileCLIP2-S0/dfndr2b",
                                  "EVA02-B-16/merged2b_s8b_b131k"])
def test_preprocessing_equals_open_clip_transform(spec):
    """Each family's preprocessing as clip_core's config gives open_clip's own tensors
    (SigLIP: squash; MobileCLIP: bilinear; its own mean and std), on odd-sized images."""
    parsed = OpenClipSpec.parse(spec)
    size = open_clip.get_model_config(parsed.architecture)["vision_cfg"]["image_size"]
    cfg = open_clip_preprocess(parsed, size)
    ours = ImageTransform(preprocess_config(cfg))
    from open_clip.transform import PreprocessCfg, image_transform_v2

    reference = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    for seed, shape in enumerate([(300, 200), (97, 131), (size, size)]):
        image = Image.open(io.BytesIO(_png(seed, shape)))
        torch.testing.assert_close(ours(image), reference(image), atol=1e-6, rtol=0)


def test_local_weights_serve_with_sigmoid_scoring(tiny_folder):
    folder = tiny_folder
    with TestClient(create_app(_settings(f"open_clip:{TINY}@{folder}"))) as c:
        card = c.get("/v1/models").json()["data"][0]
        assert (card["name"], card["engine"], card["scoring"]) == (TINY, "open_clip", "sigmoid")
        assert card["fingerprint"].startswith("sha256:")  # /moderate and heads name it
        assert (card["dimension"], card["context_length"], card["image_size"]) == (32, 16, 32)
        image = base64.b64encode(_png(1)).decode()
        labels = ["abc", "defg", "hik"]
        r = c.post("/classify", json={"images": [image], "labels": labels,
                                      "templates": ["{}"]})
        assert r.status_code == 200, r.text
        got = {s["label"]: s for s in r.json()["results"][0]["labels"]}
        emb = c.post("/embed", json={"images": [image], "texts": labels}).json()
    # The served weights are the file's: /embed equals the model's own output.
    img = np.array(emb["images"][0]["embedding"])
    txt = np.array([t["embedding"] for t in emb["texts"]])
    cosine = txt @ img
    expected = 1 / (1 + np.exp(-(7.0 * cosine - 3.0)))  # sigmoid(scale x cos + bias)
    for label, cos, p in zip(labels, cosine, expected, strict=True):
        assert got[label]["cosine"] == pytest.approx(cos, abs=1e-5)
        assert got[label]["probability"] == pytest.approx(p, abs=1e-5)
    assert sum(s["probability"] for s in got.values()) != pytest.approx(1.0, abs=1e-3)


def test_weights_that_do_not_fit_get_the_strict_loader_message(tiny_folder, tmp_path):
    folder = tiny_folder
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "open_clip_model.safetensors"))
    state.pop("text.token_embedding.weight")
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    for f in folder.iterdir():  # the tokenizer beside the weights
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(RuntimeError, match=r"Missing key.*text\.token_embedding\.weight"):
        _load(f"{TINY}@{tmp_path / 'open_clip_model.safetensors'}")


def test_a_clip_vocabulary_model_pads_to_77_and_scores_with_a_softmax(tmp_path):
    """CLIP-vocabulary towers (MobileCLIP, EVA) keep clip_core's BPE and the softmax;
    their texts are padded to 77 with zeros as open_clip's tokenizer pads them (towers
    without a causal mask attend over the padding)."""
    cfg = {"embed_dim": 32, "custom_text": True,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1, "no_causal_mask": True}}
    (tmp_path / "Tiny-Test-CLIP.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "Tiny-Test-CLIP.json")
    em = _load("Tiny-Test-CLIP", random_weights=True)
    assert em.scoring == "softmax" and em.logit_bias == 0.0
    backend = em.backends[0]
    texts = ["a dog", "a photo of a cat sitting on a red chair"]
    ours = np.stack(backend.run("text", em.tokenizer.rows(texts).ids))
    with torch.no_grad():
        reference = backend.model.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts))
    np.testing.assert_allclose(ours, reference.numpy(), atol=1e-5, rtol=0)

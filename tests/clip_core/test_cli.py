from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from conftest import random_clip
from PIL import Image
from test_checkpoint import TINY_VIT

from clip_core.__main__ import main
from clip_core.checkpoint import save_checkpoint
from clip_core.config import PreprocessConfig
from clip_core.preprocess import ImageTransform
from clip_core.tokenizer import Tokenizer


def test_embed_prints_json_matching_direct_calls(tmp_path, capsys):
    model = random_clip(TINY_VIT)
    save_checkpoint(model, tmp_path / "tiny.safetensors", PreprocessConfig(image_size=32))
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "green.png")
    rc = main(["embed", "--model", str(tmp_path / "tiny.safetensors"), "--text", "a cat",
               "--image", str(tmp_path / "green.png"), "--demo-image"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dimension"] == 64 and out["model"] == "tiny"
    assert [r["kind"] for r in out["inputs"]] == ["text", "image", "image"]
    assert out["inputs"][0]["n_tokens"] == 4 and out["inputs"][0]["truncated"] is False
    with torch.no_grad():
        txt = model.encode_text(Tokenizer()(["a cat"]).ids, normalize=True)
        pixels = ImageTransform(PreprocessConfig(image_size=32))(Image.open(tmp_path / "green.png"))
        img = model.encode_image(pixels[None], normalize=True)
    assert abs(out["cosine"][0][1] - F.cosine_similarity(txt, img).item()) < 1e-3
    assert out["inputs"][1]["embedding_head"] == [round(x, 5) for x in img[0, :4].tolist()]


def test_offline_missing_weights_exit_2_with_one_clear_line(tmp_path, capsys):
    rc = main(["embed", "--model", "RN50", "--offline", "--cache-dir", str(tmp_path),
               "--text", "x"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RN50.pt" in err[0] and str(tmp_path) in err[0]

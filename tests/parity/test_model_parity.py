"""Our CLIP against openai-clip, open_clip and transformers on identical random weights,
at the real sizes of ViT-B/32 and RN50."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_tokens

from clip_core.checkpoint import build_model, read_checkpoint

TOL = 1e-5


def _inputs(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    images = torch.randn(4, 3, size, size, generator=g)
    tokens = random_tokens(6, lengths=[2, 5, 17, 40, 76, 77], seed=3)
    return images, tokens


def _ours(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def _assert_close(ours, ref):
    for a, b in zip(ours, ref, strict=True):
        b = F.normalize(b.float(), dim=-1)
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= TOL


@pytest.fixture(params=["vit_b32", "rn50"])
def model(request):
    return request.getfixturevalue(request.param)


def test_open_clip(model):
    import open_clip

    name = {"vit": "ViT-B-32-quickgelu", "resnet": "RN50-quickgelu"}[model.config.vision.kind]
    ref = open_clip.create_model(name, pretrained=None).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    images, tokens = _inputs(224)
    with torch.no_grad():
        expected = ref.encode_image(images), ref.encode_text(tokens)
    _assert_close(_ours(model, images, tokens), expected)


def test_openai_clip(model):
    import clip

    sd = model.state_dict()
    ref = clip.model.build_model({k: v.clone() for k, v in sd.items()}).float().eval()
    # build_model rounds weights through fp16; load the exact fp32 tensors again.
    ref.load_state_dict(sd, strict=True)
    images, tokens = _inputs(224)
    with torch.no_grad():
        expected = ref.encode_image(images), ref.encode_text(tokens)
    _assert_close(_ours(model, images, tokens), expected)


def _hf_features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_transformers_clipmodel_folder_loads_into_ours(tmp_path):
    """A transformers CLIPModel folder (config.json + model.safetensors) at ViT-B/32 size."""
    from transformers import CLIPConfig, CLIPModel

    hf_cfg = CLIPConfig(
        projection_dim=512,
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                         num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408,
                         hidden_act="quick_gelu", eos_token_id=49407),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                           num_hidden_layers=12, image_size=224, patch_size=32,
                           hidden_act="quick_gelu"),
    )
    torch.manual_seed(5)
    hf = CLIPModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.02)
            else:
                p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path)
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.source_format == "huggingface"
    ours = build_model(ckpt)
    images, tokens = _inputs(224)
    with torch.no_grad():
        expected = (
            _hf_features(hf.get_image_features(pixel_values=images)),
            _hf_features(hf.get_text_features(input_ids=tokens)),
        )
    _assert_close(_ours(ours, images, tokens), expected)
    assert torch.equal(ours.logit_scale, hf.logit_scale)


def test_configs_equal_open_clip_model_configs():
    """Each of OpenAI's nine architectures against open_clip's JSON for the same model.
    (Our own small ones, such as the built-in model's, have no open_clip counterpart.)"""
    import open_clip

    from clip_core.config import load_architecture
    from clip_core.registry import REGISTRY

    names = sorted({e.architecture for e in REGISTRY.values() if e.name.startswith("openai/")})
    assert len(names) == 9
    for name in names:
        ref = open_clip.get_model_config(name)
        ours = load_architecture(name)
        assert ours.embed_dim == ref["embed_dim"]
        v, rv = ours.vision, ref["vision_cfg"]
        assert v.image_size == rv["image_size"]
        assert v.width == rv["width"]
        assert (list(v.layers) if isinstance(v.layers, tuple) else v.layers) == rv["layers"]
        if v.kind == "vit":
            assert v.patch_size == rv["patch_size"]
        t, rt = ours.text, ref["text_cfg"]
        assert (t.context_length, t.vocab_size, t.width, t.heads, t.layers) == (
            rt["context_length"], rt["vocab_size"], rt["width"], rt["heads"], rt["layers"]
        )


def test_registry_urls_equal_openai():
    import clip

    from clip_core.registry import get_entry

    for name, url in clip.clip._MODELS.items():
        entry = get_entry(name)
        assert entry.url == url
        assert entry.sha256 in url
        ref_size = {"RN50x4": 288, "RN50x16": 384, "RN50x64": 448, "ViT-L/14@336px": 336}
        assert entry.preprocess.image_size == ref_size.get(name, 224)


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu", "RN50", "ViT-H-14"])
def test_open_clip_style_configs_convert(name):
    import open_clip

    from clip_core.config import CLIPConfig, load_architecture

    cfg = CLIPConfig.from_open_clip(open_clip.get_model_config(name))
    assert cfg.act == ("quick_gelu" if "quickgelu" in name else "gelu")
    if name.startswith(("ViT-B-32", "RN50")):
        # The same shapes as our OpenAI architecture; only the activation may differ.
        assert cfg.vision == load_architecture(name.removesuffix("-quickgelu")).vision
    if name == "ViT-H-14":
        assert cfg.vision.n_heads == 1280 // 80  # open_clip's head_width, not OpenAI's 64


@pytest.mark.parametrize("name", ["convnext_base", "ViT-B-16-SigLIP"])
def test_open_clip_configs_we_do_not_build_are_refused(name):
    import open_clip

    from clip_core.config import CLIPConfig

    with pytest.raises(ValueError, match="unsupported open_clip options"):
        CLIPConfig.from_open_clip(open_clip.get_model_config(name))


def test_open_clip_gelu_model_from_its_own_config():
    """open_clip's ViT-M-32 (exact GELU, not in OpenAI's set): config and weights both
    come from open_clip, and our model built from them agrees."""
    import open_clip

    from clip_core.config import CLIPConfig
    from clip_core.model import CLIP

    torch.manual_seed(9)
    ref = open_clip.create_model("ViT-M-32", pretrained=None).eval()
    ours = CLIP(CLIPConfig.from_open_clip(open_clip.get_model_config("ViT-M-32"))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    images, tokens = _inputs(224)
    with torch.no_grad():
        expected = ref.encode_image(images), ref.encode_text(tokens)
    _assert_close(_ours(ours, images, tokens), expected)

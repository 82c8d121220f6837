"""The open_clip engine against open_clip's own calls, at real sizes on random weights:
ViT-B-16-SigLIP (squash, sigmoid, T5 SentencePiece tokenizer padded to 64),
MobileCLIP-S1 (timm's FastViT, CLIP's BPE padded to 77 with no causal mask) and
EVA02-B-16 (timm's EVA-02 image tower with rotary embeddings, CLIP's text tower).

Ours: the decode pool's transform (clip_core ImageTransform on the engine's
PreprocessConfig), the engine's tokenizer, and one batch of mixed sizes and lengths
through the engine's backend (collation, padding, normalisation on the device). Theirs:
open_clip's transform for the tag, open_clip's tokenizer, `encode_image`/`encode_text` on
the same weights. fp32, within 1e-5."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image
from sentencepiece_support import save_siglip_tokenizer

from clip_core.preprocess import ImageTransform
from service.engines import loader
from service.settings import Settings

open_clip = pytest.importorskip("open_clip")
transform = pytest.importorskip("open_clip.transform")
pytest.importorskip("sentencepiece")  # sentencepiece_support trains with it
pytest.importorskip("transformers")
pytest.importorskip("timm")

TEXTS = ["a dog", "A Photo of the CAT, sitting!", "kato rimo senpa lude " * 20, ""]


def _images() -> list[Image.Image]:
    """Noise of a different colour and contrast each, so that the towers tell them apart."""
    rng = np.random.default_rng(0)
    looks = [((320, 240), (40, 200, 90), 30), ((123, 301), (220, 30, 60), 120),
             ((256, 256), (90, 90, 250), 60)]
    out = []
    for (w, h), colour, spread in looks:
        noise = rng.normal(0, spread, (h, w, 3)) + np.array(colour)
        out.append(Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def siglip_tokenizer_folder(tmp_path_factory):
    """A SigLIP tokenizer folder (T5 layout: <pad> 0, </s> 1, <unk> 2) saved by
    transformers' SiglipTokenizer from a SentencePiece model trained here."""
    root = tmp_path_factory.mktemp("siglip_vocab")
    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "mo", "sen", "pa", "lu", "de", "dog", "cat", "photo"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
             for _ in range(500)]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(3000)]
    return save_siglip_tokenizer(lines, 600, root, root / "ViT-B-16-SigLIP")


def _engine_model(spec: str):
    settings = Settings(models=[f"open_clip:{spec}"], device="cpu", dtype="fp32",
                        random_weights=True, log_format="text")
    torch.manual_seed(0)
    em = asyncio.run(loader("open_clip")(settings, spec, ["cpu"]))
    # open_clip's initialisation leaves the text towers all but blind to their input
    # (texts differ by ~1e-6, below the tolerance); noise on every weight makes a wrong
    # id or pad show (batch-norm statistics are buffers and stay valid).
    with torch.no_grad():
        for p in em.backends[0].model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    return em


def _reference_transform(arch: str, tag: str, size: int):
    cfg = transform.merge_preprocess_dict(dataclasses.asdict(transform.PreprocessCfg()),
                                          open_clip.get_pretrained_cfg(arch, tag))
    return transform.image_transform_v2(transform.PreprocessCfg(**{**cfg, "size": size}),
                                        is_train=False)


def _check(em, arch: str, tag: str, reference_tokenizer) -> None:
    backend = em.backends[0]
    model = backend.model
    images = _images()
    pixels = [ImageTransform(em.preprocess).pixels(im) for im in images]
    ours_images = np.stack(backend.run("image", pixels))
    ours_texts = np.stack(backend.run("text", em.tokenizer.rows(TEXTS).ids))
    ref_transform = _reference_transform(arch, tag, em.preprocess.image_size)
    with torch.inference_mode():
        ref_images = model.encode_image(torch.stack([ref_transform(im) for im in images]))
        ref_texts = model.encode_text(reference_tokenizer(TEXTS))
    np.testing.assert_allclose(ours_images, ref_images.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours_texts, ref_texts.numpy(), atol=1e-5, rtol=0)
    # The check can fail: different inputs differ by ten times the tolerance or more
    # (MobileCLIP's random image tower is the least sensitive, ~4e-4).
    for ours in (ours_texts, ours_images):
        assert np.abs(ours[0] - ours[1]).max() > 1e-4


def test_siglip_matches_open_clip(siglip_tokenizer_folder):
    em = _engine_model(f"ViT-B-16-SigLIP/webli@{siglip_tokenizer_folder}")
    assert em.preprocess.resize_mode == "squash" and em.scoring == "sigmoid"
    assert em.backends[0].info.context_length == 64
    reference = open_clip.tokenizer.HFTokenizer(
        str(siglip_tokenizer_folder), context_length=64, clean="canonicalize")
    _check(em, "ViT-B-16-SigLIP", "webli", reference)


def test_mobileclip_matches_open_clip():
    em = _engine_model("MobileCLIP-S1/datacompdr")
    assert em.preprocess.interpolation == "bilinear" and em.scoring == "softmax"
    assert em.preprocess.mean == (0.0, 0.0, 0.0) and em.preprocess.std == (1.0, 1.0, 1.0)
    _check(em, "MobileCLIP-S1", "datacompdr", open_clip.get_tokenizer("MobileCLIP-S1"))


def test_eva02_matches_open_clip():
    em = _engine_model("EVA02-B-16/merged2b_s8b_b131k")
    assert em.preprocess.resize_mode == "shortest" and em.scoring == "softmax"
    assert em.backends[0].info.context_length == 77
    _check(em, "EVA02-B-16", "merged2b_s8b_b131k", open_clip.get_tokenizer("EVA02-B-16"))

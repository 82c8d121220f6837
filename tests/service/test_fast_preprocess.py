"""CLIP_PREPROCESS=fast: JPEGs decoded reduced in the DCT domain (Pillow's draft mode),
never below the model's image size; everything else as exact; embeddings close to exact's
on photo-like JPEGs (random ViT-B/32 weights: cosine >= 0.995, the issue's floor)."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from preprocess_fast import photo  # loadtests/ is on the path: tests/conftest.py
from pydantic import ValidationError
from workloads import photo_jpeg

from clip_core.config import PreprocessConfig
from clip_core.loader import load
from clip_core.preprocess import open_image
from service.app import create_app
from service.null_backend import NullBackend, model_shape
from service.prepare import ImagePreparer
from service.settings import Settings

SIZE = 224
PREP = PreprocessConfig(image_size=SIZE)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, quality=90) if fmt == "JPEG" else image.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def modes():
    preps = {m: ImagePreparer(PREP, 1, mode=m) for m in ("exact", "fast")}
    yield preps
    for p in preps.values():
        p.close()


@pytest.mark.parametrize(("width", "height", "decoded"), [
    (640, 480, (320, 240)),  # 1/2: 240 >= 224 > 120
    (1920, 1080, (480, 270)),  # 1/4: 270 >= 224 > 135
    (4000, 1800, (500, 225)),  # 1/8
    (447, 800, (447, 800)),  # 1/2 would leave 223 < 224: whole
    (449, 449, (225, 225)),  # 1/2 rounds up: 225 >= 224
])
def test_draft_keeps_the_shorter_side_at_least_the_target(width, height, decoded):
    data = _encode(Image.new("RGB", (width, height), (90, 140, 200)), "JPEG")
    image = open_image(data, draft=SIZE)
    assert min(image.size) >= SIZE and image.mode == "RGB"
    assert image.size == decoded
    assert open_image(data).size == (width, height)  # without draft: whole


def test_grayscale_and_cmyk_jpegs_keep_their_mode():
    for mode in ("L", "CMYK"):
        data = _encode(Image.new(mode, (900, 700)), "JPEG")
        image = open_image(data, draft=SIZE)
        assert image.mode == mode and image.size == (450, 350)


def test_only_jpegs_are_drafted_and_small_jpegs_match_exact(modes):
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8))
    same = [_encode(big, "PNG"), _encode(big.resize((300, 260)), "JPEG"),
            _encode(big.convert("L"), "BMP")]
    for i, data in enumerate(same):
        assert torch.equal(modes["fast"].prepare_one(i, data), modes["exact"].prepare_one(i, data))
    jpeg = _encode(big, "JPEG")
    assert not torch.equal(modes["fast"].prepare_one(0, jpeg), modes["exact"].prepare_one(0, jpeg))


def test_bad_input_fails_as_in_exact(modes):
    jpeg = photo_jpeg(3)
    for data, match in [(jpeg[: len(jpeg) // 3], "image 0: .*corrupt or truncated"),
                        (b"\xff\xd8\xff" + b"\x00" * 64, "image 0: ")]:
        for prep in modes.values():
            with pytest.raises(Exception, match=match):
                prep.prepare_one(0, data)


def test_turned_photos_are_turned_after_the_draft():
    image = open_image(photo(960, 480, 2))
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90° clockwise
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, exif=exif)
    preps = [ImagePreparer(PREP, 1, mode=m, exif_orientation=turn)
             for m, turn in (("fast", True), ("exact", True), ("exact", False))]
    try:
        fast, exact, unturned = (p.prepare_one(0, buf.getvalue()) for p in preps)
    finally:
        for p in preps:
            p.close()
    # Both upright and close; the unturned picture is another crop altogether.
    assert (fast.int() - exact.int()).abs().float().mean() < 3
    assert (unturned.int() - exact.int()).abs().float().mean() > 10


def test_embeddings_stay_within_the_floor_on_photo_like_jpegs():
    torch.manual_seed(0)
    loaded = load("ViT-B-32", random_weights=True)
    jpegs = [photo_jpeg(i) for i in range(3)] + [photo(1920, 1080, 0), photo(1280, 720, 1)]
    out = {}
    for mode in ("exact", "fast"):
        prep = ImagePreparer(loaded.preprocess, 2, mode=mode)
        try:
            pixels = torch.stack(asyncio.run(prep.prepare(jpegs)))  # (N, 3, 224, 224) uint8
        finally:
            prep.close()
        with torch.no_grad():
            out[mode] = loaded.model.encode_image(prep.transform.normalize(pixels),
                                                  normalize=True)  # (N, 512)
    cosine = (out["exact"] * out["fast"]).sum(dim=1)
    assert cosine.min().item() >= 0.995, cosine
    assert not torch.equal(out["exact"], out["fast"])  # fast did decode differently


def test_the_setting_reaches_the_decode_pool():
    with pytest.raises(ValidationError):
        Settings(preprocess="quick")
    jpeg = photo_jpeg(5)
    body = {"images": [base64.b64encode(jpeg).decode()], "encoding": "float"}
    null = NullBackend(model_shape("ViT-B-32"))
    got = {}
    for mode in ("exact", "fast"):
        settings = Settings(models=["ViT-B-32"], engine="null", device="cpu",
                            log_format="text", preprocess=mode)
        with TestClient(create_app(settings)) as c:
            r = c.post("/embed", json=body)
            assert r.status_code == 200, r.text
            got[mode] = np.array(r.json()["images"][0]["embedding"], np.float32)
        prep = ImagePreparer(model_shape("ViT-B-32").preprocess, 1, mode=mode,
                             exif_orientation=True)
        try:
            expected = null.run("image", [prep.prepare_one(0, jpeg)])[0]
        finally:
            prep.close()
        np.testing.assert_allclose(got[mode], expected, atol=1e-6)
    assert not np.allclose(got["exact"], got["fast"])

"""clip_core.preprocess against openai-clip's `_transform(n_px)` (and torchvision for the
other interpolations). Both sides decode the same bytes; tensors must agree to 1e-6."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from images import animated, encode, make_image
from PIL import Image

from clip_core.config import OPENAI_STD, PreprocessConfig
from clip_core.preprocess import MAX_RESIZED_PIXELS, ImageTransform, open_image

clip = pytest.importorskip("clip")
transforms = pytest.importorskip("torchvision.transforms")

SIZES_PX = (224, 288, 336, 384, 448)
TOL = 1e-6


@cache
def reference(n_px: int):
    return clip.clip._transform(n_px)


@cache
def ours(n_px: int = 224, policy: str = "reference") -> ImageTransform:
    return ImageTransform(PreprocessConfig(image_size=n_px), mode_policy=policy)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff}"


def check_bytes(data: bytes, n_px: int = 224) -> Image.Image:
    """Decodes `data` both ways, compares, and returns the reference's decoded image."""
    theirs = Image.open(io.BytesIO(data))
    assert_same(ours(n_px)(open_image(data)), reference(n_px)(theirs))
    return theirs


# (format, mode built, mode the decoder gives back)
ENCODED = [
    ("JPEG", "RGB", "RGB"),
    ("JPEG", "L", "L"),
    ("JPEG", "CMYK", "CMYK"),
    ("PNG", "RGB", "RGB"),
    ("PNG", "L", "L"),
    ("PNG", "LA", "LA"),
    ("PNG", "RGBA", "RGBA"),
    ("PNG", "P", "P"),
    ("PNG", "P+transparency", "P"),
    ("PNG", "1", "1"),
    ("PNG", "I;16", "I;16"),
    ("GIF", "P", "P"),
    ("GIF", "P+transparency", "P"),
    ("GIF", "L", "P"),
    ("WEBP", "RGB", "RGB"),
    ("WEBP", "RGBA", "RGBA"),
    ("BMP", "RGB", "RGB"),
    ("TIFF", "I;16", "I;16"),
    ("TIFF", "I", "I"),
    ("TIFF", "F", "F"),
    ("TIFF", "CMYK", "CMYK"),
    ("TIFF", "LAB", "LAB"),
    ("TIFF", "YCbCr", "YCbCr"),
]


@pytest.mark.parametrize(
    ("fmt", "mode", "decoded"), ENCODED, ids=[f"{f}-{m}" for f, m, _ in ENCODED]
)
@pytest.mark.parametrize("size", [(320, 240), (240, 320)], ids=["landscape", "portrait"])
def test_encoded_modes(fmt, mode, decoded, size):
    data = encode(make_image(*size, mode, seed=len(mode)), fmt)
    assert check_bytes(data).mode == decoded


# Modes no decoder above produces; compared on the in-memory image. PA and La are below.
IN_MEMORY = ["RGB", "L", "LA", "RGBA", "P", "P+transparency", "1", "CMYK", "I;16", "I", "F",
             "RGBX", "YCbCr", "LAB", "HSV", "RGBa"]  # fmt: skip


@pytest.mark.parametrize("mode", IN_MEMORY)
@pytest.mark.parametrize("size", [(301, 257), (224, 300), (500, 224)], ids=str)
def test_in_memory_modes(mode, size):
    # (224, 300) and (500, 224) need no resize: RGBA keeps its hidden colours there.
    image = make_image(*size, mode, seed=3)
    assert_same(ours()(image), reference(224)(image))


GEOMETRY = [
    (240, 320), (320, 240), (300, 300),  # portrait, landscape, square
    (1, 1), (1, 300), (300, 1), (2, 3),  # tiny
    (224, 400), (400, 224), (224, 224),  # short side already n_px
    (225, 224), (224, 227), (229, 224),  # crop offsets 0.5, 1.5, 2.5: round half to even
    (601, 451),
]  # fmt: skip


@pytest.mark.parametrize("size", GEOMETRY, ids=str)
@pytest.mark.parametrize(("fmt", "mode"), [("JPEG", "RGB"), ("PNG", "RGBA"), ("GIF", "P")])
def test_geometry(size, fmt, mode):
    check_bytes(encode(make_image(*size, mode, seed=size[0]), fmt))


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return encode(make_image(3000, 2000, "RGB", seed=5), "JPEG")


@pytest.mark.parametrize("n_px", [224, 448])
def test_large(large_jpeg, n_px):
    check_bytes(large_jpeg, n_px)
    portrait = Image.open(io.BytesIO(large_jpeg)).transpose(Image.Transpose.ROTATE_90)
    check_bytes(encode(portrait, "JPEG"), n_px)


@pytest.mark.parametrize("n_px", SIZES_PX)
@pytest.mark.parametrize(
    ("size", "fmt", "mode"),
    [
        ((480, 640), "JPEG", "RGB"),
        ((640, 480), "PNG", "RGBA"),
        ((400, 300), "GIF", "P"),
        ((500, 450), "WEBP", "RGB"),
        ((350, 777), "PNG", "I;16"),
        ((3, 40), "PNG", "L"),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_image_sizes_px(n_px, size, fmt, mode):
    check_bytes(encode(make_image(*size, mode, seed=n_px), fmt), n_px)


@pytest.mark.parametrize("n_px", SIZES_PX)
def test_short_side_equals_n_px(n_px):
    # no resize at all: only the crop (and RGBA's hidden colours) remain
    for size in [(n_px, n_px + 77), (n_px + 78, n_px)]:
        check_bytes(encode(make_image(*size, "RGBA", seed=1), "PNG"), n_px)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_first_frame(fmt):
    check_bytes(animated(300, 200, fmt))


def test_reference_crashes_on_La():
    # Pillow has no La -> RGB conversion; ours converts through LA.
    image = make_image(300, 240, "La", seed=2)
    with pytest.raises(ValueError, match="La"):
        reference(224)(image)
    out = ours()(image)
    assert out.shape == (3, 224, 224) and torch.isfinite(out).all()
    resize_crop = transforms.Compose([transforms.Resize(224, transforms.InterpolationMode.BICUBIC),
                                      transforms.CenterCrop(224)])  # fmt: skip
    rgb = resize_crop(image).convert("LA").convert("RGB")
    assert_same(out, reference(224)(rgb))


def test_reference_blackens_PA_and_ours_does_not():
    # Pillow resamples PA's palette indices and drops the palette; ours resizes it as RGBA.
    image = make_image(300, 240, "PA", seed=2)
    as_rgba = reference(224)(image.convert("RGBA"))
    assert_same(ours()(image), as_rgba)
    assert (reference(224)(image) - as_rgba).abs().max() > 1, "Pillow's PA resize now works"


def _levels(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in 8-bit grey levels between two normalised tensors."""
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    return ((a - b) * std * 255).abs().max().item()


@pytest.mark.parametrize(("size", "mode"), [((1, 1400), "L"), ((33, 45000), "L"),
                                            ((9500, 7), "RGBA")])  # fmt: skip
def test_extreme_aspect_ratio_within_a_few_levels(size, mode):
    w, h = size
    assert 224 * int(224 * max(w, h) / min(w, h)) > MAX_RESIZED_PIXELS  # the strip path
    image = make_image(w, h, mode, seed=4)
    assert _levels(ours()(image), reference(224)(image)) <= 3


INTERPOLATION = {
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "nearest": transforms.InterpolationMode.NEAREST,
}


@pytest.mark.parametrize("interpolation", list(INTERPOLATION))
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16"])
def test_other_configs_match_torchvision(interpolation, mode):
    # open_clip's weights use other sizes and means; the same pipeline applies.
    cfg = PreprocessConfig(
        image_size=256,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation=interpolation,
    )
    theirs = transforms.Compose(
        [
            transforms.Resize(cfg.image_size, interpolation=INTERPOLATION[interpolation]),
            transforms.CenterCrop(cfg.image_size),
            lambda im: im.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize(cfg.mean, cfg.std),
        ]
    )
    for size in [(333, 500), (640, 256)]:
        image = make_image(*size, mode, seed=9)
        assert_same(ImageTransform(cfg)(image), theirs(image))


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    w=st.integers(1, 500),
    h=st.integers(1, 500),
    n_px=st.sampled_from(SIZES_PX),
    mode=st.sampled_from(["RGB", "L", "RGBA", "P"]),
)
def test_random_sizes(w, h, n_px, mode):
    image = make_image(w, h, mode, seed=w * 1000 + h)
    assert_same(ours(n_px)(image), reference(n_px)(image))


def test_batch_matches_reference_per_image():
    images = [
        make_image(*s, "RGB", seed=i) for i, s in enumerate([(300, 200), (200, 300), (224, 224)])
    ]
    expected = torch.stack([reference(224)(im) for im in images])
    assert_same(ours().batch(images), expected)


def test_pixels_are_uint8_of_the_reference_crop():
    image = make_image(400, 300, "RGB", seed=6)
    crop = transforms.Compose([transforms.Resize(224, transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(224)])(image)  # fmt: skip
    expected = torch.from_numpy(np.array(crop)).permute(2, 0, 1)
    assert torch.equal(ours().pixels(image), expected)

"""clip_core.tensor_preprocess against the exact Pillow path (clip_core.preprocess).

The tensor path must stay within the tolerances docs/preprocessing.md states: on the CPU, at
most 2 grey levels at any pixel and an embedding cosine of at least 0.999 with random ViT-B/32
weights; whatever it hands to Pillow must equal Pillow's result exactly.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from workloads import photo_jpeg  # loadtests/ is on the path: tests/conftest.py

from clip_core.config import PreprocessConfig
from clip_core.errors import ImageDecodeError
from clip_core.preprocess import ImageTransform, open_image
from clip_core.tensor_preprocess import (
    TensorPreprocessor,
    grey_level,
    max_pixel_difference,
    read_jpeg_header,
)

CFG = PreprocessConfig()
MAX_LEVELS = 2  # grey levels; see docs/preprocessing.md
MEAN_LEVELS = 0.05
MIN_COSINE = 0.999
MIN_COSINE_CUDA = 0.995  # nvJPEG against libjpeg-turbo: docs/preprocessing.md

# (width, height): landscape and portrait photos, already at size, just above it, upscaled,
# a wide strip and a tall one, odd sizes whose crop offsets round.
SIZES = [(640, 480), (480, 640), (224, 224), (225, 224), (224, 500), (1001, 333), (100, 80),
         (61, 75), (1200, 230), (301, 999)]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: one of the load tests' JPEG scenes, resized."""
    base = Image.open(io.BytesIO(photo_jpeg(seed))).convert("RGB")
    return base.resize((width, height), Image.Resampling.LANCZOS)


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}), **options)
    return buf.getvalue()


def exact(tf: ImageTransform, blobs: list[bytes]) -> torch.Tensor:
    return torch.stack([tf(open_image(b)) for b in blobs])


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    blobs = [encode(photo(w, h, seed=i)) for i, (w, h) in enumerate(SIZES)]
    blobs.append(encode(photo(400, 300, seed=20).convert("L")))  # greyscale JPEG
    blobs.append(encode(photo(400, 300, seed=21), progressive=True))
    blobs.append(encode(photo(400, 300, seed=22), subsampling=0))  # 4:4:4 chroma
    return blobs


@pytest.fixture(scope="module")
def pre() -> TensorPreprocessor:
    return TensorPreprocessor(CFG, "cpu")


def test_jpegs_match_the_exact_path_within_two_grey_levels(pre, jpegs):
    tf = ImageTransform(CFG)
    got, ref = pre(jpegs), exact(tf, jpegs)
    assert got.shape == (len(jpegs), 3, 224, 224) and got.dtype == torch.float32
    assert pre.counts == {"tensor": len(jpegs), "fallback": 0}  # all took the tensor path
    worst = max_pixel_difference(got, ref)
    levels = (got - ref).abs() / grey_level(CFG)
    print(f"max difference {worst:.5f} normalised = {worst / grey_level(CFG):.2f} grey levels; "
          f"{(levels > 0.5).float().mean().item():.5%} of values differ")
    assert worst <= MAX_LEVELS * grey_level(CFG) + 1e-6
    # Most sizes differ at a few values in 10^4; where Pillow runs its vertical pass first,
    # up to a fifth of one image's values move by a level. On average, far below one level:
    assert levels.mean() <= MEAN_LEVELS
    # The uint8 pixels and normalize are the two halves of the call.
    assert torch.equal(pre.normalize(pre.pixels(jpegs)), got)


def test_embeddings_match_the_exact_path(pre, jpegs, vit_b32):
    tf = ImageTransform(CFG)
    with torch.inference_mode():
        a = vit_b32.encode_image(pre(jpegs), normalize=True)
        b = vit_b32.encode_image(exact(tf, jpegs), normalize=True)
    cos = (a * b).sum(-1)
    print(f"embedding cosine to exact: min {cos.min().item():.6f}")
    assert cos.min() >= MIN_COSINE


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_other_filters_and_sizes_follow_the_config(interpolation):
    cfg = PreprocessConfig(image_size=96, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                           interpolation=interpolation)
    blobs = [encode(photo(w, h, seed=i)) for i, (w, h) in enumerate([(640, 480), (70, 90)])]
    got = TensorPreprocessor(cfg, "cpu")(blobs)
    ref = exact(ImageTransform(cfg), blobs)
    assert got.shape == (2, 3, 96, 96)
    assert max_pixel_difference(got, ref) <= MAX_LEVELS * grey_level(cfg) + 1e-6


def test_fallbacks_give_exactly_the_pillow_result_in_their_places(pre):
    rgb = photo(300, 200, seed=5)
    png, grey_png = encode(rgb, "PNG"), encode(rgb.convert("L"), "PNG")
    cmyk = encode(rgb.convert("CMYK"))
    webp = encode(rgb, "WEBP")
    jpeg = encode(rgb)
    blobs = [png, jpeg, grey_png, cmyk, webp]
    before = dict(pre.counts)
    got = pre(blobs)
    ref = exact(ImageTransform(CFG), blobs)
    for i in (0, 2, 3, 4):
        assert torch.equal(got[i], ref[i]), i
    assert max_pixel_difference(got[1], ref[1]) <= MAX_LEVELS * grey_level(CFG) + 1e-6
    assert pre.counts["fallback"] - before["fallback"] == 4
    assert pre.counts["tensor"] - before["tensor"] == 1


def test_jpegs_with_trailing_bytes_or_no_end_marker_go_to_pillow(pre):
    jpeg = encode(photo(300, 200, seed=6))
    trailing = jpeg + b"\x00" * 16  # Pillow reads these; the end marker is not last
    assert not pre.eligible(trailing) and pre.eligible(jpeg)
    assert torch.equal(pre([trailing])[0], exact(ImageTransform(CFG), [trailing])[0])


@pytest.mark.parametrize("data", [b"", b"not an image", b"\xff\xd8\xff\xe0garbage"])
def test_undecodable_data_raises_the_usual_error(pre, data):
    with pytest.raises(ImageDecodeError):
        pre([encode(photo(64, 64)), data])


def test_truncated_jpeg_raises_the_usual_error(pre):
    jpeg = encode(photo(300, 200, seed=7))
    with pytest.raises(ImageDecodeError):
        pre([jpeg[: len(jpeg) // 2]])


def test_images_past_the_bomb_limit_are_left_to_pillow(pre, monkeypatch):
    jpeg = encode(photo(300, 200, seed=8))
    assert pre.eligible(jpeg)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    assert not pre.eligible(jpeg)


def test_empty_batch(pre):
    assert pre([]).shape == (0, 3, 224, 224)


def test_jpeg_header():
    h = read_jpeg_header(encode(photo(123, 45)))
    assert (h.width, h.height, h.precision, h.components, h.sof) == (123, 45, 8, 3, 0xC0)
    assert read_jpeg_header(encode(photo(50, 40), progressive=True)).sof == 0xC2
    assert read_jpeg_header(encode(photo(50, 40).convert("L"))).components == 1
    cmyk = read_jpeg_header(encode(photo(50, 40).convert("CMYK")))
    assert cmyk.components == 4 and cmyk.adobe_transform is not None
    assert read_jpeg_header(encode(photo(50, 40), "PNG")) is None
    assert read_jpeg_header(b"\xff\xd8\xff\xc0\x00") is None  # cut inside a segment


def test_torchvision_is_not_imported_with_clip_core():
    import subprocess
    import sys

    code = "import sys, clip_core.tensor_preprocess; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
def test_cuda_matches_cpu(jpegs, vit_b32):
    cpu = TensorPreprocessor(CFG, "cpu")
    cuda = TensorPreprocessor(CFG, "cuda")
    png = encode(photo(300, 200, seed=9), "PNG")
    blobs = [*jpegs, png]
    a = cuda(blobs)
    b = cpu(blobs)
    assert a.device.type == "cuda" and a.shape == b.shape
    # nvJPEG may refuse some JPEGs (progressive, on some versions): those fall back to Pillow.
    assert cuda.counts["tensor"] + cuda.counts["fallback"] == len(blobs)
    assert cuda.counts["fallback"] >= 1
    # The Pillow fallback, through pinned memory: the same uint8 pixels; normalised on
    # the GPU, whose float ops may round the last bit differently from the CPU's.
    assert torch.equal(cuda.pixels([png]).cpu(), cpu.pixels([png]))
    torch.testing.assert_close(a[-1].cpu(), b[-1], rtol=0, atol=1e-6)
    levels = (a.cpu() - b).abs() / grey_level(CFG)
    print(f"cuda vs cpu: max {levels.max().item():.1f} grey levels, "
          f"mean {levels.mean().item():.3f}")
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a few levels.
    assert levels.mean() <= 1.0
    with torch.inference_mode():
        model = vit_b32.to("cuda")
        try:
            ea = model.encode_image(a, normalize=True)
            eb = model.encode_image(b.cuda(), normalize=True)
        finally:
            vit_b32.to("cpu")
    # Measured 0.998 at worst on these small, busy images (0.999997 on 640x480 photos).
    assert F.cosine_similarity(ea, eb).min() >= MIN_COSINE_CUDA

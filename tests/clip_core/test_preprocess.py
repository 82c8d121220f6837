"""clip_core.preprocess: shapes, config, decoding errors, animated images, the composite policy
and the fallbacks for modes Pillow refuses. Parity with openai's transform is in tests/parity."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from clip_core.config import OPENAI_MEAN, OPENAI_STD, PreprocessConfig
from clip_core.errors import ImageDecodeError, InvalidInput
from clip_core.preprocess import DECODE_FORMATS, ImageTransform, open_image


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 55, height)[:, None, None]
    pixels = ramp + rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def solid(mode: str, colour, size=(300, 200)) -> Image.Image:
    return Image.new(mode, size, colour)


def rgb_pixels(tf: ImageTransform, image: Image.Image) -> np.ndarray:
    """(S, S, 3) uint8 as the transform sees the image just before normalising."""
    return tf.pixels(image).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def tf() -> ImageTransform:
    return ImageTransform(PreprocessConfig())


@pytest.fixture(scope="module")
def composite() -> ImageTransform:
    return ImageTransform(PreprocessConfig(), mode_policy="composite")


# --- shapes, dtype, config -------------------------------------------------------------------


def test_output_shape_and_dtype(tf):
    out = tf(photo(320, 240))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    pixels = tf.pixels(photo(320, 240))
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.uint8


def test_batch_stacks(tf):
    images = [photo(320, 240, 0), photo(200, 500, 1), solid("L", 7), solid("RGBA", (1, 2, 3, 4))]
    out = tf.batch(images)
    assert out.shape == (4, 3, 224, 224) and out.dtype == torch.float32
    for row, image in zip(out, images, strict=True):
        assert torch.equal(row, tf(image))
    assert tf.batch([]).shape == (0, 3, 224, 224)


def test_pixels_then_normalize_is_call(tf):
    image = photo(400, 300)
    assert torch.equal(tf.normalize(tf.pixels(image)), tf(image))
    batch = torch.stack([tf.pixels(image)] * 2)
    assert torch.equal(tf.normalize(batch)[1], tf(image))


def test_normalisation_values(tf):
    # a grey of 128 gives (128/255 - mean) / std per channel
    out = tf(solid("RGB", (128, 128, 128)))
    expected = (128 / 255 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    assert torch.allclose(out[:, 100, 100], expected.float(), atol=1e-6)


def test_image_size_comes_from_config():
    for size in (32, 336, 448):
        assert ImageTransform(PreprocessConfig(image_size=size))(photo(500, 400)).shape == (
            3,
            size,
            size,
        )


def test_mean_and_std_come_from_config(tf):
    image = photo(320, 240)
    other = ImageTransform(PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    a, b = tf(image), other(image)
    assert not torch.allclose(a, b)
    # both are affine in the same pixels: x = a * std + mean = b * 0.5 + 0.5
    x_a = a * torch.tensor(OPENAI_STD).view(3, 1, 1) + torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    assert torch.allclose(x_a, b * 0.5 + 0.5, atol=1e-5)
    assert b.min() >= -1 and b.max() <= 1


def test_interpolation_comes_from_config(tf):
    image = photo(500, 400)
    nearest = ImageTransform(PreprocessConfig(interpolation="nearest"))
    bilinear = ImageTransform(PreprocessConfig(interpolation="bilinear"))
    outs = [tf(image), nearest(image), bilinear(image)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(outs[i], outs[j])


@pytest.mark.parametrize(
    ("kwargs", "policy"),
    [
        ({"resize_mode": "longest"}, "reference"),  # open_clip has it; we do not
        ({"interpolation": "lanczos"}, "reference"),
        ({"image_size": 0}, "reference"),
        ({}, "clip"),
    ],
)
def test_bad_config_is_refused(kwargs, policy):
    with pytest.raises(ValueError):
        ImageTransform(PreprocessConfig(**kwargs), mode_policy=policy)


def test_not_an_image_or_empty_image(tf):
    with pytest.raises(TypeError):
        tf(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(InvalidInput, match="no pixels"):
        tf(Image.new("RGB", (0, 10)))


def test_clip_core_does_not_import_torchvision():
    code = "import sys, clip_core.preprocess; sys.exit('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- open_image ---------------------------------------------------------------------------------


def test_open_image_accepts_bytes_paths_and_files(tmp_path):
    data = encode(photo(64, 48), "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for source in (data, bytearray(data), memoryview(data), str(path), path, io.BytesIO(data)):
        image = open_image(source)
        assert image.size == (64, 48) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(photo(64, 48)))


def test_open_image_keeps_the_file_mode():
    deep = Image.fromarray(np.full((8, 8), 40000, np.uint16))
    assert open_image(encode(deep, "PNG")).mode == "I;16"
    assert open_image(encode(solid("CMYK", (1, 2, 3, 4)), "JPEG")).mode == "CMYK"


def test_open_image_missing_path_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "missing.png")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(1000),
        np.random.default_rng(0).bytes(5000),
        b"GIF89a",
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff",
    ],
    ids=["empty", "zeros", "random", "gif-magic", "png-magic", "jpeg-magic"],
)
def test_open_image_rejects_garbage(data):
    with pytest.raises(ImageDecodeError):
        open_image(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_open_image_rejects_truncated(fmt, keep):
    data = encode(photo(200, 150), fmt)
    with pytest.raises(ImageDecodeError) as info:
        open_image(data[: int(len(data) * keep)])
    assert type(info.value) is ImageDecodeError
    assert isinstance(info.value, InvalidInput)
    assert "BytesIO" not in str(info.value)


def test_open_image_restricts_formats():
    data = encode(photo(16, 16), "PPM")
    assert "PPM" not in DECODE_FORMATS
    with pytest.raises(ImageDecodeError, match="supported format"):
        open_image(data)
    assert open_image(data, formats=None).size == (16, 16)
    assert open_image(data, formats=["ppm"]).size == (16, 16)


def test_open_image_decompression_bomb(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageDecodeError, match="too large"):
        open_image(encode(photo(64, 64), "PNG"))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_image_gives_first_frame(tf, fmt):
    frames = [solid("RGB", c) for c in [(250, 0, 0), (0, 0, 250), (0, 250, 0)]]
    data = io.BytesIO()
    frames[0].save(data, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = open_image(data.getvalue())
    assert getattr(image, "n_frames", 1) == 3
    pixels = rgb_pixels(tf, image)
    assert pixels[..., 0].min() > 200 and pixels[..., 2].max() < 50


# --- reference policy: documented surprises and fallbacks ----------------------------------------


def test_reference_transparent_pixels(tf):
    hidden = solid("RGBA", (10, 200, 30, 0))
    # resized: Pillow resamples premultiplied alpha, so fully transparent pixels turn black
    assert (rgb_pixels(tf, hidden) == 0).all()
    # no resize (short side already 224): the hidden colour shows
    assert (rgb_pixels(tf, solid("RGBA", (10, 200, 30, 0), (224, 300))) == (10, 200, 30)).all()


def test_reference_clips_deep_images(tf):
    deep = Image.fromarray(np.full((200, 300), 30000, np.uint16))
    assert (rgb_pixels(tf, deep) == 255).all()
    unit_float = Image.fromarray(np.full((200, 300), 0.9, np.float32))
    assert (rgb_pixels(tf, unit_float) == 0).all()


def test_reference_falls_back_when_convert_refuses(tf, monkeypatch):
    image = Image.fromarray((np.arange(300 * 200).reshape(200, 300) % 600).astype(np.uint16))
    expected = tf(image)
    original = Image.Image.convert

    def old_pillow_convert(self, mode=None, *args, **kwargs):
        # Pillow before 10.x: "conversion from I;16 to RGB not supported"
        if self.mode.startswith("I;16") and mode == "RGB":
            raise ValueError(f"conversion from {self.mode} to {mode} not supported")
        return original(self, mode, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "convert", old_pillow_convert)
    assert torch.equal(tf(image), expected)


def test_reference_falls_back_when_resize_refuses(tf, monkeypatch):
    image = Image.fromarray((np.arange(300 * 200).reshape(200, 300) % 300).astype(np.uint16))
    expected = tf(image)
    original = Image.Image.resize

    def old_pillow_resize(self, size, resample=None, *args, **kwargs):
        if self.mode.startswith("I;16") and resample != Image.Resampling.NEAREST:
            raise ValueError("image has wrong mode")
        return original(self, size, resample, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", old_pillow_resize)
    assert torch.equal(tf(image), expected)


def test_unconvertible_mode_is_invalid_input(tf, monkeypatch):
    def refuse(self, mode=None, *args, **kwargs):
        raise ValueError("conversion not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    with pytest.raises(InvalidInput, match="mode 'RGB'"):
        tf(photo(50, 40))


def test_every_mode_gives_a_sane_tensor(tf, composite):
    base = photo(120, 90)
    rgba = base.convert("RGBA")
    images = [base.convert(m) for m in ("1", "L", "P", "CMYK", "RGBX", "YCbCr", "LAB", "HSV")]
    images += [rgba, rgba.convert("LA"), rgba.convert("LA").convert("La"), rgba.convert("RGBa")]
    images += [rgba.convert("PA"), base.convert("I"), base.convert("F")]
    images.append(Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257))
    big_endian = np.asarray(base.convert("L")).astype(">u2") * 257
    images.append(Image.frombytes("I;16B", base.size, big_endian.tobytes()))
    for image in images:
        for transform in (tf, composite):
            out = transform(image)
            assert out.shape == (3, 224, 224) and torch.isfinite(out).all(), image.mode


def test_extreme_aspect_ratio_is_cheap(tf):
    # the reference would build a 224 × 14.7M image; ours resamples only the centre strip
    strip = solid("RGB", (9, 99, 199), (1, 65535))
    assert (rgb_pixels(tf, strip) == (9, 99, 199)).all()
    wide = solid("RGBA", (9, 99, 199, 255), (65535, 1))
    assert (rgb_pixels(tf, wide) == (9, 99, 199)).all()


# --- composite policy ---------------------------------------------------------------------------


def test_composite_transparent_pixels_become_white(composite):
    assert (rgb_pixels(composite, solid("RGBA", (10, 200, 30, 0))) == 255).all()
    assert (rgb_pixels(composite, solid("LA", (10, 0))) == 255).all()
    half = rgb_pixels(composite, solid("RGBA", (0, 0, 0, 128)))
    assert (np.abs(half.astype(int) - 127) <= 1).all()
    opaque = rgb_pixels(composite, solid("RGBA", (10, 200, 30, 255)))
    assert (opaque == (10, 200, 30)).all()


def test_composite_palette_transparency(composite):
    image = Image.new("P", (300, 200), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    data = encode(image, "PNG", transparency=1)
    assert (rgb_pixels(composite, open_image(data)) == 255).all()
    gif = encode(image, "GIF", transparency=1)
    assert (rgb_pixels(composite, open_image(gif)) == 255).all()


def test_composite_rescales_16_bit(tf, composite):
    full = Image.fromarray(np.full((200, 300), 65535, np.uint16))
    half = Image.fromarray(np.full((200, 300), 32768, np.uint16))
    assert (rgb_pixels(composite, full) == 255).all()
    assert (rgb_pixels(composite, half) == 128).all()  # 32768 * 255 / 65535 = 127.5
    assert (rgb_pixels(tf, half) == 255).all()  # the reference clips
    ramp = np.tile(np.linspace(0, 65535, 224).astype(np.uint16), (224, 1))  # no resize
    pixels = rgb_pixels(composite, Image.fromarray(ramp))
    assert pixels.min() == 0 and pixels.max() == 255


def test_composite_rescales_int_and_float(composite):
    ramp = np.tile(np.linspace(0, 1, 224), (224, 1))
    as_float = Image.fromarray((ramp * 0.5 + 0.25).astype(np.float32))  # 0.25..0.75
    pixels = rgb_pixels(composite, as_float)
    assert pixels[:, 0].max() <= 2 and pixels[:, -1].min() >= 253
    as_int = Image.fromarray((ramp * 1e6 - 5e5).astype(np.int32))
    pixels = rgb_pixels(composite, as_int)
    assert pixels[:, 0].max() <= 2 and pixels[:, -1].min() >= 253
    odd = np.full((224, 224), 0.5, np.float32)
    odd[:, :10], odd[:, -10:], odd[0, 0] = np.nan, np.inf, 0.0
    pixels = rgb_pixels(composite, Image.fromarray(odd))
    assert pixels[100, 5, 0] == 0 and pixels[100, -5, 0] == 255 and pixels[100, 100, 0] == 255
    assert (rgb_pixels(composite, Image.fromarray(np.full((8, 8), 7.0, np.float32))) == 0).all()


def test_composite_matches_reference_for_rgb_and_grey(tf, composite):
    for image in (photo(320, 240), photo(240, 320).convert("L")):
        assert torch.equal(tf(image), composite(image))


def test_composite_filters_palette_images(tf, composite):
    # Pillow resizes P with nearest neighbour whatever the filter; composite converts first
    image = photo(320, 240).quantize(colors=64)
    assert torch.equal(tf(image), ImageTransform(PreprocessConfig(interpolation="nearest"))(image))
    assert torch.equal(composite(image), tf(image.convert("RGB")))

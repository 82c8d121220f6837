"""Deterministic, photo-like test images for preprocessing tests.

Everything derives from numpy's default_rng(seed), so the same call gives the same pixels on
every machine. Images mix smooth gradients, a few soft blobs, hard edges and per-pixel noise:
enough structure for resampling filters to disagree if they are not the same filter.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Modes make_image() can build, beyond the ones a file format gives directly.
MODES = (
    "RGB", "L", "LA", "RGBA", "P", "P+transparency", "1", "CMYK", "I;16", "I", "F",
    "RGBX", "YCbCr", "LAB", "HSV", "La", "RGBa", "PA",
)  # fmt: skip


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: gradients, blobs, edges and noise."""
    rng = np.random.default_rng(seed)
    # (1, W) and (H, 1), 0..1 across the image; every term below is separable, so large
    # images cost a few passes over H×W rather than dozens.
    u = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    v = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    img = np.empty((height, width, 3), dtype=np.float32)
    for c in range(3):
        angle = rng.uniform(0, 2 * np.pi)
        fu, fv, pu, pv = rng.uniform(2, 9), rng.uniform(2, 9), rng.uniform(), rng.uniform()
        wave_u = np.sin(2 * np.pi * (fu * u + pu)) * 40
        wave_v = np.cos(2 * np.pi * (fv * v + pv))
        img[..., c] = 120 * (np.cos(angle) * u + np.sin(angle) * v) + wave_u * wave_v + 80
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((u - cx) ** 2) / (2 * r * r)) * np.exp(-((v - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-90, 90, size=3).astype(np.float32)
    # a hard-edged rectangle: resampling ringing shows up on edges
    x0, x1 = sorted(rng.uniform(0, 1, size=2))
    y0, y1 = sorted(rng.uniform(0, 1, size=2))
    inside = ((u >= x0) & (u <= x1)) & ((v >= y0) & (v <= y1))
    img[inside] = rng.uniform(0, 255, size=3)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 12
    return np.clip(img, 0, 255, out=img).round().astype(np.uint8)


def alpha(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W) uint8 alpha: a fully transparent band, a fully opaque band and a ramp between."""
    rng = np.random.default_rng(seed + 1)
    u = np.linspace(0, 1, width)[None, :].repeat(height, axis=0)
    a = np.clip((u - 0.3) / 0.4, 0, 1) * 255 + rng.normal(0, 4, size=(height, width))
    a[:, u[0] < 0.3] = 0
    a[:, u[0] > 0.7] = 255
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A photo() in `mode`. Deep modes use their whole range; alpha modes have transparent
    pixels whose hidden colour is the photo's."""
    rgb = photo(width, height, seed)
    base = Image.fromarray(rgb)
    if mode in ("LA", "RGBA", "La", "RGBa", "PA"):
        rgba = Image.fromarray(np.dstack([rgb, alpha(width, height, seed)]))
        return rgba.convert("LA").convert("La") if mode == "La" else rgba.convert(mode)
    if mode == "P":
        return base.quantize(colors=200, method=Image.Quantize.MEDIANCUT)
    if mode == "P+transparency":
        pal = base.quantize(colors=200, method=Image.Quantize.MEDIANCUT)
        pal.info["transparency"] = int(np.asarray(pal)[height // 2, width // 2])
        return pal
    grey = np.asarray(base.convert("L")).astype(np.float64)
    if mode == "I;16":
        # 0..255 -> 0..65535 with the noise kept in the low bits
        deep = grey * 257 + np.random.default_rng(seed + 2).integers(0, 257, size=grey.shape)
        return Image.fromarray(np.clip(deep, 0, 65535).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((grey * 400 - 20000).astype(np.int32))  # -20000..82000
    if mode == "F":
        return Image.fromarray((grey / 255).astype(np.float32))  # 0..1, as float data often is
    return base.convert(mode)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    defaults = {"JPEG": {"quality": 92}, "WEBP": {"quality": 90}}
    buf = io.BytesIO()
    image.save(buf, fmt, **{**defaults.get(fmt, {}), **options})
    return buf.getvalue()


def animated(width: int, height: int, fmt: str, frames: int = 3, seed: int = 0) -> bytes:
    """An animated GIF or WebP whose frames are unrelated photos (frame 0 uses `seed`)."""
    images = [Image.fromarray(photo(width, height, seed + i)) for i in range(frames)]
    if fmt == "GIF":
        images = [im.quantize(colors=128) for im in images]
    buf = io.BytesIO()
    images[0].save(buf, fmt, save_all=True, append_images=images[1:], duration=100, loop=0)
    return buf.getvalue()

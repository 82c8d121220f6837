"""Image decoding and CLIP's image transform.

The "reference" policy reproduces openai/CLIP's `_transform(n_px)` bit for bit (bar the few
cases in docs/preprocessing.md where the reference crashes or goes wrong): torchvision's
Resize (shorter side to n_px, Pillow resampling in the image's own mode), CenterCrop,
convert("RGB"), ToTensor and Normalize. Embeddings made by openai/open_clip were computed that
way, so any departure would shift them. The "composite" policy is opt-in: it flattens alpha onto
white and rescales 16-bit, integer and float images instead of clipping them.

torchvision is deliberately not imported: it is a test-time reference only.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image

from .config import DECODE_FORMATS, PreprocessConfig
from .errors import ImageDecodeError, InvalidInput

ModePolicy = Literal["reference", "composite"]

_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

# The reference resizes the whole image before cropping, so a 1×65535 strip becomes
# 224×14.7M pixels (~13 GB). Past this many pixels in the uncropped resize, only the strip that
# survives the crop is resampled; values then differ from the reference by a few grey levels.
MAX_RESIZED_PIXELS = 1 << 26

_STRAIGHT_ALPHA = {"La": "LA", "RGBa": "RGBA"}  # premultiplied mode -> straight-alpha mode
_PREMULTIPLIED = {"LA": "La", "RGBA": "RGBa"}
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


def open_image(
    data: bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO,
    *,
    formats: Sequence[str] | None = DECODE_FORMATS,
    draft: int | None = None,
) -> Image.Image:
    """Decodes an image completely and returns it in the mode its file gives.

    With `draft=n`, a JPEG is decoded reduced in the DCT domain, at the smallest of
    libjpeg's scales (1/2, 1/4, 1/8) whose shorter side is still at least n pixels, so
    that a transform to n pixels after it still only downsamples ("fast" preprocessing:
    not the reference's pixels, see docs/preprocessing.md). Other formats decode whole.

    Multi-frame files (animated GIF or WebP, multi-page TIFF) give their first frame. Raises
    ImageDecodeError for anything Pillow cannot decode; a path that cannot be read raises the
    usual OSError, since that is not a problem with the image. `formats=None` allows every
    format Pillow knows.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageDecodeError("the image is empty (0 bytes)")
        fp: BinaryIO = io.BytesIO(data)
    elif isinstance(data, (str, os.PathLike)):
        fp = io.BytesIO(Path(data).read_bytes())
    else:
        fp = data

    allowed = None
    if formats is not None:
        Image.init()
        allowed = [f.upper() for f in formats if f.upper() in Image.OPEN]

    try:
        image = Image.open(fp, formats=allowed)
        if draft is not None:
            _draft(image, draft)
        image.load()
    except MemoryError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"the image is too large to decode: {e}") from e
    except Image.UnidentifiedImageError as e:
        names = ", ".join(allowed) if allowed is not None else "any format Pillow reads"
        raise ImageDecodeError(f"the data is not an image in a supported format ({names})") from e
    except Exception as e:
        # Truncated or corrupt data surfaces as OSError, SyntaxError, ValueError,
        # struct.error or EOFError depending on the plugin.
        raise ImageDecodeError(f"the image data is corrupt or truncated: {e}") from e
    return image


def _draft(image: Image.Image, n: int) -> None:
    """Pillow's JPEG draft mode, scale only: its scale is the largest of 8, 4, 2, 1 not
    above min(w // n, h // n), i.e. the shorter side stays >= n. Asking for the file's own
    mode keeps it (asking for "RGB" of a grayscale file would not, and YCbCr would change
    the colour conversion); the decoder keeps its accurate IDCT, not the draft one."""
    if image.format == "JPEG" and n > 0:  # MPO, a JPEG subclass, has frames of its own
        image.draft(image.mode, (n, n))


class ImageTransform:
    """Turns PIL images into normalised (3, S, S) float32 tensors for one set of weights.

    `pixels` and `normalize` are the two halves of `__call__`, so a server can prepare uint8
    pixels on the CPU and normalise on the accelerator with identical results.
    """

    def __init__(self, cfg: PreprocessConfig, mode_policy: ModePolicy = "reference"):
        if cfg.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"unsupported resize_mode {cfg.resize_mode!r}")
        if cfg.interpolation not in _FILTERS:
            raise ValueError(f"unsupported interpolation {cfg.interpolation!r}")
        if mode_policy not in ("reference", "composite"):
            raise ValueError(f"mode_policy must be 'reference' or 'composite', not {mode_policy!r}")
        if cfg.image_size <= 0:
            raise ValueError(f"image_size must be positive, not {cfg.image_size}")
        self.cfg = cfg
        self.mode_policy = mode_policy
        self.size = cfg.image_size
        self._filter = _FILTERS[cfg.interpolation]
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.pixels(image))

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, 3, S, S) float32."""
        if len(images) == 0:
            return torch.empty(0, 3, self.size, self.size, dtype=torch.float32)
        return self.normalize(torch.stack([self.pixels(im) for im in images]))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) uint8: the resized, cropped RGB image."""
        rgb = np.asarray(self.rgb(image), dtype=np.uint8)  # (S, S, 3)
        # HWC -> CHW in numpy: torch would copy with a parallel kernel, and every thread
        # that runs one keeps an OpenMP team (see service.backend on why that costs).
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, S, S) -> float32, in ToTensor's and Normalize's order of operations."""
        x = pixels.to(torch.float32).div(255)
        return x.sub_(self._mean.to(x.device)).div_(self._std.to(x.device))

    def rgb(self, image: Image.Image) -> Image.Image:
        """The S×S RGB image the tensor is made from."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        if image.width == 0 or image.height == 0:
            raise InvalidInput(f"the image has no pixels ({image.width}×{image.height})")
        if self.mode_policy == "composite":
            return _to_rgb(self._resize_crop(_flatten(image)))
        return _to_rgb(self._resize_crop(_resizable(image)))

    def _resize_crop(self, image: Image.Image) -> Image.Image:
        """Shorter side to S, then the centre S×S, with torchvision's sizes and offsets;
        or, for "squash" weights, the whole image to S×S (torchvision's Resize((S, S)))."""
        n = self.size
        w, h = image.size
        if self.cfg.resize_mode == "squash":
            return image if (w, h) == (n, n) else _resize(image, (n, n), self._filter)
        if w <= h:
            new_w, new_h = n, int(n * h / w)
        else:
            new_w, new_h = int(n * w / h), n
        # Python's round is half-to-even, as in torchvision's int(round(...)).
        top = round((new_h - n) / 2.0)
        left = round((new_w - n) / 2.0)
        if new_w * new_h > MAX_RESIZED_PIXELS:
            window = ((new_w, new_h), (left, top), n, self._filter)
            try:
                return _resize_centre_strip(image, *window)
            except (ValueError, OSError):
                return _resize_centre_strip(_resize_fallback(image), *window)
        # torchvision skips the resize when the size already matches; Pillow would not
        # (an RGBA image would go through premultiplied alpha and lose its hidden colours).
        if (new_w, new_h) != (w, h):
            image = _resize(image, (new_w, new_h), self._filter)
        return image.crop((left, top, left + n, top + n))


def _resize(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    try:
        return image.resize(size, resample)
    except (ValueError, OSError):
        # Pillow versions differ in which modes they resample ("image has wrong mode").
        return _resize_fallback(image).resize(size, resample)


def _resize_fallback(image: Image.Image) -> Image.Image:
    """A mode Pillow can resample that keeps the values."""
    mode = image.mode
    if mode.startswith("I;16"):
        return image.convert("I")
    if mode in _STRAIGHT_ALPHA:
        return image.convert(_STRAIGHT_ALPHA[mode])
    return image.convert("RGBA" if _has_alpha(image) else "RGB")


def _resize_centre_strip(
    image: Image.Image,
    full_size: tuple[int, int],
    offset: tuple[int, int],
    n: int,
    resample: int,
) -> Image.Image:
    """Resamples only the n×n window at `offset` of the image resized to `full_size`.

    Pillow resamples horizontally, rounds, then resamples vertically; this makes the same two
    passes as two calls, with the long axis limited to the window through `box`. The box moves
    the sampling positions by rounding error only, hence "a few grey levels".
    """
    (w, h), (new_w, new_h), (left, top) = image.size, full_size, offset
    if image.mode in ("1", "P") or resample == Image.Resampling.NEAREST:
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + n) * sx, (top + n) * sy)
        return image.resize((n, n), Image.Resampling.NEAREST, box=box)
    premultiplied = _PREMULTIPLIED.get(image.mode)
    work = image.convert(premultiplied) if premultiplied else image
    if w <= h:
        sy = h / new_h
        cols = work.resize((n, h), resample)
        out = cols.resize((n, n), resample, box=(0, top * sy, n, (top + n) * sy))
    else:
        sx = w / new_w
        rows = work.resize((n, h), resample, box=(left * sx, 0, (left + n) * sx, h))
        out = rows.resize((n, n), resample)
    return out.convert(image.mode) if premultiplied else out


def _resizable(image: Image.Image) -> Image.Image:
    """The reference policy's input; PA is the one mode whose resize goes wrong silently.

    Pillow resamples PA's palette indices as if they were intensities and drops the palette,
    so the reference turns PA images black. RGBA keeps the colours and the alpha.
    """
    return image.convert("RGBA") if image.mode == "PA" else image


def _to_rgb(image: Image.Image) -> Image.Image:
    """convert("RGB") as the reference does, routed through another mode where Pillow refuses."""
    try:
        return image.convert("RGB")
    except ValueError:
        pass
    mode = image.mode
    routes = [_STRAIGHT_ALPHA[mode]] if mode in _STRAIGHT_ALPHA else []
    if mode.startswith("I;16"):
        routes.append("I")  # Pillow's I -> RGB clips to 0..255 like I;16 -> RGB
    routes += ["RGBA", "L"]
    for via in routes:
        try:
            return image.convert(via).convert("RGB")
        except ValueError:
            continue
    raise InvalidInput(f"images of mode {mode!r} cannot be converted to RGB")


def _has_alpha(image: Image.Image) -> bool:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    palette = image.palette if image.mode == "P" else None
    return palette is not None and palette.mode.endswith("A")


def _flatten(image: Image.Image) -> Image.Image:
    """The composite policy's input: L or RGB, with alpha on white and deep images rescaled."""
    mode = image.mode
    if mode in _STRAIGHT_ALPHA:
        image = image.convert(_STRAIGHT_ALPHA[mode])
        mode = image.mode
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _rescale_to_l(image)
    if mode in ("1", "L"):
        return image.convert("L")
    return _to_rgb(image)


def _rescale_to_l(image: Image.Image) -> Image.Image:
    """I;16* maps 0..65535 onto 0..255; I and F have no fixed range, so min..max does.

    Non-finite floats are left out of the range and become 0 (NaN, -inf) or 255 (+inf); a
    constant image becomes black.
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    else:
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    with np.errstate(invalid="ignore"):  # inf * 0 in a constant image -> NaN -> 0
        scaled = np.nan_to_num((values - lo) * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # mode L

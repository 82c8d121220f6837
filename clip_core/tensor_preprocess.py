"""CLIP's image transform as tensor operations, so JPEGs can be decoded and resized on a GPU.

`TensorPreprocessor` decodes a batch of JPEGs with torchvision (nvJPEG on CUDA, libjpeg-turbo on
the CPU) and then resizes, crops and normalises with torch ops on the same device. It follows
`ImageTransform`'s reference policy step for step and differs from it by rounding only:

- the resize is Pillow's: the antialiased bicubic (or bilinear) kernel, horizontal pass first,
  each pass rounded half up and clamped to 0..255 as Pillow's uint8 passes are. Pillow's
  fixed-point weights still round a few values the other way, and for some sizes Pillow 13
  runs the vertical pass first, which moves up to a fifth of the values by one grey level
  (two at a handful of pixels);
- on CUDA, nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's, so the decoded pixels
  themselves differ by a few grey levels.

docs/preprocessing.md states the tolerances the tests hold this to. Whatever the tensor path
cannot treat the same way goes through the exact Pillow path instead, item by item: other
formats, JPEGs that are CMYK/YCCK, 12-bit, arithmetic-coded or Adobe-RGB, files that do not end
with an end-of-image marker, images past Pillow's decompression-bomb limit or
`MAX_RESIZED_PIXELS`, and anything the decoder refuses. Undecodable data therefore raises the
same `ImageDecodeError` as `open_image`.

torchvision is imported when a preprocessor is built, not at import: clip_core stays light.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import PreprocessConfig
from .preprocess import MAX_RESIZED_PIXELS, ImageTransform, ModePolicy, open_image

# torch's antialiased kernels are Pillow's (a = -0.5 for bicubic, support scaled when
# shrinking); "nearest-exact" samples at pixel centres as Pillow's NEAREST does.
_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}

# Start-of-frame markers libjpeg-turbo and nvJPEG both decode: baseline, extended sequential
# and progressive Huffman. Lossless, hierarchical and arithmetic-coded frames go to Pillow.
_SOF_TENSOR = {0xC0, 0xC1, 0xC2}
_SOF_ANY = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI: no length field


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    precision: int
    components: int
    sof: int  # the start-of-frame marker, 0xC0..0xCF
    adobe_transform: int | None  # APP14 "Adobe" colour transform flag, when present


def read_jpeg_header(data: bytes | bytearray | memoryview) -> JpegHeader | None:
    """The frame header of a JPEG, or None when `data` is not a JPEG this parser can read.

    Walks the marker segments up to the first start-of-frame; nothing is decoded.
    """
    mv = memoryview(data)
    n = len(mv)
    if n < 4 or mv[0] != 0xFF or mv[1] != 0xD8:
        return None
    pos, adobe = 2, None
    while pos + 4 <= n:
        if mv[pos] != 0xFF:
            return None
        marker = mv[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or scan data before any frame header
            return None
        (length,) = struct.unpack_from(">H", mv, pos + 2)
        if length < 2 or pos + 2 + length > n:
            return None
        body = mv[pos + 4 : pos + 2 + length]
        if marker == 0xEE and len(body) >= 12 and bytes(body[:5]) == b"Adobe":
            adobe = body[11]
        if marker in _SOF_ANY:
            if len(body) < 6:
                return None
            precision, height, width, comps = struct.unpack_from(">BHHB", body)
            return JpegHeader(width, height, precision, comps, marker, adobe)
        pos += 2 + length
    return None


def takes_tensor_path(blob: bytes | bytearray | memoryview, image_size: int) -> bool:
    """Whether a `TensorPreprocessor` making `image_size` px crops decodes `blob` itself;
    everything else takes the exact Pillow path. Reads the header only, so a caller can
    sort images before they reach the preprocessor (service.prepare does)."""
    h = read_jpeg_header(blob)
    if h is None or h.sof not in _SOF_TENSOR or h.precision != 8:
        return False
    if h.components not in (1, 3) or (h.components == 3 and h.adobe_transform == 0):
        return False  # CMYK/YCCK and untransformed RGB: decoders disagree on colours
    if h.width == 0 or h.height == 0 or not _ends_with_eoi(blob):
        return False
    bomb = Image.MAX_IMAGE_PIXELS
    if bomb is not None and h.width * h.height > bomb:
        return False  # Pillow warns or refuses; it should decide, not us
    new_w, new_h = _resized_size(h.width, h.height, image_size)
    return new_w * new_h <= MAX_RESIZED_PIXELS


def _ends_with_eoi(data: bytes | bytearray | memoryview) -> bool:
    # A truncated file lacks its end-of-image marker. libjpeg-turbo refuses such files, but
    # nvJPEG may return the part it read; Pillow decides instead, as open_image would.
    return len(data) >= 2 and data[-2] == 0xFF and data[-1] == 0xD9


def _resized_size(width: int, height: int, n: int) -> tuple[int, int]:
    """(new_w, new_h): shorter side to n, with torchvision's truncation (as ImageTransform)."""
    if width <= height:
        return n, int(n * height / width)
    return int(n * width / height), n


class TensorPreprocessor:
    """JPEG bytes -> (B, 3, S, S) float32 on `device`, as `ImageTransform` would make them.

    `pixels(blobs)` gives the uint8 (B, 3, S, S) crop and `normalize` the float tensor, like
    ImageTransform's two halves; calling the preprocessor does both.
    """

    def __init__(
        self,
        cfg: PreprocessConfig,
        device: str | torch.device = "cpu",
        mode_policy: ModePolicy = "reference",
    ):
        # ImageTransform validates the config and is the exact path for every fallback.
        self.exact = ImageTransform(cfg, mode_policy)
        self.cfg = cfg
        self.size = cfg.image_size
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._mode = _MODES[cfg.interpolation]
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32, device=self.device).view(3, 1, 1)
        from torchvision.io import ImageReadMode, decode_jpeg  # heavy: only when used

        self._decode_jpeg = decode_jpeg
        self._rgb = ImageReadMode.RGB
        # Counts of items per path since construction; a server can export them.
        self.counts = {"tensor": 0, "fallback": 0}

    def __call__(self, blobs: Sequence[bytes | bytearray | memoryview]) -> torch.Tensor:
        return self.normalize(self.pixels(blobs))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, S, S) -> float32, in ImageTransform.normalize's order of operations."""
        x = pixels.to(torch.float32).div(255)
        return x.sub_(self._mean.to(x.device)).div_(self._std.to(x.device))

    def eligible(self, blob: bytes | bytearray | memoryview) -> bool:
        """Whether `blob` takes the tensor path; everything else takes the exact Pillow path."""
        return takes_tensor_path(blob, self.size)

    def pixels(self, blobs: Sequence[bytes | bytearray | memoryview]) -> torch.Tensor:
        """(B, 3, S, S) uint8 on the device."""
        s = self.size
        out = torch.empty((len(blobs), 3, s, s), dtype=torch.uint8, device=self.device)
        if len(blobs) == 0:
            return out
        jpeg = [i for i, b in enumerate(blobs) if self.eligible(b)]
        decoded = self._decode(blobs, jpeg)
        rest = [i for i in range(len(blobs)) if i not in decoded]
        for i, image in decoded.items():
            out[i] = self._resize_crop(image)
        if rest:
            self._fallback(blobs, rest, out)
        self.counts["tensor"] += len(decoded)
        self.counts["fallback"] += len(rest)
        return out

    def _decode(
        self, blobs: Sequence[bytes | bytearray | memoryview], idx: list[int]
    ) -> dict[int, torch.Tensor]:
        """Item index -> (3, H, W) uint8 on the device, for the items the decoder accepted."""
        if not idx:
            return {}
        # The compressed bytes go into one host buffer (pinned for nvJPEG, which reads them
        # from the host) as 1-D uint8 views; copying also spares torch a read-only buffer.
        sizes = [len(blobs[i]) for i in idx]
        host = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=self._cuda)
        flat = host.numpy()
        views, off = [], 0
        for i, size in zip(idx, sizes, strict=True):
            flat[off : off + size] = np.frombuffer(blobs[i], dtype=np.uint8)
            views.append(host[off : off + size])
            off += size
        if self._cuda:
            try:
                images = self._decode_jpeg(views, mode=self._rgb, device=self.device)
                return dict(zip(idx, images, strict=True))
            except RuntimeError:
                pass  # one bad item fails the whole batch: find it below
        got = {}
        for i, view in zip(idx, views, strict=True):
            try:
                got[i] = self._decode_jpeg(view, mode=self._rgb, device=self.device)
            except RuntimeError:
                continue  # the exact path decodes it or raises ImageDecodeError
        return got

    def _resize_crop(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, S, S) uint8: ImageTransform._resize_crop on a tensor."""
        n = self.size
        h, w = image.shape[-2:]
        # "squash": the whole image to S×S; the crop below is then the whole of it.
        new_w, new_h = (n, n) if self.cfg.resize_mode == "squash" else _resized_size(w, h, n)
        top, left = round((new_h - n) / 2.0), round((new_w - n) / 2.0)
        if (new_w, new_h) == (w, h):
            return image[:, top : top + n, left : left + n]
        # Pillow resamples horizontally, rounds to uint8, then vertically: the same two passes
        # here keep its intermediate rounding. (1, 3, H, W) float32.
        x = image.unsqueeze(0).to(torch.float32)
        if new_w != w:
            x = self._pass(x, (h, new_w))
        # The vertical pass treats each column alone, so the crop's columns can go first.
        x = x[..., left : left + n]
        if new_h != h:
            x = self._pass(x, (new_h, n))
        return x[0, :, top : top + n].to(torch.uint8)

    def _pass(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self._mode == "nearest-exact":
            return F.interpolate(x, size=size, mode=self._mode)
        y = F.interpolate(x, size=size, mode=self._mode, antialias=True, align_corners=False)
        # Pillow's fixed-point passes round halves up (add half, shift), not to even.
        return y.add_(0.5).floor_().clamp_(0, 255)

    def _fallback(
        self, blobs: Sequence[bytes | bytearray | memoryview], idx: list[int], out: torch.Tensor
    ) -> None:
        """The exact Pillow path for `idx`, written into `out` (via pinned memory on CUDA)."""
        s = self.size
        host = torch.empty((len(idx), 3, s, s), dtype=torch.uint8, pin_memory=self._cuda)
        for k, i in enumerate(idx):
            host[k] = self.exact.pixels(open_image(blobs[i]))
        # From pinned memory the copy is asynchronous and ordered on the current stream; the
        # caching host allocator keeps the buffer until the copy has run.
        moved = host.to(self.device, non_blocking=self._cuda)
        for k, i in enumerate(idx):
            out[i] = moved[k]


def max_pixel_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference between two normalised batches (normalised units)."""
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def grey_level(cfg: PreprocessConfig) -> float:
    """One grey level (1/255) in normalised units, for the channel where it is largest."""
    return 1.0 / 255.0 / min(cfg.std)


__all__ = [
    "JpegHeader",
    "TensorPreprocessor",
    "grey_level",
    "max_pixel_difference",
    "read_jpeg_header",
    "takes_tensor_path",
]

"""Request inputs -> worker payloads, off the event loop.

Images are decoded, resized and cropped to uint8 (3, S, S) tensors in a bounded thread
pool at a lower priority than the model (service.tuning): Pillow releases the GIL while
it decodes and resamples, so this overlaps the model and other requests. With
`mode="device"`, a JPEG the tensor path reads as Pillow does is only checked there and
becomes an `EncodedImage`: the backend decodes it with the rest of its batch on the
model's device (clip_core.tensor_preprocess). Texts become
token id lists [sot, ..., eot] without padding; all but the smallest requests are
tokenised in a one-thread pool, so the loop spends its time on other requests (the BPE
holds the GIL, so this buys the loop's time, not throughput).

Errors name the offending input by its index in the request ("image 3: ...").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image, ImageOps

from clip_core.config import PreprocessConfig
from clip_core.errors import ImageDecodeError, InvalidInput
from clip_core.preprocess import DECODE_FORMATS, ImageTransform, open_image
from clip_core.tensor_preprocess import takes_tensor_path
from clip_core.tokenizer import TokenRows

from .engines import TextTokenizer
from .errors import EmptyInput, ImageFormatNotAllowed, ImageTooLarge, InvalidRequest
from .tuning import lower_priority

log = logging.getLogger(__name__)

# 8192 x 8192: a 50-megapixel photo passes; a decoded image is at most ~256 MB as RGBA,
# and the pool decodes at most max_workers of them at once.
DEFAULT_MAX_PIXELS = 1 << 26
DEFAULT_MAX_FRAMES = 256

ImageBytes = bytes | bytearray | memoryview

# Leading bytes of every format that may be allowed. Only the sniffed format's plugin
# is handed to Pillow, so bytes that merely claim a format reach no other decoder.
_SIGNATURES: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("JPEG", (b"\xff\xd8\xff",)),
    ("PNG", (b"\x89PNG\r\n\x1a\n",)),
    ("GIF", (b"GIF87a", b"GIF89a")),
    ("BMP", (b"BM",)),
    ("TIFF", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),  # classic and BigTIFF
)
# Formats recognised only to name them when refusing them.
_REFUSED: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("PDF", (b"%PDF",)),
    ("EPS", (b"%!PS", b"\xc5\xd0\xd3\xc6")),
    ("PSD", (b"8BPS",)),
    ("FITS", (b"SIMPLE  =",)),
    ("ICO", (b"\x00\x00\x01\x00",)),
    ("SVG", (b"<svg", b"<?xml")),
    ("JPEG 2000", (b"\x00\x00\x00\x0cjP  ", b"\xffO\xffQ")),
)
_EXIF_ORIENTATION = 0x0112
_TURNED = range(2, 9)  # EXIF orientations that move pixels; 1 is upright


@dataclass(frozen=True, eq=False)
class EncodedImage:
    """A JPEG checked (format, size, frames) but not decoded: the backend decodes it with
    its batch on the model's device (`ImagePreparer(mode="device")`)."""

    data: bytes
    index: int  # its position in the request, to name it when it does not decode


ImagePayload = torch.Tensor | EncodedImage


@dataclass(slots=True, eq=False)  # not frozen: a frozen __init__ costs the loop ~1 µs an image
class Base64Image:
    """An image still in base64, as a JSON or form field sent it: `text[start:]` (a data
    URI's payload starts past its header). `ImagePreparer` decodes it in its pool, so the
    event loop only hands the string over: decoding costs time linear in the body, which
    would hold up every other request on the loop."""

    text: str
    start: int = 0

    def decode(self, index: int) -> bytes:
        """Blocking: the image's bytes; InvalidRequest (or EmptyInput) naming image
        `index`, never echoing the field."""
        data = self.text[self.start:] if self.start else self.text
        try:
            raw = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"image {index}: not valid base64") from None
        if not raw:
            raise EmptyInput(f"image {index} is empty")
        return raw


ImageSource = ImageBytes | Base64Image


def sniff(data: ImageBytes) -> str | None:
    """The image format the leading bytes announce ("PNG", "PDF"...), or None."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF"
    for name, magics in (*_SIGNATURES, *_REFUSED):
        if head.startswith(magics):
            return name
    return None


class ImagePreparer:
    """Encoded images -> uint8 (3, S, S) pixel tensors for one preprocessing config, or,
    with `mode="device"`, `EncodedImage`s for the JPEGs the device decodes. With
    `mode="fast"`, JPEGs are decoded at a reduced scale first (not the reference's pixels;
    docs/preprocessing.md says how far from them).

    Before a decoder runs: the format is sniffed from the leading bytes and checked
    against `formats`; the header alone gives the size and frame count, checked against
    `max_pixels` (and Pillow's own decompression-bomb limit) and `max_frames`. Multi-frame
    images give their first frame. With `exif_orientation`, a photo is turned upright as
    its EXIF tag says, before resizing.
    """

    def __init__(
        self,
        preprocess: PreprocessConfig,
        max_workers: int = 2,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_frames: int = DEFAULT_MAX_FRAMES,
        formats: Sequence[str] = DECODE_FORMATS,
        exif_orientation: bool = False,
        mode: Literal["exact", "fast", "device"] = "exact",
    ):
        if mode not in ("exact", "fast", "device"):
            raise ValueError(f"mode must be 'exact', 'fast' or 'device', got {mode!r}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.transform = ImageTransform(preprocess)
        self.max_workers = max_workers
        self.max_pixels = max_pixels
        self.max_frames = max_frames
        self.formats = tuple(f.upper() for f in formats)
        self.exif_orientation = exif_orientation
        self.mode = mode
        # fast: JPEGs decoded reduced in the DCT domain to no less than S pixels
        # (clip_core.preprocess.open_image), then resized and cropped as in exact.
        self._draft = self.transform.size if mode == "fast" else None
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="prepare-image",
                                            initializer=lower_priority)

    async def prepare(self, images: Sequence[ImageSource]) -> list[ImagePayload]:
        """One payload per image, in order: a uint8 (3, S, S) tensor, or in device mode
        an `EncodedImage` for a JPEG the device decodes. A `Base64Image` is decoded from
        base64 first, in the pool.

        The first failure (lowest index among those seen) is raised as ImageDecodeError,
        InvalidInput, ImageTooLarge, ImageFormatNotAllowed or (bad base64)
        InvalidRequest naming the image, and images
        not yet started are not decoded. Cancelling the caller likewise drops the queued ones.
        """
        if not images:
            return []
        # The request goes to the pool as at most max_workers runs of consecutive images,
        # not one task per image: each task costs the event loop tens of microseconds
        # (a future, a wake-up, a callback), as much as the rest of an image's handling.
        n = len(images)
        size = -(-n // min(n, self.max_workers))
        stop = threading.Event()  # set on a failure or a cancel: the other runs stop early
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._executor, self._prepare_run, images, start,
                                        min(start + size, n), stop)
                   for start in range(0, n, size)]
        try:
            await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
            failed = [f.exception() for f in futures
                      if f.done() and not f.cancelled() and f.exception() is not None]
            if failed:
                raise failed[0]  # type: ignore[misc]
            if len(futures) == 1:
                return futures[0].result()
            return [p for f in futures for p in f.result()]
        finally:
            stop.set()
            for f in futures:
                f.cancel()  # no-op when done; a running run stops at its next image

    def _prepare_run(self, images: Sequence[ImageSource], start: int, end: int,
                     stop: threading.Event) -> list[ImagePayload]:
        """Blocking: images[start:end] in order, until one fails or `stop` is set (the
        payloads are then unused)."""
        out: list[ImagePayload] = []
        for i in range(start, end):
            if stop.is_set():
                break
            try:
                out.append(self.prepare_one(i, images[i]))
            except BaseException:
                stop.set()
                raise
        return out

    async def prepare_each(self, images: Sequence[ImageSource]
                           ) -> list[ImagePayload | BaseException]:
        """As `prepare`, but every image is tried and each failure is that image's own
        outcome (the exception naming it, in its place) instead of the request's: for
        /moderate, whose answers are per item (service.moderation)."""
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._executor, self.prepare_one, i, data)
                   for i, data in enumerate(images)]
        try:
            return list(await asyncio.gather(*futures, return_exceptions=True))
        finally:
            for f in futures:
                f.cancel()  # cancelled caller: queued decodes are dropped

    def prepare_one(self, index: int, data: ImageSource) -> ImagePayload:
        """Blocking: check, decode, orient, resize and crop image `index` of a request;
        in device mode, a JPEG the device decodes is only checked."""
        if isinstance(data, Base64Image):
            data = data.decode(index)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"image {index} is {type(data).__name__}, expected bytes")
        try:
            fmt = self._check_format(data)
            orientation = self._check_header(data, fmt)
            if self._on_device(data, fmt, orientation):
                return EncodedImage(bytes(data), index)
            with open_image(data, formats=[fmt], draft=self._draft) as image:
                return self.transform.pixels(self._upright(image))
        except ImageDecodeError as err:
            raise _indexed(ImageDecodeError, index, err) from err
        except InvalidInput as err:  # no pixels, or a mode that has no RGB
            raise _indexed(InvalidInput, index, err) from err
        except (ImageTooLarge, ImageFormatNotAllowed) as err:
            raise type(err)(f"image {index}: {err}") from None

    def close(self) -> None:
        """Stop the pool; queued decodes are dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _check_format(self, data: ImageBytes) -> str:
        if len(data) == 0:
            raise ImageDecodeError("the image is empty (0 bytes)")
        fmt = sniff(data)
        if fmt is None:
            raise ImageDecodeError(f"the data is not an image in an accepted format "
                                   f"({', '.join(self.formats)})")
        if fmt not in self.formats:
            raise ImageFormatNotAllowed(f"{fmt} images are not accepted; accepted: "
                                        f"{', '.join(self.formats)}")
        return fmt

    def _on_device(self, data: ImageBytes, fmt: str, orientation: int | None) -> bool:
        # Turned photos stay exact: the tensor path knows nothing of EXIF. So does what
        # the tensor path would hand back to Pillow anyway (CMYK, 12-bit, truncated...),
        # which is better decoded here, in parallel, than on the serving thread.
        return (self.mode == "device" and fmt == "JPEG" and orientation is not None
                and not (self.exif_orientation and orientation in _TURNED)
                and takes_tensor_path(data, self.transform.size))

    def _check_header(self, data: ImageBytes, fmt: str) -> int | None:
        """Refuse an image over the pixel or frame caps from its header, before decoding.
        Its EXIF orientation (1 when absent, unreadable or not asked for); None when the
        header does not read."""
        try:
            with Image.open(io.BytesIO(data), formats=[fmt]) as header:
                width, height = header.size
                frames = getattr(header, "n_frames", 1)  # walks frame headers, decodes none
                orientation = self._orientation(header) if self.mode == "device" else 1
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLarge("the image has too many pixels to decode") from None
        except Exception:
            return None  # not readable: open_image says why, in its own words
        # Pillow's bomb warning, as an error whatever the process's warning filters say.
        caps = [c for c in (self.max_pixels, Image.MAX_IMAGE_PIXELS) if c]
        limit = min(caps) if caps else None
        if limit is not None and width * height > limit:
            raise ImageTooLarge(f"the image is {width}×{height} pixels; at most {limit} "
                                f"pixels are accepted")
        if frames > self.max_frames:
            raise ImageTooLarge(f"the image has {frames} frames; at most "
                                f"{self.max_frames} are accepted")
        return orientation

    def _orientation(self, image: Image.Image) -> int:
        """The EXIF orientation `_upright` acts on; 1 when it would leave the pixels."""
        if not self.exif_orientation:
            return 1
        try:
            return image.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a malformed EXIF block: keep the pixels as stored
            log.debug("unreadable EXIF block; orientation ignored", exc_info=True)
            return 1

    def _upright(self, image: Image.Image) -> Image.Image:
        if self._orientation(image) not in _TURNED:
            return image
        return ImageOps.exif_transpose(image)


class TextPreparer:
    """Texts -> token id lists. Requests over either threshold are tokenised off the event
    loop by `aprepare`, in `executor` or else a pool of the preparer's own.

    The BPE holds the GIL, so the pool buys the loop its time back, not throughput: one
    thread ("tokenize_0") is enough, and more would only contend with the loop for the
    GIL. Past a few texts the hop (a future, a wake-up) costs the loop less than the
    tokenising it saves; a text or two stays inline, where the hop would cost more.
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        executor: Executor | None = None,
        inline_max_texts: int = 4,
        inline_max_chars: int = 20_000,
    ):
        self.tokenizer = tokenizer
        self.inline_max_texts = inline_max_texts
        self.inline_max_chars = inline_max_chars
        self._executor = executor
        self._own: ThreadPoolExecutor | None = None  # made on first use when no executor

    def prepare(self, texts: Sequence[str], truncate: bool = True) -> TokenRows:
        """Blocking: the unpadded id lists the worker takes, one per text. With
        `truncate=False`, TextTooLong names the first text that is over."""
        # Lists, not a tensor: the worker pads each batch to its own longest text.
        return self.tokenizer.rows(texts, truncate=truncate)

    async def aprepare(self, texts: Sequence[str], truncate: bool = True) -> TokenRows:
        """`prepare`, inline when small, in the pool when large."""
        if not self.is_large(texts):
            return self.prepare(texts, truncate)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool(), self.prepare, texts, truncate)

    def is_large(self, texts: Sequence[str]) -> bool:
        if len(texts) > self.inline_max_texts:
            return True
        chars = sum(len(t) for t in texts if isinstance(t, str))
        return chars > self.inline_max_chars

    def close(self) -> None:
        """Stop the preparer's own pool (a given executor is its owner's to stop)."""
        if self._own is not None:
            self._own.shutdown(wait=False, cancel_futures=True)

    def _pool(self) -> Executor:
        if self._executor is not None:
            return self._executor
        if self._own is None:
            self._own = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        return self._own


def _indexed(cls: type[InvalidInput], index: int, err: InvalidInput) -> InvalidInput:
    new = cls(f"image {index}: {err}")
    new.index = index  # type: ignore[attr-defined]
    return new

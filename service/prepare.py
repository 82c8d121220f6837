"""Request inputs -> worker payloads, off the event loop.

Images are decoded, resized and cropped to uint8 (3, S, S) tensors in a bounded thread
pool: Pillow releases the GIL while it decodes and resamples, so this overlaps the model
and other requests. Texts become token id lists [sot, ..., eot] without padding; large
requests are tokenised in an executor so the loop stays responsive (the BPE holds the
GIL, so this buys responsiveness, not throughput).

Errors name the offending input by its index in the request ("image 3: ...").
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from PIL import Image

from clip_core.config import PreprocessConfig
from clip_core.errors import ImageDecodeError, InvalidInput
from clip_core.preprocess import DECODE_FORMATS, ImageTransform, open_image
from clip_core.tokenizer import Tokenizer

# 8192 x 8192: a 50-megapixel photo passes; a decoded image is at most ~256 MB as RGBA,
# and the pool decodes at most max_workers of them at once.
DEFAULT_MAX_PIXELS = 1 << 26

ImageBytes = bytes | bytearray | memoryview


class ImagePreparer:
    """Encoded images -> uint8 (3, S, S) pixel tensors for one preprocessing config."""

    def __init__(
        self,
        preprocess: PreprocessConfig,
        max_workers: int = 2,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        formats: Sequence[str] = DECODE_FORMATS,
    ):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.transform = ImageTransform(preprocess)
        self.max_workers = max_workers
        self.max_pixels = max_pixels
        self.formats = tuple(formats)
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="prepare-image")

    async def prepare(self, images: Sequence[ImageBytes]) -> list[torch.Tensor]:
        """One uint8 (3, S, S) tensor per image, in order.

        The first failure (lowest index among those seen) is raised as ImageDecodeError or
        InvalidInput naming the image, and images not yet started are not decoded.
        Cancelling the caller likewise drops the queued ones.
        """
        if not images:
            return []
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._executor, self.prepare_one, i, data)
                   for i, data in enumerate(images)]
        try:
            await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
            failed = [f.exception() for f in futures
                      if f.done() and not f.cancelled() and f.exception() is not None]
            if failed:
                raise failed[0]  # type: ignore[misc]
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()  # no-op when done; a running decode finishes, unused

    def prepare_one(self, index: int, data: ImageBytes) -> torch.Tensor:
        """Blocking: decode, resize and crop image `index` of a request."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"image {index} is {type(data).__name__}, expected bytes")
        try:
            self._check_size(data)
            with open_image(data, formats=self.formats) as image:
                return self.transform.pixels(image)
        except ImageDecodeError as err:
            raise _indexed(ImageDecodeError, index, err) from err
        except InvalidInput as err:  # no pixels, or a mode that has no RGB
            raise _indexed(InvalidInput, index, err) from err

    def close(self) -> None:
        """Stop the pool; queued decodes are dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _check_size(self, data: ImageBytes) -> None:
        """Refuse an image over max_pixels from its header, before decoding it."""
        if self.max_pixels is None:
            return
        try:
            with Image.open(io.BytesIO(data), formats=list(self.formats)) as header:
                width, height = header.size
        except Exception:
            return  # not readable: open_image says why, in its own words
        if width * height > self.max_pixels:
            raise ImageDecodeError(f"the image is {width}×{height} pixels; at most "
                                   f"{self.max_pixels} pixels are accepted")


@dataclass(frozen=True)
class PreparedTexts:
    ids: list[list[int]]  # per text: [sot, ..., eot], truncated to the context length
    n_tokens: list[int]  # per text, sot and eot included, before truncation
    truncated: list[bool]

    @property
    def costs(self) -> list[int]:
        """Tokens the model computes per text: the batcher's cost of each text item."""
        return [len(row) for row in self.ids]


class TextPreparer:
    """Texts -> token id lists. Requests over either threshold go to `executor` (None:
    the loop's default executor) when prepared with `aprepare`."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        executor: Executor | None = None,
        inline_max_texts: int = 64,
        inline_max_chars: int = 20_000,
    ):
        self.tokenizer = tokenizer
        self.context_length = tokenizer.context_length
        self.inline_max_texts = inline_max_texts
        self.inline_max_chars = inline_max_chars
        self._executor = executor

    def prepare(self, texts: Sequence[str], truncate: bool = True) -> PreparedTexts:
        """Blocking. With `truncate=False`, TextTooLong names the first text that is over."""
        batch = self.tokenizer(texts, truncate=truncate)  # (N, context_length), zero padded
        rows = batch.ids.tolist()
        ids = [row[: min(n, self.context_length)]
               for row, n in zip(rows, batch.n_tokens, strict=True)]
        return PreparedTexts(ids=ids, n_tokens=batch.n_tokens, truncated=batch.truncated)

    async def aprepare(self, texts: Sequence[str], truncate: bool = True) -> PreparedTexts:
        """`prepare`, inline when small, in the executor when large."""
        if not self.is_large(texts):
            return self.prepare(texts, truncate)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.prepare, texts, truncate)

    def is_large(self, texts: Sequence[str]) -> bool:
        if len(texts) > self.inline_max_texts:
            return True
        chars = sum(len(t) for t in texts if isinstance(t, str))
        return chars > self.inline_max_chars


def _indexed(cls: type[InvalidInput], index: int, err: InvalidInput) -> InvalidInput:
    new = cls(f"image {index}: {err}")
    new.index = index  # type: ignore[attr-defined]
    return new

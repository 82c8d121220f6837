"""Preparing request inputs: images decoded in a bounded pool off the loop, texts trimmed
to their real tokens, and errors that name the offending input."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from clip_core.config import PreprocessConfig
from clip_core.errors import ImageDecodeError, TextTooLong
from clip_core.preprocess import ImageTransform, open_image
from clip_core.tokenizer import Tokenizer
from service.errors import ImageTooLarge
from service.prepare import ImagePreparer, TextPreparer

PREP = PreprocessConfig(image_size=32)


def encoded(width: int, height: int, mode: str = "RGB", fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


IMAGES = [
    encoded(40, 32),
    encoded(32, 70, "L", seed=1),
    encoded(64, 48, "RGB", "JPEG", seed=2),
    encoded(50, 50, "RGBA", seed=3),
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture
def preparer():
    p = ImagePreparer(PREP, max_workers=2)
    yield p
    p.close()


def test_pixels_equal_the_transforms_in_order(preparer):
    out = asyncio.run(preparer.prepare(IMAGES))
    transform = ImageTransform(PREP)
    assert len(out) == len(IMAGES)
    for data, pixels in zip(IMAGES, out, strict=True):
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
        assert torch.equal(pixels, transform.pixels(open_image(data)))
    assert asyncio.run(preparer.prepare([])) == []


def test_a_bad_image_is_named_by_its_index(preparer):
    images = [IMAGES[0], IMAGES[1], b"definitely not an image", IMAGES[2]]
    with pytest.raises(ImageDecodeError, match="image 2: ") as info:
        asyncio.run(preparer.prepare(images))
    assert info.value.index == 2
    with pytest.raises(ImageDecodeError, match=r"image 0: .*empty"):
        asyncio.run(preparer.prepare([b""]))
    truncated = IMAGES[2][: len(IMAGES[2]) // 2]
    with pytest.raises(ImageDecodeError, match="image 1: "):
        asyncio.run(preparer.prepare([IMAGES[0], truncated]))
    with pytest.raises(TypeError, match="image 0"):
        asyncio.run(preparer.prepare(["not bytes"]))  # type: ignore[list-item]


def test_images_over_max_pixels_are_refused_before_decoding():
    p = ImagePreparer(PREP, max_workers=1, max_pixels=40 * 40)
    try:
        out = asyncio.run(p.prepare([encoded(40, 40)]))
        assert out[0].shape == (3, 32, 32)
        with pytest.raises(ImageTooLarge, match=r"image 1: .*41×40 pixels"):
            asyncio.run(p.prepare([encoded(40, 40), encoded(41, 40)]))
    finally:
        p.close()


def test_the_pool_is_bounded_and_the_loop_stays_free(preparer):
    lock = threading.Lock()
    active, peak, threads = 0, 0, set()
    real = preparer.transform.pixels

    def slow_pixels(image):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
            threads.add(threading.current_thread().name)
        time.sleep(0.03)
        with lock:
            active -= 1
        return real(image)

    preparer.transform.pixels = slow_pixels  # type: ignore[method-assign]

    async def scenario():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        out = await preparer.prepare(IMAGES * 2)
        done.set()
        await task
        return out, ticks

    out, ticks = asyncio.run(scenario())
    assert len(out) == 8
    assert peak == 2  # overlapped, never beyond max_workers
    assert len(threads) <= 2 and all(n.startswith("prepare-image") for n in threads)
    assert ticks >= 3  # a blocked loop would tick once; ~4 rounds x 30 ms let it tick ~20


def test_texts_are_trimmed_to_their_tokens_and_flagged(tokenizer):
    texts = ["a photo of a cat", "", "word " * 100]
    prepared = TextPreparer(tokenizer).prepare(texts)
    sot, eot = tokenizer.sot_id, tokenizer.eot_id
    assert prepared.ids[0] == [sot, *tokenizer.encode(texts[0]), eot]
    assert prepared.ids[1] == [sot, eot]
    assert len(prepared.ids[2]) == 77 and prepared.ids[2][-1] == eot
    assert prepared.ids[2][:-1] == [sot, *tokenizer.encode(texts[2])][:76]
    assert prepared.truncated == [False, False, True]
    assert prepared.n_tokens == [len(prepared.ids[0]), 2, 102]
    assert [len(ids) for ids in prepared.ids] == [len(prepared.ids[0]), 2, 77]
    # The same ids as the tokenizer's padded rows, without the padding.
    padded = tokenizer(texts).ids
    for row, ids in zip(padded.tolist(), prepared.ids, strict=True):
        assert row == ids + [0] * (77 - len(ids))


def test_too_long_without_truncation_names_the_text(tokenizer):
    with pytest.raises(TextTooLong, match="text 2 ") as info:
        TextPreparer(tokenizer).prepare(["a", "b", "word " * 100], truncate=False)
    assert info.value.index == 2
    (ids,) = TextPreparer(tokenizer).prepare(["word " * 75], truncate=False).ids
    assert len(ids) == 77


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0
        self.threads: set[str] = set()

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1

        def record():
            self.threads.add(threading.current_thread().name)
            return fn(*args, **kwargs)

        return super().submit(record)


def test_large_inputs_are_tokenised_in_the_executor(tokenizer):
    executor = CountingExecutor()
    prep = TextPreparer(tokenizer, executor=executor)
    try:
        small = ["a cat", "a dog"]
        many = [f"photo number {i}" for i in range(65)]
        long = ["x" * 20_001]
        assert asyncio.run(prep.aprepare(small)) == prep.prepare(small)
        assert executor.submitted == 0
        assert asyncio.run(prep.aprepare(many)) == prep.prepare(many)
        assert asyncio.run(prep.aprepare(long)) == prep.prepare(long)
        assert executor.submitted == 2
        assert threading.current_thread().name not in executor.threads
        with pytest.raises(TextTooLong, match="text 64 "):
            asyncio.run(prep.aprepare([*many[:64], "word " * 100], truncate=False))
    finally:
        executor.shutdown()


class ThreadRecordingTokenizer:
    """Wraps a tokenizer and notes the thread each `rows` call ran on."""

    def __init__(self, inner):
        self.inner = inner
        self.threads: list[str] = []

    def rows(self, texts, truncate=True):
        self.threads.append(threading.current_thread().name)
        return self.inner.rows(texts, truncate=truncate)


def test_without_an_executor_requests_past_a_few_texts_go_to_a_tokenize_pool(tokenizer):
    recording = ThreadRecordingTokenizer(tokenizer)
    prep = TextPreparer(recording)
    few = ["a cat"] * prep.inline_max_texts
    many = [f"photo number {i}" for i in range(64)]
    try:
        assert asyncio.run(prep.aprepare(few)) == tokenizer.rows(few)
        assert asyncio.run(prep.aprepare(many)) == tokenizer.rows(many)
        assert asyncio.run(prep.aprepare(many[:5])) == tokenizer.rows(many[:5])
    finally:
        prep.close()
    loop_thread = threading.current_thread().name
    assert recording.threads[0] == loop_thread  # a few texts: inline, the hop costs more
    assert all(t.startswith("tokenize") for t in recording.threads[1:])  # ceiling.py's pools
    assert len(set(recording.threads[1:])) == 1  # one thread: the BPE holds the GIL

"""The decode pool: its default size (the cores the model does not need), and a request
handed to it as a few runs of images rather than one task per image, with the first
failure still named by its index and the rest of the request not decoded."""

from __future__ import annotations

import asyncio
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from clip_core.config import PreprocessConfig
from clip_core.errors import ImageDecodeError
from clip_core.preprocess import ImageTransform, open_image
from service.prepare import ImagePreparer
from service.settings import Settings
from service.tuning import decode_workers

PREP = PreprocessConfig(image_size=16)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("accelerator", "model_threads", "cores", "expected"), [
    (True, None, 16, 14),  # the event loop and the serving thread keep a core each
    (True, None, 4, 2),
    (True, None, 2, 1),
    (True, None, 1, 1),
    (False, None, 16, 4),  # the model may use every core: a niced quarter
    (False, None, 2, 2),
    (False, 12, 16, 4),  # what torch_threads leaves
    (False, 15, 16, 1),
    (False, 16, 16, 4),  # torch_threads at every core: as unset
])
def test_auto_leaves_the_model_its_cores(accelerator, model_threads, cores, expected):
    assert decode_workers("auto", accelerator=accelerator, model_threads=model_threads,
                          cores=cores) == expected


def test_a_number_is_taken_as_given():
    assert decode_workers(3, accelerator=True, model_threads=None, cores=16) == 3
    assert Settings().prepare_workers == "auto"
    assert Settings(prepare_workers="6").prepare_workers == 6
    with pytest.raises(ValidationError):
        Settings(prepare_workers=0)
    with pytest.raises(ValidationError):
        Settings(prepare_workers="many")


class CountingPool(ThreadPoolExecutor):
    def __init__(self, workers: int):
        super().__init__(workers)
        self.tasks = 0

    def submit(self, fn, /, *args, **kwargs):
        self.tasks += 1
        return super().submit(fn, *args, **kwargs)


def _preparer(workers: int) -> tuple[ImagePreparer, CountingPool]:
    prep = ImagePreparer(PREP, workers)
    prep.close()
    pool = prep._executor = CountingPool(workers)
    return prep, pool


@pytest.mark.parametrize(("workers", "n", "tasks"), [(2, 64, 2), (3, 64, 3), (4, 3, 3), (1, 5, 1)])
def test_a_request_is_a_few_runs_in_order(workers, n, tasks):
    prep, pool = _preparer(workers)
    images = [_png(i % 7) for i in range(n)]
    try:
        out = asyncio.run(prep.prepare(images))
    finally:
        pool.shutdown()
    assert pool.tasks == tasks
    transform = ImageTransform(PREP)
    assert len(out) == n
    for data, pixels in zip(images, out, strict=True):
        assert torch.equal(pixels, transform.pixels(open_image(data)))


def test_the_first_failure_is_named_and_stops_the_other_runs():
    prep, pool = _preparer(2)
    decoded: list[int] = []
    failed = threading.Event()
    real = prep.prepare_one

    def ordered(index, data):
        if index >= 4:  # the second run starts only once the first has failed
            assert failed.wait(30)
        decoded.append(index)
        try:
            return real(index, data)
        except ImageDecodeError:
            failed.set()
            raise

    prep.prepare_one = ordered  # type: ignore[method-assign]
    # Two runs of 4: [0..3] fails at 1; [4..7] would fail at 6.
    images = [_png(0), b"not an image", *[_png(i) for i in range(2, 6)], b"junk", _png(7)]
    try:
        with pytest.raises(ImageDecodeError, match="image 1: ") as info:
            asyncio.run(prep.prepare(images))
    finally:
        pool.shutdown(wait=True)
    assert info.value.index == 1
    # The failing run stops at once; the other at most finishes an image it had started.
    assert decoded[:2] == [0, 1] and set(decoded) <= {0, 1, 4}

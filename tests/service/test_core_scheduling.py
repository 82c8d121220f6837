"""Engine-level scheduling on a tiny random model: shared classifier builds, and
refusals made before any image is decoded."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, metric_total, random_clip
from PIL import Image

from clip_core.checkpoint import save_checkpoint
from clip_core.config import PreprocessConfig
from service.core import Engine
from service.errors import Overloaded
from service.metrics import Metrics
from service.settings import Settings

PREP = PreprocessConfig(image_size=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    save_checkpoint(random_clip(TINY_VIT, seed=5), path, PREP)
    return path


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def run(scenario, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(scenario(), timeout))


async def started(checkpoint, **settings) -> Engine:
    engine = Engine(Settings(models=[str(checkpoint)], **settings), Metrics())
    await engine.start()
    return engine


def test_concurrent_requests_for_a_new_label_set_embed_it_once(checkpoint):
    labels = ["a cat", "a dog", "a bird"]

    async def scenario():
        engine = await started(checkpoint)
        try:
            m = engine.model(None)
            calls = []
            embed_texts = engine.embed_texts

            async def counting(*args, **kwargs):
                calls.append(args[1])
                return await embed_texts(*args, **kwargs)

            engine.embed_texts = counting
            deadline = engine.deadline(None)
            clfs = await asyncio.gather(*(engine.classifier(m, labels, None, deadline)
                                          for _ in range(8)))
            assert len(calls) == 1  # one build served all eight
            for clf in clfs[1:]:
                np.testing.assert_array_equal(clf, clfs[0])
            await engine.classifier(m, labels, None, deadline)
            assert len(calls) == 1  # and then the cache
            assert not engine.classifiers[m.name].building
        finally:
            await engine.drain(5)

    run(scenario)


def test_a_caller_that_leaves_does_not_cancel_the_build_others_wait_for(checkpoint):
    async def scenario():
        engine = await started(checkpoint)
        try:
            m = engine.model(None)
            deadline = engine.deadline(None)
            first = asyncio.ensure_future(engine.classifier(m, ["x", "y"], None, deadline))
            second = asyncio.ensure_future(engine.classifier(m, ["x", "y"], None, deadline))
            await asyncio.sleep(0)
            first.cancel()
            clf = await second
            assert clf.shape == (2, 64)
            assert first.cancelled()
        finally:
            await engine.drain(5)

    run(scenario)


def test_under_overload_images_are_refused_before_they_are_decoded(checkpoint):
    async def scenario():
        engine = await started(checkpoint, max_queue_items=2)
        m = engine.model(None)
        entered, gate = threading.Event(), threading.Event()
        run_batch = m.backend.run

        def held(kind, payloads):
            entered.set()
            gate.wait(10)
            return run_batch(kind, payloads)

        m.backend.run = held
        decoded = []
        prepare = m.images.prepare

        async def counting_prepare(images):
            decoded.append(len(images))
            return await prepare(images)

        m.images.prepare = counting_prepare
        try:
            deadline = engine.deadline(None)
            busy = asyncio.ensure_future(engine.embed_images(m, [_png(), _png()], deadline))
            while not entered.is_set():  # until both images are on the model
                await asyncio.sleep(0.005)
            with pytest.raises(Overloaded):
                await engine.embed_images(m, [_png()], deadline)
            assert decoded == [2]  # the refused image was never decoded
            assert metric_total(engine.metrics.render().decode(), "clip_rejected_items_total",
                                model=m.name, modality="image") == 1
            gate.set()
            assert (await busy).shape == (2, 64)
        finally:
            gate.set()
            await engine.drain(5)

    run(scenario)


def _threads_named(name: str) -> int:
    """Threads of this process whose kernel name is `name`, read from /proc."""
    count = 0
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            count += Path(f"/proc/self/task/{tid}/comm").read_text().strip() == name
    return count


def _name_this_thread(name: str) -> None:
    """The calling thread's kernel name (at most 15 bytes); threads it starts inherit it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(15, name.encode(), 0, 0, 0) != 0:  # PR_SET_NAME
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and prctl")
@pytest.mark.parametrize("parallel_op", [False, True])
def test_preprocessing_in_another_thread_starts_no_openmp_team(parallel_op):
    """Only the worker thread should own an OpenMP team (service.tuning explains why).

    A thread that libgomp starts for a team inherits the kernel name of the thread that
    ran the parallel op, so the preparing thread gets a name of its own and the test
    counts the threads that bear it: other threads of the process, starting or ending,
    are not counted. The parallel op shows that the count sees a team when there is one.
    """
    from clip_core.preprocess import ImageTransform

    transform = ImageTransform(PreprocessConfig(image_size=224))
    image = Image.new("RGB", (640, 480), (10, 120, 200))
    name = "prep-probe"

    def prepare():
        _name_this_thread(name)
        pixels = transform.pixels(image)
        if parallel_op:
            with torch_threads(2):
                torch.ones(512, 512) @ torch.ones(512, 512)
        return pixels, _threads_named(name)

    with ThreadPoolExecutor(1) as pool:
        pixels, named = pool.submit(prepare).result()
    assert pixels.shape == (3, 224, 224) and pixels.is_contiguous()
    if parallel_op:
        assert named > 1  # the thread and the team it started
    else:
        assert named == 1  # the preparing thread alone: no team left behind


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_the_model_loads_in_a_thread_that_ends(checkpoint, monkeypatch):
    import service.engines.torch_engine as torch_engine

    loaders: list[threading.Thread] = []
    load = torch_engine.load

    def recording_load(*args, **kwargs):
        loaders.append(threading.current_thread())
        return load(*args, **kwargs)

    monkeypatch.setattr(torch_engine, "load", recording_load)

    async def scenario():
        engine = await started(checkpoint)
        try:
            assert len(loaders) == 1
            assert loaders[0] is not threading.main_thread()  # off the event loop
            assert not loaders[0].is_alive()  # and its OpenMP team is gone with it
        finally:
            await engine.drain(5)

    run(scenario)

"""ClipBackend on a tiny CPU model: batching changes no result, errors map to the worker's
terms, and the real ModelWorker serves it end to end."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from PIL import Image

from clip_core.config import PreprocessConfig
from clip_core.loader import LoadedModel
from clip_core.model import CLIP
from clip_core.preprocess import ImageTransform
from clip_core.tokenizer import Tokenizer
from service.backend import BackendInfo, ClipBackend
from service.batcher import BatcherConfig
from service.errors import OutOfMemory
from service.prepare import TextPreparer
from service.worker import ModelWorker

TINY = TINY_VIT
PREP = PreprocessConfig(image_size=32)
TEXTS = [
    "a photo of a cat",
    "dog",
    "a very long caption " * 30,  # truncated to the context length
    "an oil painting of a lighthouse at dusk, seen from the sea",
    "",
]


def tiny_model(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(TINY).eval()


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 32), (32, 57), (64, 64), (33, 90), (100, 45)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 5][::-1], 3), dtype=np.uint8))
            for i in range(n)]


@pytest.fixture(scope="module")
def model() -> CLIP:
    return tiny_model()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def backend(model) -> ClipBackend:
    return ClipBackend(LoadedModel("tiny", model, PREP, "random"),
                       warmup_images=4, warmup_tokens=4 * 77)


def direct_images(model: CLIP, images: list[Image.Image]) -> torch.Tensor:
    transform = ImageTransform(PREP)
    with torch.no_grad():
        return torch.cat([model.encode_image(transform(im)[None]) for im in images])


def stacked(vectors: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(vectors))


def test_image_batch_equals_direct_encoding_in_order(backend, model):
    images = random_images(5)
    pixels = [ImageTransform(PREP).pixels(im) for im in images]
    expected = direct_images(model, images)
    out = backend.run("image", pixels)
    assert len(out) == 5
    assert all(v.dtype == np.float32 and v.shape == (64,) for v in out)
    torch.testing.assert_close(stacked(out), expected, rtol=0, atol=1e-5)
    reversed_out = backend.run("image", pixels[::-1])
    torch.testing.assert_close(stacked(reversed_out[::-1]), expected, rtol=0, atol=1e-5)


def test_text_batch_of_mixed_lengths_equals_direct_encoding(backend, model, tokenizer):
    prepared = TextPreparer(tokenizer).prepare(TEXTS)
    assert len({len(r) for r in prepared.ids}) == len(TEXTS)  # every length differs
    with torch.no_grad():
        expected = model.encode_text(tokenizer(TEXTS).ids)
    out = backend.run("text", prepared.ids)
    torch.testing.assert_close(stacked(out), expected, rtol=0, atol=1e-5)
    # Alone or in another order, each text gives the same vector.
    for i in range(len(TEXTS)):
        (alone,) = backend.run("text", [prepared.ids[i]])
        np.testing.assert_allclose(alone, expected[i].numpy(), rtol=0, atol=1e-5)
    reversed_out = backend.run("text", prepared.ids[::-1])
    torch.testing.assert_close(stacked(reversed_out[::-1]), expected, rtol=0, atol=1e-5)


def test_results_are_raw_and_own_their_memory(backend, model, tokenizer):
    ids = TextPreparer(tokenizer).prepare(["a cat", "a dog"]).ids
    out = backend.run("text", ids)
    assert all(v.base is None for v in out)  # not views of one batch array
    with torch.no_grad():
        normed = model.encode_text(tokenizer(["a cat", "a dog"]).ids, normalize=True)
    raw = stacked(out)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), normed,
                               rtol=0, atol=1e-5)


def test_info_and_logit_scale(backend, model):
    assert backend.info == BackendInfo(name="tiny", embed_dim=64, image_size=32, device="cpu",
                                       dtype="float32", context_length=77)
    assert backend.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    assert backend.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)


def test_malformed_payloads_raise_for_the_worker_to_isolate(backend):
    with pytest.raises(ValueError, match="image payload 1"):
        backend.run("image", [torch.zeros(3, 32, 32, dtype=torch.uint8),
                              torch.zeros(3, 31, 32, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="text payload 0"):
        backend.run("text", [list(range(78))])
    assert backend.run("text", []) == []


@pytest.mark.parametrize("message", [
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 123456789 bytes.",
])
def test_out_of_memory_becomes_the_workers_error(message):
    model = tiny_model()
    backend = ClipBackend(LoadedModel("tiny", model, PREP, "random"))

    def fail(*args, **kwargs):
        raise RuntimeError(message)

    model.encode_image = fail
    model.encode_text = fail
    with pytest.raises(OutOfMemory, match="image batch of 2"):
        backend.run("image", [torch.zeros(3, 32, 32, dtype=torch.uint8)] * 2)
    with pytest.raises(OutOfMemory, match="text batch of 1"):
        backend.run("text", [[49406, 320, 49407]])


def test_other_errors_propagate():
    model = tiny_model()
    backend = ClipBackend(LoadedModel("tiny", model, PREP, "random"))

    def fail(*args, **kwargs):
        raise RuntimeError("shape mismatch somewhere")

    model.encode_image = fail
    with pytest.raises(RuntimeError, match="shape mismatch"):
        backend.run("image", [torch.zeros(3, 32, 32, dtype=torch.uint8)])


def test_warmup_runs_both_towers_and_sets_threads(model):
    backend = ClipBackend(LoadedModel("tiny", model, PREP, "random"), threads=1)
    before = torch.get_num_threads()
    try:
        backend.warmup()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError):
        ClipBackend(LoadedModel("tiny", model, PREP, "random"), threads=0)


def test_model_worker_serves_concurrent_requests(backend, model, tokenizer):
    images = random_images(7, seed=3)
    pixels = [ImageTransform(PREP).pixels(im) for im in images]
    expected_images = direct_images(model, images)
    prepared = TextPreparer(tokenizer).prepare(TEXTS)
    with torch.no_grad():
        expected_texts = model.encode_text(tokenizer(TEXTS).ids)

    async def scenario():
        worker = ModelWorker(backend, BatcherConfig(max_batch_size=4, max_batch_tokens=4 * 77),
                             name="tiny")
        await worker.start()
        try:
            image_requests = [pixels[0:3], pixels[3:4], pixels[4:7]]
            text_requests = [[0, 1], [2], [3, 4]]
            results = await asyncio.wait_for(asyncio.gather(
                *(worker.submit_many("image", req) for req in image_requests),
                *(worker.submit_many("text", [prepared.ids[i] for i in req],
                                     [len(prepared.ids[i]) for i in req])
                  for req in text_requests),
            ), timeout=20)
        finally:
            await worker.drain(timeout=5)
        image_out = [r.value for req in results[:3] for r in req]
        torch.testing.assert_close(stacked(image_out), expected_images, rtol=0, atol=1e-5)
        text_out = [r.value for req in results[3:] for r in req]
        torch.testing.assert_close(stacked(text_out), expected_texts, rtol=0, atol=1e-5)
        assert max(r.batch_size for req in results for r in req) <= 4

    asyncio.run(scenario())


@pytest.mark.gpu
def test_cuda_fp16_matches_cpu_fp32(model, tokenizer):
    cuda = copy.deepcopy(model).to("cuda", torch.float16)
    gpu = ClipBackend(LoadedModel("tiny", cuda, PREP, "random"),
                      warmup_images=8, warmup_tokens=8 * 77)
    cpu = ClipBackend(LoadedModel("tiny", model, PREP, "random"))
    gpu.warmup()
    assert gpu.info.dtype == "float16" and gpu.info.device.startswith("cuda")
    pixels = [ImageTransform(PREP).pixels(im) for im in random_images(5)]
    ids = TextPreparer(tokenizer).prepare(TEXTS).ids
    for kind, payloads in (("image", pixels), ("text", ids)):
        a = stacked(gpu.run(kind, payloads))
        b = stacked(cpu.run(kind, payloads))
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        assert cosine.min() > 0.999, (kind, cosine)

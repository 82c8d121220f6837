"""clip_core.graphs: bucketing and padding through EagerRunner on the CPU; CUDA graphs on a GPU."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import TINY_VIT, random_clip

from clip_core.graphs import (
    EagerRunner,
    GraphRunner,
    bucket_for,
    chunks,
    default_buckets,
    pad_to,
)

BUCKETS = [1, 2, 4, 8]


def test_bucket_for_picks_the_smallest_bucket_that_holds_the_batch():
    assert [bucket_for(n, BUCKETS) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert bucket_for(3, [8, 4]) == 4  # order of the list does not matter
    with pytest.raises(ValueError):
        bucket_for(9, BUCKETS)
    with pytest.raises(ValueError):
        bucket_for(0, BUCKETS)


def test_chunks_split_past_the_largest_bucket():
    assert chunks(19, BUCKETS) == [(0, 8, 8), (8, 16, 8), (16, 19, 4)]
    assert chunks(8, BUCKETS) == [(0, 8, 8)]
    assert chunks(1, BUCKETS) == [(0, 1, 1)]


def test_default_buckets():
    assert default_buckets(1) == [1]
    assert default_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert default_buckets(48) == [1, 2, 4, 8, 16, 32, 48]


def test_pad_to_appends_zero_rows():
    x = torch.randn(3, 2, 2)
    y = pad_to(x, 8)
    assert y.shape == (8, 2, 2) and torch.equal(y[:3], x) and not y[3:].any()
    assert pad_to(x, 3) is x
    with pytest.raises(ValueError):
        pad_to(x, 2)


def test_eager_runner_pads_each_chunk_to_its_bucket_and_returns_the_real_rows():
    calls: list[torch.Tensor] = []

    def encoder(x: torch.Tensor) -> torch.Tensor:  # (B, 3, 2, 2) -> (B, 2), row by row
        calls.append(x.clone())
        return torch.stack([x.flatten(1).sum(1), x.flatten(1).amax(1)], dim=1)

    run = EagerRunner(encoder, BUCKETS, (3, 2, 2), torch.float32, "cpu")
    images = torch.rand(19, 3, 2, 2) + 1  # every real row is non-zero
    out = run(images)
    assert [c.shape[0] for c in calls] == [8, 8, 4]
    assert torch.equal(calls[2][:3], images[16:]) and not calls[2][3:].any()
    assert torch.equal(out, encoder(images))


@pytest.mark.parametrize("arch", ["tiny-vit", "RN-Tiny-64"])
def test_padding_changes_no_row_of_a_real_encoder(arch):
    model = random_clip(TINY_VIT if arch == "tiny-vit" else arch, seed=3)
    s = model.config.vision.image_size
    encoder = partial(model.encode_image, normalize=True)
    run = EagerRunner(encoder, BUCKETS, (3, s, s), torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    for n in (1, 3, 5, 8, 11):
        images = torch.randn(n, 3, s, s, generator=g)
        with torch.inference_mode():
            want = encoder(images)
        got = run(images)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_empty_batch_and_wrong_shapes():
    model = random_clip(TINY_VIT)
    run = EagerRunner(model.encode_image, BUCKETS, (3, 32, 32), torch.float32, "cpu")
    assert run(torch.empty(0, 3, 32, 32)).shape == (0, TINY_VIT.embed_dim)
    with pytest.raises(ValueError):
        run(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError):
        EagerRunner(model.encode_image, [], (3, 32, 32), torch.float32, "cpu")


def test_graph_runner_refuses_a_cpu_device():
    with pytest.raises(ValueError):
        GraphRunner(lambda x: x, BUCKETS, (3, 2, 2), torch.float32, "cpu")


@pytest.fixture(scope="module")
def cuda_model():
    return random_clip("ViT-B-32", seed=4).to("cuda", torch.float16)


@pytest.mark.gpu
def test_graphs_equal_eager_on_cuda(cuda_model):
    encoder = partial(cuda_model.encode_image, normalize=True)
    shape = (3, 224, 224)
    eager = EagerRunner(encoder, BUCKETS, shape, torch.float16, "cuda")
    graphs = GraphRunner(encoder, BUCKETS, shape, torch.float16, "cuda")
    graphs.warmup()
    assert graphs.captured == BUCKETS
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (1, 3, 8, 13):
        images = torch.randn(n, *shape, device="cuda", generator=g, dtype=torch.float16)
        torch.testing.assert_close(graphs(images), eager(images), atol=2e-3, rtol=0)


@pytest.mark.gpu
def test_a_replay_makes_no_host_sync(cuda_model):
    encoder = partial(cuda_model.encode_image, normalize=True)
    runner = GraphRunner(encoder, BUCKETS, (3, 224, 224), torch.float16, "cuda")
    runner.warmup()
    images = torch.randn(5, 3, 224, 224, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = runner(images)  # copy into the static input, replay, copy the rows out
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (5, cuda_model.embed_dim)

"""The text tower with lengths the host already knows: the same numbers as reading them off
the tokens, and on CUDA no host sync in either tower (the GPU test). Tokens already on the
GPU without lengths cost one sync, where they used to cost three."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VIT, random_clip, random_tokens

import clip_core.model as model_module
from clip_core.layers import Packing, to_device

LENGTHS = [2, 4, 9, 30, 31, 77, 12, 5]


@pytest.fixture(scope="module")
def tiny():
    return random_clip(TINY_VIT, seed=3)


@pytest.mark.parametrize("pack_below", [0.0, 0.9, 2.0])  # never, as shipped, always
def test_host_lengths_give_exactly_the_embeddings_read_off_the_tokens(tiny, monkeypatch,
                                                                      pack_below):
    monkeypatch.setattr(model_module, "_PACK_BELOW", pack_below)
    tokens = random_tokens(len(LENGTHS), lengths=LENGTHS, seed=5)
    with torch.no_grad():
        read = tiny.encode_text(tokens)
        given = tiny.encode_text(tokens, lengths=LENGTHS)
        # What the backend sends: rows padded to the batch's longest, not to 77.
        trimmed = tiny.encode_text(tokens[:, :max(LENGTHS)], lengths=LENGTHS)
    assert torch.equal(read, given)
    assert torch.equal(read, trimmed)


def test_packing_indexes_the_real_tokens_of_the_flattened_batch():
    expected = [i * 77 + j for i, n in enumerate(LENGTHS) for j in range(n)]
    for lengths in (LENGTHS, torch.tensor(LENGTHS)):  # a list, or a CPU tensor
        packing = Packing.from_lengths(lengths, 77)
        assert packing.index.tolist() == expected
        assert (packing.batch, packing.length) == (len(LENGTHS), 77)


def test_lengths_must_match_the_batch(tiny):
    with pytest.raises(ValueError, match="3 lengths for 2 texts"):
        tiny.encode_text(random_tokens(2, lengths=[5, 6]), lengths=[5, 6, 7])


def test_to_device_leaves_a_tensor_already_there():
    x = torch.arange(6)
    assert to_device(x, torch.device("cpu")) is x


@pytest.mark.gpu
def test_cuda_towers_make_no_host_sync():
    model = random_clip("ViT-B-32", seed=1).to("cuda", torch.float16)
    images = torch.randn(16, 3, 224, 224, device="cuda", dtype=torch.float16)
    host_tokens = random_tokens(len(LENGTHS), lengths=LENGTHS, seed=6)[:, :max(LENGTHS)]
    device_tokens = host_tokens.cuda()
    with torch.inference_mode():
        # Once outside the check: the first calls load kernels and create cuBLAS handles.
        model.encode_image(images)
        model.encode_text(host_tokens)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # a synchronizing call raises
        try:
            img = model.encode_image(images, normalize=True)
            from_host = model.encode_text(host_tokens)  # lengths read on the CPU
            given = model.encode_text(device_tokens, lengths=LENGTHS)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        read = model.encode_text(device_tokens)  # the device path: reads its lengths
    assert img.shape == (16, 512) and torch.isfinite(img).all()
    # The same kernels on the same shapes: equal up to float32 rounding at most.
    torch.testing.assert_close(from_host, read)
    torch.testing.assert_close(given, read)

"""The image forward reads nothing back to the host: no op whose result size or value the CPU
must wait for. Such an op would stall every CUDA batch and cannot be captured in a CUDA graph
(clip_core.graphs). Checked on the CPU by recording every aten op the forward dispatches."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VIT, random_clip
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that return a Python scalar or a data-dependent shape: on CUDA each is a device->host sync.
HOST_READS = {
    "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero",
    "aten.nonzero_static", "aten.masked_select", "aten.unique", "aten._unique",
    "aten._unique2", "aten.unique_consecutive", "aten.unique_dim", "aten.repeat_interleave",
}  # fmt: skip


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(f"aten.{func.__name__.split('.')[0]}")
        return func(*args, **(kwargs or {}))


def host_reads(fn) -> set[str]:
    with torch.inference_mode(), OpRecorder() as rec:
        fn()
    assert rec.ops, "the recorder saw no ops"
    return set(rec.ops) & HOST_READS


def test_the_recorder_sees_a_host_read():
    x = torch.arange(4.0)
    assert host_reads(lambda: x.sum().item()) & {"aten.item", "aten._local_scalar_dense"}
    assert "aten.nonzero" in host_reads(lambda: (x > 1).nonzero())


@pytest.mark.parametrize("arch", ["tiny-vit", "RN-Tiny-64"])
def test_encode_image_reads_nothing_back(arch):
    model = random_clip(TINY_VIT if arch == "tiny-vit" else arch, seed=5)
    s = model.config.vision.image_size
    images = torch.randn(3, 3, s, s)
    assert host_reads(lambda: model.encode_image(images, normalize=True)) == set()

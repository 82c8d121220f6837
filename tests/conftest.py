"""Shared fixtures: seeded random CLIP weights at real sizes, the GPU marker, reading a
metrics scrape, and loadtests/ on the import path (its server process serves the tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from clip_core.config import CLIPConfig, TextConfig, VisionConfig, load_architecture
from clip_core.model import CLIP

# loadtests/ holds scripts, not a package: they import each other by name, and so do we.
LOADTESTS = Path(__file__).resolve().parents[1] / "loadtests"
if str(LOADTESTS) not in sys.path:
    sys.path.insert(0, str(LOADTESTS))

# Small but complete shapes: every code path at a fraction of a second per model.
TINY_VIT = CLIPConfig(
    embed_dim=64,
    vision=VisionConfig(kind="vit", image_size=32, width=128, layers=2, patch_size=8),
    text=TextConfig(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):  # the marker, not any id or name that says "gpu"
            item.add_marker(skip)


def random_clip(cfg: CLIPConfig | str, seed: int = 0) -> CLIP:
    """A CLIP whose every weight and batch-norm statistic is random and non-trivial.

    Default initialisation leaves LayerNorm at identity, batch-norm statistics at (0, 1)
    and some gains at zero; a parity test on such weights would not exercise them.
    """
    if isinstance(cfg, str):
        cfg = load_architecture(cfg)
    torch.manual_seed(seed)
    model = CLIP(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight",
                              "ln_final.weight")) or (".bn" in name and name.endswith("weight")):
                p.uniform_(0.5, 1.5)
            elif name != "logit_scale":
                p.add_(torch.randn_like(p) * 0.02)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model


def random_tokens(
    n: int, lengths: list[int] | None = None, context: int = 77, seed: int = 0
) -> torch.Tensor:
    """(n, context) ids shaped like the tokenizer's: sot, words, eot, zero padding."""
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(2, context + 1, (n,), generator=g).tolist()
    ids = torch.zeros(n, context, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, 0] = 49406
        ids[i, 1 : length - 1] = torch.randint(1, 49406, (length - 2,), generator=g)
        ids[i, length - 1] = 49407
    return ids


@pytest.fixture(scope="session")
def vit_b32() -> CLIP:
    return random_clip("ViT-B-32", seed=1)


@pytest.fixture(scope="session")
def rn50() -> CLIP:
    return random_clip("RN50", seed=2)


def metric_total(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`, in a /metrics text."""
    return sum(sample.value for family in text_string_to_metric_families(exposition)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v
                                              for k, v in labels.items()))

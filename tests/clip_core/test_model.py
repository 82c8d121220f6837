"""Properties of our CLIP that need no reference: trimming, batching, dtypes, every arch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import random_clip, random_tokens

from clip_core.checkpoint import Checkpoint, build_model
from clip_core.config import architecture_names, load_architecture
from clip_core.model import CLIP, infer_config


def _padded_text(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """The reference computation: all 77 positions through the tower, then pool."""
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.ln_final(model.transformer(x, causal=True))
    x = x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ model.text_projection
    return F.normalize(x, dim=-1)


def test_trimmed_text_equals_77_padded(vit_b32):
    tokens = random_tokens(8, lengths=[2, 3, 7, 12, 20, 33, 50, 60], seed=11)
    with torch.no_grad():
        trimmed = vit_b32.encode_text(tokens, normalize=True)
        padded = _padded_text(vit_b32, tokens)
    assert (trimmed - padded).abs().max().item() <= 1e-6


def test_text_batch_invariance(vit_b32):
    tokens = random_tokens(32, seed=12)  # lengths 2..77, so the batch is not trimmed
    with torch.no_grad():
        batch = vit_b32.encode_text(tokens, normalize=True)
        alone = torch.cat([vit_b32.encode_text(tokens[i : i + 1], normalize=True)
                           for i in (0, 5, 31)])
    assert (batch[[0, 5, 31]] - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["vit_b32", "rn50"])
def test_image_batch_invariance(request, name):
    model = request.getfixturevalue(name)
    images = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        batch = model.encode_image(images, normalize=True)
        alone = torch.cat([model.encode_image(images[i : i + 1], normalize=True)
                           for i in (0, 17, 31)])
    assert (batch[[0, 17, 31]] - alone).abs().max().item() <= 1e-5


def test_normalize_and_forward_logits(vit_b32):
    images = torch.randn(2, 3, 224, 224)
    tokens = random_tokens(3, seed=14)
    with torch.no_grad():
        raw = vit_b32.encode_image(images)
        unit = vit_b32.encode_image(images, normalize=True)
        logits_img, logits_txt = vit_b32(images, tokens)
        txt = vit_b32.encode_text(tokens, normalize=True)
    assert raw.dtype == torch.float32
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(F.normalize(raw, dim=-1), unit)
    assert logits_img.shape == (2, 3)
    torch.testing.assert_close(logits_img, vit_b32.logit_scale.exp() * unit @ txt.t())
    torch.testing.assert_close(logits_txt, logits_img.t())


def test_text_accepts_already_trimmed_batches(vit_b32):
    tokens = random_tokens(4, lengths=[3, 4, 5, 6], seed=15)
    with torch.no_grad():
        full = vit_b32.encode_text(tokens)
        short = vit_b32.encode_text(tokens[:, :6])
    torch.testing.assert_close(full, short, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vit_b32", "rn50"])
def test_bf16_stays_close_to_fp32(request, name):
    model = request.getfixturevalue(name)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(16))
    tokens = random_tokens(2, seed=16)
    half = random_clip(model.config, seed=1 if name == "vit_b32" else 2).to(torch.bfloat16)
    with torch.no_grad():
        for a, b in [
            (model.encode_image(images, normalize=True), half.encode_image(images, normalize=True)),
            (model.encode_text(tokens, normalize=True), half.encode_text(tokens, normalize=True)),
        ]:
            assert b.dtype == torch.float32  # embeddings always leave in fp32
            assert F.cosine_similarity(a, b).min().item() > 0.99


def test_layer_norm_runs_in_fp32_under_bf16():
    from clip_core.layers import LayerNorm

    ln = LayerNorm(1024).to(torch.bfloat16)
    # Large mean, small spread: bf16 statistics would cancel catastrophically.
    x = (1000 + torch.randn(4, 1024)).to(torch.bfloat16)
    expected = F.layer_norm(x.float(), (1024,))
    assert ln(x).dtype == torch.bfloat16
    assert (ln(x).float() - expected).abs().max().item() < 0.05


def _n_params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in CLIP(load_architecture(name)).parameters())


# Past this, two fp32 copies no longer fit a small CI machine (H/14 is ~1B parameters,
# bigG/14 2.5B: 10 GB a copy); those are checked on the meta device below.
_RUN_UP_TO = 500_000_000
_SMALL = [n for n in architecture_names() if _n_params(n) <= _RUN_UP_TO]
_LARGE = [n for n in architecture_names() if _n_params(n) > _RUN_UP_TO]


@pytest.mark.parametrize("name", _LARGE)
def test_large_architectures_read_back_off_their_shapes(name):
    """The large ones without memory: every hyperparameter but the head count (which the
    weights cannot show) read back off the shapes of a meta-device model."""
    cfg = load_architecture(name)
    with torch.device("meta"):
        sd = CLIP(cfg).state_dict()
    inferred = infer_config(sd, act=cfg.act)
    assert inferred == replace(cfg, vision=replace(cfg.vision, heads=0))


@pytest.mark.parametrize("name", _SMALL)
def test_every_architecture_builds_loads_its_state_dict_and_runs(name):
    """Every registry architecture at its real size: state dict -> inferred config -> run."""
    cfg = load_architecture(name)
    torch.manual_seed(0)
    source = CLIP(cfg).eval()
    model = build_model(Checkpoint(source.state_dict()))
    if cfg.vision.heads and cfg.vision.heads != model.config.vision.n_heads:
        # A head count off OpenAI's rule cannot be seen in the weights: such architectures
        # load with their config (our checkpoints carry it in their metadata).
        assert model.config == replace(cfg, vision=replace(cfg.vision, heads=0))
        model = build_model(Checkpoint(source.state_dict()), cfg)
    assert model.config == cfg  # every hyperparameter read back off the shapes
    size = cfg.vision.image_size
    images = torch.randn(1, 3, size, size)
    tokens = random_tokens(2, lengths=[5, 77])
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(tokens)
        torch.testing.assert_close(img, source.encode_image(images), rtol=0, atol=0)
    assert img.shape == (1, cfg.embed_dim) and txt.shape == (2, cfg.embed_dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()


@pytest.mark.gpu
def test_fp16_cuda_matches_fp32(vit_b32):
    model = random_clip(vit_b32.config, seed=1).to("cuda", torch.float16)
    images = torch.randn(8, 3, 224, 224)
    tokens = random_tokens(8, seed=17)
    with torch.no_grad():
        a = vit_b32.encode_image(images, normalize=True)
        b = model.encode_image(images.cuda(), normalize=True).cpu()
        c = vit_b32.encode_text(tokens, normalize=True)
        d = model.encode_text(tokens.cuda(), normalize=True).cpu()
    assert F.cosine_similarity(a, b).min().item() > 0.999
    assert F.cosine_similarity(c, d).min().item() > 0.999


def test_packed_and_padded_text_paths_agree(vit_b32, monkeypatch):
    import clip_core.model as model_module

    tokens = random_tokens(6, lengths=[2, 4, 9, 30, 31, 77], seed=18)
    with torch.no_grad():
        monkeypatch.setattr(model_module, "_PACK_BELOW", 0.0)  # never pack
        padded = vit_b32.encode_text(tokens, normalize=True)
        monkeypatch.setattr(model_module, "_PACK_BELOW", 2.0)  # always pack
        packed = vit_b32.encode_text(tokens, normalize=True)
        same_length = vit_b32.encode_text(random_tokens(3, lengths=[7, 7, 7]), normalize=True)
    assert (padded - packed).abs().max().item() <= 1e-6
    assert torch.isfinite(same_length).all()


@pytest.mark.parametrize("causal,packed", [(False, False), (True, False), (True, True)])
def test_pooled_last_block_equals_the_full_output_at_those_positions(causal, packed):
    from clip_core.layers import Packing, Transformer

    torch.manual_seed(19)
    stack = Transformer(width=64, layers=3, heads=4, act="quick_gelu", ln_eps=1e-5).eval()
    stack.init_weights()
    lengths = torch.tensor([3, 9, 1, 6])
    x = torch.randn(4, 9, 64)
    # Any position may be pooled, not only the last real one; with padding only real ones.
    positions = torch.tensor([2, 4, 0, 5]) if packed else torch.tensor([0, 8, 3, 5])
    packing = Packing.from_lengths(lengths, 9) if packed else None
    with torch.no_grad():
        if packing is not None:
            x = packing.pack(x)  # (19, 64)
            full = packing.unpack(stack(x, causal=causal, packing=packing))
        else:
            full = stack(x, causal=causal)
        pooled = stack(x, causal=causal, packing=packing, pool=positions)
    assert pooled.shape == (4, 64)
    expected = full[torch.arange(4), positions]
    assert (pooled - expected).abs().max().item() <= 1e-5

"""Reading every checkpoint format, strict loading, saving, and shape inference."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_VIT, random_clip, random_tokens

from clip_core.checkpoint import (
    Checkpoint,
    build_model,
    load_state_dict_strict,
    read_checkpoint,
    save_checkpoint,
)
from clip_core.config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from clip_core.errors import CheckpointError
from clip_core.model import CLIP, infer_config

# Small but complete shapes, so every format can be exercised in well under a second.
TINY_RN = CLIPConfig(
    embed_dim=64,
    vision=VisionConfig(kind="resnet", image_size=64, width=16, layers=(1, 2, 1, 1), heads=2),
    text=TextConfig(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
)


def _embed(model: CLIP, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return (
            model.encode_image(torch.randn(2, 3, size, size, generator=g)),
            model.encode_text(random_tokens(3, lengths=[3, 9, 77])),
        )


def _same(a: CLIP, b: CLIP) -> None:
    size = a.config.vision.image_size
    for x, y in zip(_embed(a, size), _embed(b, size), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RN], ids=["vit", "resnet"])
def test_safetensors_round_trip_carries_config_and_preprocessing(tmp_path, cfg):
    model = random_clip(cfg)
    prep = PreprocessConfig(image_size=cfg.vision.image_size, mean=(0.5, 0.5, 0.5),
                            std=(0.25, 0.25, 0.25), interpolation="bilinear")
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, prep)
    ckpt = read_checkpoint(path)
    assert ckpt.source_format == "clip_core"
    assert ckpt.config == cfg
    assert ckpt.preprocess == prep
    _same(model, build_model(ckpt))


def test_fp16_save_halves_the_file_and_loads_as_fp32(tmp_path):
    model = random_clip(TINY_VIT)
    save_checkpoint(model, tmp_path / "a.safetensors")
    save_checkpoint(model, tmp_path / "b.safetensors", dtype=torch.float16)
    full, half = (tmp_path / "a.safetensors").stat().st_size, (tmp_path / "b.safetensors").stat().st_size
    assert half < 0.55 * full
    loaded = build_model(read_checkpoint(tmp_path / "b.safetensors"))
    assert loaded.dtype == torch.float32


def test_plain_state_dict_and_open_clip_training_checkpoint(tmp_path):
    model = random_clip(TINY_RN)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    # open_clip's training loop saves {"epoch", "state_dict" (under DDP's "module."), ...}
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": wrapped}, tmp_path / "epoch_3.pt")
    for name in ("plain.pt", "epoch_3.pt"):
        ckpt = read_checkpoint(tmp_path / name)
        assert ckpt.config is None  # no config in the file: inferred from shapes
        _same(model, build_model(ckpt, TINY_RN))


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        read_checkpoint(tmp_path / "evil.pt")


def test_openai_torchscript_archive(tmp_path):
    """OpenAI ships traced TorchScript; we read its weights into our eager model."""
    import clip

    model = random_clip(TINY_VIT)
    ref = clip.model.build_model({k: v.clone() for k, v in model.state_dict().items()})
    ref = ref.float().eval()
    ref.load_state_dict(model.state_dict())
    # The released archives carry these three scalars beside the weights.
    for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        ref.__dict__.pop(key, None)
        ref.register_buffer(key, torch.tensor(value))
    images, tokens = torch.randn(1, 3, 32, 32), random_tokens(1, lengths=[5])
    with torch.no_grad():
        traced = torch.jit.trace(ref, (images, tokens), check_trace=False)
    traced.save(str(tmp_path / "ViT-tiny.pt"))

    ckpt = read_checkpoint(tmp_path / "ViT-tiny.pt")
    assert ckpt.source_format == "openai-torchscript"
    assert "input_resolution" not in ckpt.state_dict
    ours = build_model(ckpt)  # architecture inferred from the shapes
    assert ours.config.vision == TINY_VIT.vision
    _same(model, ours)


def test_strict_loading_names_missing_unexpected_and_misshaped_keys():
    model = random_clip(TINY_VIT)
    sd = dict(model.state_dict())
    del sd["ln_final.weight"]
    sd["visual.extra_head.weight"] = torch.zeros(3)
    sd["text_projection"] = torch.zeros(128, 32)
    target = CLIP(TINY_VIT)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(target, sd)
    msg = str(e.value)
    assert "missing keys: ln_final.weight" in msg
    assert "unexpected keys: visual.extra_head.weight" in msg
    assert "text_projection (128, 32) vs (128, 64)" in msg


def test_batch_norm_counters_may_be_absent():
    model = random_clip(TINY_RN)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    _same(model, build_model(Checkpoint(sd), TINY_RN))  # heads cannot be read off shapes


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RN], ids=["vit", "resnet"])
def test_infer_config_reads_every_hyperparameter(cfg):
    sd = CLIP(cfg).state_dict()
    inferred = infer_config(sd)
    assert inferred.vision.kind == cfg.vision.kind
    assert inferred.vision.image_size == cfg.vision.image_size
    assert inferred.vision.width == cfg.vision.width
    assert inferred.vision.layers == cfg.vision.layers
    assert inferred.text == TextConfig(77, 49408, 128, 2, 2)
    assert inferred.embed_dim == cfg.embed_dim


def test_unrecognisable_state_dict_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="cannot infer"):
        build_model(Checkpoint({"foo": torch.zeros(1)}))


def test_hf_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        read_checkpoint(tmp_path)


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint("/nonexistent/model.pt")

"""clip_core.export: the towers exported for ONNX Runtime and OpenVINO against PyTorch at
ViT-B/32 and RN50 sizes (random weights), int8's distance from fp32, and the cache that
rebuilds what fails its check.

Exports are slow on 2 cores (tracing a ViT-B/32 takes most of a minute), so each
architecture's fp32 ONNX is traced once per session, into a temporary cache, and every
other export of the same weights starts from it.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, random_clip, random_tokens

from clip_core.config import PreprocessConfig
from clip_core.export import (
    Export,
    ExportTarget,
    ModelCard,
    _lanes,
    build,
    calibration_images,
    evaluate_export,
    export_key,
    lane_threads,
    load_cached,
    open_export,
    state_dict_sha256,
)
from clip_core.loader import load
from clip_core.model import CLIP


def _exported(model: CLIP, cache: Path, target: ExportTarget, name: str = "m") -> Export:
    pre = PreprocessConfig(image_size=model.config.vision.image_size)
    weights = state_dict_sha256(model)
    found = load_cached(cache, weights, target, pre)
    return found or build(model, ModelCard.of(name, model, pre), weights, target, cache)


@pytest.fixture(scope="session")
def exports_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="session")
def rn50() -> CLIP:
    return random_clip("RN50", seed=2)


def _reference(model: CLIP, pixels: torch.Tensor, ids: torch.Tensor):
    """PyTorch's normalised embeddings of uint8 pixels (normalised as the service's
    ClipBackend does) and of zero-padded token ids: (N, E) and (M, E) numpy."""
    pre = PreprocessConfig(image_size=model.config.vision.image_size)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    with torch.no_grad():
        img = model.encode_image(pixels.float().div(255).sub(mean).div(std), normalize=True)
        txt = model.encode_text(ids, normalize=True)
    return img.numpy(), txt.numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# Lengths from sot+eot alone to the full context, in one batch.
_LENGTHS = [2, 5, 17, 40, 77, 9]


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("arch", ["vit_b32", "rn50"])
def test_fp32_exports_match_pytorch_within_1e_5(arch, engine, request, exports_cache):
    model = request.getfixturevalue(arch)
    export = _exported(model, exports_cache, ExportTarget(engine))
    towers = open_export(export, threads=2)
    s = model.config.vision.image_size
    pixels = torch.from_numpy(calibration_images(3, s, seed=5))
    ids = random_tokens(len(_LENGTHS), _LENGTHS, seed=3)
    ref_img, ref_txt = _reference(model, pixels, ids)
    got_img = _unit(towers.image(pixels.numpy()))
    assert np.abs(got_img - ref_img).max() <= 1e-5
    # Trimmed to the batch's longest text, as the service sends it; then a batch of short
    # texts alone, at a length the export never saw.
    got_txt = _unit(towers.text(ids[:, :77].numpy()))
    assert np.abs(got_txt - ref_txt).max() <= 1e-5
    short = [i for i, n in enumerate(_LENGTHS) if n <= 9]
    got_short = _unit(towers.text(ids[short, :9].numpy()))
    assert np.abs(got_short - ref_txt[short]).max() <= 1e-5


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_mixed_length_texts_run_packed_and_match_pytorch_in_order(engine, vit_b32,
                                                                  exports_cache):
    """A batch of very unequal lengths, shuffled, runs packed in one call and every row
    still matches PyTorch's packed path, in order; a text's row is the same alone, with
    other batch mates, and padded further. The image graph, which pools inside its last
    block, runs at batch 1 as at the traced 2."""
    lengths = [4, 14, 9, 77, 5, 12, 4, 30, 7, 2, 60, 10, 6]
    towers = open_export(_exported(vit_b32, exports_cache, ExportTarget(engine)), threads=2)
    ids = random_tokens(len(lengths), lengths, seed=6)
    pixels = torch.from_numpy(calibration_images(1, 224, seed=8))
    ref_img, ref_txt = _reference(vit_b32, pixels, ids)
    together = towers.text(ids.numpy())
    assert np.abs(_unit(together) - ref_txt).max() <= 1e-5
    assert np.abs(_unit(towers.image(pixels.numpy())) - ref_img).max() <= 1e-5
    # Batch mates and padding reach no row: its real tokens alone decide it.
    alone = towers.text(ids[[2], :9].numpy())
    others = towers.text(ids[[2, 7, 0], :40].numpy())
    assert np.abs(alone[0] - together[2]).max() <= 1e-5
    assert np.abs(others[0] - together[2]).max() <= 1e-5
    assert np.abs(others[2] - together[0]).max() <= 1e-5


def test_onnxruntime_int8_stays_close_to_fp32(vit_b32, exports_cache, capsys):
    fp32 = open_export(_exported(vit_b32, exports_cache, ExportTarget("onnxruntime")), 2)
    int8 = open_export(_exported(vit_b32, exports_cache,
                                 ExportTarget("onnxruntime", "int8")), 2)
    assert int8.dtype == "int8"
    pixels = calibration_images(8, 224, seed=7)
    ids = random_tokens(len(_LENGTHS), _LENGTHS, seed=4).numpy()
    cos_img = (_unit(int8.image(pixels)) * _unit(fp32.image(pixels))).sum(1)
    cos_txt = (_unit(int8.text(ids)) * _unit(fp32.text(ids))).sum(1)
    with capsys.disabled():
        print(f"\nViT-B/32 random weights, ONNX Runtime int8 vs fp32 cosine: images min "
              f"{cos_img.min():.4f} mean {cos_img.mean():.4f}; texts min {cos_txt.min():.4f} "
              f"mean {cos_txt.mean():.4f}")
    assert cos_img.min() >= 0.99 and cos_txt.min() >= 0.99


@pytest.fixture(scope="module")
def shipped(exports_cache) -> tuple[CLIP, Path]:
    """The shipped trained model, as it is now (it may be retrained: nothing is typed in)."""
    return load("builtin/clip-shapes").model, exports_cache


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_int8_zero_shot_accuracy_on_the_shipped_model_within_one_point(engine, shipped,
                                                                       capsys):
    model, cache = shipped
    export = _exported(model, cache, ExportTarget(engine, "int8"), name="clip-shapes")
    # 40 scenes per combination: the held-out cells hold 240, so that one scene moves a
    # cell by 0.4 points and "within one point" can be told apart (at 10, one is 1.7).
    reports = evaluate_export(export, open_export(export, 2), model, per_combo=40,
                              retrieval_n=200)
    for task, ref in reports["torch"]["zero_shot"].items():
        got = reports["export"]["zero_shot"][task]
        with capsys.disabled():
            print(f"\nclip-shapes {engine} int8 {task}: seen {got['seen']:.3f} "
                  f"(fp32 {ref['seen']:.3f}), held-out {got['held_out']:.3f} "
                  f"(fp32 {ref['held_out']:.3f})")
        assert abs(got["seen"] - ref["seen"]) <= 0.01
        assert abs(got["held_out"] - ref["held_out"]) <= 0.01


# ---- the cache ----


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[CLIP, Path]:
    """A tiny model's export, built once; tests damage copies of its cache."""
    model = random_clip(TINY_VIT)
    cache = tmp_path_factory.mktemp("pristine")
    _exported(model, cache, ExportTarget("onnxruntime"))
    return model, cache


@pytest.fixture
def tiny(pristine, tmp_path) -> tuple[CLIP, Path, ExportTarget, PreprocessConfig]:
    model, source = pristine
    shutil.copytree(source, tmp_path / "cache")
    return model, tmp_path / "cache", ExportTarget("onnxruntime"), PreprocessConfig(image_size=32)


def test_the_key_names_weights_engine_precision_opset_and_preprocessing(pristine):
    pre = PreprocessConfig(image_size=224)
    base = export_key("a" * 64, ExportTarget("onnxruntime"), pre)
    others = [export_key("b" * 64, ExportTarget("onnxruntime"), pre),
              export_key("a" * 64, ExportTarget("openvino"), pre),
              export_key("a" * 64, ExportTarget("onnxruntime", "int8"), pre),
              export_key("a" * 64, ExportTarget("onnxruntime", opset=18), pre),
              export_key("a" * 64, ExportTarget("onnxruntime"),
                         PreprocessConfig(image_size=224, mean=(0.5, 0.5, 0.5)))]
    assert len({base, *others}) == 6
    assert base == export_key("a" * 64, ExportTarget("onnxruntime"), pre)
    model = copy.deepcopy(pristine[0])
    before = state_dict_sha256(model)
    with torch.no_grad():
        model.ln_final.bias[0] += 1e-3
    assert state_dict_sha256(model) != before


@pytest.mark.parametrize("damage", ["corrupt", "truncate_manifest", "missing"])
def test_an_export_that_fails_its_check_is_never_served_and_is_logged(tiny, damage, caplog):
    model, cache, target, pre = tiny
    weights = state_dict_sha256(model)
    export = load_cached(cache, weights, target, pre)
    assert export is not None
    if damage == "corrupt":
        data = bytearray(export.image.read_bytes())
        data[len(data) // 2] ^= 0xFF
        export.image.write_bytes(bytes(data))
    elif damage == "truncate_manifest":
        manifest = export.directory / "manifest.json"
        manifest.write_text(manifest.read_text()[:40])
    else:
        export.text.unlink()
    with caplog.at_level(logging.WARNING, logger="clip_core.export"):
        assert load_cached(cache, weights, target, pre) is None
    assert "fails its check" in caplog.text
    assert not export.directory.exists()  # removed, so the next start builds it afresh


def test_a_corrupt_export_is_rebuilt_and_serves_correctly(tiny, caplog):
    model, cache, target, pre = tiny
    export = load_cached(cache, state_dict_sha256(model), target, pre)
    assert export is not None
    data = bytearray(export.text.read_bytes())
    data[len(data) // 3] ^= 0xFF
    export.text.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="clip_core.export"):
        rebuilt = _exported(model, cache, target)
    assert "fails its check" in caplog.text
    ids = random_tokens(2, [4, 9], seed=1)
    _, ref = _reference(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ids)
    got = _unit(open_export(rebuilt, 1).text(ids[:, :9].numpy()))
    assert np.abs(got - ref).max() <= 1e-5


@pytest.mark.parametrize("batch", [1, 3])
def test_the_towers_pooled_in_their_last_block_keep_the_batch_dynamic(pristine, batch):
    """Both graphs run their last block for the pooled token alone (one_query), traced at
    batch 2; a batch size frozen into them (as len(q) would) fails or differs here."""
    model, cache = pristine
    towers = open_export(_exported(model, cache, ExportTarget("onnxruntime")), 1)
    pixels = torch.from_numpy(calibration_images(batch, 32, seed=batch))
    ids = random_tokens(batch, [6] * batch, seed=batch)  # one length: one call of `batch`
    ref_img, ref_txt = _reference(model, pixels, ids)
    assert np.abs(_unit(towers.image(pixels.numpy())) - ref_img).max() <= 1e-5
    assert np.abs(_unit(towers.text(ids.numpy())) - ref_txt).max() <= 1e-5


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_lanes_compute_what_the_whole_export_computes_side_by_side(pristine, tmp_path, engine):
    """Two streams on two threads: one one-thread lane that both streams call at once,
    each call equal to the whole export's within 1e-6."""
    model, _ = pristine
    towers = open_export(_exported(model, tmp_path, ExportTarget(engine)), 2, streams=2)
    assert len(towers.lanes) == 2 and towers.lanes[0] is towers.lanes[1]
    assert len(towers.sessions()) == 2
    pixels = calibration_images(3, 32, seed=5)
    ids = random_tokens(3, [3, 12, 6], seed=5)[:, :12].numpy()
    want = towers.image(pixels), towers.text(ids)
    got: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def stream(i: int) -> None:
        start.wait(10)
        for _ in range(5):
            got[i].append((towers.lanes[i].image(pixels), towers.lanes[i].text(ids)))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [len(v) for v in got.values()] == [5, 5]
    for image, text in got[0] + got[1]:
        assert np.abs(image - want[0]).max() <= 1e-6
        assert np.abs(text - want[1]).max() <= 1e-6


@pytest.mark.parametrize(("engine", "threads", "streams", "sessions"), [
    ("onnxruntime", 4, 2, 3),  # wider lanes: a session each, or they would share one pool
    ("openvino", 4, 2, 2),  # one model compiled for two streams serves both lanes
    ("onnxruntime", 2, 1, 1),  # one stream: the whole session is all
    ("onnxruntime", 1, 2, 1),  # one thread: nothing to split, each caller computes itself
    ("openvino", 1, 2, 2),  # one stream's model would run the two callers one at a time
])
def test_the_sessions_an_export_opens_for_its_streams(pristine, tmp_path, engine, threads,
                                                       streams, sessions):
    model, _ = pristine
    towers = open_export(_exported(model, tmp_path, ExportTarget(engine)), threads, streams)
    assert len(towers.sessions()) == sessions
    assert len(towers.lanes) == (streams if sessions > 1 else 0)
    ids = random_tokens(2, [4, 7], seed=2)[:, :7].numpy()
    for lane in towers.lanes:
        assert np.abs(lane.text(ids) - towers.text(ids)).max() <= 1e-6


def test_lanes_get_an_even_share_of_the_threads_and_one_thread_lanes_are_shared():
    opened: list[int] = []

    def open_lane(n: int) -> object:
        opened.append(n)
        return object()

    assert _lanes(2, 1, open_lane) == [] and _lanes(1, 2, open_lane) == [] and opened == []
    two = _lanes(3, 2, open_lane)  # 3 // 2: the odd thread stays with decoding and the loop
    assert opened == [1] and two[0] is two[1]
    opened.clear()
    wide = _lanes(8, 2, open_lane)
    assert opened == [4, 4] and wide[0] is not wide[1]
    assert lane_threads(8, 3) == 2 and lane_threads(2, 4) == 1


def test_an_export_for_other_weights_is_never_served(tiny):
    model, cache, target, pre = tiny
    export = load_cached(cache, state_dict_sha256(model), target, pre)
    assert export is not None
    manifest = json.loads((export.directory / "manifest.json").read_text())
    manifest["key"] = "0" * 64  # a manifest left by something else in this directory
    (export.directory / "manifest.json").write_text(json.dumps(manifest))
    assert load_cached(cache, state_dict_sha256(model), target, pre) is None
    assert not export.directory.exists()


def test_a_built_export_leaves_no_temporary_files(pristine):
    _, cache = pristine
    (export_dir,) = (cache / "exports").iterdir()
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"image.onnx", "text.onnx"}
    assert manifest["key"] == export_dir.name

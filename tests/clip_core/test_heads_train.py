"""clip-train-head: splits, class weights, the torch training of linear and MLP heads
(single- and multi-label), and the command on generated scenes through the built-in model,
whose head file records the model's fingerprint and is refused for another model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, random_clip

from clip_core.config import PreprocessConfig
from clip_core.errors import HeadModelMismatch, InvalidInput
from clip_core.loader import load
from clip_core.moderation.data import read_class_folders, read_label_csv
from clip_core.moderation.embed import Embedder
from clip_core.moderation.fingerprint import model_fingerprint
from clip_core.moderation.heads import load_head, save_head
from clip_core.moderation.train_head import (
    TrainConfig,
    class_weights,
    fit,
    main,
    split_indices,
    train_head,
)
from clip_core.preprocess import ImageTransform
from clip_core.scenes import SceneGenerator


def _clusters(n_per: list[int], dim: int = 32, seed: int = 0, spread: float = 0.15):
    """Unit vectors around one random centre per class: (N, D) and the (N,) class ids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(n_per), dim))
    x = np.concatenate([c + spread * np.linalg.norm(c) / np.sqrt(dim) * rng.normal(size=(n, dim))
                        for c, n in zip(centres, n_per, strict=True)])
    y = np.repeat(np.arange(len(n_per)), n_per)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def _onehot(y: np.ndarray, c: int) -> np.ndarray:
    return np.eye(c, dtype=bool)[y]


# ---- the pure parts ----


def test_the_validation_split_is_stratified_and_reproducible():
    labels = _onehot(np.repeat([0, 1, 2], [50, 30, 5]), 3)
    train, val = split_indices(labels, 0.2, seed=3, stratify=True)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(85))
    assert [int(labels[val, c].sum()) for c in range(3)] == [10, 6, 1]
    assert all(labels[train, c].sum() > 0 for c in range(3))
    again = split_indices(labels, 0.2, seed=3, stratify=True)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(split_indices(labels, 0.2, seed=4, stratify=True)[1], val)
    with pytest.raises(InvalidInput):
        split_indices(labels, 1.0, seed=0, stratify=False)


def test_balanced_class_weights():
    labels = _onehot(np.repeat([0, 1], [30, 10]), 2)
    # Single-label: N / (C * count); multi-label: negatives / positives.
    assert class_weights(labels, ["a", "b"], False, "balanced") == pytest.approx(
        [40 / (2 * 30), 40 / (2 * 10)])
    assert class_weights(labels, ["a", "b"], True, "balanced") == pytest.approx([10 / 30, 30 / 10])
    assert class_weights(labels, ["a", "b"], False, {"b": 3.0}).tolist() == [1.0, 3.0]
    with pytest.raises(InvalidInput, match="unknown classes"):
        class_weights(labels, ["a", "b"], False, {"c": 2.0})


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_single_label_heads_separate_clusters(kind):
    x, y = _clusters([60, 60, 60], seed=1)
    data = _dataset(_onehot(y, 3), ["a", "b", "c"], multi_label=False)
    result = train_head(data, x, model="m", fingerprint="sha256:0",
                        config=TrainConfig(kind=kind, epochs=60, hidden=32))
    probs = result.head.predict(x[result.val_index])
    assert probs.sum(axis=1) == pytest.approx(np.ones(len(probs)))  # a softmax
    assert (probs.argmax(axis=1) == y[result.val_index]).all()
    assert all(m["f1"] == 1.0 for m in result.metrics.values())
    assert set(result.head.tensors) == (
        {"weight", "bias"} if kind == "linear"
        else {"hidden.weight", "hidden.bias", "out.weight", "out.bias"})


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_multi_label_heads_score_each_class_on_its_own(kind):
    # Three "atoms"; an item is the normalised sum of the atoms it holds (0 to 3 of them).
    rng = np.random.default_rng(2)
    atoms = rng.normal(size=(3, 32))
    labels = rng.random((240, 3)) < 0.4
    x = labels @ atoms + 0.1 * rng.normal(size=(240, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    data = _dataset(labels, ["a", "b", "c"], multi_label=True)
    result = train_head(data, x, model="m", fingerprint="sha256:0",
                        config=TrainConfig(kind=kind, epochs=80, hidden=32))
    probs = result.head.predict(x[result.val_index])
    assert not np.allclose(probs.sum(axis=1), 1.0)  # independent sigmoids
    accuracy = ((probs >= 0.5) == labels[result.val_index]).mean()
    assert accuracy > 0.95, accuracy
    assert min(m["recall"] for m in result.metrics.values()) > 0.9, result.metrics


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    x, y = _clusters([40, 40], seed=5, spread=0.6)
    labels, w = _onehot(y, 2), np.ones(2)
    before = torch.random.get_rng_state()
    a = fit(x, labels, False, w, TrainConfig(kind="mlp", epochs=5, hidden=8, seed=1))
    assert torch.equal(torch.random.get_rng_state(), before)
    b = fit(x, labels, False, w, TrainConfig(kind="mlp", epochs=5, hidden=8, seed=1))
    c = fit(x, labels, False, w, TrainConfig(kind="mlp", epochs=5, hidden=8, seed=2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["hidden.weight"], c["hidden.weight"])


def test_balanced_weights_lift_the_minority_class():
    # Overlapping classes, 10:1: unweighted, the minority is mostly missed.
    x, y = _clusters([400, 40], dim=4, seed=7, spread=3.0)
    labels = _onehot(y, 2)
    recall, majority = {}, {}
    for spec in ("none", "balanced"):
        t = fit(x, labels, False, class_weights(labels, ["a", "b"], False, spec),
                TrainConfig(epochs=40))
        pred = (x @ t["weight"].T + t["bias"]).argmax(axis=1)
        recall[spec] = (pred[y == 1] == 1).mean()
        majority[spec] = (pred[y == 0] == 0).mean()
    assert recall["balanced"] > recall["none"] + 0.3, recall
    assert majority["balanced"] < majority["none"], majority  # the price paid for it


def _dataset(labels, classes, multi_label):
    from pathlib import Path

    from clip_core.moderation.data import LabelledImages

    return LabelledImages([Path(f"{i}.png") for i in range(len(labels))], labels, classes,
                          multi_label)


# ---- the command, on scenes through the built-in model ----


@pytest.fixture(scope="module")
def shapes():
    return load("builtin/clip-shapes")


def _scene(gen, seed, i, combo):
    rng = np.random.default_rng([seed, i])
    return gen.render(gen.scene(rng, combo=combo), rng)


@pytest.fixture(scope="module")
def scene_data(tmp_path_factory):
    """Lone stars and lone circles (any colour) in class folders, and mixed scenes in a
    CSV of the shapes they hold."""
    root = tmp_path_factory.mktemp("heads")
    gen = SceneGenerator(64, split="all")
    colours = ["red", "blue", "green", "yellow", "white"]
    for shape in ("star", "circle"):
        (root / "folders" / shape).mkdir(parents=True)
        for i in range(24):
            _scene(gen, 11, i + 100 * len(shape), (colours[i % 5], shape)).save(
                root / "folders" / shape / f"{i}.png")
    rows = []
    (root / "mixed").mkdir()
    for i in range(64):
        rng = np.random.default_rng([12, i])
        scene = gen.scene(rng)
        gen.render(scene, rng).save(root / "mixed" / f"{i}.png")
        rows.append([f"mixed/{i}.png", *sorted({s.shape for s in scene.shapes})])
    with (root / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["path", "labels"], *rows])
    return root


def test_the_embedder_gives_clip_cores_embeddings(shapes, scene_data):
    paths = sorted((scene_data / "folders" / "star").iterdir())[:5]
    emb = Embedder(shapes, batch_size=2, progress=False).images(paths)
    from clip_core.preprocess import open_image

    with torch.no_grad():
        ref = shapes.model.encode_image(
            ImageTransform(shapes.preprocess).batch([open_image(p) for p in paths]),
            normalize=True)
    assert emb.dtype == np.float32 and emb.shape == (5, shapes.model.embed_dim)
    assert emb == pytest.approx(ref.numpy(), abs=1e-5)


def test_the_command_trains_a_single_label_head_from_class_folders(shapes, scene_data,
                                                                    tmp_path, capsys):
    out = tmp_path / "stars.safetensors"
    rc = main(["--model", "builtin/clip-shapes", "--data", str(scene_data / "folders"),
               "--out", str(out), "--epochs", "40", "--val-split", "0.25", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| star |" in printed and "| circle |" in printed
    fp = model_fingerprint(shapes.model, shapes.preprocess)
    head = load_head(out, expect_fingerprint=fp)
    assert (head.kind, head.multi_label, head.classes) == ("linear", False, ["circle", "star"])
    assert head.model == "builtin/clip-shapes"
    assert head.metrics is not None and head.metrics["n_val"] == 12
    assert set(head.metrics["classes"]) == {"circle", "star"}
    report = tmp_path / "stars.safetensors.report"
    assert (report / "pr_star.png").stat().st_size > 0
    assert (report / "pr_circle.png").stat().st_size > 0
    # The file's head scores stars as stars on the model's own embeddings.
    data = read_class_folders(scene_data / "folders")
    probs = head.predict(Embedder(shapes, progress=False).images(data.paths))
    assert ((probs.argmax(axis=1) == 1) == data.labels[:, 1]).mean() > 0.9


def test_the_command_trains_a_multi_label_mlp_from_a_csv(shapes, scene_data, tmp_path):
    out = tmp_path / "shapes.safetensors"
    rc = main(["--model", "builtin/clip-shapes", "--csv", str(scene_data / "labels.csv"),
               "--out", str(out), "--kind", "mlp", "--hidden", "32", "--epochs", "40",
               "--class-weights", "none", "--report", str(tmp_path / "r"), "--no-plots",
               "--no-progress"])
    assert rc == 0
    head = load_head(out)
    data = read_label_csv(scene_data / "labels.csv")
    assert head.multi_label and head.kind == "mlp" and head.classes == data.classes
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"metrics.md"}
    probs = head.predict(Embedder(shapes, progress=False).images(data.paths))
    assert probs.shape == data.labels.shape
    assert ((probs >= 0.5) == data.labels).mean() > 0.8  # mostly its own training data
    assert json.loads(json.dumps(head.metrics))["split"] == "validation"


def test_a_head_for_the_built_in_model_is_refused_for_another(shapes, scene_data, tmp_path):
    out = tmp_path / "h.safetensors"
    data = read_class_folders(scene_data / "folders")
    embedder = Embedder(shapes, progress=False)
    result = train_head(data, embedder.images(data.paths), model=embedder.name,
                        fingerprint=embedder.fingerprint,
                        config=TrainConfig(epochs=2, val_split=0))
    save_head(out, result.head)
    assert load_head(out, expect_fingerprint=embedder.fingerprint).classes == data.classes
    other = model_fingerprint(random_clip(TINY_VIT, seed=3), PreprocessConfig(image_size=32))
    with pytest.raises(HeadModelMismatch) as e:
        load_head(out, expect_fingerprint=other)
    assert str(out) in str(e.value) and other in str(e.value)


def test_bad_data_is_refused_with_a_message(tmp_path, capsys):
    (tmp_path / "only").mkdir()
    rc = main(["--model", "builtin/clip-shapes", "--data", str(tmp_path), "--out",
               str(tmp_path / "h.safetensors"), "--no-progress"])
    assert rc == 2
    assert "one sub-folder per class" in capsys.readouterr().err

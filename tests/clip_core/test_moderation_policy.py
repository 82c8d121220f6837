"""Policy files: validation that names the file and the field, round trips, heads, the
fingerprint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, random_clip

from clip_core.config import PreprocessConfig
from clip_core.moderation import (
    Head,
    HeadInvalid,
    HeadModelMismatch,
    PolicyInvalid,
    dump_policy,
    load_head,
    load_policies,
    load_policy,
    load_policy_heads,
    model_fingerprint,
    save_head,
)

GOOD = """\
name: demo
version: 2
model: builtin/clip-shapes
description: red things and stars
categories:
  red:
    threshold: 1.5
    prompts:
      positive: [red]
      negative: [blue, green]
      templates: ["a photo of a {} shape."]
  stars:
    threshold: 0.5
    head: {path: heads/stars.safetensors, class: star}
"""


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_a_policy_file_loads_and_round_trips(tmp_path):
    p = load_policy(_write(tmp_path, "demo.yaml", GOOD))
    assert (p.name, p.version, p.model) == ("demo", 2, "builtin/clip-shapes")
    assert p.categories["red"].kind == "prompts"
    assert p.categories["red"].prompts.negative == ["blue", "green"]
    assert p.categories["stars"].kind == "head"
    assert p.categories["stars"].head.class_ == "star"
    # Head paths are relative to the policy's folder.
    assert p.head_path(p.categories["stars"].head) == tmp_path / "heads/stars.safetensors"
    for suffix in ("yaml", "json"):
        out = tmp_path / "out" / f"demo.v3.{suffix}"
        out.parent.mkdir(exist_ok=True)
        dump_policy(p.model_copy(update={"version": 3}), out)
        again = load_policy(out)
        assert again.version == 3
        assert again.model_dump() == p.model_copy(update={"version": 3}).model_dump()
    assert "class: star" in (tmp_path / "out" / "demo.v3.yaml").read_text()


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["categories"]["red"].pop("threshold"), "categories.red.threshold"),
    (lambda d: d["categories"]["red"].update(treshold=1), "categories.red.treshold"),
    (lambda d: d["categories"]["red"]["prompts"].update(positive=[]),
     "categories.red.prompts.positive"),
    (lambda d: d["categories"]["red"]["prompts"].update(templates=["no slot"]),
     "categories.red.prompts.templates"),
    (lambda d: d["categories"]["stars"].update(prompts={"positive": ["x"]}),
     "categories.stars"),
    (lambda d: d.update(version=0), "version"),
    (lambda d: d.update(name="has space"), "name"),
    (lambda d: d.update(categories={}), "categories"),
    (lambda d: d["categories"]["red"].update(threshold=float("nan")), "categories.red.threshold"),
])
def test_an_invalid_policy_names_the_file_and_the_field(tmp_path, edit, field):
    import yaml

    data = yaml.safe_load(GOOD)
    edit(data)
    path = _write(tmp_path, "bad.json", json.dumps(data))
    with pytest.raises(PolicyInvalid) as e:
        load_policy(path)
    assert e.value.field == field
    assert str(path) in str(e.value) and field in str(e.value)


def test_unreadable_files_and_duplicates_are_refused(tmp_path):
    with pytest.raises(PolicyInvalid, match="does not parse"):
        load_policy(_write(tmp_path, "a.yaml", "name: [unclosed"))
    with pytest.raises(PolicyInvalid, match="mapping"):
        load_policy(_write(tmp_path, "b.yaml", "- a list\n"))
    d = tmp_path / "dir"
    _write(d, "one.yaml", GOOD)
    _write(d, "two.yml", GOOD)
    _write(d, "notes.txt", "ignored")
    with pytest.raises(PolicyInvalid) as e:
        load_policies(d)
    assert e.value.field == "name" and "two.yml" in str(e.value)
    (d / "two.yml").unlink()
    assert list(load_policies(d)) == ["demo"]


def _head(fingerprint="sha256:abc", kind="linear", multi_label=True, d=8, classes=("star", "ring")):
    rng = np.random.default_rng(0)
    c = len(classes)
    if kind == "linear":
        tensors = {"weight": rng.normal(size=(c, d)), "bias": rng.normal(size=c)}
    else:
        tensors = {"hidden.weight": rng.normal(size=(5, d)), "hidden.bias": rng.normal(size=5),
                   "out.weight": rng.normal(size=(c, 5)), "out.bias": rng.normal(size=c)}
    return Head(kind=kind, multi_label=multi_label, classes=list(classes), model="m",
                fingerprint=fingerprint, tensors=tensors, metrics={"star": {"f1": 0.9}})


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("multi_label", [True, False])
def test_head_predictions_match_torch(tmp_path, kind, multi_label):
    head = _head(kind=kind, multi_label=multi_label)
    save_head(tmp_path / "h.safetensors", head)
    loaded = load_head(tmp_path / "h.safetensors", expect_fingerprint="sha256:abc")
    assert loaded.classes == head.classes and loaded.metrics == head.metrics
    assert loaded.inputs == ("image",)
    x = np.random.default_rng(1).normal(size=(6, 8))
    t = {k: torch.from_numpy(v).double() for k, v in loaded.tensors.items()}
    xt = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1)
    if kind == "linear":
        logits = torch.nn.functional.linear(xt, t["weight"], t["bias"])
    else:
        h = torch.relu(torch.nn.functional.linear(xt, t["hidden.weight"], t["hidden.bias"]))
        logits = torch.nn.functional.linear(h, t["out.weight"], t["out.bias"])
    ref = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
    np.testing.assert_allclose(loaded.predict(x), ref.numpy(), rtol=1e-9, atol=1e-12)


def test_a_head_for_another_model_is_refused(tmp_path):
    save_head(tmp_path / "h.safetensors", _head())
    with pytest.raises(HeadModelMismatch) as e:
        load_head(tmp_path / "h.safetensors", expect_fingerprint="sha256:other")
    assert "h.safetensors" in str(e.value) and "sha256:abc" in str(e.value)
    assert "sha256:other" in str(e.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HeadInvalid):
        load_head(tmp_path / "junk.safetensors")
    with pytest.raises(HeadInvalid, match="shapes"):
        Head(kind="linear", multi_label=True, classes=["a"], model="m", fingerprint="f",
             tensors={"weight": np.zeros((2, 4)), "bias": np.zeros(2)})


def test_policy_heads_resolve_and_check_their_class(tmp_path):
    (tmp_path / "heads").mkdir()
    save_head(tmp_path / "heads/stars.safetensors", _head())
    policy = load_policy(_write(tmp_path, "demo.yaml", GOOD))
    heads = load_policy_heads(policy, "sha256:abc")
    assert list(heads) == ["heads/stars.safetensors"]
    bad = load_policy(_write(tmp_path, "bad.yaml", GOOD.replace("class: star", "class: moon")))
    with pytest.raises(PolicyInvalid) as e:
        load_policy_heads(bad)
    assert e.value.field == "categories.stars.head.class" and "bad.yaml" in str(e.value)


def test_the_fingerprint_follows_weights_and_preprocessing_not_storage():
    model = random_clip(TINY_VIT, seed=0)
    prep = PreprocessConfig(image_size=32)
    fp = model_fingerprint(model, prep)
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    assert model_fingerprint(random_clip(TINY_VIT, seed=0), prep) == fp
    assert model_fingerprint(model, PreprocessConfig(image_size=32, interpolation="bilinear")) != fp
    other = random_clip(TINY_VIT, seed=0)
    with torch.no_grad():
        other.logit_scale.add_(1e-3)
    assert model_fingerprint(other, prep) != fp
    # fp16 weights widened back to fp32 are the same numbers, hashed the same.
    half = random_clip(TINY_VIT, seed=0).half()
    assert model_fingerprint(half, prep) == model_fingerprint(half.float(), prep)

"""The evaluation's arithmetic, against brute-force references: recall@k when several items
share a caption, and the zero-shot table's split into seen and held-out combinations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from clip_core.evaluate import _combos, _retrieval, format_report
from clip_core.scenes import HELD_OUT


def _brute_recall(scores: np.ndarray, captions: list[str], k: int) -> float:
    hits = 0
    for q in range(scores.shape[0]):
        top = sorted(range(scores.shape[1]), key=lambda j: -scores[q, j])[:k]
        hits += any(captions[j] == captions[q] for j in top)
    return hits / scores.shape[0]


def test_recall_counts_any_item_with_the_querys_caption_as_a_hit():
    rng = np.random.default_rng(0)
    captions = [f"c{int(v)}" for v in rng.integers(0, 7, size=40)]
    scores = rng.normal(size=(40, 40)).astype(np.float32)
    r = _retrieval(torch.from_numpy(scores), captions)
    assert r["n"] == 40 and r["distinct_captions"] == len(set(captions))
    for k in (1, 5):
        # fp32 means: equal up to the float32 rounding of a share of 40
        assert r["image_to_text"][f"R@{k}"] == pytest.approx(_brute_recall(scores, captions, k))
        assert r["text_to_image"][f"R@{k}"] == pytest.approx(
            _brute_recall(scores.T, captions, k))
    pairs = list(itertools.product(captions, captions))
    assert r["chance_R@1"] == pytest.approx(sum(a == b for a, b in pairs) / len(pairs))


def test_a_perfect_scorer_recalls_everything_and_a_reversed_one_little():
    captions = [f"c{i % 10}" for i in range(30)]
    same = torch.tensor([[float(a == b) for b in captions] for a in captions])
    assert _retrieval(same, captions)["image_to_text"]["R@1"] == 1.0
    assert _retrieval(-same, captions)["text_to_image"]["R@5"] == 0.0


def test_every_shape_has_a_held_out_colour_among_the_48_labels():
    combos = _combos()
    assert len(combos) == 48 and set(combos) > HELD_OUT


def test_the_report_prints_the_style_breakdown():
    zs = {t: {"seen": 1.0, "held_out": 0.5, "chance": 0.1} for t in ("colour", "shape")}
    ret = {"n": 3, "distinct_captions": 3, "chance_R@1": 0.33,
           "image_to_text": {"R@1": 1.0, "R@5": 1.0}, "text_to_image": {"R@1": 1.0, "R@5": 1.0}}
    text = format_report({"seed": 1, "images_per_combination": 2, "zero_shot": zs,
                          "colour+shape_by": {"fmt": {"JPEG": 0.25, "PNG": 0.75}},
                          "retrieval": ret}, title="drawings")
    assert "2 drawings per combination" in text and "by fmt: JPEG 0.250, PNG 0.750" in text

"""Scoring: prompt vectors against clip_core.zeroshot's ensembling, margins, heads,
thresholds, and independence from the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, random_clip

from clip_core.moderation import Head, PolicyScorer, decide, parse_policy, prompt_vectors
from clip_core.tokenizer import Tokenizer
from clip_core.zeroshot import build_classifier, combine_prompts, format_prompts


@pytest.fixture(scope="module")
def model():
    return random_clip(TINY_VIT, seed=5)


@pytest.fixture(scope="module")
def encode(model):
    tok = Tokenizer()

    def encode_texts(texts):
        with torch.no_grad():
            return model.encode_text(tok(texts).ids).numpy()

    return encode_texts


POLICY = {
    "name": "p", "version": 1, "model": "tiny",
    "categories": {
        "red": {"threshold": 0.2, "prompts": {"positive": ["red", "crimson"],
                                               "negative": ["blue"],
                                               "templates": ["a {} shape", "a {} thing"]}},
        "round": {"threshold": 2.0, "prompts": {"positive": ["circle"]}},
        "stars": {"threshold": 0.5, "head": {"path": "h.safetensors", "class": "star"}},
    },
}


def _head(dim, inputs=("image",)):
    rng = np.random.default_rng(2)
    return Head(kind="linear", multi_label=True, classes=["ring", "star"], model="tiny",
                fingerprint="f", tensors={"weight": rng.normal(size=(2, dim)),
                                          "bias": rng.normal(size=2)}, inputs=inputs)


def test_prompt_vectors_are_zeroshot_class_embeddings(model, encode):
    policy = parse_policy(POLICY, "p.yaml")
    pos, neg = prompt_vectors(policy.categories["red"], encode)
    tok = Tokenizer()
    with torch.no_grad():
        # A category is one "label" whose prompts are every positive in every template.
        prompts = format_prompts(["red", "crimson"], ["a {} shape", "a {} thing"])
        ref_pos = combine_prompts(model.encode_text(tok(prompts).ids), 1)[0]
        ref_neg = build_classifier(model, tok, ["blue"], ["a {} shape", "a {} thing"])[0]
    np.testing.assert_allclose(pos, ref_pos.double().numpy(), atol=1e-6)
    np.testing.assert_allclose(neg, ref_neg.double().numpy(), atol=1e-6)
    assert prompt_vectors(policy.categories["round"], encode)[1] is None


def test_scores_are_scaled_margins_and_head_probabilities(model, encode):
    policy = parse_policy(POLICY, "p.yaml")
    dim = model.embed_dim
    head = _head(dim)
    scale = float(model.logit_scale.detach().exp())
    scorer = PolicyScorer(policy, encode, {"h.safetensors": head}, scale)
    emb = np.random.default_rng(0).normal(size=(5, dim)).astype(np.float32)
    s = scorer.score(emb)
    assert set(s) == {"red", "round", "stars"}
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    pos, neg = prompt_vectors(policy.categories["red"], encode)
    np.testing.assert_allclose(s["red"], scale * (x @ pos - x @ neg), rtol=1e-6)
    pos_r, _ = prompt_vectors(policy.categories["round"], encode)
    np.testing.assert_allclose(s["round"], scale * (x @ pos_r), rtol=1e-6)
    np.testing.assert_allclose(s["stars"], head.predict(emb)[:, 1])
    flags = decide(s, policy)
    for name in s:
        np.testing.assert_array_equal(flags[name], s[name] >= policy.categories[name].threshold)
    # A subset, and texts: the image-only head does not score texts.
    assert set(scorer.score(emb, categories=["round"])) == {"round"}
    assert set(scorer.score(emb, kind="text")) == {"red", "round"}
    text_head = PolicyScorer(policy, encode, {"h.safetensors": _head(dim, ("image", "text"))},
                             scale)
    assert set(text_head.score(emb, kind="text")) == {"red", "round", "stars"}


def test_an_items_scores_do_not_depend_on_its_batch(model, encode):
    policy = parse_policy(POLICY, "p.yaml")
    scorer = PolicyScorer(policy, encode, {"h.safetensors": _head(model.embed_dim)},
                          float(model.logit_scale.detach().exp()))
    emb = np.random.default_rng(1).normal(size=(33, model.embed_dim)).astype(np.float32)
    whole = scorer.score(emb)
    for i in (0, 7, 32):
        alone = scorer.score(emb[i : i + 1])
        for name in whole:
            assert abs(alone[name][0] - whole[name][i]) <= 1e-9

"""Scores of moderation categories over embeddings: pure functions shared by the server
and the offline tools (clip-calibrate), so that a threshold calibrated offline means the
same thing online.

A prompt category's score is the scaled cosine margin
`logit_scale * (cos(x, pos) - cos(x, neg))` (without negatives, `logit_scale * cos(x, pos)`),
where `pos`/`neg` are the mean of the normalised embeddings of every prompt written into
every template, normalised again (CLIP's prompt ensembling, `clip_core.zeroshot`). A head
category's score is its class's probability (`heads.Head.predict`). Every row is scored
from its own embedding alone, in float64, so an item's scores do not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..zeroshot import format_prompts
from .heads import Head
from .policy import Category, Policy

# texts -> (n, D) embeddings (normalised or not: rows are normalised here)
EncodeTexts = Callable[[list[str]], np.ndarray]
KINDS = ("image", "text")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _ensemble(prompts: Sequence[str], templates: Sequence[str],
              encode_texts: EncodeTexts) -> np.ndarray:
    emb = _unit(encode_texts(format_prompts(prompts, templates)))  # (P*T, D)
    return _unit(emb.mean(axis=0))  # (D,)


def prompt_vectors(category: Category, encode_texts: EncodeTexts,
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """(pos (D,), neg (D,) or None), unit-norm float64, for a prompt category."""
    ps = category.prompts
    if ps is None:
        raise ValueError("not a prompt category")
    pos = _ensemble(ps.positive, ps.templates, encode_texts)
    neg = _ensemble(ps.negative, ps.templates, encode_texts) if ps.negative else None
    return pos, neg


class PolicyScorer:
    """A policy made ready to score: its prompt vectors computed (once, here) and its
    heads resolved. `heads` is keyed by the head path as the policy writes it
    (`heads.load_policy_heads`)."""

    def __init__(self, policy: Policy, encode_texts: EncodeTexts,
                 heads: Mapping[str, Head], logit_scale: float):
        self.policy = policy
        self.logit_scale = float(logit_scale)
        self.vectors: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        self.heads: dict[str, tuple[Head, int]] = {}
        for name, cat in policy.categories.items():
            if cat.prompts is not None:
                self.vectors[name] = prompt_vectors(cat, encode_texts)
            else:
                assert cat.head is not None
                head = heads[cat.head.path]
                self.heads[name] = (head, head.index(cat.head.class_))

    def applies(self, category: str, kind: str) -> bool:
        """Whether `category` scores embeddings of `kind` ("image" or "text"): prompt
        categories score both (text vs prompt vectors is CLIP's shared space); a head
        scores only the kinds it was trained on (images, unless its file says text)."""
        if category in self.vectors:
            return True
        return kind in self.heads[category][0].inputs

    def categories_for(self, kind: str, subset: Iterable[str] | None = None) -> list[str]:
        names = list(subset) if subset is not None else list(self.policy.categories)
        return [c for c in names if self.applies(c, kind)]

    def score(self, emb: np.ndarray, kind: str = "image",
              categories: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """(N, D) embeddings of `kind` -> {category: (N,) float64 scores}, for the
        categories (default: all of the policy's) that apply to `kind`."""
        x = _unit(emb)  # (N, D)
        out: dict[str, np.ndarray] = {}
        for name in self.categories_for(kind, categories):
            if name in self.vectors:
                pos, neg = self.vectors[name]
                margin = x @ pos if neg is None else x @ pos - x @ neg  # (N,)
                out[name] = self.logit_scale * margin
            else:
                head, col = self.heads[name]
                out[name] = head.predict(x)[:, col]
        return out


def decide(scores: Mapping[str, np.ndarray], policy: Policy) -> dict[str, np.ndarray]:
    """{category: (N,) bool}: flagged where the score reaches the category's threshold."""
    return {name: np.asarray(s) >= policy.categories[name].threshold
            for name, s in scores.items()}

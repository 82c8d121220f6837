"""clip_core.tokenizer against openai-clip's and open_clip's tokenizers on a seeded corpus."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from corpus import build_corpus

from clip_core.tokenizer import Tokenizer, clean_text

clip = pytest.importorskip("clip")
open_clip = pytest.importorskip("open_clip")

CONTEXT = 77
SPECIAL_SPELLINGS = ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>")


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, str]]:
    return build_corpus(seed=0)


@pytest.fixture(scope="module")
def texts(corpus) -> list[str]:
    return [text for _, text in corpus]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def ours(tokenizer, texts):
    return tokenizer(texts)


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    tok = open_clip.get_tokenizer("ViT-B-32")
    assert isinstance(tok, open_clip.tokenizer.SimpleTokenizer)
    return tok


@pytest.fixture(scope="module")
def open_clip_encoded(open_clip_tokenizer, texts) -> list[list[int]]:
    return [open_clip_tokenizer.encode(t) for t in texts]


def _first_mismatch(ours: torch.Tensor, ref: torch.Tensor, texts: list[str]) -> str:
    rows = (ours != ref).any(dim=1).nonzero().flatten().tolist()
    if not rows:
        return ""
    i = rows[0]
    return f"{len(rows)} rows differ; first is {i}: {texts[i]!r}"


def test_corpus_is_deterministic_and_covers_every_category(corpus):
    assert len(corpus) >= 2000
    assert build_corpus(seed=0) == corpus
    assert build_corpus(seed=1) != corpus
    counts = Counter(category for category, _ in corpus)
    assert min(counts.values()) >= 1
    assert {"ascii", "emoji", "html", "mojibake", "whitespace", "long", "odd_unicode"} <= set(
        counts
    )


def test_corpus_avoids_special_token_spellings(texts):
    # For these the references emit special ids and clip_core, on purpose, does not.
    for text in texts:
        cleaned = clean_text(text)
        assert not any(s in cleaned for s in SPECIAL_SPELLINGS)


def test_ids_match_openai_clip(ours, texts):
    ref = clip.tokenize(texts, context_length=CONTEXT, truncate=True).to(torch.int64)
    assert ours.ids.shape == ref.shape == (len(texts), CONTEXT)
    assert ours.ids.dtype == torch.int64
    assert torch.equal(ours.ids, ref), _first_mismatch(ours.ids, ref, texts)


def test_ids_match_open_clip(ours, texts, open_clip_tokenizer):
    ref = open_clip_tokenizer(texts).to(torch.int64)
    assert ours.ids.shape == ref.shape
    assert torch.equal(ours.ids, ref), _first_mismatch(ours.ids, ref, texts)


def test_encode_matches_open_clip_before_truncation(tokenizer, texts, open_clip_encoded):
    mismatched = [i for i, t in enumerate(texts) if tokenizer.encode(t) != open_clip_encoded[i]]
    assert not mismatched, f"{len(mismatched)} differ; first: {texts[mismatched[0]]!r}"


def test_n_tokens_and_truncated_flags_match_reference_lengths(ours, open_clip_encoded):
    expected = [len(ids) + 2 for ids in open_clip_encoded]
    assert ours.n_tokens == expected
    assert ours.truncated == [n > CONTEXT for n in expected]
    # The corpus must exercise both sides of the limit.
    assert 0 < sum(ours.truncated) < len(ours.truncated)


def test_decode_matches_open_clip(tokenizer, open_clip_tokenizer, open_clip_encoded):
    # open_clip leaves the space after the last word; clip_core strips it.
    for ids in open_clip_encoded[:500]:
        assert tokenizer.decode(ids) == open_clip_tokenizer.decode(ids).rstrip(" ")

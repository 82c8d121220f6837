"""SigLIP's and SigLIP2's tokenizers (clip_core.tokenizers_sp) against the reference
classes on the same vocabulary file: transformers' SiglipTokenizer and GemmaTokenizer,
called through open_clip's HFTokenizer as open_clip calls them for its pretrained SigLIP
models (clean="canonicalize", padded to 64). The vocabularies are SentencePiece models
trained here, laid out as the real ones (T5: <pad> 0, </s> 1, <unk> 2; Gemma: <pad> 0,
<eos> 1, <bos> 2, <unk> 3, byte fallback, no dummy prefix): none can be downloaded."""

from __future__ import annotations

import random
import shutil

import pytest

from clip_core.errors import TextTooLong
from clip_core.tokenizers_sp import SentencePieceTokenizer, TextScheme, clean_text

sentencepiece = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")
open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

CTX = 64
_SYLLABLES = ["ka", "to", "ri", "mo", "sen", "pa", "lu", "de", "qui", "bra", "xo", "ne",
              "fi", "gh", "tr", "ei", "ou", "z", "photo", "dog", "cat", "the", "of", "a"]

TEXTS = [
    "a photo of a dog.",
    "A Photo Of The CAT!!",
    "kato_rimo sen-pa (lude), quibra; xone?",
    "  lots   of\twhitespace \n here  ",
    "&amp;amp; html &lt;escaped&gt; katori",
    "déjà vu café naïve",  # characters the vocabulary lacks: <unk> or byte fallback
    "emoji 🐈 and 中文",
    "",
    "!!!",
    " ".join(["kato rimo senpa lude"] * 30),  # past 64 pieces: cut, the eos kept
]


def _corpus(n: int = 4000) -> list[str]:
    rng = random.Random(0)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
             for _ in range(600)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def vocabularies(tmp_path_factory):
    """(SigLIP folder, SigLIP2 folder with tokenizer.json, SigLIP2 folder with the .model
    only): the first two saved by the reference classes as the hub repos are."""
    root = tmp_path_factory.mktemp("sp")
    lines = _corpus()
    train = sentencepiece.SentencePieceTrainer.train
    train(sentence_iterator=iter(lines), model_prefix=str(root / "t5"), vocab_size=400,
          model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
          hard_vocab_limit=False, minloglevel=2)
    train(sentence_iterator=iter(lines), model_prefix=str(root / "gemma"), vocab_size=500,
          model_type="bpe", byte_fallback=True, add_dummy_prefix=False, pad_id=0, eos_id=1,
          bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
          hard_vocab_limit=False, minloglevel=2)
    siglip = root / "siglip"
    transformers.SiglipTokenizer(vocab_file=str(root / "t5.model")).save_pretrained(siglip)
    model_only = root / "gemma_model_only"
    model_only.mkdir()
    shutil.copy(root / "gemma.model", model_only / "tokenizer.model")
    # open_clip's own settings for SigLIP2 (SigLipTokenizer's "gemma" variant).
    gemma = transformers.GemmaTokenizer.from_pretrained(
        model_only, add_bos_token=False, add_eos_token=True, padding_side="right")
    siglip2 = root / "siglip2"
    gemma.save_pretrained(siglip2)
    return siglip, siglip2, model_only


def _reference(folder) -> list[list[int]]:
    ref = open_clip_tokenizer.HFTokenizer(str(folder), context_length=CTX, clean="canonicalize")
    return ref(TEXTS).tolist()


def _ours(folder, hint: str) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.from_folder(folder, context_length=CTX, clean="canonicalize",
                                              family_hint=hint)


def _padded(tok: SentencePieceTokenizer) -> list[list[int]]:
    return [tok.scheme.pad(row) for row in tok.rows(TEXTS).ids]


def test_siglip_t5_vocabulary_matches_siglip_tokenizer(vocabularies):
    siglip, _, _ = vocabularies
    tok = _ours(siglip, "ViT-B-16-SigLIP")
    # SigLIP: no BOS, </s> appended, padded with </s> (pad == eos == 1).
    assert tok.scheme == TextScheme(CTX, pad_id=1, eos_id=1, bos_id=None)
    assert _padded(tok) == _reference(siglip)


def test_siglip2_gemma_vocabulary_matches_gemma_tokenizer_from_either_file(vocabularies):
    _, siglip2, model_only = vocabularies
    expected = _reference(siglip2)
    # tokenizer.json through `tokenizers`, with the saved config's flags and padding side.
    from_json = _ours(siglip2, "ViT-B-16-SigLIP2")
    # SigLIP2: no BOS, <eos> (1) appended, padded with <pad> (0) on the right.
    assert from_json.scheme == TextScheme(CTX, pad_id=0, eos_id=1, bos_id=None)
    assert _padded(from_json) == expected
    # The bare SentencePiece model through `sentencepiece`, with open_clip's SigLIP2 rule.
    from_model = _ours(model_only, "ViT-B-16-SigLIP2")
    assert from_model.scheme == from_json.scheme
    assert _padded(from_model) == expected


def test_counts_truncation_and_refusal(vocabularies):
    siglip, _, _ = vocabularies
    tok = _ours(siglip, "ViT-B-16-SigLIP")
    long_text = TEXTS[-1]
    rows = tok.rows(["a dog", long_text])
    n_long = len(tok.encode(long_text)) + 1
    assert n_long > CTX
    assert rows.n_tokens == [len(tok.encode("a dog")) + 1, n_long]
    assert rows.truncated == [False, True]
    assert len(rows.ids[1]) == CTX and rows.ids[1][-1] == 1  # cut pieces, eos kept
    with pytest.raises(TextTooLong, match="text 1"):
        tok.rows(["a dog", long_text], truncate=False)


def test_cleaning_follows_open_clip():
    for text in TEXTS:
        for how in ("canonicalize", "whitespace", "lower"):
            assert clean_text(text, how) == open_clip_tokenizer.get_clean_fn(how)(text)


def test_a_folder_without_tokenizer_files_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        SentencePieceTokenizer.from_folder(tmp_path, context_length=CTX, clean="canonicalize",
                                           family_hint="ViT-B-16-SigLIP")


def test_a_folder_whose_class_cannot_be_told_is_refused(vocabularies):
    _, _, model_only = vocabularies  # a bare .model: only a SigLIP name says which scheme
    with pytest.raises(ValueError, match="names no tokenizer_class"):
        SentencePieceTokenizer.from_folder(model_only, context_length=CTX, clean="whitespace",
                                           family_hint="xlm-roberta-base-ViT-B-32")

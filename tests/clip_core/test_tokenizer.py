"""clip_core.tokenizer: layout of the id rows, truncation, decoding, the bounded cache and
inputs that are not ordinary text. Parity with the references is in tests/parity."""

from __future__ import annotations

import gzip
import random
import string
import threading
from importlib import resources

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import clip_core.tokenizer as tokenizer_module
from clip_core.errors import InvalidInput, TextTooLong
from clip_core.tokenizer import TokenizedBatch, Tokenizer, clean_text

SOT, EOT, CONTEXT = 49406, 49407, 77
# "a photo of a cat" in CLIP's vocabulary (checked against open_clip).
PHOTO_OF_A_CAT = [320, 1125, 539, 320, 2368]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def check_row(batch: TokenizedBatch, row: int, context: int = CONTEXT) -> None:
    """Invariants of every row: sot first, eot at the end of the kept tokens, zeros after."""
    ids = batch.ids[row].tolist()
    n = batch.n_tokens[row]
    kept = min(n, context)
    assert n >= 2
    assert batch.truncated[row] == (n > context)
    assert ids[0] == SOT
    assert ids[kept - 1] == EOT
    assert all(0 <= i < SOT for i in ids[1 : kept - 1])
    assert ids[kept:] == [0] * (context - kept)


def check_text(tok: Tokenizer, text: str, truncate: bool) -> None:
    """Tokenizing any str gives valid rows, or TextTooLong only where truncation is off."""
    try:
        batch = tok([text], truncate=truncate)
    except TextTooLong as e:
        assert not truncate
        assert e.n_tokens > CONTEXT
        assert e.n_tokens == tok.count_tokens(text)
        return
    assert batch.ids.shape == (1, CONTEXT)
    assert batch.ids.dtype == torch.int64
    check_row(batch, 0)


def test_vocabulary_constants(tok):
    assert (tok.sot_id, tok.eot_id, tok.vocab_size) == (SOT, EOT, 49408)
    assert tok.context_length == CONTEXT


def test_row_layout(tok):
    batch = tok("a photo of a cat")
    assert isinstance(batch, TokenizedBatch)
    assert batch.ids.shape == (1, CONTEXT)
    assert batch.ids.dtype == torch.int64
    assert batch.ids[0, :7].tolist() == [SOT, *PHOTO_OF_A_CAT, EOT]
    assert batch.ids[0, 7:].eq(0).all()
    assert batch.n_tokens == [7]
    assert batch.truncated == [False]
    check_row(batch, 0)


def test_encode_has_no_specials(tok):
    assert tok.encode("A  Photo\tof a CAT") == PHOTO_OF_A_CAT
    assert tok.count_tokens("a photo of a cat") == 7


def test_sequences_and_empty_batch(tok):
    batch = tok(("a photo of a cat", "", "dog"))
    assert batch.ids.shape == (3, CONTEXT)
    assert batch.n_tokens == [7, 2, 3]
    for row in range(3):
        check_row(batch, row)
    empty = tok([])
    assert empty.ids.shape == (0, CONTEXT)
    assert empty.n_tokens == [] and empty.truncated == []


@pytest.mark.parametrize("text", ["", " ", "\t\n\r ", "\xa0\u3000\u2028", "&nbsp;", "\x00"])
def test_empty_and_whitespace_only_give_sot_eot(tok, text):
    batch = tok(text)
    assert batch.ids[0, :2].tolist() == [SOT, EOT]
    assert batch.n_tokens == [2]
    assert batch.ids[0, 2:].eq(0).all()


def test_exactly_context_length_is_not_truncated(tok):
    batch = tok("a " * (CONTEXT - 2))
    assert batch.n_tokens == [CONTEXT]
    assert batch.truncated == [False]
    assert batch.ids[0, -1].item() == EOT
    assert tok("a " * (CONTEXT - 2), truncate=False).n_tokens == [CONTEXT]


def test_truncation_keeps_eot_last_and_flags_it(tok):
    batch = tok(["a " * 100, "dog"])
    row = batch.ids[0].tolist()
    assert row == [SOT, *[320] * (CONTEXT - 2), EOT]
    assert batch.n_tokens == [102, 3]
    assert batch.truncated == [True, False]
    check_row(batch, 0)
    check_row(batch, 1)


def test_truncate_false_raises_without_echoing_the_text(tok):
    secret = "zanzibarquux " * 80
    with pytest.raises(TextTooLong) as info:
        tok(["short", secret], truncate=False)
    err = info.value
    assert isinstance(err, InvalidInput)
    assert (err.index, err.context_length) == (1, CONTEXT)
    assert err.n_tokens == tok.count_tokens(secret) > CONTEXT
    assert "zanzibar" not in str(err) and "quux" not in str(err)


def test_custom_context_length():
    small = Tokenizer(context_length=4, cache_size=16)
    batch = small(["a photo of a cat", "cat"])
    assert batch.ids.tolist() == [[SOT, 320, 1125, EOT], [SOT, 2368, EOT, 0]]
    assert batch.n_tokens == [7, 3]
    assert batch.truncated == [True, False]
    with pytest.raises(TextTooLong):
        small("a photo of a cat", truncate=False)


@pytest.mark.parametrize("kwargs", [{"context_length": 1}, {"cache_size": -1}])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        Tokenizer(**kwargs)


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["ok", None], ("ok", b"x"), {"a": 1}])
def test_non_str_input_is_a_type_error(tok, bad):
    with pytest.raises(TypeError):
        tok(bad)


@pytest.mark.parametrize("bad", [None, b"x", 1.5])
def test_encode_non_str_is_a_type_error(tok, bad):
    with pytest.raises(TypeError):
        tok.encode(bad)


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        ("a photo of a cat", "a photo of a cat"),
        ("  A Photo   of a CAT ", "a photo of a cat"),
        ("Hello, World!", "hello , world !"),
        ("café 東京", "café 東京"),
        ("don't", "don 't"),
        ("👍🏿", "👍🏿"),
    ],
)
def test_decode_inverts_encode(tok, text, decoded):
    assert tok.decode(tok.encode(text)) == decoded
    # A padded row decodes the same: sot skipped, eot and the padding after it ignored.
    assert tok.decode(tok(text).ids[0]) == decoded


def test_decode_keeps_id_zero_before_eot(tok):
    # Id 0 is "!"; only zeros after eot are padding.
    assert tok.decode([0]) == "!"
    assert tok.decode([SOT, 2368, EOT, 0, 0]) == "cat"


@pytest.mark.parametrize("bad", [-1, 49408, 10**9])
def test_decode_rejects_ids_outside_the_vocabulary(tok, bad):
    with pytest.raises(InvalidInput):
        tok.decode([320, bad])


@pytest.mark.parametrize("spelling", ["<|endoftext|>", "<|startoftext|>", "<end_of_text>"])
def test_special_spellings_in_text_are_plain_text(tok, spelling):
    ids = tok.encode(f"a {spelling} cat")
    assert ids and max(ids) < SOT
    assert tok.decode(ids).replace(" ", "") == f"a{spelling}cat"


def test_merge_cache_stays_bounded():
    small = Tokenizer(cache_size=256)
    rng = random.Random(0)
    words = {"".join(rng.choices(string.ascii_lowercase, k=10)) for _ in range(20_000)}
    assert len(words) > 19_000
    ordered = sorted(words)
    for start in range(0, len(ordered), 500):
        small.encode(" ".join(ordered[start : start + 500]))
    info = small.cache_info()
    assert info.maxsize == 256
    assert info.currsize <= 256
    assert info.misses >= len(words)


def test_cache_can_be_disabled():
    uncached = Tokenizer(cache_size=0)
    assert uncached.encode("a photo of a cat") == PHOTO_OF_A_CAT
    assert uncached.cache_info().currsize == 0


def test_threads_get_the_same_ids_as_one_thread(tok):
    rng = random.Random(1)
    texts = [" ".join(rng.choices(["dog", "cat", "photo", "zebra", "東京", "xqz"], k=20))] * 8
    texts = [f"{t} {i}" for i, t in enumerate(texts * 25)]
    expected = [tok.encode(t) for t in texts]
    fresh = Tokenizer(cache_size=64)
    results: dict[int, list[list[int]]] = {}

    def work(k: int) -> None:
        results[k] = [fresh.encode(t) for t in texts]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[k] == expected for k in range(8))


def test_vocab_path_gzipped_or_plain(tmp_path):
    packaged = resources.files("clip_core") / "data" / "bpe_simple_vocab_16e6.txt.gz"
    data = packaged.read_bytes()
    plain = tmp_path / "merges.txt"
    plain.write_bytes(gzip.decompress(data))
    gz = tmp_path / "merges.txt.gz"
    gz.write_bytes(data)
    for path in (plain, str(gz)):
        assert Tokenizer(vocab_path=path).encode("a photo of a cat") == PHOTO_OF_A_CAT


def test_short_vocab_file_is_rejected(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="merge lines"):
        Tokenizer(vocab_path=path)


WEIRD = [
    "\x00",
    "a\x00b",
    "\x00" * 200,
    "\ud800",
    "a\udfffb",
    "\ud83d",
    "\ud83d\ude00",
    "\u200b",
    "zero\u200bwidth\u200c\u200djoin\ufeff",
    "\u202eevil\u202c",
    "مرحبا بالعالم",
    "שלום\u200f",
    "\u0301\u0301\u0301",
    "\U0010ffff\U000e0001",
    "\x1b[31mred\x1b[0m",
    "\ufffe\uffff",
    "ǅ ß ﬀ İ",
    "\r\n" * 50,
    "&#0;&#xD800;&#x110000;&amp;#1114112;",
]


@pytest.mark.parametrize("text", WEIRD)
@pytest.mark.parametrize("truncate", [True, False])
def test_weird_unicode_does_not_crash(tok, text, truncate):
    check_text(tok, text, truncate)


def test_nul_vanishes_and_a_lone_surrogate_becomes_u_fffd(tok):
    assert tok("\x00\x00").n_tokens == [2]
    assert tok("\ud800").n_tokens == [3]  # U+FFFD, as ftfy replaces the lone surrogate


def test_surrogates_that_survive_cleaning_become_replacement_characters(tok, monkeypatch):
    # ftfy replaces lone surrogates itself; this is the guard behind it.
    monkeypatch.setattr(tokenizer_module.ftfy, "fix_text", lambda text: text)
    assert clean_text("A\ud800b\udc00") == "a\ufffdb\ufffd"
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")


def test_random_code_points_never_raise(tok):
    rng = random.Random(2)
    for _ in range(300):
        top = rng.choice([0x80, 0x800, 0x10000, 0x110000])
        text = "".join(chr(rng.randrange(top)) for _ in range(rng.randint(0, 120)))
        check_text(tok, text, truncate=rng.random() < 0.5)


# Every code point, surrogates included (st.text() leaves them out by default); the
# second branch strings pieces together so that about half the texts pass 77 tokens.
ANY_CHAR = st.characters(exclude_categories=())
PIECES = st.sampled_from(["a ", "&amp;", "\ud800", "\t", "don't ", "\x00", "\u200d"])
ANY_TEXT = st.one_of(
    st.text(ANY_CHAR, max_size=300),
    st.lists(st.one_of(st.text(ANY_CHAR, max_size=4), PIECES), min_size=30, max_size=150).map(
        "".join
    ),
)


@settings(max_examples=150, deadline=None)
@given(text=ANY_TEXT, truncate=st.booleans())
def test_any_text_property(tok, text, truncate):
    check_text(tok, text, truncate)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="&"),
               max_size=60))
def test_clean_text_skips_ftfy_only_where_ftfy_changes_nothing(text):
    # Printable ASCII without '&': clean_text does not call ftfy, and ftfy would have left it
    # as it is. The next test checks that everything else still goes through ftfy.
    real = tokenizer_module.ftfy.fix_text
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer_module.ftfy, "fix_text", lambda t: calls.append(t) or real(t))
        clean_text(text)
    assert calls == []
    assert real(text) == text


@pytest.mark.parametrize("text", ["a&amp;amp;b", "tab\there", "\x1b[31mred", "line\r\nbreak",
                                  "caf\u00c3\u00a9", "nul\x00char"])
def test_text_ftfy_would_change_still_goes_through_it(text, monkeypatch):
    calls = []
    real = tokenizer_module.ftfy.fix_text
    monkeypatch.setattr(tokenizer_module.ftfy, "fix_text", lambda t: calls.append(t) or real(t))
    clean_text(text)
    assert calls == [text]


def test_rows_are_the_tensor_rows_without_padding(tok):
    texts = ["a photo of a cat", "", "word " * 100, "two words"]
    rows = tok.rows(texts)
    batch = tok(texts)
    assert rows.n_tokens == batch.n_tokens and rows.truncated == batch.truncated
    for row, padded, n in zip(rows.ids, batch.ids.tolist(), batch.n_tokens, strict=True):
        assert row == padded[: min(n, CONTEXT)]
        assert all(i == 0 for i in padded[len(row):])
    assert rows.ids[0] == [SOT, *PHOTO_OF_A_CAT, EOT]
    with pytest.raises(TextTooLong):
        tok.rows(texts, truncate=False)

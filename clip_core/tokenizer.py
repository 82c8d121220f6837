"""CLIP's byte-level BPE tokenizer.

Produces the same ids as openai/CLIP's `clip.tokenize(truncate=True)` and open_clip's default
tokenizer (clean='lower') for ordinary text; tests/parity checks this on a seeded corpus.

Where this tokenizer departs from them on purpose:
- The special-token spellings inside a caller's text ("<|endoftext|>" for openai/CLIP,
  "<end_of_text>" for open_clip) are ordinary text here. A caller cannot place an end-of-text
  id early and so move the position the text encoder pools from.
- Lone surrogates ('\\ud800') cannot be UTF-8 encoded. ftfy already replaces them with U+FFFD
  (and joins valid surrogate pairs into one character); any that survive cleaning are replaced
  with U+FFFD as well, so every str tokenizes.
"""

from __future__ import annotations

import gzip
import heapq
import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from itertools import pairwise

import ftfy
import regex
import torch

from clip_core.errors import InvalidInput, TextTooLong

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
# CLIP uses the first 49152 - 256 - 2 merges of its file: 256 byte symbols, 256 byte symbols
# ending a word, the merges and two specials make a vocabulary of 49408.
N_MERGES = 49152 - 256 - 2
DEFAULT_CONTEXT_LENGTH = 77
_END_OF_WORD = "</w>"

# Pre-tokenizer of openai/CLIP simple_tokenizer.py, without its two special-token alternatives:
# English contractions, runs of letters, single digits, runs of other non-space characters.
_WORD_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)
_SURROGATE = regex.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True)
class TokenRows:
    ids: list[list[int]]  # per text: [sot, ..., eot], truncated to the context length
    n_tokens: list[int]  # per text, sot and eot included, before truncation
    truncated: list[bool]


@dataclass(frozen=True)
class TokenizedBatch:
    ids: torch.Tensor  # (N, context_length) int64: [sot, ..., eot, 0, ...]
    n_tokens: list[int]  # per text, sot and eot included, before truncation
    truncated: list[bool]


def clean_text(text: str) -> str:
    """CLIP's text normalisation: ftfy, HTML unescaping twice, whitespace collapsed, lower case."""
    # Printable ASCII without '&' is what ftfy leaves as it is (its fixes need non-ASCII
    # characters, control characters or HTML entities), and most requests are that; its
    # per-call set-up cost the event loop more than the rest of tokenising.
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)
    # Twice, as CLIP does, so doubly escaped scraped text ("&amp;amp;") comes out plain.
    text = html.unescape(html.unescape(text))
    # str.split's whitespace is regex's \s (openai/CLIP's choice) plus U+001C..U+001F, which
    # ftfy has already removed as control characters, so both references agree here.
    text = " ".join(text.split()).lower()
    if not text.isascii():
        text = _SURROGATE.sub("\ufffd", text)
    return text


def _byte_symbols() -> list[str]:
    """One visible character per byte value, indexed by byte.

    Bytes that are printable Latin-1 stand for themselves; the 68 others (controls, space,
    NBSP, soft hyphen) take U+0100 upwards in byte order, so BPE symbols never hold whitespace.
    Same table as GPT-2 and CLIP.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols = []
    next_extra = 0x100
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(next_extra))
            next_extra += 1
    return symbols


def _read_merges(vocab_path: str | os.PathLike[str] | None) -> list[tuple[str, str]]:
    if vocab_path is None:
        data = (resources.files("clip_core") / "data" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    else:
        with open(vocab_path, "rb") as f:
            data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    lines = data.decode("utf-8").split("\n")
    # Line 0 is a "#version" header.
    pairs = [line.split() for line in lines[1 : N_MERGES + 1]]
    if len(pairs) < N_MERGES or any(len(p) != 2 for p in pairs):
        raise ValueError(
            f"{vocab_path or 'packaged vocabulary'}: expected {N_MERGES} merge lines of two "
            "symbols each after the header"
        )
    return [(a, b) for a, b in pairs]


def _build_vocab(
    byte_symbols: list[str], merges: list[tuple[str, str]], source: object
) -> list[str]:
    """Symbols in id order: byte symbols sorted by code point (the printable bytes, then
    U+0100...), the same symbols ending a word, one per merge in rank order, the specials."""
    singles = sorted(byte_symbols)
    vocab = [*singles, *(s + _END_OF_WORD for s in singles)]
    known = set(vocab)
    for rank, (a, b) in enumerate(merges):
        # Tokenizer._bpe relies on every merge building on earlier symbols only.
        if a not in known or b not in known or a + b in known:
            raise ValueError(
                f"{source or 'packaged vocabulary'}: merge {rank} ({a} {b}) uses a symbol no "
                "earlier merge made, or makes one that exists already"
            )
        known.add(a + b)
        vocab.append(a + b)
    return [*vocab, SOT, EOT]


class Tokenizer:
    """Text -> (N, context_length) ids for CLIP's text encoder.

    Thread-safe: after construction the tables are only read, and the merge cache is a
    functools.lru_cache, bounded to `cache_size` words.
    """

    def __init__(
        self,
        vocab_path: str | os.PathLike[str] | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        cache_size: int = 65536,
    ):
        if context_length < 2:
            raise ValueError(
                f"context_length must be at least 2 (sot and eot), not {context_length}"
            )
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, not {cache_size}")
        self.context_length = context_length

        merges = _read_merges(vocab_path)
        self._byte_symbol = _byte_symbols()
        vocab = _build_vocab(self._byte_symbol, merges, vocab_path)
        self._id_of = {symbol: i for i, symbol in enumerate(vocab)}
        # Bytes each non-special id stands for; a word's last symbol adds the space between words.
        symbol_byte = {s: b for b, s in enumerate(self._byte_symbol)}
        self._bytes_of = [
            bytes(symbol_byte[ch] for ch in s.removesuffix(_END_OF_WORD))
            + (b" " if s.endswith(_END_OF_WORD) else b"")
            for s in vocab[:-2]
        ]
        self._rank = {pair: rank for rank, pair in enumerate(merges)}

        self.sot_id = self._id_of[SOT]
        self.eot_id = self._id_of[EOT]
        self.vocab_size = len(vocab)
        # Per instance, so each tokenizer's cache is bounded and freed with it. Keyed by the
        # word as written: a hit then costs no mapping to byte symbols.
        self._word_ids = lru_cache(maxsize=cache_size)(self._word_bpe)

    def cache_info(self):
        """functools' CacheInfo (hits, misses, maxsize, currsize) of the per-word merge cache."""
        return self._word_ids.cache_info()

    def _word_bpe(self, word: str) -> tuple[int, ...]:
        byte_symbol = self._byte_symbol
        return self._bpe("".join(byte_symbol[b] for b in word.encode("utf-8")))

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized word, given as byte symbols.

        Applies the lowest-ranked merge first and, within a rank, the leftmost occurrence
        first ("aaa" -> "aa a"), which is the order of CLIP's pass-per-rank loop: a merge
        only ever builds on symbols of lower rank (checked when the vocabulary is read), so
        ranks come out of the heap in the same order. O(n log n) in the word's length, where
        the pass-per-rank loop is quadratic and a single 10,000-letter word took seconds.
        """
        symbols = [*word[:-1], word[-1] + _END_OF_WORD]
        rank = self._rank
        # Doubly linked list over positions; a merge keeps the left position and empties
        # the right one ("" is no symbol, so a pair holding it has no rank).
        nxt = [*range(1, len(symbols)), -1]
        prv = list(range(-1, len(symbols) - 1))
        heap = [(rank[pair], i) for i, pair in enumerate(pairwise(symbols)) if pair in rank]
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            j = nxt[i]
            # Stale entry: position i was merged away or its pair has changed since the push.
            if not symbols[i] or j < 0 or rank.get((symbols[i], symbols[j])) != r:
                continue
            symbols[i] += symbols[j]
            symbols[j] = ""
            k = nxt[i] = nxt[j]
            if k >= 0:
                prv[k] = i
                if (r_next := rank.get((symbols[i], symbols[k]))) is not None:
                    heapq.heappush(heap, (r_next, i))
            h = prv[i]
            if h >= 0 and (r_prev := rank.get((symbols[h], symbols[i]))) is not None:
                heapq.heappush(heap, (r_prev, h))
        return tuple(self._id_of[s] for s in symbols if s)

    def encode(self, text: str) -> list[int]:
        """BPE ids of the cleaned text, without sot and eot."""
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        ids: list[int] = []
        for word in _WORD_PATTERN.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
        return ids

    def count_tokens(self, text: str) -> int:
        """Tokens the text needs, sot and eot included."""
        return len(self.encode(text)) + 2

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of a row of ids: a leading sot is skipped and the first eot ends the text, so
        the padding after it is ignored. Words come back separated by single spaces."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        parts = []
        for i in ids:
            i = int(i)
            if i == self.sot_id:
                continue
            if i == self.eot_id:
                break
            if not 0 <= i < self.sot_id:
                raise InvalidInput(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            parts.append(self._bytes_of[i])
        # Ids need not end on a character boundary, hence errors="replace".
        return b"".join(parts).decode("utf-8", errors="replace").rstrip(" ")

    def rows(self, texts: str | Sequence[str], truncate: bool = True) -> TokenRows:
        """Tokenize one text or a sequence of texts into unpadded id lists.

        An over-long text keeps its first context_length - 1 tokens with eot after them when
        `truncate` is true; otherwise TextTooLong names its index and token count.
        """
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, Sequence):
            raise TypeError(f"expected str or a sequence of str, got {type(texts).__name__}")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {index} is {type(text).__name__}, expected str")

        length = self.context_length
        rows: list[list[int]] = []
        n_tokens: list[int] = []
        truncated: list[bool] = []
        for index, text in enumerate(texts):
            row = [self.sot_id, *self.encode(text), self.eot_id]
            n = len(row)
            if n > length:
                if not truncate:
                    raise TextTooLong(index, n, length)
                row = [*row[: length - 1], self.eot_id]
            n_tokens.append(n)
            truncated.append(n > length)
            rows.append(row)
        return TokenRows(ids=rows, n_tokens=n_tokens, truncated=truncated)

    def __call__(self, texts: str | Sequence[str], truncate: bool = True) -> TokenizedBatch:
        """`rows`, zero padded into one (N, context_length) tensor."""
        out = self.rows(texts, truncate)
        length = self.context_length
        padded = [row + [0] * (length - len(row)) for row in out.ids]
        ids = torch.tensor(padded, dtype=torch.int64).reshape(len(padded), length)
        return TokenizedBatch(ids=ids, n_tokens=out.n_tokens, truncated=out.truncated)

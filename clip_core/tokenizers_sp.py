"""SentencePiece-family tokenizers: SigLIP's T5 vocabulary, SigLIP2's Gemma vocabulary,
XLM-R's, read with the libraries that own those formats (`sentencepiece` for a `.model`
file, `tokenizers` for a `tokenizer.json`).

What differs between the families is data (`TextScheme`): which special ids frame a text
and which id pads it. The facts, as open_clip 3.3 and transformers lay them out:

- SigLIP (`SiglipTokenizer`, T5's SentencePiece): no BOS, `</s>` (1) appended, padded
  with `</s>` too (pad == eos), to 64.
- SigLIP2 (`GemmaTokenizer` with `add_bos_token: false, add_eos_token: true`): no BOS,
  `<eos>` (1) appended, padded with `<pad>` (0) on the right, to 64.
- XLM-R (`XLMRobertaTokenizer`): `<s>` text `</s>`, padded with `<pad>`, to 77.

Texts are cleaned as open_clip's `HFTokenizer` cleans them (`clean` in the model config's
`tokenizer_kwargs`): SigLIP canonicalises (lower case, ASCII punctuation removed). Padding
matters here, unlike CLIP's BPE path: SigLIP pools the last position of the padded row and
attends over the padding, so the backend pads every row to `context_length`.
"""

from __future__ import annotations

import html
import json
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ftfy

from .errors import TextTooLong
from .tokenizer import TokenRows

Clean = Literal["canonicalize", "whitespace", "lower"]
_PUNCTUATION = str.maketrans("", "", string.punctuation)

# tokenizer_config.json's class -> (bos piece or None, eos piece or None, default pad piece).
# Gemma's flags (add_bos_token / add_eos_token) are read from the file and override these.
_CLASS_SPECIALS: dict[str, tuple[str | None, str | None, str]] = {
    "SiglipTokenizer": (None, "</s>", "</s>"),
    "T5Tokenizer": (None, "</s>", "<pad>"),
    "GemmaTokenizer": ("<bos>", None, "<pad>"),
    "XLMRobertaTokenizer": ("<s>", "</s>", "<pad>"),
}
# Files a model folder may hold, in the order they are preferred.
SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.model")
TOKENIZER_FILES = (*SENTENCEPIECE_FILES, "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def clean_text(text: str, how: Clean) -> str:
    """open_clip's cleaning: ftfy, HTML unescaped twice, stripped; then `whitespace` collapses
    runs of whitespace, `lower` also lower-cases, `canonicalize` (big_vision's) also turns
    '_' into spaces and drops ASCII punctuation."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if how == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    elif how == "lower":
        text = text.lower()
    return " ".join(text.split())


@dataclass(frozen=True)
class TextScheme:
    """How one model's texts become rows: the specials around the pieces and the padding."""

    context_length: int
    pad_id: int
    eos_id: int | None = None  # appended; kept when a text is cut
    bos_id: int | None = None  # prepended
    clean: Clean = "canonicalize"
    padding_side: Literal["right", "left"] = "right"

    @property
    def n_specials(self) -> int:
        return (self.bos_id is not None) + (self.eos_id is not None)

    def pad(self, row: Sequence[int]) -> list[int]:
        """One row padded to `context_length` with `pad_id` on its padding side."""
        fill = [self.pad_id] * (self.context_length - len(row))
        return [*row, *fill] if self.padding_side == "right" else [*fill, *row]


class SentencePieceTokenizer:
    """Texts -> unpadded rows [bos?, pieces..., eos?] (`TokenRows`), cut to the context
    length as transformers cuts them (the pieces, never the specials). `encode` maps a
    cleaned text to its piece ids; `piece_id` maps a special's spelling to its id."""

    def __init__(self, encode: Callable[[str], list[int]], scheme: TextScheme,
                 vocab_size: int):
        if scheme.context_length <= scheme.n_specials:
            raise ValueError(f"context_length {scheme.context_length} leaves no room for text")
        self._encode = encode
        self.scheme = scheme
        self.vocab_size = vocab_size
        self.context_length = scheme.context_length

    def encode(self, text: str) -> list[int]:
        """The piece ids of one text after cleaning, without specials."""
        return self._encode(clean_text(text, self.scheme.clean))

    def rows(self, texts: str | Sequence[str], truncate: bool = True) -> TokenRows:
        if isinstance(texts, str):
            texts = [texts]
        s = self.scheme
        room = s.context_length - s.n_specials
        head = [] if s.bos_id is None else [s.bos_id]
        tail = [] if s.eos_id is None else [s.eos_id]
        ids: list[list[int]] = []
        n_tokens: list[int] = []
        truncated: list[bool] = []
        for i, text in enumerate(texts):
            pieces = self.encode(text)
            n = len(pieces) + s.n_specials
            if n > s.context_length and not truncate:
                raise TextTooLong(i, n, s.context_length)
            ids.append([*head, *pieces[:room], *tail])
            n_tokens.append(n)
            truncated.append(n > s.context_length)
        return TokenRows(ids, n_tokens, truncated)

    @classmethod
    def from_folder(cls, folder: str | Path, *, context_length: int, clean: Clean,
                    family_hint: str = "") -> SentencePieceTokenizer:
        """From a model folder as the hub lays it out: a SentencePiece `.model` (read with
        `sentencepiece`) or else a `tokenizer.json` (read with `tokenizers`), and
        `tokenizer_config.json` for the class, its flags and its pad token. Without a
        config, the class follows open_clip's naming rule: "siglip2" in `family_hint` means
        Gemma, another "siglip" T5; anything else needs the config."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        hint = family_hint.lower()
        cls_name = str(config.get("tokenizer_class") or (
            "GemmaTokenizer" if "siglip2" in hint else "SiglipTokenizer" if "siglip" in hint
            else "")).removesuffix("Fast")
        if not cls_name:
            raise ValueError(f"{folder}: tokenizer_config.json names no tokenizer_class")
        if cls_name not in _CLASS_SPECIALS:
            raise ValueError(f"{folder}: tokenizer class {cls_name!r} is not supported; "
                             f"known: {', '.join(_CLASS_SPECIALS)}")
        bos, eos, pad = _CLASS_SPECIALS[cls_name]
        pieces = _open_pieces(folder)
        flags = {"add_bos_token", "add_eos_token"} & set(config)
        if flags:
            bos = "<bos>" if config.get("add_bos_token") else None
            eos = "<eos>" if config.get("add_eos_token") else None
        elif pieces.framing is not None:
            # transformers 5 keeps the flags in tokenizer.json's post-processor only.
            bos, eos = pieces.framing
        elif cls_name == "GemmaTokenizer":
            # No flags anywhere: SigLIP2's settings without a config (open_clip's
            # SigLipTokenizer), transformers' class defaults with one.
            bos, eos = (None, "<eos>") if not config else ("<bos>", None)
        pad = _spelling(config.get("pad_token") or special_map.get("pad_token")) or pad
        default_side = "left" if cls_name == "GemmaTokenizer" and config else "right"
        scheme = TextScheme(
            context_length=context_length, pad_id=pieces.piece_id(pad),
            eos_id=None if eos is None else pieces.piece_id(eos),
            bos_id=None if bos is None else pieces.piece_id(bos),
            clean=clean, padding_side=config.get("padding_side", default_side),
        )
        return cls(pieces.encode, scheme, pieces.vocab_size)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _spelling(token: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


@dataclass(frozen=True)
class _Pieces:
    encode: Callable[[str], list[int]]  # cleaned text -> piece ids, no specials
    piece_id: Callable[[str], int]
    vocab_size: int
    # (bos, eos) spellings that tokenizer.json's post-processor puts around a text.
    framing: tuple[str | None, str | None] | None = None


def _open_pieces(folder: Path) -> _Pieces:
    """The folder's SentencePiece model, else its tokenizer.json. The libraries are
    imported here: only these families need them."""
    for name in SENTENCEPIECE_FILES:
        if (folder / name).is_file():
            return _sentencepiece(folder / name)
    if (folder / "tokenizer.json").is_file():
        return _tokenizers(folder / "tokenizer.json")
    raise FileNotFoundError(f"{folder}: no tokenizer file (one of "
                            f"{', '.join((*SENTENCEPIECE_FILES, 'tokenizer.json'))})")


def _sentencepiece(path: Path) -> _Pieces:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))

    def piece_id(piece: str) -> int:
        i = sp.piece_to_id(piece)
        if sp.id_to_piece(i) != piece:  # an unknown piece maps to <unk>
            raise ValueError(f"{path}: no piece {piece!r}")
        return int(i)

    def encode(text: str) -> list[int]:
        return list(sp.encode(text))

    return _Pieces(encode, piece_id, int(sp.get_piece_size()))


def _tokenizers(path: Path) -> _Pieces:
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(path))

    def piece_id(piece: str) -> int:
        i = tok.token_to_id(piece)
        if i is None:
            raise ValueError(f"{path}: no token {piece!r}")
        return int(i)

    def encode(text: str) -> list[int]:
        # The specials are the scheme's to place, not the file's post-processor.
        return list(tok.encode(text, add_special_tokens=False).ids)

    # What the post-processor adds around a probe: at most one special each side.
    bare = tok.encode("a", add_special_tokens=False).tokens
    framed = tok.encode("a", add_special_tokens=True).tokens
    at = next((i for i in range(len(framed)) if framed[i:i + len(bare)] == bare), None)
    framing = None
    if at is not None and at <= 1 and len(framed) - at - len(bare) <= 1:
        after = framed[at + len(bare):]
        framing = (framed[0] if at else None, after[0] if after else None)
    return _Pieces(encode, piece_id, int(tok.get_vocab_size()), framing)

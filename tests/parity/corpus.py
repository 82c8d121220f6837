"""A seeded corpus of texts for tokenizer parity tests.

`build_corpus(seed)` returns the same list for the same seed on every machine: only
random.Random and fixed tables are used. Texts never contain the special-token spellings the
reference tokenizers treat as specials ("<|endoftext|>", "<end_of_text>", ...), where
clip_core.tokenizer departs from them on purpose.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def _words(text: str) -> list[str]:
    return text.split()


WORDS = _words(
    "a photo of the dog cat car tree house bird person man woman child red green blue small "
    "large old new running sitting on in at with and or by near beach mountain city street "
    "night day sunset snow rain painting drawing sketch close-up view two three many some "
    "bicycle airplane boat pizza guitar flower garden kitchen window table chair computer "
    "phone book sign road bridge river forest field sky cloud ocean wave sand rock stone"
)

ACCENTED = _words(
    "café naïve façade jalapeño über Ångström Łódź São Paulo crème brûlée résumé coöperate "
    "Ærøskøbing smörgåsbord piñata Dvořák Gdańsk Zürich el niño déjà vu Straße ﬁancée "
    "Ελληνικά Москва Київ Ñandú İstanbul ĳssel cafe\u0301 Kelvin\u212a \u017ftraße"
)

CJK = [
    "東京タワー",
    "北京烤鸭",
    "一只猫坐在桌子上",
    "こんにちは世界",
    "カタカナ",
    "서울의 밤",
    "한국어 텍스트",
    "漢字とひらがな",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
]

EMOJI = [
    "😀",
    "🐶",
    "🚗💨",
    "👍🏿",
    "👋🏼",
    "🧑🏽‍💻",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈",
    "🏴‍☠️",
    "🇫🇷🇯🇵",
    "1️⃣",
    "❤️",
    "🫠",
    "👩🏻‍🤝‍👨🏾",
]

ENTITIES = [
    "&amp;",
    "&lt;",
    "&gt;",
    "&quot;",
    "&#39;",
    "&nbsp;",
    "&eacute;",
    "&#x263A;",
    "&#128512;",
    "&amp;amp;",
    "&amp;lt;b&amp;gt;",
    "&copy;",
    "&hellip;",
    "&mdash;",
    "&amp",
    "&#0;",
    "&#xD800;",
    "&notanentity;",
    "&lt;b&gt;bold&lt;/b&gt;",
]

WHITESPACE = [" ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\xa0", "\u2028", "\u3000", "\x85", "\u2009"]

ODD = [
    "\x00",
    "\u200b",
    "\u200c",
    "\u200d",
    "\ufeff",
    "\u200f",
    "\u202e",
    "\u2066",
    "\ud800",
    "\udfff",
    "\ud83d\ude00",
    "\x07",
    "\x1b[31m",
    "\x7f",
    "\u0301",
    "\ufffd",
    "\U000e0001",
    "مرحبا بالعالم",
    "שלום עולם",
]

PUNCTUATION = [
    "3.14159",
    "$1,000,000",
    "(555) 123-4567",
    "!!!???",
    "...",
    "--",
    "#hashtag",
    "@user",
    "https://example.com/a?b=c&d=e",
    "1st 2nd 3rd",
    "50%",
    "C++",
    "e=mc²",
    "½ ¾ ⅓",
    "١٢٣",
    "Ⅻ",
    "x_1",
    "“quoted” ‘single’",
    "a/b\\c",
    "~`^|",
]

CONTRACTIONS = [
    "don't",
    "it's",
    "WE'LL",
    "I'm",
    "you're",
    "they've",
    "she'd",
    "can't",
    "Y'ALL",
    "won’t",
    "'s'",
    "rock 'n' roll",
    "o'clock",
    "'twas",
]


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", "!", "?", "", "..."])


def _mixed_case(rng: random.Random, text: str) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c for c in text)


def _mojibake(text: str) -> str:
    # UTF-8 bytes read as Latin-1 or Windows-1252, as in scraped captions ('cafÃ©').
    return text.encode("utf-8").decode("latin-1")


def _mojibake_1252(text: str) -> str:
    return text.encode("utf-8").decode("cp1252", errors="replace")


def _random_codepoints(rng: random.Random, n: int) -> str:
    # Any code point, surrogates included; biased towards the BMP where most scripts live.
    top = 0x10000 if rng.random() < 0.7 else 0x110000
    return "".join(chr(rng.randrange(top)) for _ in range(n))


def _mix(rng: random.Random, pools: list[list[str]], n: int) -> str:
    parts = [rng.choice(rng.choice(pools)) for _ in range(n)]
    return rng.choice(["", " ", "  "]).join(parts)


def _generators() -> list[tuple[str, int, Callable[[random.Random], str]]]:
    """(category, count, make one text)."""
    everything = [WORDS, ACCENTED, CJK, EMOJI, ENTITIES, WHITESPACE, ODD, PUNCTUATION, CONTRACTIONS]
    return [
        ("ascii", 300, lambda r: _sentence(r, r.randint(1, 15))),
        ("accented", 150, lambda r: " ".join(r.choice(ACCENTED) for _ in range(r.randint(1, 6)))),
        ("cjk", 120, lambda r: _mix(r, [CJK, WORDS], r.randint(1, 5))),
        ("emoji", 150, lambda r: _mix(r, [EMOJI, WORDS], r.randint(1, 6))),
        ("html", 150, lambda r: _mix(r, [ENTITIES, WORDS, ENTITIES], r.randint(1, 6))),
        ("mojibake", 120, lambda r: _mojibake(_mix(r, [ACCENTED, EMOJI, CJK], r.randint(1, 4)))),
        (
            "mojibake_1252",
            60,
            lambda r: _mojibake_1252(_mix(r, [ACCENTED, PUNCTUATION], r.randint(1, 4))),
        ),
        ("whitespace", 80, lambda r: "".join(r.choice(WHITESPACE) for _ in range(r.randint(0, 6)))),
        ("tabs_newlines", 100, lambda r: _mix(r, [WORDS, WHITESPACE], r.randint(2, 12))),
        ("punctuation", 150, lambda r: _mix(r, [PUNCTUATION, WORDS], r.randint(1, 6))),
        ("contractions", 150, lambda r: _mix(r, [CONTRACTIONS, WORDS], r.randint(1, 8))),
        ("mixed_case", 120, lambda r: _mixed_case(r, _mix(r, everything, r.randint(1, 8)))),
        ("odd_unicode", 150, lambda r: _mix(r, [ODD, WORDS, ODD], r.randint(1, 6))),
        ("random_codepoints", 150, lambda r: _random_codepoints(r, r.randint(1, 30))),
        ("long", 100, lambda r: _sentence(r, r.randint(60, 200))),
        ("long_mixed", 40, lambda r: _mix(r, everything, r.randint(40, 120))),
        ("long_word", 20, lambda r: "".join(r.choice("etaoinshrdlu") for _ in range(300))),
    ]


def build_corpus(seed: int = 0) -> list[tuple[str, str]]:
    """(category, text) pairs, fixed cases first, then each generated category in turn."""
    rng = random.Random(seed)
    corpus = [
        ("fixed", t)
        for t in [
            "",
            " ",
            "\t\n",
            "a",
            "A photo of a cat.",
            "cafÃ©",
            "don't stop",
            "&amp;nbsp;",
            "\x00",
            "\ud800",
        ]
    ]
    for category, count, make in _generators():
        corpus += [(category, make(rng)) for _ in range(count)]
    return corpus

"""Per-request limits, checked on the decoded request before any work is queued.

The body size cap is enforced earlier, while the body arrives (`service.api.middleware`);
image pixel, frame and format caps when an image's header is read (`service.prepare`).
Messages name the field and index, never the value.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import EmptyInput, InputTooLong, InvalidText, TooManyItems
from .settings import Settings

# Lone surrogates cannot come from UTF-8, only from JSON's \\uD800 escapes; the tokenizer
# would fail on them when it encodes to UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Limits:
    # No defaults: the settings are their one source (`from_settings`).
    max_items: int
    max_text_chars: int

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(max_items=s.max_items_per_request, max_text_chars=s.max_text_chars)

    def check_count(self, n: int) -> None:
        """Items in the whole request: texts, images, labels and templates together."""
        if n == 0:
            raise EmptyInput("the request has no inputs")
        if n > self.max_items:
            raise TooManyItems(f"the request has {n} inputs; at most {self.max_items} "
                               f"are accepted")

    def check_texts(self, field: str, texts: Sequence[object]) -> None:
        """Each text: a non-empty string of valid Unicode within the character cap.

        Cheap on purpose (len and one regex scan): it runs before tokenising, so a 1 MB
        string costs microseconds, not a BPE pass."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                continue  # the schema already refused it
            if not t:
                raise EmptyInput(f"{field} {i} is empty")
            if len(t) > self.max_text_chars:
                raise InputTooLong(f"{field} {i} has {len(t)} characters; at most "
                                   f"{self.max_text_chars} are accepted")
            if _SURROGATE.search(t):
                raise InvalidText(f"{field} {i} is not valid Unicode (a lone surrogate)")

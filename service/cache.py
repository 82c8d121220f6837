"""A thread-safe LRU of text embeddings keyed by (model, text).

Zero-shot classification embeds the same label prompts on every request; with this cache
they are embedded once per model and each request costs only its image encodes.

    lookup = cache.lookup(model, texts)
    computed = await embed(lookup.missing)      # each distinct missing text once
    values = cache.complete(lookup, computed)   # one value per text, in order

Values are opaque. The key holds whatever makes an embedding differ, so a caller whose
embeddings depend on an option (truncation, say) folds it into `model`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CacheLookup:
    """What `EmbeddingCache.lookup` found: the cached values and the texts left to compute."""

    model: Hashable
    texts: list[str]
    found: dict[str, Any]
    missing: list[str] = field(default_factory=list)  # distinct, in first-seen order


class EmbeddingCache:
    """LRU bounded by entry count; `capacity=0` disables caching but keeps deduplication."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[tuple[Hashable, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, model: Hashable, text: str, value: Any) -> None:
        self.put_many(model, [text], [value])

    def put_many(self, model: Hashable, texts: Sequence[str], values: Sequence[Any]) -> None:
        """`put` of each pair, under one hold of the lock (a request's texts at once)."""
        if any(v is None for v in values):
            raise ValueError("None cannot be cached; it means 'absent'")
        if self.capacity == 0:
            return
        entries = self._entries
        with self._lock:
            for text, value in zip(texts, values, strict=True):
                key = (model, text)
                entries[key] = value
                entries.move_to_end(key)
            while len(entries) > self.capacity:
                entries.popitem(last=False)

    def lookup(self, model: Hashable, texts: Sequence[str]) -> CacheLookup:
        """Split `texts` into cached values and the distinct texts still to compute."""
        texts = list(texts)
        if self.capacity == 0:  # nothing is kept: only the repeats to fold
            return CacheLookup(model=model, texts=texts, found={},
                               missing=list(dict.fromkeys(texts)))
        found: dict[str, Any] = {}
        missing: dict[str, None] = {}  # an ordered set
        with self._lock:
            for text in texts:
                if text in found or text in missing:
                    continue  # a repeat within this call: computed or served once
                key = (model, text)
                value = self._entries.get(key)
                if value is None:
                    missing[text] = None
                else:
                    self._entries.move_to_end(key)
                    found[text] = value
        return CacheLookup(model=model, texts=texts, found=found, missing=list(missing))

    def complete(self, lookup: CacheLookup, computed: Sequence[Any]) -> list[Any]:
        """Store the values computed for `lookup.missing`; one value per text, in order."""
        if len(computed) != len(lookup.missing):
            raise ValueError(
                f"expected {len(lookup.missing)} computed values, got {len(computed)}"
            )
        self.put_many(lookup.model, lookup.missing, computed)
        if not lookup.found and len(lookup.missing) == len(lookup.texts):
            return list(computed)  # every text missing and none repeated: already in order
        values = dict(lookup.found)
        values.update(zip(lookup.missing, computed, strict=True))
        return [values[t] for t in lookup.texts]

"""The text-embedding LRU: bounded, thread-safe, and each distinct text once."""

from __future__ import annotations

import random
import threading

import pytest

from service.cache import EmbeddingCache


def _cached(cache: EmbeddingCache, model: str, text: str):
    """The value the cache holds for `text`, or None; a hit refreshes it as a lookup does."""
    lookup = cache.lookup(model, [text])
    return None if lookup.missing else lookup.found[text]


def test_least_recently_used_entry_is_evicted():
    cache = EmbeddingCache(capacity=2)
    cache.put("m", "a", 1)
    cache.put("m", "b", 2)
    assert _cached(cache, "m", "a") == 1  # "a" is now the most recent
    cache.put("m", "c", 3)
    assert len(cache) == 2
    assert _cached(cache, "m", "b") is None
    assert _cached(cache, "m", "a") == 1
    assert _cached(cache, "m", "c") == 3


def test_model_is_part_of_the_key():
    cache = EmbeddingCache(capacity=4)
    cache.put("vit", "a cat", "v")
    assert _cached(cache, "rn50", "a cat") is None
    assert _cached(cache, "vit", "a cat") == "v"


def test_lookup_finds_what_was_completed_and_completes_in_order():
    cache = EmbeddingCache(capacity=8)
    first = cache.lookup("m", ["x", "y"])
    assert first.missing == ["x", "y"] and first.found == {}
    assert cache.complete(first, ["X", "Y"]) == ["X", "Y"]

    second = cache.lookup("m", ["y", "z", "x"])
    assert second.missing == ["z"] and second.found == {"x": "X", "y": "Y"}
    assert cache.complete(second, ["Z"]) == ["Y", "Z", "X"]
    assert len(cache) == 3


def test_repeated_texts_in_one_call_are_computed_once():
    cache = EmbeddingCache(capacity=8)
    lookup = cache.lookup("m", ["a photo of a dog", "a photo of a cat", "a photo of a dog"])
    assert lookup.missing == ["a photo of a dog", "a photo of a cat"]
    assert cache.complete(lookup, ["D", "C"]) == ["D", "C", "D"]
    assert len(cache) == 2

    again = cache.lookup("m", ["a photo of a dog"] * 3)
    assert again.missing == [] and again.found == {"a photo of a dog": "D"}
    assert cache.complete(again, []) == ["D", "D", "D"]


def test_capacity_zero_stores_nothing_but_still_deduplicates():
    cache = EmbeddingCache(capacity=0)
    lookup = cache.lookup("m", ["a", "a", "b"])
    assert lookup.missing == ["a", "b"]
    assert cache.complete(lookup, [1, 2]) == [1, 1, 2]
    assert len(cache) == 0
    assert cache.lookup("m", ["a"]).missing == ["a"]


def test_misuse_is_refused():
    with pytest.raises(ValueError):
        EmbeddingCache(capacity=-1)
    cache = EmbeddingCache(capacity=2)
    with pytest.raises(ValueError):
        cache.put("m", "a", None)
    lookup = cache.lookup("m", ["a", "b"])
    with pytest.raises(ValueError):
        cache.complete(lookup, [1])


def test_concurrent_use_stays_bounded_and_consistent():
    cache = EmbeddingCache(capacity=50)
    n_threads, n_ops = 8, 2000
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(n_ops):
                text = f"t{rng.randrange(200)}"
                lookup = cache.lookup("m", [text])
                values = cache.complete(lookup, [f"v-{t}" for t in lookup.missing])
                assert values == [f"v-{text}"]
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not errors
    assert not any(t.is_alive() for t in threads)
    assert len(cache) <= 50


def test_put_many_keeps_what_puts_one_by_one_keep():
    one_by_one, at_once = EmbeddingCache(capacity=5), EmbeddingCache(capacity=5)
    for cache in (one_by_one, at_once):
        cache.put("m", "old", 0)
        cache.put("m", "older", -1)
        cache.lookup("m", ["old"])  # "older" is now the least recent
    texts = ["a", "old", "b", "c", "d"]  # more than fit beside what is kept
    for i, t in enumerate(texts):
        one_by_one.put("m", t, i)
    at_once.put_many("m", texts, list(range(len(texts))))
    for t in ["older", *texts]:
        assert _cached(one_by_one, "m", t) == _cached(at_once, "m", t), t
    assert len(at_once) == len(one_by_one) == 5
    with pytest.raises(ValueError, match="None"):
        at_once.put_many("m", ["e", "f"], [1, None])
    assert _cached(at_once, "m", "e") is None  # refused whole


def test_complete_puts_each_missing_text_and_answers_in_order():
    cache = EmbeddingCache(capacity=8)
    lookup = cache.lookup("m", ["p", "q", "r"])
    assert cache.complete(lookup, [1, 2, 3]) == [1, 2, 3]
    assert [_cached(cache, "m", t) for t in "pqr"] == [1, 2, 3]
    again = cache.lookup("m", ["s", "q", "s"])
    assert again.missing == ["s"]
    assert cache.complete(again, [4]) == [4, 2, 4]

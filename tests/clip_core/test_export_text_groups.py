"""clip_core.export.length_groups and texts_by_length: how an exported text graph's batch is
split by length, without any export (the graphs' parity is tests/clip_core/test_export.py's)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from clip_core.export import length_groups, texts_by_length


def _cost(lengths: list[int], groups: list[list[int]], call: float) -> float:
    return sum(len(g) * max(lengths[i] for i in g) + call for g in groups)


def _brute_force(lengths: list[int], call: float) -> float:
    """The least cost over every split of the sorted distinct lengths into runs."""
    distinct = sorted(set(lengths))
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(distinct) - 1):
        groups, current = [], [distinct[0]]
        for n, cut in zip(distinct[1:], cuts, strict=True):
            if cut:
                groups.append(current)
                current = []
            current.append(n)
        groups.append(current)
        best = min(best, sum(sum(lengths.count(n) for n in g) * max(g) + call
                             for g in groups))
    return best


def test_every_text_is_in_exactly_one_group_and_groups_are_runs_of_length():
    lengths = [9, 7, 8, 14, 8, 11, 11, 4, 10, 5, 4, 14, 10, 12, 10, 4]  # bench's batch 16
    groups = length_groups(lengths, call_tokens=8)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(g == sorted(g) for g in groups)
    spans = [(min(lengths[i] for i in g), max(lengths[i] for i in g)) for g in groups]
    # Longest group first, and no two groups' lengths overlap.
    assert all(lo_a > hi_b for (lo_a, _), (_, hi_b) in itertools.pairwise(spans))
    assert len(groups) > 1
    # Fewer padded positions than the one batch at 14 tokens a text, its extra call paid.
    assert _cost(lengths, groups, 8) < len(lengths) * 14 + 8


@pytest.mark.parametrize("seed", range(30))
def test_the_split_costs_the_least_of_every_possible_split(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(2, 40) for _ in range(rng.randint(1, 14))]
    call = rng.choice([0, 3, 24, 100])
    groups = length_groups(lengths, call)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert _cost(lengths, groups, call) == pytest.approx(_brute_force(lengths, call))


def test_the_extremes():
    lengths = [5, 12, 5, 77, 2]
    assert length_groups([]) == []
    assert length_groups([7, 7, 7]) == [[0, 1, 2]]
    # Free calls: one group per length; calls dearer than any padding: one batch.
    assert length_groups(lengths, call_tokens=0) == [[3], [1], [0, 2], [4]]
    assert length_groups(lengths, call_tokens=1e9) == [[0, 1, 2, 3, 4]]
    assert length_groups(lengths, call_tokens=float("inf")) == [[0, 1, 2, 3, 4]]


def test_texts_come_back_in_order_each_group_trimmed_to_its_longest():
    """A fake graph whose rows depend on each text's real tokens only, as the exported
    tower's do: every call sees a batch trimmed to its longest text, and the rows come
    back where they were given."""
    lengths = [3, 30, 4, 29, 3, 12, 30, 2]
    ids = np.zeros((len(lengths), 77), dtype=np.int64)
    rng = np.random.default_rng(0)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = 49406, 49407
        ids[i, 1:n - 1] = rng.integers(1, 49406, n - 2)
    calls = []

    def graph(x: np.ndarray) -> np.ndarray:  # (b, L) -> (b, 2)
        assert x.flags.c_contiguous
        calls.append(x.shape)
        assert (x.argmax(axis=1) + 1).max() == x.shape[1]  # trimmed to its longest
        return np.stack([x.sum(axis=1), x.argmax(axis=1)], axis=1).astype(np.float32)

    out = texts_by_length(graph, call_tokens=4)(ids)
    expected = np.stack([ids.sum(axis=1), ids.argmax(axis=1)], axis=1).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
    assert len(calls) == len(length_groups(lengths, 4)) > 1
    assert sum(b for b, _ in calls) == len(lengths)
    # One group: one call, still trimmed from the 77 it was padded to.
    calls.clear()
    texts_by_length(graph, call_tokens=1e9)(ids)
    assert calls == [(len(lengths), 30)]

"""loadtests/preprocess_fast.py: its photo-like JPEGs, and the zero-shot agreement it
reports, on a few of the default model's scenes."""

from __future__ import annotations

import io

from PIL import Image
from preprocess_fast import photo, zero_shot


def test_photos_have_the_asked_size_and_the_same_bytes_for_a_seed():
    data = photo(320, 200, 4)
    assert Image.open(io.BytesIO(data)).size == (320, 200)
    assert photo(320, 200, 4) == data and photo(320, 200, 5) != data


def test_zero_shot_agreement_is_reported_for_both_modes():
    report = zero_shot(per_combo=1)
    assert report["scenes"] == 48
    for key in ("agreement", "exact_accuracy", "fast_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    # The scenes are the model's own kind at 8x its input size: both modes should mostly
    # agree, and a fast path that broke the pixels would not.
    assert report["agreement"] >= 0.9 and report["fast_accuracy"] >= 0.8

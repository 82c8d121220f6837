"""The shipped default model, `builtin/clip-shapes`: small, loadable offline, and as good as
its model card says (docs/models/clip-shapes.md) on scenes it has never seen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from clip_core.checkpoint import read_checkpoint
from clip_core.evaluate import evaluate_scenes
from clip_core.loader import load
from clip_core.preprocess import ImageTransform
from clip_core.registry import DEFAULT_MODEL, get_entry
from clip_core.tokenizer import Tokenizer
from clip_core.zeroshot import build_classifier, classify

# Floors, from the card's table of the generator's own scenes (docs/models/clip-shapes.md,
# seed 1000001): about two binomial standard deviations under what the shipped weights
# measured there at this test's 120 scenes per held-out cell, so that a fresh test set's
# sampling noise passes and a broken model or pipeline does not. (Since issue 20 the
# generator draws every style, 8 %-wide cut-off and outlined shapes among them: these
# scenes are harder than the user-style drawings whose 0.9 floors test_style_shift holds.)
FLOORS = {
    ("colour", "seen"): 0.97, ("colour", "held_out"): 0.97,  # card: 0.989 / 1.000
    ("shape", "seen"): 0.90, ("shape", "held_out"): 0.72,  # card: 0.936 / 0.808
    ("colour+shape", "seen"): 0.88, ("colour+shape", "held_out"): 0.82,  # 0.927 / 0.883
}  # fmt: skip
RETRIEVAL_FLOORS = {"R@1": 0.48, "R@5": 0.78}  # card: R@1 0.534 / 0.577, R@5 0.823 / 0.874


@pytest.fixture(scope="module")
def shipped():
    return load("clip-shapes")


def test_it_is_the_registered_default_and_ships_small_in_fp16(shipped):
    assert get_entry("clip-shapes").name == DEFAULT_MODEL == shipped.name
    path = Path(shipped.source)
    assert path.stat().st_size <= 25 * 1024 * 1024
    ckpt = read_checkpoint(path)
    assert {v.dtype for v in ckpt.state_dict.values() if v.is_floating_point()} == {
        torch.float16}
    assert ckpt.preprocess == shipped.preprocess  # the weights carry their preprocessing


def test_accuracy_on_a_fresh_test_set_meets_the_card(shipped):
    # A seed the card's numbers were not measured on.
    report = evaluate_scenes(shipped.model, shipped.preprocess, seed=777, per_combo=20,
                             retrieval_n=300)
    zs = report["zero_shot"]
    for (task, split), floor in FLOORS.items():
        assert zs[task][split] >= floor, (task, split, zs[task][split])
        assert zs[task][split] > 3 * zs[task]["chance"]
    for direction in ("image_to_text", "text_to_image"):
        for k, floor in RETRIEVAL_FLOORS.items():
            assert report["retrieval"][direction][k] >= floor, report["retrieval"]


def _drawing(shape: str, colour: tuple[int, int, int]) -> Image.Image:
    """Drawn here with plain Pillow, not by the scene generator, at four times the model's
    input size, on a flat background the generator never uses."""
    img = Image.new("RGB", (256, 256), (100, 104, 98))
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse((78, 78, 178, 178), fill=colour)
    elif shape == "square":
        d.rectangle((83, 83, 173, 173), fill=colour)
    elif shape == "triangle":
        d.polygon([(128, 70), (188, 180), (68, 180)], fill=colour)
    return img


@pytest.mark.parametrize("shape, colour, name", [
    ("circle", (220, 30, 30), "a red circle"),
    ("square", (30, 80, 230), "a blue square"),
    ("triangle", (250, 225, 30), "a yellow triangle"),
])  # fmt: skip
def test_a_drawing_of_a_red_circle_is_a_red_circle(shipped, shape, colour, name):
    labels = ["a red circle", "a blue square", "a yellow triangle", "a green star",
              "a red square", "a blue triangle", "a yellow circle", "a white ring"]
    tok = Tokenizer()
    with torch.no_grad():
        image = shipped.model.encode_image(
            ImageTransform(shipped.preprocess).batch([_drawing(shape, colour)]))
        probs, _ = classify(shipped.model, image, build_classifier(shipped.model, tok, labels))
    assert labels[int(probs.argmax())] == name, dict(zip(labels, probs[0].tolist(), strict=True))

"""The style-shifted evaluation (issue 20): lone shapes drawn as a new user would draw them,
by a renderer that shares nothing with the training generator, and the shipped model's floors
on them."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
import torch

import clip_core.scenes as scenes
from clip_core.config import PreprocessConfig, load_architecture
from clip_core.evaluate import (
    IMAGE_SIZES,
    USER_COLOURS,
    Drawing,
    draw_like_a_user,
    evaluate_style_shift,
    style_shift_set,
    user_drawing_spec,
)
from clip_core.loader import load
from clip_core.model import CLIP

# The floors: top-1 over the 48 "a {colour} {shape}" labels and the six shapes, for
# the combinations seen in training and for the held-out ones alike.
FLOORS = {("colour+shape", "seen"): 0.9, ("colour+shape", "held_out"): 0.9,
          ("shape", "seen"): 0.9, ("shape", "held_out"): 0.9}
TEST_SEED = 4242  # not the card's seed (evaluate.STYLE_SEED)
# 20 per combination: 120 held-out drawings, so one drawing moves a held-out cell by 0.008.
# At 8 (48 held-out) one drawing was 0.021 and the shipped model's held-out shape cell read
# 0.896 (43/48) on this seed against 0.975 (117/120) on the card's: sampling noise the size
# of the margin under the floor.
PER_COMBO = 20
RENDERER = (user_drawing_spec, draw_like_a_user, style_shift_set, Drawing)


# ---- independence from the generator ----


def _names_used(obj) -> set[str]:
    tree = ast.parse(inspect.getsource(obj))
    return ({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)})


def test_the_renderer_uses_none_of_the_generators_drawing_code():
    drawing_code = {name for name, v in vars(scenes).items()
                    if (inspect.isfunction(v) or inspect.isclass(v))
                    and v.__module__ == scenes.__name__}
    # What the evaluation may share: the words it asks about and the held-out pairs.
    allowed = {"with_article"}
    assert {"SceneGenerator", "_draw", "_polygon", "_paint_background"} <= drawing_code
    for obj in RENDERER:
        used = _names_used(obj)
        assert not (used & drawing_code) - allowed, (obj.__name__, used & drawing_code)
        assert "scenes" not in used and "COLOURS" not in used  # not even the nominal RGBs


def test_the_renderer_draws_with_the_generator_broken(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the style-shifted set must not use the generator")

    for name in ("_draw", "_polygon", "_paint_background", "caption", "full_caption"):
        monkeypatch.setattr(scenes, name, refuse)
    monkeypatch.setattr(scenes.SceneGenerator, "__init__", refuse)
    items = style_shift_set(1, per_combo=1)
    assert len(items) == len(scenes.COLOURS) * len(scenes.SHAPES)


def test_its_colours_are_its_own_but_name_the_same_words():
    assert set(USER_COLOURS) == set(scenes.COLOURS)
    nominal = set(scenes.COLOURS.values())
    assert not any(rgb in nominal for rgbs in USER_COLOURS.values() for rgb in rgbs)


# ---- what it draws ----


@pytest.fixture(scope="module")
def drawings():
    return style_shift_set(7, per_combo=3)  # 144


def test_it_is_deterministic(drawings):
    again = style_shift_set(7, per_combo=3)
    assert [d for d, _ in again] == [d for d, _ in drawings]
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for (_, a), (_, b) in zip(again, drawings, strict=True))


def test_it_varies_size_format_ground_and_place(drawings):
    specs = [d for d, _ in drawings]
    assert {d.side for d in specs} == set(IMAGE_SIZES)
    assert {d.fmt for d in specs} == {"PNG", "JPEG"}
    assert {d.ground for d in specs} == {"light", "dark", "mid", "gradient"}
    assert np.mean([d.ground == "light" for d in specs]) > 0.3  # the case, mostly
    assert {d.where for d in specs} == {"centre", "left", "right", "top", "bottom"}
    assert all(im.size == (d.side, d.side) and im.mode == "RGB" for d, im in drawings)


def _bbox(drawing: Drawing, rng_seed: int) -> tuple[int, int]:
    """Width and height, in pixels, of what differs from the image's corner colour."""
    img = np.asarray(draw_like_a_user(drawing, np.random.default_rng(rng_seed)), float)
    differs = np.abs(img - img[0, 0]).sum(axis=2) > 60
    ys, xs = np.nonzero(differs)
    return xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_a_256_px_drawing_is_60_to_110_px_wide_in_its_file_format(shape):
    for i in range(6):
        spec = user_drawing_spec(np.random.default_rng([shape == "circle", i]), "red", shape)
        d = Drawing(**{**spec.__dict__, "side": 256, "ground": "light", "turn": 0.0})
        w, h = _bbox(d, i)
        assert 55 <= w <= 110 and 55 <= h <= 110, (d, w, h)
        png = Drawing(**{**d.__dict__, "fmt": "PNG"})
        jpeg = Drawing(**{**d.__dict__, "fmt": "JPEG", "quality": 60})
        a = np.asarray(draw_like_a_user(png, np.random.default_rng(0)))
        b = np.asarray(draw_like_a_user(jpeg, np.random.default_rng(0)))
        assert (a == d.rgb).all(axis=2).sum() > 1200  # PNG keeps the fill exact
        assert not np.array_equal(a, b)  # the JPEG round trip really happened
        assert np.abs(a.astype(float) - b).mean() < 4


def test_captions_name_the_shape_and_where_it_is():
    d = user_drawing_spec(np.random.default_rng(0), "orange", "ring", where="left")
    assert d.caption == "an orange ring on the left"
    img = np.asarray(draw_like_a_user(d, np.random.default_rng(0)), float)
    differs = np.abs(img - img[0, 0]).sum(axis=2) > 60
    assert np.nonzero(differs)[1].mean() < 0.4 * d.side


# ---- the evaluation, and the shipped model's floors ----


def test_an_untrained_model_scores_near_chance():
    # The floors below can fail: a random model is nowhere near them.
    torch.manual_seed(0)
    model = CLIP(load_architecture("RN-Tiny-64"))
    report = evaluate_style_shift(model, PreprocessConfig(image_size=64), seed=1, per_combo=1)
    zs = report["zero_shot"]
    assert zs["colour+shape"]["seen"] < 0.2 and zs["shape"]["seen"] < 0.5
    assert set(report["colour+shape_by"]) == {"ground", "fmt", "side"}
    assert report["retrieval"]["n"] == 48


@pytest.fixture(scope="module")
def shipped_report():
    shipped = load("clip-shapes")
    return evaluate_style_shift(shipped.model, shipped.preprocess, seed=TEST_SEED, per_combo=PER_COMBO)


@pytest.mark.parametrize("task, split", sorted(FLOORS))
def test_the_shipped_model_knows_user_drawings(shipped_report, task, split):
    got = shipped_report["zero_shot"][task][split]
    assert got >= FLOORS[(task, split)], (task, split, shipped_report["zero_shot"])


def test_the_shipped_model_retrieves_user_drawings(shipped_report):
    # 960 drawings, 5 places x 48 combinations of captions: the place is the hard part.
    r = shipped_report["retrieval"]
    for direction in ("image_to_text", "text_to_image"):
        assert r[direction]["R@5"] > 10 * r["chance_R@1"], r

"""The procedural scene generator: deterministic, captions that say what is drawn, and
held-out combinations that never reach the training split."""

from __future__ import annotations

import numpy as np
import pytest

from clip_core.scenes import (
    COLOURS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SceneGenerator,
    caption,
    full_caption,
    plural,
)


def test_a_sample_is_a_function_of_seed_and_index():
    gen = SceneGenerator(64)
    a_img, a_cap = gen.sample(3, 17)
    b_img, b_cap = SceneGenerator(64).sample(3, 17)
    assert a_cap == b_cap and np.array_equal(np.asarray(a_img), np.asarray(b_img))
    c_img, _ = gen.sample(3, 18)
    d_img, _ = gen.sample(4, 17)
    assert not np.array_equal(np.asarray(a_img), np.asarray(c_img))
    assert not np.array_equal(np.asarray(a_img), np.asarray(d_img))


@pytest.mark.parametrize("size", [32, 64, 96])
def test_images_are_rgb_at_the_requested_size(size):
    img, _ = SceneGenerator(size).sample(0, 0)
    assert img.mode == "RGB" and img.size == (size, size)


def test_the_training_split_never_draws_a_held_out_combination():
    gen = SceneGenerator(32)
    seen = set()
    for i in range(3000):
        scene = gen.scene(np.random.default_rng([0, i]))
        assert not scene.combos & HELD_OUT
        seen |= scene.combos
    # ...while every other combination does occur.
    assert seen == {(c, s) for c in COLOURS for s in SHAPES} - HELD_OUT


def test_held_out_combinations_cover_every_shape_and_can_be_drawn_on_request():
    assert {s for _, s in HELD_OUT} == set(SHAPES)
    assert len({c for c, _ in HELD_OUT}) == len(HELD_OUT)
    gen = SceneGenerator(32, split="all")
    scene = gen.scene(np.random.default_rng(0), combo=("blue", "circle"))
    assert scene.combos == {("blue", "circle")}


def test_scene_variety_counts_sizes_and_positions():
    gen = SceneGenerator(32)
    scenes = [gen.scene(np.random.default_rng([1, i])) for i in range(600)]
    assert {len(s.shapes) for s in scenes} == {1, 2, 3}
    assert {s.shapes[0].size for s in scenes} == {"small", "large"}
    assert {s.position for s in scenes if len(s.shapes) == 1} == set(POSITIONS)
    assert len({s.background[0] for s in scenes}) > 300  # backgrounds vary


def test_shapes_in_one_scene_do_not_overlap():
    gen = SceneGenerator(32)
    for i in range(500):
        shapes = gen.scene(np.random.default_rng([2, i])).shapes
        for a in range(len(shapes)):
            for b in range(a + 1, len(shapes)):
                gap = np.hypot(shapes[a].x - shapes[b].x, shapes[a].y - shapes[b].y)
                assert gap > shapes[a].radius + shapes[b].radius


def test_lone_shapes_are_drawn_where_the_caption_says():
    gen = SceneGenerator(64, split="all")
    for i, pos in enumerate(["left", "right", "top", "bottom"]):
        rng = np.random.default_rng([5, i])
        while (scene := gen.scene(rng, combo=("white", "circle"))).position != pos:
            pass
        img = np.asarray(gen.render(scene, rng)).astype(float).sum(axis=2)  # (H, W)
        bright = img > img.mean() + 2 * img.std()  # the white disc
        ys, xs = np.nonzero(bright)
        cx, cy = xs.mean() / 64, ys.mean() / 64
        expected = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6}
        assert expected[pos], (pos, cx, cy)
        assert POSITIONS[pos][0] in full_caption(scene)


def test_every_caption_names_what_is_drawn_and_nothing_else():
    gen = SceneGenerator(32)
    rng = np.random.default_rng(9)
    for _ in range(2000):
        scene = gen.scene(rng)
        text = caption(scene, rng)
        words = set(text.replace(",", "").split())
        colours = {c for c, _ in scene.combos}
        shapes = {s for _, s in scene.combos}
        named_colours = words & set(COLOURS)
        named_shapes = {s for s in SHAPES if s in words or plural(s) in words}
        assert named_colours <= colours and named_shapes <= shapes, (text, scene.combos)
        assert named_colours or named_shapes, text
        # A full caption names every shape's colour and kind.
        full = full_caption(scene)
        assert all(c in full for c in colours) and all(s in full for s in shapes)


def test_captions_vary():
    gen = SceneGenerator(32, split="all")
    rng = np.random.default_rng(0)
    scene = gen.scene(rng, combo=("orange", "cross"))
    texts = {caption(scene, rng) for _ in range(300)}
    assert len(texts) >= 10
    assert "an orange cross" in texts  # the article follows the sound

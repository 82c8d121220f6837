"""The procedural scene generator: deterministic, captions that say what is drawn, held-out
combinations that never reach the training split, and drawing styles as varied as issue 20
asks (backgrounds black to white, sizes 8-80 %, cut-off, outlined, rotated, aliased or not,
blurred, noisy, JPEG'd, scale-jittered)."""

from __future__ import annotations

import numpy as np
import pytest

from clip_core.scenes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    LARGE_FROM,
    MIN_CONTRAST,
    POSITIONS,
    SHAPES,
    Background,
    Scene,
    SceneGenerator,
    Shape,
    Style,
    caption,
    full_caption,
    plural,
    position_of,
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
    assert len({s.background.rgb for s in scenes}) > 300  # backgrounds vary


def test_shapes_in_one_scene_do_not_overlap():
    gen = SceneGenerator(32)
    for i in range(500):
        shapes = gen.scene(np.random.default_rng([2, i])).shapes
        for a in range(len(shapes)):
            for b in range(a + 1, len(shapes)):
                gap = np.hypot(shapes[a].x - shapes[b].x, shapes[a].y - shapes[b].y)
                assert gap > shapes[a].radius + shapes[b].radius


def _shape_mask(gen: SceneGenerator, scene: Scene, seed: int) -> np.ndarray:
    """(S, S) bool: where the scene differs from itself drawn without its shapes (the same
    noise and JPEG settings, from the same rng state)."""
    with_shapes = gen.render(scene, np.random.default_rng(seed))
    bare = gen.render(Scene((), None, scene.background, scene.style), np.random.default_rng(seed))
    diff = np.abs(np.asarray(with_shapes, float) - np.asarray(bare, float)).sum(axis=2)
    return diff > 60


def test_lone_shapes_are_drawn_where_the_caption_says():
    gen = SceneGenerator(64, split="all")
    found = set()
    rng = np.random.default_rng(5)
    while found != {"left", "right", "top", "bottom"}:
        scene = gen.scene(rng, combo=("white", "circle"))
        s = scene.shapes[0]
        # A shape wholly in the frame, big enough to find, not yet checked at its position.
        if scene.position in found | {"centre"} or s.radius < 0.08 or not (
                s.radius < s.x < 1 - s.radius and s.radius < s.y < 1 - s.radius):
            continue
        ys, xs = np.nonzero(_shape_mask(gen, scene, len(found)))
        cx, cy = xs.mean() / 64, ys.mean() / 64
        pos = scene.position
        expected = {"left": cx < 0.42, "right": cx > 0.58, "top": cy < 0.42, "bottom": cy > 0.58}
        assert pos is not None and expected[pos], (pos, cx, cy)
        assert POSITIONS[pos] in full_caption(scene)
        found.add(pos)


def test_a_position_is_named_by_the_larger_offset_from_the_middle():
    assert position_of(0.5, 0.5) == "centre"
    assert position_of(0.45, 0.55) == "centre"
    assert position_of(0.1, 0.4) == "left" and position_of(0.9, 0.6) == "right"
    assert position_of(0.4, 0.1) == "top" and position_of(0.6, 0.95) == "bottom"


# ---- the variety of styles (issue 20) ----


@pytest.fixture(scope="module")
def many_scenes():
    gen = SceneGenerator(64)
    return [gen.scene(np.random.default_rng([3, i])) for i in range(2000)]


def test_backgrounds_run_from_black_to_white_in_every_kind(many_scenes):
    kinds = [s.background.kind for s in many_scenes]
    assert set(kinds) == set(BACKGROUNDS)
    assert min(kinds.count(k) for k in BACKGROUNDS) > 300  # each a fair share
    grey = np.array([np.mean(s.background.rgb) for s in many_scenes])
    assert (grey < 30).sum() > 50 and (grey > 225).sum() > 50
    assert np.histogram(grey, bins=4, range=(0, 256))[0].min() > 250  # spread, not bunched


def test_shapes_stand_out_from_their_background(many_scenes):
    gaps = [np.linalg.norm(np.subtract(sh.rgb, s.background.rgb))
            for s in many_scenes for sh in s.shapes]
    assert np.mean(np.array(gaps) >= MIN_CONTRAST) > 0.99


def test_sizes_span_8_to_80_percent_and_lone_shapes_are_sometimes_cut_off(many_scenes):
    lone = [s.shapes[0] for s in many_scenes if len(s.shapes) == 1]
    extent = np.array([2 * sh.radius for sh in lone])
    assert extent.min() < 0.09 and extent.max() > 0.75
    assert np.histogram(extent, bins=4, range=(0.08, 0.8))[0].min() > 100
    cut = [sh for sh in lone if min(sh.x, sh.y, 1 - sh.x, 1 - sh.y) < sh.radius]
    assert 0.1 < len(cut) / len(lone) < 0.7
    # ...but never more than half the radius beyond the edge: the shape stays recognisable.
    assert all(min(sh.x, sh.y, 1 - sh.x, 1 - sh.y) >= sh.radius * 0.5 / 1.08 - 1e-9
               for sh in lone)
    assert all(sh.size == ("large" if sh.radius / 1.08 >= LARGE_FROM * 0.92 else "small")
               or abs(sh.radius - LARGE_FROM) < 0.02 for sh in lone)


def test_shapes_are_filled_or_outlined_and_turned_any_way(many_scenes):
    shapes = [sh for s in many_scenes for sh in s.shapes]
    for kind in ("square", "triangle", "star", "cross"):
        of_kind = [sh for sh in shapes if sh.shape == kind]
        outlined = np.mean([sh.outline > 0 for sh in of_kind])
        assert 0.1 < outlined < 0.5, (kind, outlined)
    # An outlined circle would be a ring: circles are always filled, rings always outlined.
    assert all(sh.outline == 0 for sh in shapes if sh.shape == "circle")
    assert all(sh.outline > 0 for sh in shapes if sh.shape == "ring")
    angles = np.array([sh.angle for sh in shapes if sh.shape == "square"])
    assert np.histogram(angles, bins=8, range=(0, 360))[0].min() > 20


def test_rendering_styles_vary(many_scenes):
    styles = [s.style for s in many_scenes]
    assert {st.supersample for st in styles} == {1, 3}  # aliased and anti-aliased
    assert 0.2 < np.mean([st.jpeg > 0 for st in styles]) < 0.5
    assert 0.15 < np.mean([st.blur > 0 for st in styles]) < 0.4
    sides = np.array([st.side for st in styles])
    assert sides.min() < 56 and sides.max() > 170  # 0.75x to 3x the output size
    assert len({st.resample for st in styles}) == 5


def _plain(kind: str, outline: float) -> Scene:
    shape = Shape(kind, "red", "large", 0.5, 0.5, 0.3, 0.0, (220, 30, 30), outline)
    return Scene((shape,), "centre", Background("flat", (240, 240, 240), (240, 240, 240), 0.0,
                                                0.0, 2), Style(64, 3, 2, 0.0, 0.0, 0))


def test_an_outlined_shape_is_hollow_and_a_filled_one_is_not():
    gen = SceneGenerator(64)
    for kind in ("square", "triangle"):
        filled = np.asarray(gen.render(_plain(kind, 0.0), np.random.default_rng(0)))
        hollow = np.asarray(gen.render(_plain(kind, 0.15), np.random.default_rng(0)))
        assert tuple(filled[32, 32]) == (220, 30, 30)
        assert tuple(hollow[32, 32]) == (240, 240, 240)
        red = (hollow == (220, 30, 30)).all(axis=2)
        assert red.sum() > 30  # the stroke is there
        assert (filled == (220, 30, 30)).all(axis=2).sum() > 2 * red.sum()


def test_aliased_edges_have_no_blended_pixels_and_anti_aliased_ones_do():
    gen = SceneGenerator(64)
    scene = _plain("triangle", 0.0)
    sharp = Scene(scene.shapes, "centre", scene.background, Style(64, 1, 0, 0.0, 0.0, 0))
    colours = {tuple(p) for p in np.asarray(gen.render(sharp, np.random.default_rng(0)))
               .reshape(-1, 3)}
    assert colours == {(220, 30, 30), (240, 240, 240)}
    smooth = np.asarray(gen.render(scene, np.random.default_rng(0))).reshape(-1, 3)
    assert len({tuple(p) for p in smooth}) > 5


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

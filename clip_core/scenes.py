"""Procedural scenes of coloured shapes with captions, deterministic from a seed.

The built-in model is trained on these (see docs/models/clip-shapes.md). Each scene holds one
to three shapes on a tinted, shaded, lightly noisy background; its captions are drawn from
varied templates ("a small red circle on the left", "two blue squares", "a photo of a green
star"). Some colour-shape combinations are held out of training altogether, so evaluation can
ask whether the model composes colour and shape or memorised the pairs.

Sample `i` of a seed depends only on (seed, i): datasets are random-access, reproducible and
resumable from any step without replaying a generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

# Nominal RGB of each colour word; samples jitter around it.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (40, 165, 60),
    "blue": (40, 85, 220),
    "purple": (135, 55, 185),
    "pink": (245, 135, 195),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
PLURAL = {"cross": "crosses"}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

# Never drawn in the training split, in any scene: each shape once, each with another colour.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("orange", "ring"), ("yellow", "cross"),
    ("green", "triangle"), ("blue", "circle"), ("purple", "square"),
})  # fmt: skip

# Where a lone shape sits: its caption phrase and the centre's range in image fractions.
POSITIONS: dict[str, tuple[str, tuple[float, float], tuple[float, float]]] = {
    "left": ("on the left", (0.2, 0.33), (0.3, 0.7)),
    "right": ("on the right", (0.67, 0.8), (0.3, 0.7)),
    "top": ("at the top", (0.3, 0.7), (0.2, 0.33)),
    "bottom": ("at the bottom", (0.3, 0.7), (0.67, 0.8)),
    "centre": ("in the middle", (0.42, 0.58), (0.42, 0.58)),
}

Split = Literal["train", "all"]


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: Literal["small", "large"]
    x: float  # centre, as fractions of the image side
    y: float
    radius: float  # fraction of the image side
    angle: float  # degrees
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    position: str | None  # a key of POSITIONS for a lone shape, else None
    background: tuple[tuple[int, int, int], float, float, float]  # rgb, shade dir, depth, noise

    @property
    def combos(self) -> set[tuple[str, str]]:
        return {(s.colour, s.shape) for s in self.shapes}


def plural(shape: str) -> str:
    return PLURAL.get(shape, shape + "s")


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


class SceneGenerator:
    """Samples and renders scenes. `split="train"` never draws a HELD_OUT combination."""

    def __init__(self, image_size: int = 64, supersample: int = 3, split: Split = "train",
                 held_out: frozenset[tuple[str, str]] = HELD_OUT):
        if split not in ("train", "all"):
            raise ValueError(f"split must be 'train' or 'all', not {split!r}")
        self.image_size = image_size
        self.supersample = supersample
        excluded = held_out if split == "train" else frozenset()
        self.combos = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in excluded]

    # ---- sampling ----

    def sample(self, seed: int, index: int) -> tuple[Image.Image, str]:
        """Sample `index` of `seed`: the image and one caption for it."""
        rng = _rng(seed, index)
        scene = self.scene(rng)
        return self.render(scene, rng), caption(scene, rng)

    def scene(self, rng: np.random.Generator, combo: tuple[str, str] | None = None) -> Scene:
        """A random scene; with `combo`, a lone shape of that colour and kind."""
        background = self._background(rng)
        kind = "single" if combo else rng.choice(["single", "same", "mixed"], p=[0.5, 0.25, 0.25])
        if kind == "single":
            colour, shape = combo or self.combos[rng.integers(len(self.combos))]
            pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
            _, xr, yr = POSITIONS[pos]
            large = bool(rng.random() < 0.5)
            radius = rng.uniform(0.2, 0.25) if large else rng.uniform(0.1, 0.14)
            if pos != "centre":  # keep it inside the frame and in its region
                radius = min(radius, 0.19)
            x, y = rng.uniform(*xr), rng.uniform(*yr)
            return Scene((self._shape(rng, colour, shape, large, x, y, radius),), pos, background)
        n = 2 if kind == "mixed" else int(rng.integers(2, 4))
        if kind == "same":
            picks = [self.combos[rng.integers(len(self.combos))]] * n
        else:
            first = rng.integers(len(self.combos))
            second = (first + rng.integers(1, len(self.combos))) % len(self.combos)
            picks = [self.combos[first], self.combos[second]]
        large = bool(rng.random() < 0.5)
        radius = rng.uniform(0.13, 0.16) if large else rng.uniform(0.08, 0.11)
        centres = _place(rng, n, radius)
        shapes = tuple(self._shape(rng, c, s, large, x, y, radius)
                       for (c, s), (x, y) in zip(picks, centres, strict=True))
        return Scene(shapes, None, background)

    def _shape(self, rng, colour, shape, large, x, y, radius) -> Shape:
        jitter = rng.integers(-18, 19, size=3)
        r, g, b = (int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
        spin = 360.0 if shape in ("star", "circle", "ring") else 30.0  # squares stay squares
        return Shape(shape, colour, "large" if large else "small", float(x), float(y),
                     float(radius) * rng.uniform(0.92, 1.08), float(rng.uniform(-spin, spin) / 2),
                     (r, g, b))

    @staticmethod
    def _background(rng):
        grey = rng.uniform(35, 150)
        rgb = tuple(int(v) for v in np.clip(grey + rng.integers(-22, 23, size=3), 0, 255))
        return rgb, float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 35)), float(
            rng.uniform(1, 7))

    # ---- rendering ----

    def render(self, scene: Scene, rng: np.random.Generator) -> Image.Image:
        """Drawn `supersample` times larger and shrunk, so edges are anti-aliased."""
        big = self.image_size * self.supersample
        rgb, direction, depth, noise = scene.background
        ramp = np.linspace(-0.5, 0.5, big, dtype=np.float32)
        shade = (math.cos(direction) * ramp[None, :] + math.sin(direction) * ramp[:, None]) * depth
        canvas = np.clip(np.array(rgb, np.float32) + shade[..., None], 0, 255).astype(np.uint8)
        image = Image.fromarray(canvas)
        draw = ImageDraw.Draw(image)
        for s in scene.shapes:
            _draw(draw, s, big)
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BOX)
        pixels = np.asarray(image, np.float32) + rng.normal(0, noise, (*image.size[::-1], 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _place(rng: np.random.Generator, n: int, radius: float) -> list[tuple[float, float]]:
    """n centres inside the frame whose shapes do not touch (rejection sampling)."""
    lo, hi = radius + 0.02, 1 - radius - 0.02
    for _ in range(200):
        pts = rng.uniform(lo, hi, size=(n, 2))
        gaps = [np.hypot(*(pts[i] - pts[j])) for i in range(n) for j in range(i + 1, n)]
        if min(gaps) > 2 * radius * 1.15:
            return [(float(x), float(y)) for x, y in pts]
    # Rare; a fixed row always fits the radii used here.
    return [((i + 0.5) / n, 0.5) for i in range(n)]


def _polygon(cx, cy, radii, angle, n_points):
    """Vertices at alternating radii around (cx, cy), the first pointing up."""
    out = []
    for k in range(n_points):
        a = math.radians(angle) - math.pi / 2 + 2 * math.pi * k / n_points
        r = radii[k % len(radii)]
        out.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return out


def _draw(draw: ImageDraw.ImageDraw, s: Shape, side: int) -> None:
    cx, cy, r = s.x * side, s.y * side, s.radius * side
    if s.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=s.rgb)
    elif s.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=s.rgb, width=max(1, round(r * 0.38)))
    elif s.shape == "square":
        draw.polygon(_polygon(cx, cy, [r * 0.85 * math.sqrt(2)], s.angle + 45, 4), fill=s.rgb)
    elif s.shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, [r * 1.1], s.angle, 3), fill=s.rgb)
    elif s.shape == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.05, r * 0.45], s.angle, 10), fill=s.rgb)
    elif s.shape == "cross":
        w = r * 0.36  # half the arm width
        arm = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
               (-r, w), (-r, -w), (-w, -w)]
        a = math.radians(s.angle)
        ca, sa = math.cos(a), math.sin(a)
        draw.polygon([(cx + u * ca - v * sa, cy + u * sa + v * ca) for u, v in arm], fill=s.rgb)
    else:
        raise ValueError(f"unknown shape {s.shape!r}")


# ---- captions ----

_ONE = (
    "{a_cs}", "{a_cs}", "{a_scs}", "a photo of {a_cs}", "a picture of {a_scs}",
    "a drawing of {a_cs}", "{a_cs} {where}", "{a_scs} {where}", "one {cs}",
    "{a_shape} that is {colour}", "a photo of {a_cs} {where}", "{a_colour} shape",
    "{a_shape}", "{a_size} {shape}", "{a_shape} {where}",
)  # fmt: skip
_SAME = (
    "{n} {c} {ss}", "{n} {size} {c} {ss}", "a photo of {n} {c} {ss}", "{n} {ss}, all {c}",
    "a picture of {n} {c} {ss}", "{n} {ss}",
)  # fmt: skip
_MIXED = (
    "{first} and {second}", "{second} and {first}", "a photo of {first} next to {second}",
    "{first} beside {second}", "a picture of {first} and {second}",
)  # fmt: skip


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption, from varied templates."""
    s = scene.shapes[0]
    if len(scene.shapes) == 1:
        assert scene.position is not None  # a lone shape always has one
        t = _ONE[rng.integers(len(_ONE))]
        cs = f"{s.colour} {s.shape}"
        return t.format(
            a_cs=with_article(cs), a_scs=with_article(f"{s.size} {cs}"), cs=cs,
            a_shape=with_article(s.shape), shape=s.shape, colour=s.colour,
            a_colour=with_article(s.colour), a_size=with_article(s.size),
            where=POSITIONS[scene.position][0],
        )
    if len({(x.colour, x.shape) for x in scene.shapes}) == 1:
        t = _SAME[rng.integers(len(_SAME))]
        return t.format(n=COUNT_WORDS[len(scene.shapes)], c=s.colour, size=s.size,
                        ss=plural(s.shape))
    t = _MIXED[rng.integers(len(_MIXED))]
    a, b = scene.shapes
    return t.format(first=with_article(f"{a.colour} {a.shape}"),
                    second=with_article(f"{b.colour} {b.shape}"))


def full_caption(scene: Scene) -> str:
    """The most specific caption, for retrieval: count, size, colour, shape and position."""
    s = scene.shapes[0]
    if len(scene.shapes) == 1:
        assert scene.position is not None  # a lone shape always has one
        return f"{with_article(f'{s.size} {s.colour} {s.shape}')} {POSITIONS[scene.position][0]}"
    if len({(x.colour, x.shape) for x in scene.shapes}) == 1:
        return f"{COUNT_WORDS[len(scene.shapes)]} {s.size} {s.colour} {plural(s.shape)}"
    a, b = scene.shapes
    return " and ".join(with_article(f"{x.size} {x.colour} {x.shape}") for x in (a, b))

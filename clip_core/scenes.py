"""Procedural scenes of coloured shapes with captions, deterministic from a seed.

The built-in model is trained on these (see docs/models/clip-shapes.md). Each scene holds one
to three shapes; its captions are drawn from varied templates ("a small red circle on the
left", "two blue squares", "a photo of a green star"). Some colour-shape combinations are held
out of training altogether, so evaluation can ask whether the model composes colour and shape
or memorised the pairs.

The drawing style varies as widely as the captions allow, so that the model learns shapes
rather than one way of drawing them: backgrounds from black to white (flat, gradient, blotchy
"photo-like" texture, heavy noise); shapes from 8 % to 80 % of the side, anywhere, lone
shapes sometimes cut off by the frame; filled or outlined (a circle is never outlined, since
an outlined circle is a ring), any rotation; drawn anti-aliased or not, at 0.75-3x the output
size and shrunk with a random filter; then blur, sensor noise and JPEG artefacts. No caption
names the style, so the text pulls every style of one shape to the same place.

Sample `i` of a seed depends only on (seed, i): datasets are random-access, reproducible and
resumable from any step without replaying a generator.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

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

# A lone shape's caption phrase, from where its centre falls (see `position_of`).
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the middle",
}
CENTRE_BOX = 0.1  # a centre within this of the middle on both axes is "in the middle"

# Radii as fractions of the image side: a shape spans 8 % to 80 % of it.
LONE_RADIUS = (0.04, 0.40)
GROUP_RADIUS = {2: (0.04, 0.19), 3: (0.04, 0.15)}  # a row of them always fits (see _place)
LARGE_FROM = 0.15  # radius from which a shape is "large", below it "small"
MIN_CONTRAST = 90.0  # RGB distance between a shape's colour and the background's mean
BACKGROUNDS = ("flat", "gradient", "texture", "noise")
RESAMPLE = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC,
            Image.Resampling.LANCZOS, Image.Resampling.BOX)

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
    outline: float = 0.0  # 0: filled; else the stroke width as a fraction of the radius


@dataclass(frozen=True)
class Background:
    kind: str  # one of BACKGROUNDS
    rgb: tuple[int, int, int]  # the mean colour
    other: tuple[int, int, int]  # gradient: the far end's colour
    angle: float  # gradient: direction, radians
    amplitude: float  # texture: blotch strength; noise: per-pixel sigma
    cells: int  # texture: blotches per side


@dataclass(frozen=True)
class Style:
    """How a scene is drawn; none of it reaches the caption."""
    side: int  # the canvas side in pixels, before the final resize (scale jitter)
    supersample: int  # 1: aliased edges; >1: drawn that much larger and box-filtered
    resample: int  # the final resize's filter, an Image.Resampling
    blur: float  # Gaussian radius in output pixels; 0: none
    noise: float  # sensor noise sigma
    jpeg: int  # JPEG quality of a round trip; 0: none


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    position: str | None  # a key of POSITIONS for a lone shape, else None
    background: Background
    style: Style

    @property
    def combos(self) -> set[tuple[str, str]]:
        return {(s.colour, s.shape) for s in self.shapes}


def plural(shape: str) -> str:
    return PLURAL.get(shape, shape + "s")


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def size_word(radius: float) -> Literal["small", "large"]:
    return "large" if radius >= LARGE_FROM else "small"


def position_of(x: float, y: float) -> str:
    """The POSITIONS key for a centre at (x, y): the middle, else the axis it is furthest out
    along (a centre in a corner is named by its larger offset)."""
    dx, dy = x - 0.5, y - 0.5
    if max(abs(dx), abs(dy)) < CENTRE_BOX:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


class SceneGenerator:
    """Samples and renders scenes. `split="train"` never draws a HELD_OUT combination."""

    def __init__(self, image_size: int = 64, supersample: int = 3, split: Split = "train",
                 held_out: frozenset[tuple[str, str]] = HELD_OUT):
        if split not in ("train", "all"):
            raise ValueError(f"split must be 'train' or 'all', not {split!r}")
        self.image_size = image_size
        self.supersample = supersample  # the anti-aliased styles' factor
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
        kind = "single" if combo else rng.choice(["single", "same", "mixed"], p=[0.5, 0.25, 0.25])
        if kind == "single":
            colour, shape = combo or self.combos[rng.integers(len(self.combos))]
            radius = float(rng.uniform(*LONE_RADIUS))
            # Half the lone shapes lie wholly inside the frame where they fit; the others may
            # reach past it by up to half their radius.
            margin = radius + 0.02 if rng.random() < 0.5 and radius < 0.4 else radius * 0.5
            x, y = rng.uniform(margin, 1 - margin, size=2)
            shapes: tuple[Shape, ...] = (self._shape(rng, colour, shape, x, y, radius),)
            position: str | None = position_of(float(x), float(y))
        else:
            n = 2 if kind == "mixed" else int(rng.integers(2, 4))
            if kind == "same":
                picks = [self.combos[rng.integers(len(self.combos))]] * n
            else:
                first = rng.integers(len(self.combos))
                second = (first + rng.integers(1, len(self.combos))) % len(self.combos)
                picks = [self.combos[first], self.combos[second]]
            radius = float(rng.uniform(*GROUP_RADIUS[n]))
            centres = _place(rng, n, radius)
            shapes = tuple(self._shape(rng, c, s, x, y, radius)
                           for (c, s), (x, y) in zip(picks, centres, strict=True))
            position = None
        return Scene(shapes, position, self._background(rng, shapes), self._style(rng))

    def _shape(self, rng, colour, shape, x, y, radius) -> Shape:
        # Per-channel jitter and a lighting factor: the colour word must survive both.
        jitter = rng.integers(-25, 26, size=3)
        light = rng.uniform(0.85, 1.08)
        r, g, b = (int(v) for v in np.clip((np.array(COLOURS[colour]) + jitter) * light, 0, 255))
        outline = 0.0
        if shape == "ring":
            outline = float(rng.uniform(0.2, 0.45))
        elif shape != "circle" and rng.random() < 0.25:
            outline = float(rng.uniform(0.12, 0.3))
        return Shape(shape, colour, size_word(radius), float(x), float(y),
                     float(radius) * rng.uniform(0.92, 1.08), float(rng.uniform(0, 360)),
                     (r, g, b), outline)

    @staticmethod
    def _background(rng: np.random.Generator, shapes: tuple[Shape, ...]) -> Background:
        kind = str(BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
        # Black to white, tinted; redrawn until every shape stands out from its mean.
        for _ in range(50):
            grey = rng.uniform(0, 255)
            rgb = np.clip(grey + rng.normal(0, 22, size=3), 0, 255)
            if all(np.linalg.norm(rgb - np.array(s.rgb)) >= MIN_CONTRAST for s in shapes):
                break
        spread = rng.uniform(30, 110)  # gradient: the two ends' distance apart
        other = np.clip(rgb + rng.normal(0, spread / math.sqrt(3), size=3), 0, 255)
        amplitude = rng.uniform(10, 35) if kind == "texture" else rng.uniform(8, 28)
        return Background(kind, _rgb(rgb), _rgb(other), float(rng.uniform(0, 2 * math.pi)),
                          float(amplitude), int(rng.integers(2, 9)))

    def _style(self, rng: np.random.Generator) -> Style:
        side = round(self.image_size * math.exp(rng.uniform(math.log(0.75), math.log(3))))
        return Style(
            side=max(8, side),
            supersample=self.supersample if rng.random() < 0.6 else 1,
            resample=int(RESAMPLE[rng.integers(len(RESAMPLE))]),
            blur=float(rng.uniform(0.3, 1.2)) if rng.random() < 0.25 else 0.0,
            noise=float(rng.uniform(0, 6)),
            jpeg=int(rng.integers(15, 90)) if rng.random() < 0.35 else 0,
        )

    # ---- rendering ----

    def render(self, scene: Scene, rng: np.random.Generator) -> Image.Image:
        """The scene at `style.side`, then shrunk or enlarged to `image_size`."""
        st = scene.style
        side = st.side
        canvas = _paint_background(scene.background, side, rng)  # (side, side, 3) float32
        big = side * st.supersample
        layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        for s in scene.shapes:
            _draw(draw, s, big)
        if st.supersample > 1:  # Pillow premultiplies alpha when it resizes RGBA
            layer = layer.resize((side, side), Image.Resampling.BOX)
        canvas += rng.normal(0, st.noise, canvas.shape).astype(np.float32) if st.noise else 0
        image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).convert("RGBA")
        image.alpha_composite(layer)
        image = image.convert("RGB")
        if st.blur:
            image = image.filter(ImageFilter.GaussianBlur(st.blur * side / self.image_size))
        if st.jpeg:
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=st.jpeg)
            image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        if side != self.image_size:
            image = image.resize((self.image_size, self.image_size),
                                 Image.Resampling(st.resample))
        return image


def _rgb(v) -> tuple[int, int, int]:
    r, g, b = (round(float(c)) for c in v)
    return r, g, b


def _paint_background(bg: Background, side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side, 3) float32 pixels of `bg`."""
    base = np.array(bg.rgb, np.float32)
    if bg.kind == "gradient":
        ramp = np.linspace(-0.5, 0.5, side, dtype=np.float32)
        t = math.cos(bg.angle) * ramp[None, :] + math.sin(bg.angle) * ramp[:, None]  # (S, S)
        delta = np.array(bg.other, np.float32) - base
        return base + t[..., None] * delta  # the mean stays `rgb`
    canvas = np.broadcast_to(base, (side, side, 3)).astype(np.float32)
    if bg.kind == "texture":
        # Smooth blotches, a few random cells per side upsampled bicubically: mostly light and
        # shade, a little colour, so that no blotch reads as a coloured shape.
        cells = rng.normal(0, 1, (bg.cells, bg.cells, 1)) + rng.normal(0, 0.35, (bg.cells,
                                                                               bg.cells, 3))
        small = Image.fromarray(np.clip(128 + 40 * cells, 0, 255).astype(np.uint8))
        smooth = np.asarray(small.resize((side, side), Image.Resampling.BICUBIC), np.float32)
        canvas += (smooth - 128) / 40 * bg.amplitude
    elif bg.kind == "noise":
        canvas += rng.normal(0, bg.amplitude, canvas.shape).astype(np.float32)
    return canvas


def _place(rng: np.random.Generator, n: int, radius: float) -> list[tuple[float, float]]:
    """n centres whose shapes do not touch, each at most 30 % of its radius past the frame
    (rejection sampling)."""
    lo, hi = radius * 0.7, 1 - radius * 0.7
    for _ in range(200):
        pts = rng.uniform(lo, hi, size=(n, 2))
        gaps = [np.hypot(*(pts[i] - pts[j])) for i in range(n) for j in range(i + 1, n)]
        if min(gaps) > 2 * radius * 1.15:
            return [(float(x), float(y)) for x, y in pts]
    # Rare; a row fits GROUP_RADIUS's largest radii even after the 8 % size jitter.
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
    fill = (*s.rgb, 255)
    # Polygons are filled, or stroked `width` pixels wide inside their edge.
    width = max(1, round(r * s.outline)) if s.outline else 0
    paint = {"outline": fill, "width": width} if width else {"fill": fill}
    if s.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif s.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, width))
    elif s.shape == "square":
        draw.polygon(_polygon(cx, cy, [r * 0.85 * math.sqrt(2)], s.angle + 45, 4), **paint)
    elif s.shape == "triangle":
        # Centred on its centroid so that it turns in place.
        draw.polygon(_polygon(cx, cy, [r * 1.1], s.angle, 3), **paint)
    elif s.shape == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.05, r * 0.45], s.angle, 10), **paint)
    elif s.shape == "cross":
        w = r * 0.36  # half the arm width
        arm = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
               (-r, w), (-r, -w), (-w, -w)]
        a = math.radians(s.angle)
        ca, sa = math.cos(a), math.sin(a)
        draw.polygon([(cx + u * ca - v * sa, cy + u * sa + v * ca) for u, v in arm], **paint)
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
            where=POSITIONS[scene.position],
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
        return f"{with_article(f'{s.size} {s.colour} {s.shape}')} {POSITIONS[scene.position]}"
    if len({(x.colour, x.shape) for x in scene.shapes}) == 1:
        return f"{COUNT_WORDS[len(scene.shapes)]} {s.size} {s.colour} {plural(s.shape)}"
    a, b = scene.shapes
    return " and ".join(with_article(f"{x.size} {x.colour} {x.shape}") for x in (a, b))

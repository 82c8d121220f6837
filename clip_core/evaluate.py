"""Held-out evaluation of a model trained on the procedural scenes.

Zero-shot top-1 accuracy for colour, shape and the full colour+shape label, on lone shapes
of every combination, reported separately for the combinations seen in training and for
the HELD_OUT ones never drawn there (do colour and shape compose?). Labels are scored with
prompt ensembling as in the paper. Then image->text and text->image recall@1/@5 over mixed
scenes and their most specific captions.

Then the same questions on a style-shifted set (`evaluate_style_shift`) the model never
trains on: lone shapes drawn the way a new user would draw them, by a second renderer that
shares no code and no parameter ranges with the generator (`draw_like_a_user`).

`python -m clip_core.evaluate --model clip-shapes` prints the tables; `--json` the numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from .config import PreprocessConfig
from .model import CLIP
from .preprocess import ImageTransform
from .scenes import COLOURS, HELD_OUT, SHAPES, SceneGenerator, full_caption, with_article
from .tokenizer import Tokenizer
from .zeroshot import build_classifier

# Labels carry their article ("an orange circle"), so the templates do not.
TEMPLATES = ("{}", "a photo of {}", "a picture of {}", "a drawing of {}")
TEST_SEED = 1_000_001  # far from any training seed


@torch.no_grad()
def _embed_images(model: CLIP, preprocess: PreprocessConfig, images, batch_size=256):
    transform = ImageTransform(preprocess)
    out = [model.encode_image(transform.batch(images[i : i + batch_size]), normalize=True)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)  # (N, E)


@torch.no_grad()
def _embed_texts(model: CLIP, tokenizer: Tokenizer, texts, batch_size=256):
    out = [model.encode_text(tokenizer(texts[i : i + batch_size]).ids, normalize=True)
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out)  # (N, E)


def _recall(scores: torch.Tensor, correct: torch.Tensor, k: int) -> float:
    """scores (Q, N); correct (Q, N) bool -> share of queries with a correct hit in the top k."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return correct.gather(1, top).any(dim=1).float().mean().item()


def _combos() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


@torch.no_grad()
def _zero_shot(model: CLIP, tokenizer: Tokenizer, img: torch.Tensor,
               truth: Sequence[tuple[str, str]]) -> tuple[dict, dict[str, np.ndarray]]:
    """img (N, E) unit image embeddings of lone shapes, truth their (colour, shape) ->
    top-1 accuracy per task over seen and held-out combinations apart, and each task's
    (N,) bool hits."""
    combos, colours, shapes = _combos(), list(COLOURS), list(SHAPES)

    def predict(labels: list[str]) -> torch.Tensor:
        classifier = build_classifier(model, tokenizer, labels, TEMPLATES)  # (C, E)
        return (img @ classifier.T).argmax(dim=1)  # (N,)

    pred = {
        "colour": [colours[j] for j in predict([with_article(f"{c} shape") for c in colours])],
        "shape": [shapes[j] for j in predict([with_article(s) for s in shapes])],
        "colour+shape": [combos[j] for j in predict([with_article(f"{c} {s}")
                                                     for c, s in combos])],
    }
    target: dict[str, Sequence[object]] = {"colour": [c for c, _ in truth],
                                           "shape": [s for _, s in truth],
                                           "colour+shape": list(truth)}
    chance = {"colour": 1 / len(colours), "shape": 1 / len(shapes),
              "colour+shape": 1 / len(combos)}
    held = np.array([t in HELD_OUT for t in truth])
    table, hits = {}, {}
    for task in pred:
        hit = np.array([p == t for p, t in zip(pred[task], target[task], strict=True)])
        table[task] = {"seen": float(hit[~held].mean()), "held_out": float(hit[held].mean()),
                       "chance": chance[task]}
        hits[task] = hit
    return table, hits


@torch.no_grad()
def evaluate_scenes(model: CLIP, preprocess: PreprocessConfig, *, seed: int = TEST_SEED,
                    per_combo: int = 20, retrieval_n: int = 1000) -> dict:
    model = model.eval()
    tokenizer = Tokenizer(context_length=model.config.text.context_length)
    gen = SceneGenerator(preprocess.image_size, split="all")
    combos = _combos()

    images, truth = [], []
    for k, combo in enumerate(combos):
        for i in range(per_combo):
            rng = np.random.default_rng([seed, k, i])
            images.append(gen.render(gen.scene(rng, combo=combo), rng))
            truth.append(combo)
    img = _embed_images(model, preprocess, images)

    report: dict = {"seed": seed, "images_per_combination": per_combo,
                    "zero_shot": _zero_shot(model, tokenizer, img, truth)[0]}

    # Retrieval over training-distribution scenes of another seed. Identical captions
    # cannot be told apart, so a hit is any item whose caption equals the query's.
    train_gen = SceneGenerator(preprocess.image_size, split="train")
    scenes, pics = [], []
    for i in range(retrieval_n):
        rng = np.random.default_rng([seed + 1, i])
        scene = train_gen.scene(rng)
        scenes.append(scene)
        pics.append(train_gen.render(scene, rng))
    captions = [full_caption(s) for s in scenes]
    scores = _embed_images(model, preprocess, pics) @ _embed_texts(model, tokenizer, captions).T
    report["retrieval"] = _retrieval(scores, captions)
    return report


def _retrieval(scores: torch.Tensor, captions: Sequence[str]) -> dict:
    """scores (N, N) image i against caption j -> recall@1/@5 both ways. Identical captions
    cannot be told apart, so a hit is any item whose caption equals the query's."""
    ids = {c: n for n, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions])
    same = cid[:, None] == cid[None, :]  # (N, N)
    return {
        "n": len(captions), "distinct_captions": len(ids),
        "image_to_text": {f"R@{k}": _recall(scores, same, k) for k in (1, 5)},
        "text_to_image": {f"R@{k}": _recall(scores.T, same, k) for k in (1, 5)},
        "chance_R@1": float(same.float().mean()),  # a random pick's odds of a hit
    }



# ---- the style-shifted set ----
#
# A second renderer, written apart from clip_core.scenes and sharing none of its code or
# numbers: the colours are Pillow's named colours and a few near them that a user might pick,
# the shapes are Pillow primitives (ellipse, rectangle, regular_polygon) or points computed
# here, on flat or simple gradient backgrounds, at several image sizes, saved as PNG or JPEG.
# Only the words (COLOURS' and SHAPES' keys) and the HELD_OUT pairs come from the generator.

STYLE_SEED = 2_000_003
# Per colour word, RGBs a user might fill with: Pillow's name first, then near neighbours.
USER_COLOURS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((255, 0, 0), (220, 20, 60), (200, 16, 46), (230, 50, 30)),
    "orange": ((255, 165, 0), (255, 140, 0), (255, 120, 40), (240, 150, 30)),
    "yellow": ((255, 255, 0), (255, 215, 0), (250, 230, 60), (235, 210, 20)),
    "green": ((0, 128, 0), (34, 139, 34), (50, 205, 50), (0, 160, 80)),
    "blue": ((0, 0, 255), (65, 105, 225), (30, 80, 200), (0, 90, 230)),
    "purple": ((128, 0, 128), (148, 0, 211), (120, 60, 180), (110, 40, 150)),
    "pink": ((255, 105, 180), (255, 20, 147), (255, 150, 200), (240, 120, 170)),
    "white": ((255, 255, 255), (250, 250, 250), (240, 240, 235), (235, 240, 245)),
}
LIGHT = ((255, 255, 255), (245, 245, 245), (240, 240, 230), (230, 235, 240), (220, 220, 220))
DARK = ((0, 0, 0), (30, 30, 30), (20, 25, 45), (50, 50, 50))
MID = ((128, 128, 128), (110, 115, 105), (150, 150, 160))
IMAGE_SIZES = (128, 200, 256, 256, 320, 512)  # 256 most often, the size
WHERE = {"centre": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5),
         "top": (0.5, 0.27), "bottom": (0.5, 0.73)}  # the centre, before a jitter of ±0.04
WHERE_WORDS = {"centre": "in the middle", "left": "on the left", "right": "on the right",
               "top": "at the top", "bottom": "at the bottom"}


@dataclass(frozen=True)
class Drawing:
    """One lone shape as a user might draw it."""
    colour: str
    shape: str
    where: str  # a key of WHERE
    rgb: tuple[int, int, int]
    ground: str  # "light", "dark", "mid" or "gradient"
    side: int  # pixels
    extent: float  # the shape's width as a fraction of the side (0.22-0.42: 56-108 px of 256)
    turn: float  # degrees; 0 for most: users draw shapes upright
    fmt: str  # "PNG" or "JPEG"
    quality: int  # JPEG quality

    @property
    def caption(self) -> str:
        return f"{with_article(f'{self.colour} {self.shape}')} {WHERE_WORDS[self.where]}"


def user_drawing_spec(rng: np.random.Generator, colour: str, shape: str,
                      where: str | None = None) -> Drawing:
    """Chooses how to draw one (colour, shape): each choice from its own range here."""
    rgb = USER_COLOURS[colour][rng.integers(len(USER_COLOURS[colour]))]
    # A white shape goes on a dark or mid ground (nobody draws white on white).
    grounds = ("dark", "mid", "gradient") if colour == "white" else (
        "light", "light", "light", "dark", "mid", "gradient")
    if where is None:
        where = "centre" if rng.random() < 0.5 else str(
            rng.choice(["left", "right", "top", "bottom"]))
    return Drawing(
        colour=colour, shape=shape, where=where, rgb=rgb,
        ground=str(grounds[rng.integers(len(grounds))]),
        side=int(IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]),
        extent=float(rng.uniform(0.22, 0.42)),
        turn=float(rng.uniform(-40, 40)) if rng.random() < 0.3 else 0.0,
        fmt="JPEG" if rng.random() < 0.5 else "PNG",
        quality=int(rng.integers(60, 96)),
    )


def draw_like_a_user(d: Drawing, rng: np.random.Generator) -> Image.Image:
    """Draws `d` with plain Pillow and round-trips it through its file format."""
    n = d.side
    if d.ground == "gradient":
        # Pillow's own 256-step ramp, stretched: dark to mid, the way a slide background is.
        top, bottom = (int(rng.integers(0, 60)), int(rng.integers(90, 160)))
        ramp = Image.linear_gradient("L").resize((n, n)).point(
            lambda v: top + (bottom - top) * v // 255)
        img = Image.merge("RGB", (ramp, ramp, ramp))
    else:
        grounds = {"light": LIGHT, "dark": DARK, "mid": MID}[d.ground]
        img = Image.new("RGB", (n, n), grounds[rng.integers(len(grounds))])
    draw = ImageDraw.Draw(img)
    ox, oy = WHERE[d.where]
    cx = (ox + rng.uniform(-0.04, 0.04)) * n
    cy = (oy + rng.uniform(-0.04, 0.04)) * n
    half = d.extent * n / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    if d.shape == "circle":
        draw.ellipse(box, fill=d.rgb)
    elif d.shape == "ring":
        draw.ellipse(box, outline=d.rgb, width=max(2, round(half * rng.uniform(0.25, 0.45))))
    elif d.shape == "square":
        if d.turn:
            draw.regular_polygon((cx, cy, half * 1.2), 4, rotation=45 + d.turn, fill=d.rgb)
        else:
            draw.rectangle(box, fill=d.rgb)
    elif d.shape == "triangle":
        if d.turn:
            draw.regular_polygon((cx, cy, half), 3, rotation=d.turn, fill=d.rgb)
        else:  # upright, flat-bottomed, as wide as it is tall
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)],
                         fill=d.rgb)
    elif d.shape == "star":
        inner = rng.uniform(0.38, 0.5)
        pts = []
        for k in range(10):
            a = math.radians(d.turn + 36 * k - 90)
            r = half if k % 2 == 0 else half * inner
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        draw.polygon(pts, fill=d.rgb)
    elif d.shape == "cross":  # a plus sign: two bars
        bar = half * rng.uniform(0.3, 0.4)
        if d.turn:
            t = math.radians(d.turn)
            for u, v in ((half, bar), (bar, half)):
                corners = [(-u, -v), (u, -v), (u, v), (-u, v)]
                draw.polygon([(cx + x * math.cos(t) - y * math.sin(t),
                               cy + x * math.sin(t) + y * math.cos(t)) for x, y in corners],
                             fill=d.rgb)
        else:
            draw.rectangle((cx - half, cy - bar, cx + half, cy + bar), fill=d.rgb)
            draw.rectangle((cx - bar, cy - half, cx + bar, cy + half), fill=d.rgb)
    else:
        raise ValueError(f"unknown shape {d.shape!r}")
    buf = io.BytesIO()
    img.save(buf, d.fmt, **({"quality": d.quality} if d.fmt == "JPEG" else {}))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def style_shift_set(seed: int, per_combo: int) -> list[tuple[Drawing, Image.Image]]:
    """`per_combo` drawings of each of the 48 (colour, shape) combinations."""
    out = []
    for k, (colour, shape) in enumerate(_combos()):
        for i in range(per_combo):
            rng = np.random.default_rng([seed, k, i])
            d = user_drawing_spec(rng, colour, shape)
            out.append((d, draw_like_a_user(d, rng)))
    return out


@torch.no_grad()
def evaluate_style_shift(model: CLIP, preprocess: PreprocessConfig, *, seed: int = STYLE_SEED,
                         per_combo: int = 20) -> dict:
    """Zero-shot top-1 on user-style drawings, seen and held-out combinations apart, with
    colour+shape accuracy broken down by ground, file format and image size; then retrieval
    between the drawings and their captions ("a red circle on the left")."""
    model = model.eval()
    tokenizer = Tokenizer(context_length=model.config.text.context_length)
    items = style_shift_set(seed, per_combo)
    drawings = [d for d, _ in items]
    img = _embed_images(model, preprocess, [im for _, im in items])  # (N, E)
    table, hits = _zero_shot(model, tokenizer, img, [(d.colour, d.shape) for d in drawings])
    both = hits["colour+shape"]
    breakdown: dict[str, dict[str, float]] = {}
    for factor in ("ground", "fmt", "side"):
        values = sorted({getattr(d, factor) for d in drawings})
        breakdown[factor] = {str(v): float(both[[getattr(d, factor) == v for d in drawings]]
                                           .mean()) for v in values}
    captions = [d.caption for d in drawings]
    scores = img @ _embed_texts(model, tokenizer, captions).T  # (N, N)
    return {"seed": seed, "images_per_combination": per_combo, "zero_shot": table,
            "colour+shape_by": breakdown, "retrieval": _retrieval(scores, captions)}

def format_report(r: dict, title: str = "lone shapes") -> str:
    lines = [f"zero-shot top-1 ({r['images_per_combination']} {title} per combination, "
             f"seed {r['seed']}):",
             f"  {'task':<14}{'seen combos':>12}{'held-out':>10}{'chance':>8}"]
    for task, v in r["zero_shot"].items():
        lines.append(f"  {task:<14}{v['seen']:>12.3f}{v['held_out']:>10.3f}{v['chance']:>8.3f}")
    for factor, cells in r.get("colour+shape_by", {}).items():
        lines.append(f"  colour+shape by {factor}: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in cells.items()))
    t = r["retrieval"]
    lines += [f"retrieval over {t['n']} images ({t['distinct_captions']} distinct captions; "
              f"chance R@1 {t['chance_R@1']:.3f}):",
              f"  image->text  R@1 {t['image_to_text']['R@1']:.3f}  "
              f"R@5 {t['image_to_text']['R@5']:.3f}",
              f"  text->image  R@1 {t['text_to_image']['R@1']:.3f}  "
              f"R@5 {t['text_to_image']['R@5']:.3f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .loader import load

    parser = argparse.ArgumentParser(
        prog="python -m clip_core.evaluate",
        description="Held-out evaluation on procedural scenes and on user-style drawings.")
    parser.add_argument("--model", default="clip-shapes", help="a registry name or a path")
    parser.add_argument("--seed", type=int, default=TEST_SEED)
    parser.add_argument("--per-combo", type=int, default=20)
    parser.add_argument("--retrieval", type=int, default=1000, help="scenes for retrieval")
    parser.add_argument("--style-seed", type=int, default=STYLE_SEED)
    parser.add_argument("--style-per-combo", type=int, default=20,
                        help="user-style drawings per combination")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    loaded = load(args.model)
    report = {
        "scenes": evaluate_scenes(loaded.model, loaded.preprocess, seed=args.seed,
                                  per_combo=args.per_combo, retrieval_n=args.retrieval),
        "style_shift": evaluate_style_shift(loaded.model, loaded.preprocess,
                                            seed=args.style_seed,
                                            per_combo=args.style_per_combo),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("generated scenes (the training distribution, unseen seed)")
        print(format_report(report["scenes"]))
        print("\nstyle-shifted: user-style drawings (never trained on)")
        print(format_report(report["style_shift"], title="drawings"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

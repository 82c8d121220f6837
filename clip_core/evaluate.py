"""Held-out evaluation of a model trained on the procedural scenes.

Zero-shot top-1 accuracy for colour, shape and the full colour+shape label, on lone shapes
of every combination, reported separately for the combinations seen in training and for
the HELD_OUT ones never drawn there (do colour and shape compose?). Labels are scored with
prompt ensembling as in the paper. Then image->text and text->image recall@1/@5 over mixed
scenes and their most specific captions.

`python -m clip_core.evaluate --model clip-shapes` prints the table; `--json` the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np
import torch

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


@torch.no_grad()
def evaluate_scenes(model: CLIP, preprocess: PreprocessConfig, *, seed: int = TEST_SEED,
                    per_combo: int = 20, retrieval_n: int = 1000) -> dict:
    model = model.eval()
    tokenizer = Tokenizer(context_length=model.config.text.context_length)
    gen = SceneGenerator(preprocess.image_size, split="all")
    combos = [(c, s) for c in COLOURS for s in SHAPES]

    images, truth = [], []
    for k, combo in enumerate(combos):
        for i in range(per_combo):
            rng = np.random.default_rng([seed, k, i])
            images.append(gen.render(gen.scene(rng, combo=combo), rng))
            truth.append(combo)
    img = _embed_images(model, preprocess, images)

    def predict(labels: list[str]) -> torch.Tensor:
        classifier = build_classifier(model, tokenizer, labels, TEMPLATES)  # (C, E)
        return (img @ classifier.T).argmax(dim=1)  # (N,)

    colours, shapes = list(COLOURS), list(SHAPES)
    pred = {
        "colour": [colours[j] for j in predict([with_article(f"{c} shape") for c in colours])],
        "shape": [shapes[j] for j in predict([with_article(s) for s in shapes])],
        "colour+shape": [combos[j] for j in predict([with_article(f"{c} {s}")
                                                     for c, s in combos])],
    }
    target: dict[str, Sequence[object]] = {"colour": [c for c, _ in truth], "shape": [s for _, s in truth],
              "colour+shape": truth}
    chance = {"colour": 1 / len(colours), "shape": 1 / len(shapes),
              "colour+shape": 1 / len(combos)}
    held = np.array([t in HELD_OUT for t in truth])
    report: dict = {"seed": seed, "images_per_combination": per_combo, "zero_shot": {}}
    for task in pred:
        hit = np.array([p == t for p, t in zip(pred[task], target[task], strict=True)])
        report["zero_shot"][task] = {"seen": float(hit[~held].mean()),
                                     "held_out": float(hit[held].mean()),
                                     "chance": chance[task]}

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
    ids = {c: n for n, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions])
    same = cid[:, None] == cid[None, :]  # (N, N)
    report["retrieval"] = {
        "n": retrieval_n, "distinct_captions": len(ids),
        "image_to_text": {f"R@{k}": _recall(scores, same, k) for k in (1, 5)},
        "text_to_image": {f"R@{k}": _recall(scores.T, same, k) for k in (1, 5)},
        "chance_R@1": float(same.float().mean()),  # a random pick's odds of a hit
    }
    return report


def format_report(r: dict) -> str:
    lines = [f"zero-shot top-1 ({r['images_per_combination']} lone shapes per combination, "
             f"seed {r['seed']}):",
             f"  {'task':<14}{'seen combos':>12}{'held-out':>10}{'chance':>8}"]
    for task, v in r["zero_shot"].items():
        lines.append(f"  {task:<14}{v['seen']:>12.3f}{v['held_out']:>10.3f}{v['chance']:>8.3f}")
    t = r["retrieval"]
    lines += [f"retrieval over {t['n']} scenes ({t['distinct_captions']} distinct captions; "
              f"chance R@1 {t['chance_R@1']:.3f}):",
              f"  image->text  R@1 {t['image_to_text']['R@1']:.3f}  "
              f"R@5 {t['image_to_text']['R@5']:.3f}",
              f"  text->image  R@1 {t['text_to_image']['R@1']:.3f}  "
              f"R@5 {t['text_to_image']['R@5']:.3f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .loader import load

    parser = argparse.ArgumentParser(prog="python -m clip_core.evaluate",
                                     description="Held-out evaluation on procedural scenes.")
    parser.add_argument("--model", default="clip-shapes", help="a registry name or a path")
    parser.add_argument("--seed", type=int, default=TEST_SEED)
    parser.add_argument("--per-combo", type=int, default=20)
    parser.add_argument("--retrieval", type=int, default=1000, help="scenes for retrieval")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    loaded = load(args.model)
    report = evaluate_scenes(loaded.model, loaded.preprocess, seed=args.seed,
                             per_combo=args.per_combo, retrieval_n=args.retrieval)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

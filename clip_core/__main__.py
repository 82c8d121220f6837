"""`python -m clip_core embed`: embed texts and images from the command line.

Prints one JSON object: the model, each input's embedding summary and the cosine matrix.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from .errors import ClipCoreError
from .loader import load
from .preprocess import ImageTransform, open_image
from .tokenizer import Tokenizer


def _demo_image():
    """A red disc on grey, drawn in memory, for a first run with no files at hand."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 240), (128, 128, 128))
    ImageDraw.Draw(img).ellipse((100, 60, 220, 180), fill=(220, 20, 20))
    return img


def embed(args: argparse.Namespace) -> dict:
    loaded = load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        offline=args.offline,
        random_weights=args.random_weights,
    )
    model = loaded.model
    rows, embeddings = [], []
    with torch.no_grad():
        if args.text:
            tokens = Tokenizer(context_length=model.config.text.context_length)(args.text)
            emb = model.encode_text(tokens.ids, normalize=True)
            embeddings.append(emb)
            for i, text in enumerate(args.text):
                rows.append({"kind": "text", "input": text, "n_tokens": tokens.n_tokens[i],
                             "truncated": tokens.truncated[i]})
        images = [(p, open_image(p)) for p in args.image]
        if args.demo_image:
            images.append(("<demo: red disc>", _demo_image()))
        if images:
            pixels = ImageTransform(loaded.preprocess).batch([im for _, im in images])
            embeddings.append(model.encode_image(pixels, normalize=True))
            rows += [{"kind": "image", "input": name} for name, _ in images]
    if not rows:
        raise SystemExit("nothing to embed: pass --text, --image or --demo-image")
    emb = torch.cat(embeddings)
    for row, vec in zip(rows, emb, strict=True):
        row["embedding_head"] = [round(x, 5) for x in vec[:4].tolist()]
    return {
        "model": loaded.name,
        "source": loaded.source,
        "dimension": model.embed_dim,
        "dtype": str(model.dtype).removeprefix("torch."),
        "inputs": rows,
        "cosine": [[round(x, 4) for x in r] for r in (emb @ emb.t()).tolist()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip_core")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", help="embed texts and images, print JSON")
    p.add_argument("--model", default="ViT-B-32", help="registry name or checkpoint path")
    p.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--demo-image", action="store_true", help="add a drawn red disc")
    p.add_argument("--random-weights", action="store_true",
                   help="use random weights instead of downloading (meaningless output)")
    p.add_argument("--offline", action="store_true", help="never download; use the cache only")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: by device)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = embed(args)
    except ClipCoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # One line per field and per input: readable, and still one JSON document.
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items() if k != "inputs"]
    inputs = ",\n  ".join(json.dumps(row, ensure_ascii=False) for row in result["inputs"])
    lines.append(f' "inputs": [\n  {inputs}\n ]')
    print("{\n" + ",\n".join(lines) + "\n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

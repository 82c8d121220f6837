"""Raw in-process throughput of our CLIP against open_clip on the same weights.

For each dtype and batch size it times `encode_image` on preprocessed pixels and
`encode_text` on short texts (at most 12 words), ours and open_clip's, in one process,
interleaved, and prints items/s and the ratio. open_clip always runs its text tower on
all 77 positions; ours trims the batch to its longest text.

    python loadtests/bench_model.py --model ViT-B-32 --batch-sizes 1,8,32 --dtypes fp32,bf16
    python loadtests/bench_model.py --model ViT-B-32/laion2b_s34b_b79k   # a registry name

Weights are always random: timings do not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch

from clip_core.config import CLIPConfig, load_architecture
from clip_core.model import CLIP
from clip_core.registry import get_entry
from clip_core.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WORDS = ["red", "blue", "green", "small", "large", "photo", "picture", "of", "a", "the", "dog", "cat", "car", "tree", "house", "on", "in", "with", "two", "three", "sunny", "street", "bright", "dark", "old", "new", "beach", "mountain", "city", "river"]


def short_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 12))) for _ in range(n)]


def _rate(fn: Callable[[], object], batch: int, min_time: float) -> float:
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return n * batch / elapsed


def compare(
    ours: Callable[[], object], ref: Callable[[], object], batch: int, min_time: float,
    repeats: int,
) -> tuple[float, float]:
    """Median items/s of each, timed in alternation so drift in a shared machine's speed
    affects both alike."""
    ours(), ref()  # warm-up: first calls allocate and pick kernels
    a, b = [], []
    for _ in range(repeats):
        a.append(_rate(ours, batch, min_time))
        b.append(_rate(ref, batch, min_time))
    return statistics.median(a), statistics.median(b)


def _model(name: str) -> tuple[CLIPConfig, str]:
    """Our config and open_clip's model name for an architecture or a registry model."""
    if "/" not in name:
        return load_architecture(name), f"{name}-quickgelu"
    entry = get_entry(name)
    cfg = entry.config()
    if entry.name.startswith("openai/"):
        return cfg, f"{entry.architecture}-quickgelu"
    return cfg, entry.name.split("/")[0]  # "ViT-B-32" (GELU), "ViT-B-32-quickgelu"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32",
                    help="architecture name (QuickGELU), or a registry model name such as "
                         "ViT-B-32/laion2b_s34b_b79k (its architecture and activation)")
    ap.add_argument("--open-clip-name", default=None,
                    help="open_clip model (default: NAME-quickgelu for an architecture, the "
                         "open_clip name of a registry model)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--inputs", default="image,text", help="which towers to time")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import open_clip  # benchmark dependency only, like the tests

    device = torch.device(args.device)
    cfg, oc_name = _model(args.model)
    oc_name = args.open_clip_name or oc_name
    torch.manual_seed(0)
    ours_fp32 = CLIP(cfg).eval()
    ref_fp32 = open_clip.create_model(oc_name, pretrained=None).eval()
    ref_fp32.load_state_dict(ours_fp32.state_dict())
    tokenizer = Tokenizer()
    size = cfg.vision.image_size

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        if dtype == torch.float16 and device.type != "cuda":
            print(f"skipping {dname} on {device.type}: half kernels are CUDA-only in practice")
            continue
        ours = CLIP(cfg).eval()
        ours.load_state_dict(ours_fp32.state_dict())
        ours = ours.to(device, dtype)
        ref = ref_fp32.to(device, dtype) if dtype == torch.float32 else (
            open_clip.create_model(oc_name, pretrained=None).eval()
        )
        if dtype != torch.float32:
            ref.load_state_dict(ours_fp32.state_dict())
            ref = ref.to(device, dtype)
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            pixels = torch.randn(bs, 3, size, size, device=device, dtype=dtype)
            ids = tokenizer(short_texts(bs, seed=bs)).ids.to(device)

            def run(fn, x):
                def call():
                    with torch.inference_mode():
                        fn(x)
                    sync()
                return call

            for kind, ours_fn, ref_fn, x in (
                ("image", ours.encode_image, ref.encode_image, pixels),
                ("text", ours.encode_text, ref.encode_text, ids),
            ):
                if kind not in args.inputs.split(","):
                    continue
                a, b = compare(run(ours_fn, x), run(ref_fn, x), bs, args.min_time, args.repeats)
                rows.append({"dtype": dname, "batch": bs, "kind": kind, "ours": a,
                             "open_clip": b, "ratio": a / b})
                print(f"{dname:>5} {kind:>5} batch {bs:>3}: ours {a:8.1f}/s  "
                      f"open_clip {b:8.1f}/s  x{a / b:.2f}", flush=True)

    report = {
        "model": args.model,
        "device": str(device),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "texts": "2-12 random words, tokenized (open_clip pads to 77)",
        "rows": rows,
    }
    print()
    print(f"# {args.model} on {report['device']} ({report['machine']}), torch {torch.__version__}")
    print("| dtype | input | batch | ours items/s | open_clip items/s | ours / open_clip |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['kind']} | {r['batch']} | {r['ours']:.1f} | "
              f"{r['open_clip']:.1f} | {r['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()

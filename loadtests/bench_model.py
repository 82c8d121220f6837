"""Raw in-process throughput of our CLIP against open_clip on the same weights.

For each dtype and batch size it times `encode_image` on preprocessed pixels and
`encode_text` on short texts (at most 12 words), ours and open_clip's, in one process,
interleaved, and prints items/s and the ratio. open_clip always runs its text tower on
all 77 positions; ours trims the batch to its longest text.

    python loadtests/bench_model.py --model ViT-B-32 --batch-sizes 1,8,32 --dtypes fp32,bf16
    python loadtests/bench_model.py --model ViT-B-32/laion2b_s34b_b79k   # a registry name

With --engine, the exported engines (clip_core.export) beside torch fp32 instead of
open_clip; --torch-padded times what packing is worth to torch's texts (docs/benchmarks.md,
issue 23):

    python loadtests/bench_model.py --engine torch,onnxruntime,openvino --inputs text \
        --batch-sizes 1,16,64 --dtypes fp32 --torch-padded

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
    # --engine: the exported engines (clip_core.export) beside torch instead of open_clip.
    ap.add_argument("--engine", default=None,
                    help="comma list of torch,onnxruntime,openvino: each engine's towers, "
                         "fp32 (bf16 too where --dtypes asks and the engine has it)")
    ap.add_argument("--int8", action="store_true", help="with --engine: the int8 exports too")
    ap.add_argument("--export-cache", default=None,
                    help="with --engine: where exports are cached (default: a temp dir)")
    ap.add_argument("--torch-padded", action="store_true",
                    help="with --engine: torch fp32 texts also without packing (each batch "
                         "padded to its longest text, as one exported graph call runs it)")
    args = ap.parse_args(argv)
    if args.engine:
        return engines_main(args)

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


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def engines_main(args) -> dict:
    """Items/s of each engine's towers per dtype and batch size, torch fp32 among them,
    timed in alternation with torch fp32 (the texts: 2-12 words, each batch trimmed to its
    longest, as the service sends them), and the resident memory each engine added."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from clip_core.config import PreprocessConfig
    from clip_core.export import ExportTarget, ModelCard, build, open_export, state_dict_sha256

    cfg = load_architecture(args.model)
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    pre = PreprocessConfig(image_size=cfg.vision.image_size)
    cache = Path(args.export_cache or tempfile.mkdtemp(prefix="bench-exports-"))
    weights = state_dict_sha256(model)
    tokenizer = Tokenizer()
    threads = torch.get_num_threads()
    size = cfg.vision.image_size
    wanted = args.engine.split(",")
    dtypes = args.dtypes.split(",")

    def torch_towers(m):
        def image(x):
            with torch.inference_mode():
                mean = torch.tensor(pre.mean).view(3, 1, 1)
                std = torch.tensor(pre.std).view(3, 1, 1)
                return m.encode_image(torch.from_numpy(x).float().div(255).sub(mean).div(std))

        def text(ids):
            with torch.inference_mode():
                t = torch.from_numpy(ids)
                return m.encode_text(t, lengths=(t.argmax(-1) + 1).tolist())

        def padded_text(ids):  # every length given as the longest: encode_text never packs
            with torch.inference_mode():
                return m.encode_text(torch.from_numpy(ids), lengths=[ids.shape[1]] * len(ids))
        return image, text, padded_text

    # engine, dtype, image (None: texts only), text, MiB
    variants: list[tuple[str, str, object, object, float]] = []
    base_image, base_text, padded_text = torch_towers(model)
    if "torch" in wanted:
        variants.append(("torch", "fp32", base_image, base_text, 0.0))
        if args.torch_padded:
            variants.append(("torch", "fp32-padded", None, padded_text, 0.0))
        if "bf16" in dtypes:
            before = _rss_mib()
            m16 = CLIP(cfg).eval()
            m16.load_state_dict(model.state_dict())
            variants.append(("torch", "bf16", *torch_towers(m16.to(torch.bfloat16))[:2],
                             _rss_mib() - before))
    for engine in ("onnxruntime", "openvino"):
        if engine not in wanted:
            continue
        precisions = ["fp32", "int8"] if args.int8 else ["fp32"]
        for precision in precisions:
            export = build(model, ModelCard.of(args.model, model, pre), weights,
                           ExportTarget(engine, precision), cache)  # type: ignore[arg-type]
            modes = [False] + ([True] if engine == "openvino" and precision == "fp32"
                               and "bf16" in dtypes else [])
            for bf16 in modes:
                before = _rss_mib()
                towers = open_export(export, threads, 1, bf16)
                towers.image(np.zeros((1, 3, size, size), np.uint8))  # allocate, plan
                name = "int8" if precision == "int8" else "bf16" if bf16 else "fp32"
                variants.append((engine, name, towers.image, towers.text, _rss_mib() - before))
    rows = []
    rng = np.random.default_rng(0)
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        pixels = rng.integers(0, 256, (bs, 3, size, size), dtype=np.uint8)
        ids = tokenizer(short_texts(bs, seed=bs)).ids
        ids = ids[:, : int(ids.argmax(-1).max()) + 1].numpy()  # trimmed to the longest
        for kind, x in (("image", pixels), ("text", ids)):
            if kind not in args.inputs.split(","):
                continue
            ref = base_image if kind == "image" else base_text
            for engine, dname, image, text, mib in variants:
                fn = image if kind == "image" else text
                if fn is None:
                    continue
                a, b = compare(lambda fn=fn, x=x: fn(x), lambda ref=ref, x=x: ref(x), bs,
                               args.min_time, args.repeats)
                rows.append({"engine": engine, "dtype": dname, "batch": bs, "kind": kind,
                             "items_per_s": a, "torch_fp32": b, "ratio": a / b,
                             "rss_mib": mib})
                print(f"{engine:>11} {dname:>5} {kind:>5} batch {bs:>3}: {a:8.1f}/s  "
                      f"torch fp32 {b:8.1f}/s  x{a / b:.2f}", flush=True)
    report = {"model": args.model, "threads": threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "rows": rows}
    print(f"\n# {args.model}, {threads} threads, torch {torch.__version__}; medians of "
          f"{args.repeats}, each timed in alternation with torch fp32")
    print("| engine | dtype | input | batch | items/s | torch fp32 items/s | ratio |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['dtype']} | {r['kind']} | {r['batch']} | "
              f"{r['items_per_s']:.1f} | {r['torch_fp32']:.1f} | {r['ratio']:.2f} |")
    print("\n| engine | dtype | resident memory added (MiB) |\n|---|---|---:|")
    for engine, dname, image, _, mib in variants:
        if image is not None:
            print(f"| {engine} | {dname} | {mib:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()

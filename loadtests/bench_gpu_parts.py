"""The GPU parts measured alone: CUDA graphs against eager image batches, and preprocessing
(Pillow exact, Pillow draft mode, the tensor path on the device).

    python3 loadtests/bench_gpu_parts.py graphs --model ViT-B-32 --device cuda --dtype fp16 \
        --batches 1,8,32,64,128,256,512,1024 --json out.json [--tiny]
    python3 loadtests/bench_gpu_parts.py preprocess --device cuda --threads 1,2,4,8,16 \
        --images 256 --json out.json [--tiny]

Needs only torch, torchvision, numpy and Pillow (clip_core's model, config and preprocessing;
no service, no tokenizer): the GPU machine has nothing else. Every measurement is wrapped so a
failure is recorded as an error string in the JSON and the rest still runs. Models have random
weights: throughput does not depend on the values, and parity is measured between paths.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # workloads, run from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # clip_core, uninstalled

from workloads import photo_jpeg

from clip_core.config import (
    CLIPConfig,
    PreprocessConfig,
    TextConfig,
    VisionConfig,
    load_architecture,
)
from clip_core.graphs import EagerRunner, GraphRunner
from clip_core.loader import resolve_dtype
from clip_core.model import CLIP
from clip_core.preprocess import ImageTransform, open_image

_TINY_TEXT = TextConfig(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
# --tiny: small enough for a few seconds on 2 CPU cores.
TINY_GRAPHS = CLIPConfig(embed_dim=32, vision=VisionConfig(
    kind="vit", image_size=32, width=64, layers=1, patch_size=8), text=_TINY_TEXT)
TINY_PREPROCESS = CLIPConfig(embed_dim=32, vision=VisionConfig(
    kind="vit", image_size=224, width=64, layers=1, patch_size=32), text=_TINY_TEXT)


def error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def build(cfg: CLIPConfig, device: torch.device, dtype: torch.dtype) -> CLIP:
    """Random weights, initialised on the device (a CPU init of ViT-L/14 takes seconds)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = CLIP(cfg)
    return model.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[], object], items: int, device: torch.device, *, repeats: int = 5,
         budget_s: float = 2.0, min_repeat_s: float = 0.02) -> dict:
    """Items/s of fn (which handles `items` items): one untimed call, then the median of up
    to `repeats` timed repeats, each of enough calls to last min_repeat_s, within budget_s."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, int(min_repeat_s / once))
    rates, start = [], time.perf_counter()
    while len(rates) < repeats and (not rates or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        rates.append(items * calls / (time.perf_counter() - t0))
    return {"items_per_s": statistics.median(rates), "repeats": len(rates), "calls": calls}


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cpu_count": os.cpu_count(), "device": str(device)}
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except Exception as e:  # recorded, not fatal: only the tensor path needs it
        env["torchvision"] = error(e)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ---- graphs -------------------------------------------------------------------------------


def bench_graphs(args: argparse.Namespace) -> dict:
    device = torch.device("cpu" if args.tiny else args.device)
    dtype = resolve_dtype(args.dtype, device) if device.type == "cuda" else torch.float32
    out: dict = {"kind": "graphs", "model": "tiny-vit" if args.tiny else args.model,
                 "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny,
                 "env": environment(device), "rows": [], "errors": []}
    deadline = time.perf_counter() + args.max_seconds
    try:
        cfg = TINY_GRAPHS if args.tiny else load_architecture(args.model)
        model = build(cfg, device, dtype)
    except Exception as e:
        out["errors"].append(f"model: {error(e)}")
        return out
    s = cfg.vision.image_size
    encoder = partial(model.encode_image, normalize=True)
    batches = sorted(args.batches)
    shape = (3, s, s)
    eager = EagerRunner(encoder, batches, shape, dtype, device)
    graphs = None
    if device.type == "cuda":
        try:
            graphs = GraphRunner(encoder, batches, shape, dtype, device)
        except Exception as e:
            out["errors"].append(f"graphs: {error(e)}")
    for bs in batches:
        row: dict = {"batch": bs}
        out["rows"].append(row)
        if time.perf_counter() > deadline:
            row["error"] = f"skipped: past the {args.max_seconds:.0f} s budget"
            continue
        budget = min(2.0, max(0.2, (deadline - time.perf_counter()) / 8))
        try:
            x = torch.randn(bs, *shape, device=device).to(dtype)
        except Exception as e:
            row["error"] = f"input: {error(e)}"
            continue
        try:
            row["eager_images_per_s"] = rate(lambda x=x: eager(x), bs, device,
                                             budget_s=budget)["items_per_s"]
        except Exception as e:
            row["eager_error"] = error(e)
        if graphs is None:
            row["graphs_images_per_s"] = "n/a"
        else:
            try:
                t0 = time.perf_counter()
                graphs._graph(bs)  # capture outside the timing
                sync(device)
                row["capture_s"] = time.perf_counter() - t0
                row["graphs_images_per_s"] = rate(lambda x=x: graphs(x), bs, device,
                                                  budget_s=budget)["items_per_s"]
                row["max_abs_diff"] = float((graphs(x) - eager(x)).abs().max())
            except Exception as e:
                row["graphs_error"] = error(e)
        del x
    if device.type == "cuda":
        out["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def print_graphs(res: dict) -> None:
    print(f"{res['model']} {res['dtype']} on {res['env'].get('gpu', res['env']['device'])}")
    print(f"{'batch':>6} {'eager img/s':>12} {'graphs img/s':>13} {'speed-up':>9}")
    for r in res["rows"]:
        e, g = r.get("eager_images_per_s"), r.get("graphs_images_per_s")
        up = f"{g / e:.2f}x" if isinstance(e, float) and isinstance(g, float) else ""
        es = f"{e:.0f}" if isinstance(e, float) else r.get("eager_error", r.get("error", "-"))
        gs = f"{g:.0f}" if isinstance(g, float) else str(g or r.get("graphs_error", "-"))
        print(f"{r['batch']:>6} {es:>12} {gs:>13} {up:>9}")
    for e in res["errors"]:
        print("error:", e)


# ---- preprocess ---------------------------------------------------------------------------


def draft_pixels(tf: ImageTransform, blob: bytes) -> torch.Tensor:
    """Pillow's "fast" path: the JPEG decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose
    shorter side is still at least S, then the exact resize and crop from there."""
    image = Image.open(io.BytesIO(blob))
    if image.format == "JPEG":
        image.draft("RGB", (tf.size, tf.size))
    image.load()
    return tf.pixels(image)


def exact_pixels(tf: ImageTransform, blob: bytes) -> torch.Tensor:
    return tf.pixels(open_image(blob))


def threaded(fn: Callable[[bytes], torch.Tensor], blobs: list[bytes], threads: int) -> float:
    """Images/s of fn over blobs on `threads` threads (best of two passes)."""
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, blobs[: threads * 2]))  # warm the threads
        for _ in range(2):
            t0 = time.perf_counter()
            list(pool.map(fn, blobs))
            best = max(best, len(blobs) / (time.perf_counter() - t0))
    return best


def parity(model: CLIP, device: torch.device, ref: torch.Tensor, got: torch.Tensor,
           cfg: PreprocessConfig) -> dict:
    """Max and mean pixel difference (normalised units and grey levels), embedding cosine."""
    diff = (got.float().cpu() - ref.float().cpu()).abs()
    level = 1.0 / 255.0 / min(cfg.std)
    with torch.inference_mode():
        a = torch.cat([model.encode_image(ref[i:i + 64].to(device), normalize=True)
                       for i in range(0, len(ref), 64)])
        b = torch.cat([model.encode_image(got[i:i + 64].to(device), normalize=True)
                       for i in range(0, len(got), 64)])
    cos = (a * b).sum(-1)
    return {"max_abs_diff": float(diff.max()), "max_grey_levels": float(diff.max()) / level,
            "mean_grey_levels": float(diff.mean()) / level,
            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def bench_preprocess(args: argparse.Namespace) -> dict:
    device = torch.device("cpu" if args.tiny and args.device.startswith("cuda")
                          and not torch.cuda.is_available() else args.device)
    out: dict = {"kind": "preprocess", "tiny": args.tiny, "env": environment(device),
                 "images": args.images, "exact": {}, "draft": {}, "tensor": {}, "parity": {},
                 "errors": []}
    cfg = PreprocessConfig()  # CLIP's: 224 px, bicubic, OpenAI mean/std
    out["image_size"] = cfg.image_size
    tf = ImageTransform(cfg)
    workers = max(args.threads)
    with ThreadPoolExecutor(min(workers, os.cpu_count() or 1)) as pool:
        blobs = list(pool.map(photo_jpeg, range(args.images)))  # ~640×480, quality 90
    out["mean_jpeg_bytes"] = sum(map(len, blobs)) / len(blobs)

    for name, fn in (("exact", exact_pixels), ("draft", draft_pixels)):
        for t in args.threads:
            try:
                out[name][str(t)] = threaded(partial(fn, tf), blobs, t)
            except Exception as e:
                out[name][str(t)] = error(e)

    tensor_pixels = None
    try:
        from clip_core.tensor_preprocess import TensorPreprocessor

        pre = TensorPreprocessor(cfg, device)
        batch = args.batch

        def run_all() -> list[torch.Tensor]:
            return [pre.pixels(blobs[i:i + batch]) for i in range(0, len(blobs), batch)]

        out["tensor"] = {"device": str(device), "batch": batch,
                         **rate(run_all, len(blobs), device, repeats=3, budget_s=5.0)}
        tensor_pixels = torch.cat([p.cpu() for p in run_all()])
        out["tensor"]["counts"] = dict(pre.counts)
    except Exception as e:
        out["tensor"] = {"error": error(e)}

    try:
        mcfg = TINY_PREPROCESS if args.tiny else load_architecture("ViT-B-32")
        model = build(mcfg, device, torch.float32)
        exact = tf.normalize(torch.stack([exact_pixels(tf, b) for b in blobs]))
        draft = tf.normalize(torch.stack([draft_pixels(tf, b) for b in blobs]))
        out["parity"]["model"] = "tiny-vit" if args.tiny else "ViT-B-32 (random weights)"
        out["parity"]["draft"] = parity(model, device, exact, draft, cfg)
        if tensor_pixels is not None:
            out["parity"]["tensor"] = parity(model, device, exact, tf.normalize(tensor_pixels),
                                             cfg)
    except Exception as e:
        out["errors"].append(f"parity: {error(e)}")
    return out


def print_preprocess(res: dict) -> None:
    env = res["env"]
    print(f"preprocessing {res['images']} JPEGs to {res.get('image_size')} px, "
          f"{env['cpu_count']} CPUs, device {env['device']}")
    print(f"{'threads':>8} {'exact img/s':>12} {'draft img/s':>12}")
    for t in res["exact"]:
        e, d = res["exact"][t], res["draft"].get(t)
        fmt = lambda v: f"{v:.0f}" if isinstance(v, float) else str(v)  # noqa: E731
        print(f"{t:>8} {fmt(e):>12} {fmt(d):>12}")
    tensor = res["tensor"]
    if "items_per_s" in tensor:
        print(f"tensor path on {tensor['device']}, batches of {tensor['batch']}: "
              f"{tensor['items_per_s']:.0f} img/s")
    else:
        print("tensor path:", tensor.get("error"))
    for name, p in res["parity"].items():
        if isinstance(p, dict):
            print(f"{name} vs exact: max {p['max_grey_levels']:.1f} grey levels "
                  f"(mean {p['mean_grey_levels']:.3f}), min cosine {p['min_cosine']:.6f}")
    for e in res["errors"]:
        print("error:", e)


# ---- CLI ----------------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("graphs", help="image images/s, eager against CUDA graphs")
    g.add_argument("--model", default="ViT-B-32")
    g.add_argument("--device", default="cuda")
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp16")
    g.add_argument("--batches", type=ints, default=[1, 8, 32, 64, 128, 256, 512, 1024])
    g.add_argument("--max-seconds", type=float, default=80.0,
                   help="stop starting new batch sizes after this long")
    pp = sub.add_parser("preprocess", help="preprocessing images/s and parity")
    pp.add_argument("--device", default="cuda")
    pp.add_argument("--threads", type=ints, default=[1, 2, 4, 8, 16])
    pp.add_argument("--images", type=int, default=256)
    pp.add_argument("--batch", type=int, default=64)
    for sp in (g, pp):
        sp.add_argument("--json", type=Path)
        sp.add_argument("--tiny", action="store_true", help="a tiny model on the CPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    bench, show = ((bench_graphs, print_graphs) if args.command == "graphs"
                   else (bench_preprocess, print_preprocess))
    try:
        res = bench(args)
    except Exception as e:  # the JSON still says what went wrong
        res = {"kind": args.command, "errors": [error(e)], "traceback": traceback.format_exc()}
    res["wall_s"] = time.perf_counter() - t0
    try:
        show(res)
    except Exception as e:
        print("could not print the table:", error(e))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

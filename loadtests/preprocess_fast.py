"""`CLIP_PREPROCESS=fast` against `exact`: what it saves and what it costs.

Speed: the decode pool's own work per image (`ImagePreparer.prepare_one`: sniff, header
check, decode, resize, crop), CPU time of one thread, median over repeats, on photo-like
JPEGs of about 640×480 (the load tests' `workloads.photo_jpeg`) and 1920×1080 (the same
recipe at that size, here). Then the pool's images/s at 1 and 2 threads for 64-image
requests, and the projection to a 16-core GPU host, whose default pool is 14 threads
(`service.tuning.decode_workers`).

Cost: the largest and the mean difference between the two modes' uint8 pixels; the cosine
between their embeddings with random ViT-B/32 weights (seeded; target >= 0.999, floor
0.995); and zero-shot agreement on the default model's (builtin/clip-shapes) test scenes,
drawn at 512 px and saved as JPEG so that draft mode has something to reduce.

    python loadtests/preprocess_fast.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workloads import photo_jpeg  # noqa: E402  (loadtests/ scripts import each other by name)

from clip_core.config import PreprocessConfig  # noqa: E402
from service.prepare import ImagePreparer  # noqa: E402

MODES = ("exact", "fast")
GPU_HOST_DECODERS = 14  # decode_workers("auto") on a 16-core host with a GPU


def photo(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG of width×height (quality 90): a gradient, soft shapes, noise."""
    rng = np.random.default_rng(seed)
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    t = np.linspace(0, 1, width, dtype=np.float32)[None, :] * rng.uniform(0.2, 1) \
        + np.linspace(0, 1, height, dtype=np.float32)[:, None] * rng.uniform(0.2, 1)
    t /= t.max()
    img = Image.fromarray((c0 + (c1 - c0) * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 16))):
        x0, y0 = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        x1 = x0 + int(rng.integers(width // 12, width // 2))
        y1 = y0 + int(rng.integers(height // 12, height // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    noise = rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray((np.asarray(img, np.int16) + noise).clip(0, 255).astype(np.uint8)).save(
        out, "JPEG", quality=90)
    return out.getvalue()


def image_sets(quick: bool) -> dict[str, list[bytes]]:
    n = 4 if quick else 12
    return {"640x480": [photo_jpeg(i) for i in range(n)],
            "1920x1080": [photo(1920, 1080, i) for i in range(n // 2 + 1)]}


def preparers(cfg: PreprocessConfig, workers: int = 1) -> dict[str, ImagePreparer]:
    # exif_orientation as the service's default; these JPEGs carry no EXIF.
    return {m: ImagePreparer(cfg, workers, mode=m, exif_orientation=True) for m in MODES}


VIT_B_32 = PreprocessConfig(image_size=224)  # OpenAI's mean, std and bicubic


def cpu_ms_per_image(prep: ImagePreparer, jpegs: list[bytes], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        for i, data in enumerate(jpegs):
            t0 = time.thread_time()
            prep.prepare_one(i, data)
            times.append(time.thread_time() - t0)
    return statistics.median(times) * 1e3


def pool_rate(prep: ImagePreparer, jpegs: list[bytes], rounds: int) -> float:
    """Images/s of wall time through the pool, 64-image requests back to back."""
    batch = [jpegs[i % len(jpegs)] for i in range(64)]

    async def go() -> float:
        await prep.prepare(batch)  # warm the threads
        t0 = time.perf_counter()
        for _ in range(rounds):
            await prep.prepare(batch)
        return rounds * len(batch) / (time.perf_counter() - t0)

    return asyncio.run(go())


def speed(sets: dict[str, list[bytes]], repeats: int, rounds: int) -> dict:
    out: dict = {}
    for name, jpegs in sets.items():
        preps = preparers(VIT_B_32)
        row = {m: cpu_ms_per_image(p, jpegs, repeats) for m, p in preps.items()}
        row["speedup"] = row["exact"] / row["fast"]
        for threads in (1, 2):
            for m, p in preparers(VIT_B_32, threads).items():
                row[f"{m}_{threads}t_images_s"] = pool_rate(p, jpegs, rounds)
                p.close()
        for m in MODES:
            one, two = row[f"{m}_1t_images_s"], row[f"{m}_2t_images_s"]
            row[f"{m}_scaling_2t"] = two / one
            # 14 decoders at the 1-thread rate times the per-thread efficiency seen at 2.
            row[f"{m}_16core_images_s"] = GPU_HOST_DECODERS * one * min(1.0, two / one / 2)
            row[f"{m}_16core_ideal_images_s"] = GPU_HOST_DECODERS * 1e3 / row[m]
        out[name] = row
    return out


def pixels_and_cosine(sets: dict[str, list[bytes]]) -> dict:
    import torch

    from clip_core.loader import load

    torch.manual_seed(0)
    loaded = load("ViT-B-32", random_weights=True)
    preps = preparers(loaded.preprocess)
    transform = preps["exact"].transform
    out = {}
    for name, jpegs in sets.items():
        px = {m: torch.stack([p.prepare_one(i, d) for i, d in enumerate(jpegs)])
              for m, p in preps.items()}  # (N, 3, 224, 224) uint8
        diff = (px["exact"].int() - px["fast"].int()).abs()
        with torch.no_grad():
            emb = {m: loaded.model.encode_image(transform.normalize(x), normalize=True)
                   for m, x in px.items()}  # (N, E)
        cos = (emb["exact"] * emb["fast"]).sum(dim=1)
        out[name] = {"max_pixel_diff": int(diff.max()), "mean_pixel_diff": float(diff.float().mean()),
                     "cosine_min": float(cos.min()), "cosine_median": float(cos.median())}
    return out


def zero_shot(per_combo: int) -> dict:
    """Colour+shape zero-shot labels of the default model on its test scenes, drawn at
    512 px and stored as JPEG (quality 90): agreement between exact and fast, and each
    mode's accuracy."""
    import torch

    from clip_core.evaluate import TEMPLATES
    from clip_core.loader import load
    from clip_core.registry import DEFAULT_MODEL
    from clip_core.scenes import COLOURS, SHAPES, SceneGenerator, with_article
    from clip_core.tokenizer import Tokenizer
    from clip_core.zeroshot import build_classifier

    loaded = load(DEFAULT_MODEL)
    model = loaded.model.float().eval()
    gen = SceneGenerator(512, supersample=1, split="all")
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    jpegs, truth = [], []
    for k, combo in enumerate(combos):
        for i in range(per_combo):
            rng = np.random.default_rng([1_000_001, k, i])
            buf = io.BytesIO()
            gen.render(gen.scene(rng, combo=combo), rng).save(buf, "JPEG", quality=90)
            jpegs.append(buf.getvalue())
            truth.append(k)
    preps = preparers(loaded.preprocess)
    tokenizer = Tokenizer(context_length=model.config.text.context_length)
    with torch.no_grad():
        classifier = build_classifier(model, tokenizer,
                                      [with_article(f"{c} {s}") for c, s in combos], TEMPLATES)
        pred = {}
        for m, p in preps.items():
            x = torch.stack([p.prepare_one(i, d) for i, d in enumerate(jpegs)])
            emb = model.encode_image(p.transform.normalize(x), normalize=True)
            pred[m] = (emb @ classifier.T).argmax(dim=1).numpy()
    t = np.array(truth)
    return {"scenes": len(jpegs), "agreement": float((pred["exact"] == pred["fast"]).mean()),
            "exact_accuracy": float((pred["exact"] == t).mean()),
            "fast_accuracy": float((pred["fast"] == t).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer images and repeats")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args()
    sets = image_sets(args.quick)
    report = {
        "speed": speed(sets, repeats=2 if args.quick else 5, rounds=1 if args.quick else 3),
        "quality": pixels_and_cosine(sets),
        "zero_shot": zero_shot(per_combo=1 if args.quick else 3),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print("decode pool, per image (CPU ms of one thread, median) and images/s of the pool")
    print(f"{'images':<10} {'exact ms':>9} {'fast ms':>8} {'speed-up':>9} "
          f"{'exact 1t/2t img/s':>18} {'fast 1t/2t img/s':>17} {'16-core exact/fast':>19}")
    for name, r in report["speed"].items():
        print(f"{name:<10} {r['exact']:>9.2f} {r['fast']:>8.2f} {r['speedup']:>8.1f}x "
              f"{r['exact_1t_images_s']:>8.0f}/{r['exact_2t_images_s']:<9.0f} "
              f"{r['fast_1t_images_s']:>7.0f}/{r['fast_2t_images_s']:<9.0f} "
              f"{r['exact_16core_images_s']:>9.0f}/{r['fast_16core_images_s']:<9.0f}")
    print("\nfast against exact: uint8 pixels, and embeddings with random ViT-B/32 weights")
    for name, q in report["quality"].items():
        print(f"{name:<10} max diff {q['max_pixel_diff']:>3}  mean diff {q['mean_pixel_diff']:.2f}  "
              f"cosine min {q['cosine_min']:.5f} median {q['cosine_median']:.5f}")
    z = report["zero_shot"]
    print(f"\nzero-shot colour+shape, default model, {z['scenes']} scenes at 512 px: "
          f"agreement {z['agreement']:.3f}, accuracy exact {z['exact_accuracy']:.3f} "
          f"fast {z['fast_accuracy']:.3f}")


if __name__ == "__main__":
    main()

"""Is ONNX Runtime's static int8 (QDQ, calibrated on photo-like images) better than the
dynamic int8 the onnxruntime engine serves? One model's image tower, both ways, against
its fp32 export: cosine to fp32 on held-out photo-like images, and images/s at batch 1
and 16, each timed in alternation with fp32 in one process.

    python loadtests/int8_static.py --model ViT-B-32 --export-cache /tmp/bench-exports

Random weights unless --real-weights (random weights understate quantisation error;
docs/benchmarks.md). The answer decides whether the engine offers static int8.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from clip_core.export import ExportTarget, calibration_images, ensure, quantize_dynamic_int8


def images_per_s(run, x: np.ndarray, min_time: float) -> float:
    run(x)  # warm
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time:
        run(x)
        n += len(x)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--export-cache", type=Path, default=Path(tempfile.gettempdir()) / "exports")
    p.add_argument("--calibration", type=int, default=64, help="calibration images")
    p.add_argument("--held-out", type=int, default=32, help="images the cosines are taken on")
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all)")
    p.add_argument("--real-weights", action="store_true", help="the registry's weights")
    args = p.parse_args(argv)

    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    random = not args.real_weights
    fp32 = ensure(args.model, ExportTarget("onnxruntime", "fp32"),
                  cache_dir=args.export_cache, random_weights=random)
    size = fp32.card.image_size
    # Both int8 graphs from this fp32 graph (random weights differ between builds).
    work = Path(tempfile.mkdtemp(prefix="int8-static-"))
    dynamic_image = quantize_dynamic_int8({"image": fp32.image}, work)["image"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            batches = calibration_images(args.calibration, size, seed=1)
            self._it = iter([{"input": batches[i:i + 8]} for i in range(0, len(batches), 8)])

        def get_next(self):
            return next(self._it, None)

    static_path = work / "image.static-qdq.onnx"
    start = time.perf_counter()
    quantize_static(str(fp32.image), str(static_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True)
    print(f"static QDQ calibration on {args.calibration} images: "
          f"{time.perf_counter() - start:.0f} s")

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def runner(path: Path):
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"input": x})[0]

    runs = {"fp32": runner(fp32.image), "dynamic int8": runner(dynamic_image),
            "static int8 (QDQ)": runner(static_path)}
    held = calibration_images(args.held_out, size, seed=2)  # not the calibration images
    ref = runs["fp32"](held)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    print(f"\n{args.model} image tower, {args.held_out} held-out photo-like images; "
          f"images/s medians of {args.repeats}, each beside fp32 in alternation\n")
    print("| int8 | cosine to fp32, min | mean | batch | images/s | fp32 images/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("dynamic int8", "static int8 (QDQ)"):
        out = runs[name](held)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        cos = (out * ref).sum(1)
        for batch in (1, 16):
            x = held[:batch]
            mine, base = [], []
            for _ in range(args.repeats):
                mine.append(images_per_s(runs[name], x, args.min_time))
                base.append(images_per_s(runs["fp32"], x, args.min_time))
            m, b = statistics.median(mine), statistics.median(base)
            print(f"| {name} | {cos.min():.4f} | {cos.mean():.4f} | {batch} | {m:.1f} | "
                  f"{b:.1f} | {m / b:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

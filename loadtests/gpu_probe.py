"""The in-process GPU questions of loadtests/gpu_check.sh, one subcommand (and process) each,
so a crash or a timeout in one leaves the others' answers:

    env     versions (Python, torch, CUDA, cuDNN, driver), the card, the carried packages
    parity  fp16 (and bf16) against fp32 at real size: cosines of normalised embeddings
    syncs   host syncs per image and text batch, counted by torch's sync-debug mode
    oom     an image batch far too big, through the service backend's OOM path, and after it
    raw     eager fp16 images/s and texts/s per batch size

    python3 loadtests/gpu_probe.py raw --json out/raw.json [--budget-s 50] [--dry-run]

Models are built on the device with random weights at their real size (ViT-B/32 and
ViT-L/14). --dry-run runs the same code on the CPU with two tiny ViTs in seconds, so the
script is exercised by `make test` where there is no GPU. Each subcommand writes its JSON
after every step and ends with one `headline` line, which the summary quotes.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import linecache
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_model import short_texts

from clip_core.config import (
    CLIPConfig,
    PreprocessConfig,
    TextConfig,
    VisionConfig,
    load_architecture,
)
from clip_core.loader import resolve_dtype
from clip_core.model import CLIP
from clip_core.tokenizer import Tokenizer

# Stand-ins for ViT-B/32 and ViT-L/14 in a dry run: every code path, milliseconds a batch.
_TINY_TEXT = TextConfig(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
TINY = {
    "tiny-a": CLIPConfig(embed_dim=32, text=_TINY_TEXT,
                         vision=VisionConfig(kind="vit", image_size=32, width=64, layers=2,
                                             patch_size=8)),
    "tiny-b": CLIPConfig(embed_dim=32, text=_TINY_TEXT,
                         vision=VisionConfig(kind="vit", image_size=48, width=64, layers=3,
                                             patch_size=8)),
}
CARRIED = ("fastapi", "starlette", "pydantic", "pydantic-core", "pydantic-settings", "uvicorn",
           "httptools", "python-multipart", "ftfy", "typing-extensions", "opentelemetry-api",
           "anyio", "h11", "click", "annotated-doc", "httpx", "httpcore", "numpy", "pillow",
           "prometheus-client", "uvloop", "nvidia-ml-py", "torchvision", "pytest")
PARITY_MIN_COSINE = 0.995  # fp16 below this is broken, not rounding


class Plan:
    """What a run measures: real sizes on CUDA, tiny ones on the CPU for a dry run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        # The served dtype; a dry run's is fp32 because CPU fp16 kernels are ~100x slower.
        self.dtype = torch.float32 if dry_run else torch.float16
        self.models = tuple(TINY) if dry_run else ("ViT-B-32", "ViT-L-14")
        self.image_batches = [2] if dry_run else [1, 8, 32, 64, 128, 256, 512, 1024]
        self.text_batches = [8] if dry_run else [64, 256, 1024]
        self.parity_items = 4 if dry_run else 32
        self.sync_batch = 8 if dry_run else 64
        self.oom_batch = 4 if dry_run else 1024  # ViT-L/14: ~2 GB for one MLP activation
        self.oom_headroom = 2 * 2**30  # bytes left free beside the filler
        self.run_s = 0.01 if dry_run else 0.1  # length of one timed run of k calls
        self.repeats = 1 if dry_run else 3  # timed runs, the median taken

    def config(self, name: str) -> CLIPConfig:
        return TINY[name] if name in TINY else load_architecture(name)

    def build(self, name: str, dtype: torch.dtype | None = None) -> CLIP:
        """Random weights (CLIP's own init, seeded), created on the device: building
        ViT-L/14 on the CPU first would cost seconds of a short lease."""
        torch.manual_seed(0)
        with torch.device(self.device):
            model = CLIP(self.config(name))
        return model.eval().to(dtype or self.dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


class Report:
    """A JSON file rewritten after every step, so a killed run keeps what it found."""

    def __init__(self, path: Path | None, **head: object):
        self.path = path
        self.data: dict = dict(head)

    def __setitem__(self, key: str, value: object) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def headline(self, text: str) -> None:
        self["headline"] = text
        print(f"headline: {text}", flush=True)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def env(plan: Plan, report: Report) -> int:
    report["python"] = sys.version.split()[0]
    report["platform"] = platform.platform()
    report["cpus"] = len(os.sched_getaffinity(0))
    report["torch"] = torch.__version__
    report["cuda_build"] = torch.version.cuda
    report["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    report["packages"] = {name: _version(name) for name in CARRIED}
    report["package_paths"] = {m: _origin(m) for m in ("fastapi", "pydantic", "typing_extensions")}
    card = "no CUDA"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        report["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                            "sms": p.multi_processor_count,
                            "memory_gib": round(p.total_memory / 2**30, 1),
                            "count": torch.cuda.device_count()}
        card = f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
        try:
            import pynvml

            pynvml.nvmlInit()
            report["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:  # the version is nice to have; nvidia-smi.txt has it too
            report["driver"] = f"unknown: {type(e).__name__}: {e}"
    # The service's whole import graph, with the carried wheels: fails here, not mid-run.
    try:
        import service.app  # noqa: F401

        report["service_import"] = "ok"
    except Exception as e:
        report["service_import"] = f"{type(e).__name__}: {e}"
    report.headline(f"{card}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
                    f"{report.data['cudnn']}, driver {report.data.get('driver', '-')}; "
                    f"service import {report.data['service_import']}")
    return 0 if report.data["service_import"] == "ok" else 1


def _origin(module: str) -> str | None:
    try:
        return str(Path(__import__(module).__file__).parent)
    except Exception:
        return None


def _texts(n: int, seed: int = 0) -> list[str]:
    """Captions of 2-12 words, one in eight a long paragraph truncated at 77 tokens: the
    lengths differ enough that the tower packs them."""
    out = short_texts(n, seed)
    for i in range(0, n, 8):
        out[i] = " ".join([out[i]] * 12)
    return out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    c = F.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1)
    return {"min": round(float(c.min()), 6), "mean": round(float(c.mean()), 6)}


def parity(plan: Plan, report: Report) -> int:
    tokenizer = Tokenizer()
    worst = 1.0
    parts = []
    for name in plan.models:
        ref = plan.build(name, torch.float32)
        s = ref.config.vision.image_size
        g = torch.Generator().manual_seed(1)
        images = torch.randn(plan.parity_items, 3, s, s, generator=g)
        tokens = tokenizer(_texts(plan.parity_items)).ids  # (N, 77), CPU
        with torch.inference_mode():
            want_img = ref.encode_image(images.to(plan.device), normalize=True)
            want_txt = ref.encode_text(tokens, normalize=True)
            result: dict = {}
            for dtype in ("fp16", "bf16"):
                model = copy.deepcopy(ref).to(resolve_dtype(dtype, plan.device))
                result[dtype] = {  # encode_image casts the pixels to the model's dtype
                    "image": _cosine(want_img, model.encode_image(
                        images.to(plan.device), normalize=True)),
                    "text": _cosine(want_txt, model.encode_text(tokens, normalize=True)),
                }
                del model
            if plan.device.type == "cuda" and name == plan.models[0]:
                # The CUDA kernels against the CPU's, both fp32: a wrong kernel, not rounding.
                cpu = copy.deepcopy(ref).cpu()
                result["cuda_fp32_vs_cpu_fp32"] = {
                    "image": _cosine(want_img, cpu.encode_image(images, normalize=True)),
                    "text": _cosine(want_txt, cpu.encode_text(tokens, normalize=True))}
        report[name] = result
        worst = min(worst, result["fp16"]["image"]["min"], result["fp16"]["text"]["min"])
        parts.append(f"{name} img {result['fp16']['image']['min']:.5f} "
                     f"txt {result['fp16']['text']['min']:.5f}")
        del ref
        _free(plan)
    report.headline(f"fp16 vs fp32, min cosine of {plan.parity_items}: " + "; ".join(parts))
    return 0 if worst >= PARITY_MIN_COSINE else 1


def _free(plan: Plan) -> None:
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()


def count_syncs(plan: Plan, fn: Callable[[], object]) -> dict:
    """Host syncs during one call of fn, after an untimed one: torch's sync-debug mode warns
    at each, and the warning's place is the Python line that caused it."""
    with torch.inference_mode():
        fn()
        plan.sync()
        if plan.device.type != "cuda":
            fn()
            return {"count": None, "where": {}, "note": "no CUDA: the calls ran, nothing counted"}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        plan.sync()
    # torch/cuda/__init__.py warns once that the mode is a prototype: not a sync.
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()
             and "prototype feature" not in str(w.message)]
    # The backend's `.cpu()` that returns the (B, E) result is the one sync it must make.
    reads = [w for w in syncs if Path(w.filename).name == "backend.py"
             and ".cpu()" in linecache.getline(w.filename, w.lineno)]
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs if w not in reads)
    return {"count": len(syncs) - len(reads), "result_read": len(reads), "where": dict(where)}


def syncs(plan: Plan, report: Report) -> int:
    name = plan.models[0]
    model = plan.build(name)
    s, n = model.config.vision.image_size, plan.sync_batch
    images = torch.randn(n, 3, s, s, device=plan.device, dtype=model.dtype)
    rows = Tokenizer().rows(_texts(n)).ids
    lengths = [len(r) for r in rows]
    host = torch.tensor([r + [0] * (max(lengths) - len(r)) for r in rows])  # (B, longest)
    device = host.to(plan.device)
    report["model"] = f"{name} {model.dtype}, batch {n}"
    cases = {
        "image": lambda: model.encode_image(images),
        "text_device_tokens_host_lengths": lambda: model.encode_text(device, lengths=lengths),
        "text_cpu_tokens": lambda: model.encode_text(host),
        "text_device_tokens_no_lengths": lambda: model.encode_text(device),
    }
    counts = {}
    for case, fn in cases.items():
        counts[case] = count_syncs(plan, fn)
        report["model_calls"] = counts
    # The service's backend around the model: collation, the copy, the result's read.
    try:
        backend = _backend(name, model)
        pixels = list(torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8))
        report["backend_calls"] = {
            "image": count_syncs(plan, lambda: backend.run("image", pixels)),
            "text": count_syncs(plan, lambda: backend.run("text", rows)),
            "note": "count: syncs besides the (B, E) result's read back (result_read), "
                    "which is the floor: 0 and 1 expected"}
    except Exception as e:
        report["backend_calls"] = {"error": f"{type(e).__name__}: {e}"}
    c = {k: v["count"] for k, v in counts.items()}
    b = report.data["backend_calls"]
    report.headline(
        f"syncs per batch of {n}: image {c['image']}, text with host lengths "
        f"{c['text_device_tokens_host_lengths']}, text from CPU tokens {c['text_cpu_tokens']}, "
        f"text on device without lengths {c['text_device_tokens_no_lengths']}; backend image "
        f"{_backend_syncs(b.get('image'))}, text {_backend_syncs(b.get('text'))}")
    return 0


def _backend_syncs(c: dict | None) -> str:
    if not c or c.get("count") is None:
        return "-"
    return f"{c['count']} + {c['result_read']} result read"


def _backend(name: str, model: CLIP):
    """The service's ClipBackend around `model` (imported here: it needs the service)."""
    from clip_core.loader import LoadedModel
    from service.backend import ClipBackend

    size = model.config.vision.image_size
    return ClipBackend(LoadedModel(name, model, PreprocessConfig(image_size=size), "random"))


def oom(plan: Plan, report: Report) -> int:
    """Fill the card but for a little, send an image batch that cannot fit, then check that
    a small batch still works beside the filler and a large one once it is freed."""
    from service.errors import OutOfMemory

    name = plan.models[-1]
    model = plan.build(name)
    backend = _backend(name, model)
    s = model.config.vision.image_size
    pixels = list(torch.randint(0, 256, (plan.oom_batch, 3, s, s), dtype=torch.uint8))
    small = pixels[:8]
    before = backend.run("image", small)
    report["model"] = f"{name} {model.dtype}"
    filler = None
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()  # cached blocks would add to the headroom
        free, _ = torch.cuda.mem_get_info()
        size = max(0, free - plan.oom_headroom)
        while filler is None:  # one plain cudaMalloc; a little less if that much will not go
            try:
                filler = torch.empty(size, dtype=torch.uint8, device=plan.device)
            except torch.cuda.OutOfMemoryError:
                size -= 2**30
        report["filler_gib"] = round(size / 2**30, 1)
        report["free_gib_beside_filler"] = round(torch.cuda.mem_get_info()[0] / 2**30, 2)
    else:
        # No card to fill: the model raises what CUDA would, once, so the same path runs.
        encode = model.encode_image

        def fails_once(*args, **kwargs):
            model.encode_image = encode
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (dry run: simulated)")
        model.encode_image = fails_once
    start = time.perf_counter()
    try:
        backend.run("image", pixels)
        outcome = "no error: the batch fit"
    except OutOfMemory as e:
        outcome = f"OutOfMemory: {e}"
    except Exception as e:
        outcome = f"other error {type(e).__name__}: {e}"
    report["big_batch"] = {"images": len(pixels), "outcome": outcome,
                           "seconds": round(time.perf_counter() - start, 3)}
    results = {"small_beside_filler": _attempt(backend, small, before)}
    del filler
    _free(plan)
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results["big_after_freeing"] = _attempt(backend, pixels[:256], None)
    results["text_after"] = _attempt_text(backend)
    report["after"] = results
    if plan.device.type == "cuda":  # what the 256-image batch needed
        report["peak_gib_after_freeing"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    ok = outcome.startswith("OutOfMemory") and all(r["ok"] for r in results.values())
    room = "simulated" if plan.dry_run else f"{plan.oom_headroom / 2**30:.0f} GiB free"
    report.headline(f"{name} image batch of {len(pixels)} ({room}): "
                    f"{outcome.split(':')[0]}; after: "
                    + ", ".join(f"{k} {'ok' if v['ok'] else 'FAILED'}" for k, v in results.items()))
    return 0 if ok else 1


def _attempt(backend, batch, expected) -> dict:
    try:
        out = backend.run("image", batch)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    result: dict = {"ok": len(out) == len(batch), "items": len(out)}
    if expected is not None:  # the same pixels give the same embeddings as before the OOM
        a = torch.from_numpy(np.stack(expected[: len(out)]))
        b = torch.from_numpy(np.stack(out[: len(expected)]))
        result["cosine_to_before"] = _cosine(a, b)
        result["ok"] = result["ok"] and result["cosine_to_before"]["min"] > 0.9999
    return result


def _attempt_text(backend) -> dict:
    rows = Tokenizer().rows(_texts(16)).ids
    try:
        return {"ok": len(backend.run("text", rows)) == 16}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def timed(plan: Plan, fn: Callable[[], object]) -> float:
    """Median seconds per call: two untimed calls, then `plan.repeats` runs of k calls with
    the device synchronised around each run, k sized so a run lasts about `plan.run_s`."""
    with torch.inference_mode():
        fn()
        fn()
        plan.sync()
        start = time.perf_counter()
        fn()
        plan.sync()
        one = time.perf_counter() - start
        k = max(1, min(50, math.ceil(plan.run_s / max(one, 1e-6))))
        samples = []
        for _ in range(plan.repeats):
            plan.sync()
            start = time.perf_counter()
            for _ in range(k):
                fn()
            plan.sync()
            samples.append((time.perf_counter() - start) / k)
    return statistics.median(samples)


def raw(plan: Plan, report: Report, budget_s: float) -> int:
    deadline = time.monotonic() + budget_s
    tokenizer = Tokenizer()
    best = []
    for name in plan.models:
        model = plan.build(name)
        s = model.config.vision.image_size
        result: dict = {"images_per_s": {}, "texts_per_s": {}, "image_ms": {}, "peak_gib": {}}
        for bs in plan.image_batches:
            if time.monotonic() > deadline:
                result["images_per_s"][bs] = "skipped: budget"
                continue
            try:
                x = torch.randn(bs, 3, s, s, device=plan.device, dtype=model.dtype)
                if plan.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t = timed(plan, lambda m=model, x=x: m.encode_image(x))
                result["images_per_s"][bs] = round(bs / t, 1)
                result["image_ms"][bs] = round(t * 1000, 2)
                if plan.device.type == "cuda":
                    result["peak_gib"][bs] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                del x
            except torch.cuda.OutOfMemoryError:
                result["images_per_s"][bs] = "out of memory"
            _free(plan)
            report[name] = result
        for bs in plan.text_batches:
            if time.monotonic() > deadline:
                result["texts_per_s"][bs] = "skipped: budget"
                continue
            rows = tokenizer.rows(short_texts(bs, seed=bs)).ids  # 2-12 words each
            lengths = [len(r) for r in rows]
            ids = torch.tensor([r + [0] * (max(lengths) - len(r)) for r in rows])
            ids = ids.to(plan.device)
            t = timed(plan, lambda m=model, ids=ids, lens=lengths: m.encode_text(ids, lengths=lens))
            result["texts_per_s"][bs] = round(bs / t, 1)
            report[name] = result
        numeric = {k: v for k, v in result["images_per_s"].items() if isinstance(v, float)}
        if numeric:
            top = max(numeric, key=numeric.__getitem__)
            best.append(f"{name} {numeric[top]:.0f} images/s at {top}")
        del model
        _free(plan)
    report.headline(f"{str(plan.dtype).removeprefix('torch.')} eager, best: " + "; ".join(best))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["env", "parity", "syncs", "oom", "raw"])
    p.add_argument("--json", type=Path, help="write the answers here")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, seconds")
    p.add_argument("--budget-s", type=float, default=50.0,
                   help="raw: start no new batch size after this many seconds")
    args = p.parse_args(argv)
    plan = Plan(args.dry_run)
    if not args.dry_run and not torch.cuda.is_available() and args.what != "env":
        print("no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    report = Report(args.json, what=args.what, dry_run=args.dry_run, device=str(plan.device))
    if args.what == "raw":
        return raw(plan, report, args.budget_s)
    return {"env": env, "parity": parity, "syncs": syncs, "oom": oom}[args.what](plan, report)


if __name__ == "__main__":
    sys.exit(main())

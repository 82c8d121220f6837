"""The in-process references of the service benchmark (loadtests/bench.py).

The model is built the way the server builds it (`clip_core.loader.load` with random
weights at the architecture's real size, in the server's dtype), and timed with
bench_model's helpers: items/s per batch size, the median of batch-1 image latency,
our text tower on short texts, and open_clip's text tower, which always computes all 77
positions. Optionally bf16 against fp32: speed and how far the embeddings move.
"""

from __future__ import annotations

import copy
import gc
import statistics
import threading
import time
from collections.abc import Callable

import torch
from bench_model import _rate, short_texts
from workloads import image_pool

from clip_core.config import CLIPConfig
from clip_core.loader import LoadedModel, load
from clip_core.model import CLIP
from clip_core.preprocess import ImageTransform, open_image
from clip_core.tokenizer import Tokenizer


def _call(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], None]:
    # On CUDA a call returns before the kernels finish: wait for them, or we time launches.
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def call() -> None:
        with torch.inference_mode():
            fn(x)
        sync()
    return call


def rates(fn: Callable[[torch.Tensor], object], inputs: dict[int, torch.Tensor],
          min_time: float, repeats: int) -> dict[int, float]:
    """Median items/s per batch size, after one untimed call at each size."""
    out = {}
    for bs, x in inputs.items():
        call = _call(fn, x)
        call()
        out[bs] = statistics.median(_rate(call, bs, min_time) for _ in range(repeats))
    return out


def side_by_side(fn: Callable[[torch.Tensor], object], x: torch.Tensor, streams: int,
                 min_time: float) -> float:
    """Items/s of `streams` threads each calling fn(x) on its share of the cores at once:
    the ceiling the server's CPU streams (service.batcher) aim at."""
    share = max(1, torch.get_num_threads() // streams)

    def lane() -> Callable[[], None]:
        torch.set_num_threads(share)  # this thread's own pool (OpenMP's count is per thread)
        return _call(fn, x)

    return together([lane] * streams, x.shape[0], min_time)


def together(lanes: list[Callable[[], Callable[[], object]]], batch: int,
             min_time: float) -> float:
    """Items/s of one thread per lane, all calling at once, `batch` items a call: each
    thread makes its call with `lane()` (in the thread), calls it once untimed, then
    times it from a common start."""
    ready = threading.Barrier(len(lanes))
    rates_: list[float] = []

    def work(lane: Callable[[], Callable[[], object]]) -> None:
        call = lane()
        call()
        ready.wait()
        rates_.append(_rate(call, batch, min_time))

    threads = [threading.Thread(target=work, args=(lane,)) for lane in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(rates_)


def best(by_batch: dict[int, float]) -> dict:
    bs = max(by_batch, key=by_batch.__getitem__)
    return {"batch": bs, "items_per_s": by_batch[bs]}


def image_inputs(model: CLIP, batch_sizes: list[int]) -> dict[int, torch.Tensor]:
    size = model.config.vision.image_size
    g = torch.Generator().manual_seed(0)
    return {bs: torch.randn(bs, 3, size, size, generator=g).to(model.device, model.dtype)
            for bs in batch_sizes}


def text_inputs(batch_sizes: list[int], tokenizer: Tokenizer,
                device: torch.device | str = "cpu") -> dict[int, torch.Tensor]:
    """(B, 77) ids of 2-12 word texts: ours trims them, open_clip computes all 77."""
    return {bs: tokenizer(short_texts(bs, seed=bs)).ids.to(device) for bs in batch_sizes}


def batch1_latency_s(model: CLIP, n: int) -> float:
    call = _call(model.encode_image, image_inputs(model, [1])[1])
    call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def preprocess_ms(loaded: LoadedModel, n: int = 16) -> float:
    """Median time to decode and resize one of the load tests' JPEGs, as the server does."""
    transform = ImageTransform(loaded.preprocess)
    times = []
    for jpeg in image_pool().jpegs[:n]:
        start = time.perf_counter()
        transform.pixels(open_image(jpeg))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def open_clip_text_model(cfg: CLIPConfig) -> torch.nn.Module:
    """open_clip's CLIP with our architecture's shapes (open_clip imported here only)."""
    import open_clip

    v = cfg.vision
    vision = {"image_size": v.image_size, "width": v.width,
              "head_width": (v.width // v.n_heads if v.kind == "vit" else v.width * 32 // v.n_heads),
              "layers": list(v.layers) if isinstance(v.layers, tuple) else v.layers}
    if v.kind == "vit":
        vision["patch_size"] = v.patch_size
    t = cfg.text
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
            "heads": t.heads, "layers": t.layers}
    torch.manual_seed(0)
    return open_clip.CLIP(cfg.embed_dim, vision, text, quick_gelu=cfg.act == "quick_gelu").eval()


def cosines(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    c = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return {"min": float(c.min()), "mean": float(c.mean())}


def measure(model_name: str, dtype: str, batch_sizes: list[int], min_time: float,
            repeats: int, latency_calls: int, bf16: bool, device: str = "cpu") -> dict:
    """Every raw number the benchmark's targets refer to, in this process."""
    loaded = load(model_name, device=device, dtype=dtype, random_weights=True, progress=False)
    model, tokenizer = loaded.model.eval(), Tokenizer()
    texts = text_inputs(batch_sizes, tokenizer, model.device)
    out: dict = {"model": loaded.name, "dtype": str(model.dtype).removeprefix("torch."),
                 "device": str(model.device),
                 "threads": torch.get_num_threads(), "batch_sizes": batch_sizes}
    print("raw: images ...", flush=True)
    out["image_per_s"] = rates(model.encode_image, image_inputs(model, batch_sizes),
                               min_time, repeats)
    out["image_best"] = best(out["image_per_s"])
    out["image_batch1_ms"] = batch1_latency_s(model, latency_calls) * 1000
    out["preprocess_ms"] = preprocess_ms(loaded)
    print("raw: texts ...", flush=True)
    out["text_per_s"] = rates(model.encode_text, texts, min_time, repeats)
    out["text_best"] = best(out["text_per_s"])
    try:
        ref = open_clip_text_model(model.config).to(model.device, model.dtype)
    except Exception as e:  # not installed, or a shape open_clip cannot build
        out["open_clip"] = {"unavailable": f"{type(e).__name__}: {e}"}
    else:
        print("raw: open_clip texts (77 positions) ...", flush=True)
        per_s = rates(ref.encode_text, texts, min_time, repeats)
        out["open_clip"] = {"text77_per_s": per_s, "text77_best": best(per_s)}
        del ref
    if model.device.type == "cpu" and out["threads"] >= 2:
        print("raw: two streams side by side ...", flush=True)
        ib, tb = out["image_best"]["batch"], out["text_best"]["batch"]
        out["streams"] = {
            "streams": 2, "image_batch": ib, "text_batch": tb,
            "image_per_s": side_by_side(model.encode_image, image_inputs(model, [ib])[ib], 2,
                                        min_time),
            "text_per_s": side_by_side(model.encode_text, texts[tb], 2, min_time),
        }
    if bf16 and model.device.type == "cpu":
        print("raw: bf16 against fp32 ...", flush=True)
        out["bf16"] = compare_bf16(model, loaded, tokenizer, batch_sizes, min_time, repeats)
    del model, loaded
    gc.collect()
    return out


def compare_bf16(model: CLIP, loaded: LoadedModel, tokenizer: Tokenizer,
                 batch_sizes: list[int], min_time: float, repeats: int) -> dict:
    """bf16 against fp32 on the same weights: best-batch speed of each tower, and the
    cosine between the two dtypes' embeddings of the pool's photos and short texts."""
    fp32 = copy.deepcopy(model).float()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bs = max(batch_sizes)
    texts = text_inputs([bs], tokenizer)
    speed = {}
    for kind, inputs in (("image", lambda m: image_inputs(m, [bs])), ("text", lambda m: texts)):
        a = rates(getattr(fp32, f"encode_{kind}"), inputs(fp32), min_time, repeats)[bs]
        b = rates(getattr(bf16, f"encode_{kind}"), inputs(bf16), min_time, repeats)[bs]
        speed[kind] = {"batch": bs, "fp32_per_s": a, "bf16_per_s": b, "speedup": b / a}
    transform = ImageTransform(loaded.preprocess)
    pixels = transform.batch([open_image(j) for j in image_pool().jpegs[:8]])
    ids = tokenizer(short_texts(8, seed=99)).ids
    with torch.inference_mode():
        image_cos = cosines(fp32.encode_image(pixels), bf16.encode_image(pixels))
        text_cos = cosines(fp32.encode_text(ids), bf16.encode_text(ids))
    return {"speed": speed, "cosine": {"image": image_cos, "text": text_cos},
            "note": "random weights: trained weights may differ"}

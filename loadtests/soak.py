"""A bounded soak: a real clip-serve on 127.0.0.1 under mixed valid and hostile traffic,
its resident memory sampled over time.

    python loadtests/soak.py --duration 600 --warmup 300 --concurrency 3

Valid requests (unique random texts, so the text cache fills and must stay bounded;
random images; classify, similarity, /v1/embeddings) must get 200; hostile ones
(decompression bombs, foreign formats, truncated and random bytes, bad base64, lone
surrogates, megabyte strings, oversize bodies, too many items, garbage JSON) must get a
4xx. Any other answer is counted as an error. The server's RSS (/proc/PID/status) is
sampled every --sample-every seconds; after --warmup seconds the growth to the end and
the slope are reported, and the exit status is non-zero when the growth passes
--max-growth-mb or any request got a wrong answer.

Warm-up is when the bounded caches fill: the text-embedding cache (--cache-size entries)
and the tokenizer's per-word BPE cache (65,536 words), which unique random texts fill in
roughly ten thousand requests; after that, memory should only wobble.

Without --model a tiny random CLIP is built in a temporary folder (seconds, on the CPU),
so the soak measures the service, not the model. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import string
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from serverproc import ROOT, ServerDidNotStart, ServerProcess, rss_mb


def tiny_checkpoint(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    import torch

    from clip_core.checkpoint import save_checkpoint
    from clip_core.config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
    from clip_core.model import CLIP

    torch.manual_seed(0)
    cfg = CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(kind="vit", image_size=32, width=128, layers=2, patch_size=8),
        text=TextConfig(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
    )
    path = folder / "soak-tiny.safetensors"
    save_checkpoint(CLIP(cfg).eval(), path, PreprocessConfig(image_size=32))
    return path


# ---- traffic ----


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png(rng: random.Random, size: tuple[int, int] | None = None) -> bytes:
    w, h = size or (rng.randint(8, 160), rng.randint(8, 160))
    pixels = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (h, w, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, rng.choice(["PNG", "JPEG", "WEBP"]))
    return buf.getvalue()


def _bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


def _text(rng: random.Random) -> str:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
             for _ in range(rng.randint(2, 12))]
    return " ".join(words) + f" {rng.getrandbits(64):x}"  # unique: the cache must cope


def valid(rng: random.Random) -> tuple[str, dict]:
    kind = rng.choice(["texts", "texts", "images", "classify", "similarity", "openai", "mixed"])
    if kind == "texts":
        return "/embed", {"texts": [_text(rng) for _ in range(rng.randint(1, 8))]}
    if kind == "images":
        return "/embed", {"images": [_b64(_png(rng)) for _ in range(rng.randint(1, 4))]}
    if kind == "classify":
        return "/classify", {"images": [_b64(_png(rng))],
                             "labels": list({_text(rng) for _ in range(rng.randint(2, 5))})}
    if kind == "similarity":
        return "/similarity", {"queries": {"images": [_b64(_png(rng))]},
                               "candidates": {"texts": [_text(rng) for _ in range(3)]}}
    if kind == "openai":
        return "/v1/embeddings", {"input": [_text(rng) for _ in range(rng.randint(1, 4))]}
    return "/embed", {"texts": [_text(rng)], "images": [_b64(_png(rng))],
                      "encoding": "base64", "truncate": rng.random() < 0.5}


HOSTILE_KINDS = ["bomb", "pdf", "truncated", "random", "zeros", "bad_base64", "data_uri",
                 "surrogate", "megabyte", "too_many", "unknown_field", "garbage_json",
                 "empty", "oversize", "bad_timeout", "url"]


def hostile(rng: random.Random, body_cap: int) -> tuple[str, dict | bytes, dict]:
    """(path, body, extra headers): a request the service must refuse with a 4xx."""
    kind = rng.choice(HOSTILE_KINDS)
    images = {
        "bomb": _bomb(),
        "pdf": b"%PDF-1.7\n" + rng.randbytes(200),
        "truncated": _png(rng, (64, 64))[:120],
        "random": rng.randbytes(rng.randint(1, 5000)),
        "zeros": b"\0" * rng.randint(1, 5000),
    }
    if kind in images:
        return "/embed", {"images": [_b64(images[kind])]}, {}
    if kind == "bad_base64":
        return "/embed", {"images": ["not base64 at all %$#"]}, {}
    if kind == "data_uri":
        return "/embed", {"images": ["data:text/html;base64," + _b64(b"<p>")]}, {}
    if kind == "surrogate":
        body = json.dumps({"texts": ["ok", "bad \ud800 " + _text(rng)]}).encode()
        return "/embed", body, {}
    if kind == "megabyte":
        return "/embed", {"texts": [_text(rng) * 10_000]}, {}
    if kind == "too_many":
        return "/v1/embeddings", {"input": [_text(rng) for _ in range(2000)]}, {}
    if kind == "unknown_field":
        return "/embed", {"texts": [_text(rng)], _text(rng): 1}, {}
    if kind == "garbage_json":
        return "/classify", b"{" + rng.randbytes(300), {}
    if kind == "empty":
        return rng.choice(["/embed", "/classify", "/similarity"]), {}, {}
    if kind == "oversize":
        return "/embed", b'{"texts": ["' + b"a" * (body_cap + 1) + b'"]}', {}
    if kind == "bad_timeout":
        return "/embed", {"texts": [_text(rng)]}, {"X-Request-Timeout": "-5"}
    return "/embed", {"images": ["http://127.0.0.1:9/x.png"]}, {}  # URLs are off


async def soak(args: argparse.Namespace, url: str, pid: int) -> dict:
    rng = random.Random(args.seed)
    outcomes: Counter[str] = Counter()
    wrong: list[str] = []
    samples: list[tuple[float, float, int]] = []  # (seconds, RSS MB, requests so far)
    start = time.monotonic()
    end = start + args.duration
    sent = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.monotonic() < end and sent < args.max_requests:
            sent += 1
            bad = rng.random() < args.hostile_share
            if bad:
                path, body, headers = hostile(rng, args.body_cap)
            else:
                (path, body), headers = valid(rng), {}
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                r = await client.post(path, content=content,
                                      headers={"content-type": "application/json", **headers})
                status = r.status_code
            except httpx.HTTPError as e:
                status = 0
                wrong.append(f"{path}: {type(e).__name__}")
            ok = (400 <= status < 500) if bad else status == 200
            outcomes[f"{'hostile' if bad else 'valid'} {status}"] += 1
            if not ok and status:
                wrong.append(f"{'hostile' if bad else 'valid'} {path} -> {status}: "
                             f"{r.text[:200]}")

    async def sampler() -> None:
        while time.monotonic() < end and sent < args.max_requests:
            samples.append((time.monotonic() - start, rss_mb(pid), sent))
            print(f"  t={samples[-1][0]:6.1f} s  rss={samples[-1][1]:7.1f} MB  "
                  f"requests={sent}", flush=True)
            await asyncio.sleep(args.sample_every)
        samples.append((time.monotonic() - start, rss_mb(pid), sent))

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(sampler(), *(worker(client) for _ in range(args.concurrency)))

    after = [(t, m) for t, m, _ in samples if t >= args.warmup]
    if len(after) < 2:
        after = [(t, m) for t, m, _ in samples[-2:]]
    ts, ms = np.array([t for t, _ in after]), np.array([m for _, m in after])
    slope = float(np.polyfit(ts, ms, 1)[0] * 60) if len(after) >= 2 else 0.0
    return {
        "requests": sent,
        "seconds": round(samples[-1][0], 1),
        "outcomes": dict(sorted(outcomes.items())),
        "wrong": wrong[:20],
        "n_wrong": len(wrong),
        "rss_start_mb": round(samples[0][1], 1),
        "rss_after_warmup_mb": round(after[0][1], 1),
        "rss_end_mb": round(samples[-1][1], 1),
        "rss_max_after_warmup_mb": round(float(ms.max()), 1),
        "growth_after_warmup_mb": round(float(ms.max() - after[0][1]), 1),
        "slope_after_warmup_mb_per_min": round(slope, 2),
        "samples": [(round(t, 1), round(m, 1), n) for t, m, n in samples],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint or registry name; default: a tiny random CLIP")
    p.add_argument("--duration", type=float, default=600, help="seconds of traffic (bound)")
    p.add_argument("--max-requests", type=int, default=200_000, help="requests (bound)")
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--hostile-share", type=float, default=0.35)
    p.add_argument("--warmup", type=float, default=300, help="seconds before growth counts")
    p.add_argument("--sample-every", type=float, default=15)
    p.add_argument("--max-growth-mb", type=float, default=25)
    p.add_argument("--body-cap", type=int, default=4 * 2**20, help="the server's body cap")
    p.add_argument("--cache-size", type=int, default=2000, help="the server's text cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        model = args.model or str(tiny_checkpoint(Path(tmp)))
        env = {"CLIP_LOG_FORMAT": "text", "CLIP_LOG_LEVEL": "warning",
               "CLIP_MAX_BODY_BYTES": str(args.body_cap),
               "CLIP_CACHE_SIZE": str(args.cache_size)}
        server = ServerProcess(["--model", model], env)
        try:
            try:
                server.wait_ready(120)
            except ServerDidNotStart:
                print("server did not start", file=sys.stderr)
                return 2
            print(f"soak: {args.duration:.0f} s, concurrency {args.concurrency}, "
                  f"{args.hostile_share:.0%} hostile, model {args.model or 'tiny random'}")
            summary = asyncio.run(soak(args, server.url, server.pid))
        finally:
            server.stop(30)
    summary["server_exit"] = server.returncode
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    flat = summary["growth_after_warmup_mb"] <= args.max_growth_mb
    clean = summary["n_wrong"] == 0 and summary["server_exit"] == 0
    print(f"memory {'flat' if flat else 'GROWING'} after warm-up "
          f"({summary['growth_after_warmup_mb']} MB, limit {args.max_growth_mb} MB); "
          f"{summary['n_wrong']} wrong answers")
    return 0 if flat and clean else 1


if __name__ == "__main__":
    sys.exit(main())

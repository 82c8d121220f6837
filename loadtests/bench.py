"""The service benchmark: the raw model and the real server, measured in one run and held
against the service's targets.

    python loadtests/bench.py --model ViT-B-32 --dtype fp32 --out out/bench
    python loadtests/bench.py --model ViT-B-32 --dtype fp32 --repeats 3 --bf16 --out out/bench
    python loadtests/bench.py --quick --model builtin/clip-shapes --out /tmp/bench   # smoke run

First, with no server running, the model is timed in this process (loadtests/bench_raw.py)
with the torch thread count the server will use. Then `python -m service --random-weights`
is started on 127.0.0.1 and driven by loadtests/loadgen.py:

  idle      sequential 1-image requests, after a few warm-ups: p50 latency
  image1    closed loop, 16 callers, 1 image per request
  text      closed loop, 32 callers, 1 unique short text per request
  classify  closed loop, 16 callers, 1 image against the same 10 labels
  image16   closed loop, 2 callers, 16 images per request
  overload  open loop (Poisson) at twice image1's measured rate, the server's RSS read
            every second from /proc

--engine onnxruntime|openvino serves the model from its export (CLIP_ENGINE) and times that
engine's raw towers instead of torch's (engine_raw): the service is held against its own
engine. The export is built here first, into the cache the server is pointed at.

--repeats N runs image1..image16 N times and takes medians. The server is always stopped
at the end (SIGTERM, then SIGKILL). A missed target is reported as FAIL and the exit status
stays 0 unless --strict. Writes report.json, report.md, server.log and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import loadgen
import torch
from loadgen import Clients, RunConfig, send, settle
from serverproc import ServerDidNotStart, ServerProcess, cpu_s, proc_status_mb, rss_mb
from stats import format_report, percentiles
from workloads import Workload, image_pool

BATCH_SIZES = [1, 4, 8, 16, 32]
# Closed-loop phases: (name, workload, callers). The targets below name them.
# image16 has two callers: on a CPU one 16-image request is ~0.7 s of ViT-B/32, and more
# callers only queue past the server's wait bound and get refused (which is its job).
PHASES = [("image1", "image1", 16), ("text", "text", 32), ("classify", "classify", 16),
          ("image16", "image16", 2)]
IDLE_LATENCY_BUDGET_MS = 15.0  # HTTP, JSON, base64, JPEG decode and resize
OVERLOAD_P99_S = 2.0
RSS_LIMIT_MB = 1.3e9 / 2**20  # the target's 1.3 GB (10^9 bytes) in MiB, as /proc counts: 1,239.8
IDLE_RSS_AFTER_S = 4.0  # after the last phase: the server's idle release, and a margin
RSS_GROWTH_MB, RSS_GROWTH_SHARE = 20.0, 0.02  # flat: growth within the larger of these


@dataclass(frozen=True)
class Plan:
    duration: float
    warmup: float
    overload_duration: float
    rss_settle: float  # seconds of overload before RSS must stay flat
    idle_requests: int
    raw_min_time: float
    raw_repeats: int


FULL = Plan(30, 5, 60, 10, 30, 1.5, 3)
QUICK = Plan(3, 1, 6, 2, 10, 0.2, 1)


def machine() -> dict:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "avx512_bf16": "avx512_bf16" in flags, "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def torch_version(python: str | None) -> str:
    """torch's version in another interpreter (`--server-python`), else in this one: the
    raw references always run here, so a report must say when the server ran another build."""
    if python is None:
        return torch.__version__
    out = subprocess.run([python, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True, timeout=300, check=True)
    return out.stdout.strip()


def server_threads(server_env: dict[str, str]) -> int:
    """The server's torch thread count: CLIP_TORCH_THREADS, else every usable core (as
    service.backend decides)."""
    return int(server_env.get("CLIP_TORCH_THREADS") or len(os.sched_getaffinity(0)))


# ---- service phases ----


async def idle_latency(url: str, n: int, warmups: int = 3) -> dict:
    """n sequential 1-image requests on one connection: nothing else runs on the server."""
    clients = Clients(url, {}, 60.0)
    client, workload = clients.take(), Workload("image1", seed=7)
    try:
        for _ in range(warmups):
            await send(client, workload.next(), 0.0)
        records = [await send(client, workload.next(), 0.0) for _ in range(n)]
    finally:
        await clients.aclose()
    return {"requests": n, "ok": sum(r.outcome == "ok" for r in records),
            "latency_ok_s": percentiles([r.latency for r in records if r.outcome == "ok"])}


async def overload(cfg: RunConfig, pid: int) -> tuple[dict, list[tuple[float, float]]]:
    """The open-loop run, with the server's RSS sampled every second while it lasts."""
    samples: list[tuple[float, float]] = []

    async def sample() -> None:
        start = time.monotonic()
        while True:
            samples.append((time.monotonic() - start, rss_mb(pid)))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    try:
        report = await loadgen.run(cfg)
    finally:
        sampler.cancel()
    return report, samples


def rss_flatness(samples: list[tuple[float, float]], settle_s: float) -> dict:
    after = [m for t, m in samples if t >= settle_s] or [samples[-1][1]]
    at_settle = after[0]
    tolerance = max(RSS_GROWTH_MB, RSS_GROWTH_SHARE * at_settle)
    growth = max(after) - at_settle
    return {"at_settle_mb": at_settle, "max_after_mb": max(after), "growth_mb": growth,
            "tolerance_mb": tolerance, "settle_s": settle_s, "flat": growth <= tolerance}


def _median_of(runs: list[dict]) -> dict:
    def med(values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    s = [r["summary"] for r in runs]
    return {
        "ok_per_s": med([x["ok_per_s"] for x in s]),
        "items_per_s": med([x["items_per_s"] for x in s]),
        "p50_s": med([x["latency_ok_s"]["p50"] if x["latency_ok_s"] else None for x in s]),
        "p99_s": med([x["latency_ok_s"]["p99"] if x["latency_ok_s"] else None for x in s]),
        "errors": sum(x["error"] + x["timeout"] + x["transport_error"] for x in s),
        "refused": sum(x["refused_503"] + x["refused_429"] for x in s),
        "server_cpu_s": med([r.get("server_cpu_s") for r in runs]),
        "client_cpu_share": med([r["client_cpu"]["share_of_one_core"] for r in runs]),
    }


def run_service(args: argparse.Namespace, plan: Plan, out: Path) -> dict:
    server_args = ["--model", args.model, "--random-weights", "--log-format", "text",
                   "--dtype", args.dtype, "--device", args.device, *args.server_arg]
    result: dict = {"server_args": server_args, "server_env": args.server_env,
                    "server_python": args.server_python or sys.executable,
                    "server_torch": torch_version(args.server_python)}
    print(f"server: python -m service {' '.join(server_args)}", flush=True)
    with (out / "server.log").open("w") as log:
        server = ServerProcess(server_args, args.server_env, stdout=log,
                               stderr=subprocess.STDOUT, python=args.server_python)
        try:
            start = time.monotonic()
            server.wait_ready(args.ready_timeout)
            result["ready_s"] = time.monotonic() - start
            result["rss_ready_mb"] = rss_mb(server.pid)
            result.update(asyncio.run(_phases(args, plan, server)))
            result["rss_end_mb"] = rss_mb(server.pid)
            result["rss_peak_mb"] = proc_status_mb(server.pid, "VmHWM")
            # The server gives memory back after RELEASE_AFTER_IDLE_S (2 s) without work.
            time.sleep(IDLE_RSS_AFTER_S)
            result["rss_idle_mb"] = rss_mb(server.pid)
        finally:
            result["server_exit"] = server.stop()
    return result


async def _phases(args: argparse.Namespace, plan: Plan, server: ServerProcess) -> dict:
    url = server.url
    image_pool()  # built before any clock starts
    print(f"phase idle: {plan.idle_requests} sequential 1-image requests", flush=True)
    out: dict = {"idle": await idle_latency(url, plan.idle_requests)}
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in PHASES}
    for rep in range(args.repeats):
        for i, (name, workload, callers) in enumerate(PHASES):
            cfg = RunConfig(url=url, workload=workload, concurrency=callers,
                            duration=plan.duration, warmup=plan.warmup, timeout=args.timeout,
                            seed=args.seed + 100 * rep + i)  # fresh texts: no cache hits
            await settle(url)
            print(f"phase {name} ({rep + 1}/{args.repeats}): {cfg.describe()}", flush=True)
            before = cpu_s(server.pid)
            report = await loadgen.run(cfg)
            report["server_cpu_s"] = cpu_s(server.pid) - before
            print(format_report(report), flush=True)
            print(f"server CPU {report['server_cpu_s']:.1f} s", flush=True)
            runs[name].append(report)
    out["phases"] = {name: {"median": _median_of(r), "runs": r} for name, r in runs.items()}
    capacity = out["phases"]["image1"]["median"]["ok_per_s"] or 1.0
    rate = 2 * capacity
    # Room for every request the server keeps open until its own deadline: only a client
    # that cannot keep up drops arrivals.
    cfg = RunConfig(url=url, workload="image1", mode="open", rate=rate,
                    duration=plan.overload_duration, warmup=0.0, timeout=args.timeout,
                    max_outstanding=min(4096, int(rate * (args.timeout + 5)) + 16),
                    seed=args.seed + 99)
    await settle(url)
    print(f"phase overload: {cfg.describe()}", flush=True)
    before = cpu_s(server.pid)
    report, samples = await overload(cfg, server.pid)
    report["server_cpu_s"] = cpu_s(server.pid) - before
    print(format_report(report), flush=True)
    out["overload"] = {"report": report, "rss_samples": samples,
                       "rss": rss_flatness(samples, plan.rss_settle)}
    return out


# ---- targets ----


def engine_raw(args: argparse.Namespace, threads: int, plan: Plan, cache: Path) -> dict:
    """The server's exported engine (clip_core.export) timed in this process, no server
    running: the keys bench_raw.measure gives that the targets read, for the engine's
    towers opened as the server opens them (`threads` threads), images as uint8 pixels and
    the short texts trimmed to each batch's longest."""
    import numpy as np
    from bench_model import _rate, short_texts
    from bench_raw import best, together

    from clip_core.export import ExportTarget, ensure, open_export
    from clip_core.preprocess import ImageTransform, open_image
    from clip_core.tokenizer import Tokenizer

    target = ExportTarget(args.engine, "int8" if args.int8 else "fp32")
    print(f"raw: the {args.engine} {target.precision} export in {cache} (built when missing)",
          flush=True)
    export = ensure(args.model, target, cache_dir=cache, random_weights=True)
    towers = open_export(export, threads, 1, args.dtype == "bf16")
    s, rng, tokenizer = export.card.image_size, np.random.default_rng(0), Tokenizer()

    def per_s(fn, inputs: dict[int, np.ndarray]) -> dict[int, float]:
        out = {}
        for bs, x in inputs.items():
            fn(x)  # the runtimes plan each shape on its first run
            out[bs] = statistics.median(_rate(lambda x=x: fn(x), bs, plan.raw_min_time)
                                        for _ in range(plan.raw_repeats))
        return out

    def trimmed(bs: int) -> np.ndarray:
        ids = tokenizer(short_texts(bs, seed=bs)).ids
        return ids[:, :int(ids.argmax(-1).max()) + 1].numpy()

    raw: dict = {"model": export.card.name, "engine": args.engine, "dtype": towers.dtype,
                 "device": "cpu", "threads": threads, "batch_sizes": BATCH_SIZES,
                 "export": str(export.directory),
                 "open_clip": {"unavailable": f"not timed: the {args.engine} engine's own raw "
                                              f"numbers are the references"}}
    print("raw: images ...", flush=True)
    raw["image_per_s"] = per_s(towers.image, {b: rng.integers(0, 256, (b, 3, s, s), np.uint8)
                                              for b in BATCH_SIZES})
    raw["image_best"] = best(raw["image_per_s"])
    one = rng.integers(0, 256, (1, 3, s, s), np.uint8)
    times = []
    for _ in range(max(10, plan.idle_requests)):
        start = time.perf_counter()
        towers.image(one)
        times.append(time.perf_counter() - start)
    raw["image_batch1_ms"] = statistics.median(times) * 1000
    transform, times = ImageTransform(export.card.preprocess), []
    for jpeg in image_pool().jpegs[:16]:
        start = time.perf_counter()
        transform.pixels(open_image(jpeg))
        times.append(time.perf_counter() - start)
    raw["preprocess_ms"] = statistics.median(times) * 1000
    print("raw: texts ...", flush=True)
    texts = {b: trimmed(b) for b in BATCH_SIZES}
    raw["text_per_s"] = per_s(towers.text, texts)
    raw["text_best"] = best(raw["text_per_s"])
    if threads >= 2:
        # As the server computes under load: two batches at once, each on its stream's
        # lane (clip_core.export.Towers.lanes), at every batch size: the batches a load
        # forms, not the best one, bound what the service can reach.
        print("raw: two lanes side by side ...", flush=True)
        lanes = open_export(export, threads, 2, args.dtype == "bf16").lanes
        ib = raw["image_best"]["batch"]
        image = rng.integers(0, 256, (ib, 3, s, s), np.uint8)
        raw["streams"] = {
            "streams": 2, "image_batch": ib, "text_batch": raw["text_best"]["batch"],
            "image_per_s": together([lambda t=t: lambda: t.image(image) for t in lanes], ib,
                                    plan.raw_min_time),
            "text_by_batch": {b: together([lambda t=t, x=x: lambda: t.text(x) for t in lanes],
                                          b, plan.raw_min_time) for b, x in texts.items()},
        }
        raw["streams"]["text_per_s"] = raw["streams"]["text_by_batch"][
            raw["streams"]["text_batch"]]
        del lanes
    return raw


def _row(target: str, measured: str, reference: str, passed: bool | None, key: str) -> dict:
    return {"key": key, "target": target, "measured": measured, "reference": reference,
            "result": "n/a" if passed is None else "PASS" if passed else "FAIL"}


def targets(raw: dict, svc: dict) -> list[dict]:
    ph = {k: v["median"] for k, v in svc["phases"].items()}
    rows = []
    best_img = raw["image_best"]
    ref = 0.9 * best_img["items_per_s"]
    img = ph["image1"]["items_per_s"]
    rows.append(_row("images, 1 per request, 16 callers: >= 0.9 x raw best-batch img/s",
                     f"{img:.1f} img/s", f"{ref:.1f} (raw {best_img['items_per_s']:.1f} at "
                     f"batch {best_img['batch']})", img >= ref, "image1_throughput"))
    txt = ph["text"]["items_per_s"]
    oc = raw.get("open_clip", {})
    if "text77_best" in oc:
        ref = 5 * oc["text77_best"]["items_per_s"]
        rows.append(_row("short texts, 1 per request, 32 callers: >= 5 x open_clip raw "
                         "77-token texts/s", f"{txt:.1f} texts/s",
                         f"{ref:.1f} (open_clip {oc['text77_best']['items_per_s']:.1f} at "
                         f"batch {oc['text77_best']['batch']})", txt >= ref, "text_throughput"))
    else:
        rows.append(_row("short texts, 1 per request, 32 callers: >= 5 x open_clip raw "
                         "77-token texts/s", f"{txt:.1f} texts/s",
                         f"open_clip unavailable: {oc.get('unavailable', '?')}", None,
                         "text_throughput"))
    if "engine" in raw:  # the service against its own exported engine (issue 23)
        best_txt = raw["text_best"]
        ref = 0.9 * best_txt["items_per_s"]
        rows.append(_row(f"short texts, 1 per request, 32 callers: >= 0.9 x {raw['engine']} "
                         f"raw best-batch texts/s", f"{txt:.1f} texts/s",
                         f"{ref:.1f} (raw {best_txt['items_per_s']:.1f} at batch "
                         f"{best_txt['batch']})", txt >= ref, "text_vs_engine"))
    clf = ph["classify"]["items_per_s"]
    ref = 0.85 * img
    rows.append(_row("classify, same 10 labels, 16 callers: >= 0.85 x image1 service img/s",
                     f"{clf:.1f} img/s", f"{ref:.1f}", clf >= ref, "classify_throughput"))
    idle = svc["idle"]["latency_ok_s"]
    ref = raw["image_batch1_ms"] + IDLE_LATENCY_BUDGET_MS
    p50 = idle["p50"] * 1000 if idle else float("inf")
    rows.append(_row("idle, 1 image: p50 <= raw batch-1 + 15 ms", f"{p50:.1f} ms",
                     f"{ref:.1f} ms (raw {raw['image_batch1_ms']:.1f} ms)", p50 <= ref,
                     "idle_latency"))
    ov = svc["overload"]["report"]["summary"]
    rate = svc["overload"]["report"]["config"]["rate"]
    lat = ov["latency_accepted_s"]
    p99 = lat["p99"] if lat else float("inf")
    rows.append(_row(f"overload ({rate:.1f} req/s = 2 x image1): accepted p99 <= 2 s",
                     f"{p99:.2f} s", f"{OVERLOAD_P99_S:.1f} s", p99 <= OVERLOAD_P99_S,
                     "overload_p99"))
    rows.append(_row("overload: excess refused with 503 + Retry-After",
                     f"{ov['refused_503']} of {ov['requests']} refused, "
                     f"{ov['refused_without_retry_after']} without Retry-After",
                     "> 0 refused, all with Retry-After",
                     ov["refused_503"] > 0 and ov["refused_without_retry_after"] == 0,
                     "overload_refusals"))
    bad = ov["timeout"] + ov["error"] + ov["transport_error"] + ov["client_dropped"]
    rows.append(_row("overload: no timeouts, no errors",
                     f"{ov['timeout']} timeouts, {ov['error']} errors {ov['status']}, "
                     f"{ov['transport_error']} transport, {ov['client_dropped']} client-dropped",
                     "0", bad == 0, "overload_clean"))
    rss = svc["overload"]["rss"]
    rows.append(_row(f"overload: RSS flat after the first {rss['settle_s']:g} s",
                     f"+{rss['growth_mb']:.1f} MB ({rss['at_settle_mb']:.0f} -> max "
                     f"{rss['max_after_mb']:.0f})",
                     f"<= {rss['tolerance_mb']:.1f} MB (larger of {RSS_GROWTH_MB:g} MB and "
                     f"{RSS_GROWTH_SHARE:.0%})", rss["flat"], "overload_rss_flat"))
    idle = svc.get("rss_idle_mb")
    idle_note = "" if idle is None else f"; {idle:.0f} MB once idle {IDLE_RSS_AFTER_S:g} s"
    # Judged as the run ends, under load's memory; the idle figure is reported beside it.
    rows.append(_row("server RSS after the run", f"{svc['rss_end_mb']:.0f} MB (peak "
                     f"{svc['rss_peak_mb']:.0f} MB{idle_note})", f"<= {RSS_LIMIT_MB:.0f} MB (1.3 GB)",
                     svc["rss_end_mb"] <= RSS_LIMIT_MB, "server_rss"))
    return rows


TARGET_KEYS = ("image1_throughput", "text_throughput", "classify_throughput", "idle_latency",
               "overload_p99", "overload_refusals", "overload_clean", "overload_rss_flat",
               "server_rss")


# ---- report ----


def lanes_cap(raw: dict, svc: dict, cores: int) -> dict | None:
    """What the engine could serve of the text phase on these cores beside its load
    generator: two lanes at the batch the service formed (its mean, rounded down to a
    timed size) on the cores the load generator left, against the raw best batch. None
    without the lanes' timing or the phase's batch sizes."""
    by_batch = raw.get("streams", {}).get("text_by_batch")
    phase = svc["phases"].get("text", {})
    means = [b["mean"] for run in phase.get("runs", [])
             for b in run.get("batch_sizes", {}).values() if b.get("mean")]
    if not by_batch or not means:
        return None
    mean = statistics.median(means)
    batch = max([b for b in map(int, by_batch) if b <= mean] or [min(map(int, by_batch))])
    lanes = by_batch[batch] if batch in by_batch else by_batch[str(batch)]
    client = phase["median"]["client_cpu_share"]
    cap = lanes * max(0.0, cores - client) / cores
    return {"mean_batch": mean, "batch": batch, "lanes_per_s": lanes, "client_cores": client,
            "cap_per_s": cap, "of_best": cap / raw["text_best"]["items_per_s"]}


def _other_build(here: str, svc: dict) -> str:
    there = svc.get("server_torch", here)
    if there == here:
        return ""
    return (f"; the server ran torch {there} (`{svc['server_python']}`), the raw references "
            f"torch {here}, so the ratios compare two builds")


def markdown(report: dict) -> str:
    m, raw, svc = report["machine"], report["raw"], report["service"]
    lines = [f"# Service benchmark: {report['model']} {report['dtype']}",
             "",
             f"{m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']}, "
             f"{raw['threads']} torch threads, {m['date']}; load average before the run "
             f"{m['loadavg_1min_before']:.2f}",
             f"server: `python -m service {' '.join(svc['server_args'])}`"
             + (f" with {svc['server_env']}" if svc["server_env"] else "")
             + _other_build(m["torch"], svc),
             "",
             "| target | measured | reference | result |",
             "|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['measured']} | {r['reference']} | {r['result']} |"
              for r in report["targets"]]
    lines += ["", "| phase | ok req/s | items/s | p50 ms | p99 ms | errors | refused | "
              "server CPU s | client CPU |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, ph in svc["phases"].items():
        md = ph["median"]
        lines.append(f"| {name} | {md['ok_per_s']:.1f} | {md['items_per_s']:.1f} | "
                     f"{(md['p50_s'] or 0) * 1000:.0f} | {(md['p99_s'] or 0) * 1000:.0f} | "
                     f"{md['errors']} | {md['refused']} | {md['server_cpu_s'] or 0:.1f} | "
                     f"{md['client_cpu_share']:.0%} of a core |")
    engine = f" ({raw['engine']} {raw['dtype']})" if "engine" in raw else ""
    lines += ["", f"raw{engine}, items/s by batch size: images " + ", ".join(
        f"{b}: {v:.1f}" for b, v in raw["image_per_s"].items()) + "; texts (ours) " + ", ".join(
        f"{b}: {v:.1f}" for b, v in raw["text_per_s"].items())]
    if "text77_per_s" in raw.get("open_clip", {}):
        lines.append("open_clip texts (77 positions): " + ", ".join(
            f"{b}: {v:.1f}" for b, v in raw["open_clip"]["text77_per_s"].items()))
    if "streams" in raw:
        st = raw["streams"]
        lines.append(f"raw, two streams side by side on one core each (the server's CPU default):"
                     f" images {st['image_per_s']:.1f}/s at batch {st['image_batch']}, texts "
                     f"{st['text_per_s']:.1f}/s at batch {st['text_batch']}")
        if "text_by_batch" in st:
            lines.append("raw, texts on two lanes side by side, texts/s by batch size: "
                         + ", ".join(f"{b}: {v:.1f}" for b, v in st["text_by_batch"].items()))
        cap = lanes_cap(raw, svc, m["usable_cores"])
        if cap:
            lines.append(
                f"texts: the service's batches averaged {cap['mean_batch']:.1f}, where two "
                f"lanes do {cap['lanes_per_s']:.1f}/s (batch {cap['batch']}); the load "
                f"generator took {cap['client_cores']:.2f} of the {m['usable_cores']} cores, "
                f"which leaves the engine at most {cap['cap_per_s']:.1f} texts/s "
                f"({cap['of_best']:.2f} x the raw best batch) before any serving cost")
    lines.append(f"raw batch-1 image {raw['image_batch1_ms']:.1f} ms; decode + resize of one "
                 f"test JPEG {raw['preprocess_ms']:.1f} ms")
    if "bf16" in raw:
        b = raw["bf16"]
        lines.append(
            f"bf16 vs fp32 (best batch {b['speed']['image']['batch']}): images "
            f"x{b['speed']['image']['speedup']:.2f}, texts x{b['speed']['text']['speedup']:.2f}; "
            f"cosine to fp32 images min {b['cosine']['image']['min']:.4f} mean "
            f"{b['cosine']['image']['mean']:.4f}, texts min {b['cosine']['text']['min']:.4f} "
            f"mean {b['cosine']['text']['mean']:.4f} ({b['note']})")
    return "\n".join(lines)


def write_plots(report: dict, out: Path) -> list[str]:
    import plots  # matplotlib only here

    svc = report["service"]
    first = [ph["runs"][0] for ph in svc["phases"].values()]
    written = [plots.batch_sizes(first, out / "batch_sizes.png", list(svc["phases"]))]
    ov = svc["overload"]
    written.append(plots.timeline(ov["report"], out / "overload.png", ov["rss_samples"]))
    return [str(p) for p in written if p is not None]


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("CLIP_"):
        raise argparse.ArgumentTypeError(f"expected CLIP_NAME=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="registry name (built with random weights)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda; the targets are the CPU's (loadtests/gpu_check.sh)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json and plots")
    p.add_argument("--duration", type=float, help="seconds per closed-loop phase (30)")
    p.add_argument("--warmup", type=float, help="seconds sent first in each phase (5)")
    p.add_argument("--overload-duration", type=float, help="seconds of open-loop overload (60)")
    p.add_argument("--repeats", type=int, default=1, help="closed-loop phases, medians taken")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--server-env", type=_env_pair, action="append", default=[],
                   metavar="CLIP_NAME=VALUE", help="a server setting (repeatable)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="an extra clip-serve argument (repeatable), e.g. --server-arg=--max-wait-ms=2")
    p.add_argument("--server-python", metavar="PATH",
                   help="interpreter for the server (default: this one), e.g. a virtualenv "
                        "with the CPU-only torch wheel, to measure its memory")
    p.add_argument("--bf16", action="store_true", help="also time bf16 against fp32 in-process")
    p.add_argument("--quick", action="store_true", help="a short smoke run (seconds per phase)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    # The server's engine (CLIP_ENGINE); its raw speed: loadtests/bench_model.py --engine.
    p.add_argument("--engine", default=None, choices=["torch", "onnxruntime", "openvino"])
    p.add_argument("--int8", action="store_true", help="with --engine: CLIP_INT8=true")
    p.add_argument("--export-cache", type=Path, default=None,
                   help="with --engine onnxruntime|openvino: the server's CLIP_CACHE_DIR, where "
                        "the export is built before the run (default: the server's default)")
    p.add_argument("--raw-min-time", type=float, help="seconds per raw timing (1.5)")
    p.add_argument("--raw-repeats", type=int, help="raw timings per batch size, median (3)")
    args = p.parse_args(argv)
    args.server_env = dict(args.server_env)
    if args.engine:
        args.server_env["CLIP_ENGINE"] = args.engine
    if args.int8:
        args.server_env["CLIP_INT8"] = "true"
    plan = QUICK if args.quick else FULL
    plan = replace(plan, **{k: v for k, v in (
        ("duration", args.duration), ("warmup", args.warmup),
        ("overload_duration", args.overload_duration), ("raw_min_time", args.raw_min_time),
        ("raw_repeats", args.raw_repeats)) if v is not None})
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)

    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"note: load average {load_before:.2f} before starting: other processes share "
              f"the cores, and every number below will be lower and noisier", flush=True)
    threads = server_threads(args.server_env)
    torch.set_num_threads(threads)
    print(f"raw model, in this process ({threads} threads), no server running", flush=True)
    if args.engine in ("onnxruntime", "openvino"):
        from clip_core.hub import default_cache_dir

        cache = Path(args.export_cache or args.server_env.get("CLIP_CACHE_DIR")
                     or default_cache_dir())
        args.server_env["CLIP_CACHE_DIR"] = str(cache)  # the server finds the export built
        raw = engine_raw(args, threads, plan, cache)
    else:
        import bench_raw  # torch and clip_core

        raw = bench_raw.measure(args.model, args.dtype, BATCH_SIZES, plan.raw_min_time,
                                plan.raw_repeats, latency_calls=max(10, plan.idle_requests),
                                bf16=args.bf16, device=args.device)
    try:
        service = run_service(args, plan, args.out)
    except ServerDidNotStart as e:
        log = (args.out / "server.log").read_text().splitlines()[-20:]
        print(f"bench: {e}; the end of {args.out / 'server.log'}:\n" + "\n".join(log),
              file=sys.stderr)
        return 2
    report = {"model": args.model, "dtype": args.dtype, "device": args.device,
              "machine": {**machine(), "loadavg_1min_before": load_before},
              "plan": asdict(plan), "raw": raw, "service": service}
    report["targets"] = targets(raw, service)
    report["passed"] = all(r["result"] != "FAIL" for r in report["targets"])
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "report.md").write_text(text + "\n")
    print("\n" + text)
    try:
        print("plots: " + ", ".join(write_plots(report, args.out)))
    except ImportError as e:
        print(f"no plots ({e})")
    return 1 if args.strict and not report["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""A retry storm against the real model, and whether the admission's prediction is honest.

    python loadtests/storm.py            # about 5 minutes on 2 cores
    python loadtests/storm.py --quick    # a few seconds per phase, for a test

Starts clip-serve (ViT-B-32 fp32, random weights, CPU) twice:

1. **The storm** (issue 18): `--callers` closed-loop callers in `--procs` load-generator
   processes, each sending one small JPEG per request to /embed and retrying a 503 at
   once (Retry-After ignored, as many real clients do). First with the queue-wait bound
   off (`CLIP_MAX_QUEUE_WAIT_S=none`), then with the default bound, `--seconds` each after
   a warm-up. Reports images/s of both and their ratio, refusals per second, and the
   server's CPU split into the event loop's thread and the others (/proc/PID/task/*/stat);
   the storm's share of the server's CPU is the event loop's CPU beyond what the answered
   requests cost it in the bound-off phase.
2. **The prediction** (second server only): closed loop at a half, three quarters and
   all of `--callers` (16, 24 and 32 by default) and open loop (Poisson arrivals, no
   retries) at 1x, 1.5x and 2x the capacity measured in the bound-off phase. For each
   admitted request, the wait the admission predicted when it was queued and the queue
   wait it had, paired.

The prediction is read inside the server by this script's own entry point (`--serve`),
which wraps `ModelWorker.submit_many` to note `Admission.predicted_wait` at admission and
the result's `queue_s`, one JSON line per request: the service itself exposes nothing new.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serverproc import ROOT, ServerProcess, free_port  # noqa: E402

MODEL_ARGS = ["--model", "ViT-B-32", "--random-weights", "--device", "cpu", "--dtype", "fp32",
              "--log-format", "text"]


# ---- the traced server (runs inside the server process) ----


def serve_traced(trace: str, args: list[str]) -> int:
    """clip-serve with `ModelWorker.submit_many` wrapped: per request, the predicted wait
    when it was admitted and the queue wait it had, written to `trace`."""
    sys.path.insert(0, str(ROOT))
    from service import __main__ as entry
    from service.worker import ModelWorker

    out = open(trace, "a", buffering=1)  # noqa: SIM115 - open for the process's life
    submit = ModelWorker.submit_many

    def predicted(worker: ModelWorker, kind: str, n: int) -> tuple[float, float]:
        d = worker.dispatcher
        with d._cond:  # what Dispatcher._overloaded reads, under its lock
            a = d.admission
            wait = a.predicted_wait(kind, d.queue.units)
            cap = a.batch_limit(kind)
            return wait, wait + a.costs.seconds(kind, cap, cap)

    async def traced(self, kind, payloads, costs=None, **kw):
        wait, bound = predicted(self, kind, len(payloads))
        results = await submit(self, kind, payloads, costs, **kw)
        queue_s = max(r.queue_s for r in results)
        total_s = max(r.queue_s + r.compute_s for r in results)
        out.write(json.dumps({"t": time.time(), "kind": kind, "n": len(payloads),
                              "predicted_s": wait, "predicted_bound_s": bound,
                              "queue_s": queue_s, "total_s": total_s}) + "\n")
        return results

    ModelWorker.submit_many = traced
    return entry.main(args)


# ---- the load generator (its own processes) ----


def _request(port: int, body: bytes) -> bytes:
    return (f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes) -> int:
    """One request on a keep-alive connection; its status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _caller(port: int, request: bytes, until: float, stats: dict, lat: list[float],
                  retry: bool, start_at: float | None = None) -> None:
    """Closed loop: send, and on an answer send again (a 503 at once when `retry`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.time() < until:
            t = time.time()
            try:
                status = await _exchange(reader, writer, request)
            except (ConnectionError, asyncio.IncompleteReadError):
                stats["error"] += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            if status == 200:
                stats["ok"] += 1
                lat.append(time.time() - t)
            elif status == 503:
                stats["refused"] += 1
                if not retry:
                    await asyncio.sleep(1.0)
            else:
                stats["error"] += 1
    finally:
        writer.close()


async def _open_loop(port: int, request: bytes, rate: float, until: float, stats: dict,
                     lat: list[float], seed: int) -> None:
    """Poisson arrivals at `rate`/s, each on its own connection, no retries."""
    rng, tasks = random.Random(seed), []

    async def one() -> None:
        t = time.time()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            status = await _exchange(reader, writer, request)
            writer.close()
        except (ConnectionError, asyncio.IncompleteReadError):
            stats["error"] += 1
            return
        if status == 200:
            stats["ok"] += 1
            lat.append(time.time() - t)
        else:
            stats["refused" if status == 503 else "error"] += 1

    while (now := time.time()) < until:
        tasks.append(asyncio.ensure_future(one()))
        await asyncio.sleep(max(0.0, rng.expovariate(rate) - (time.time() - now)))
    await asyncio.gather(*tasks)


def _generator(port: int, body: bytes, mode: str, n: float, start: float, until: float,
               seed: int, out: mp.Queue) -> None:
    """One load-generator process: `n` closed-loop callers, or open loop at `n`/s."""
    stats, lat = {"ok": 0, "refused": 0, "error": 0}, []
    request = _request(port, body)

    async def main() -> None:
        await asyncio.sleep(max(0.0, start - time.time()))
        if mode == "closed":
            await asyncio.gather(*(_caller(port, request, until, stats, lat, retry=True)
                                   for _ in range(int(n))))
        else:
            await _open_loop(port, request, n, until, stats, lat, seed)

    asyncio.run(main())
    out.put((stats, lat, os.times()))


def load(port: int, body: bytes, mode: str, total: float, procs: int, seconds: float) -> dict:
    """`total` callers (or arrivals/s) split over `procs` processes for `seconds`."""
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    start = time.time() + 0.5
    until = start + seconds
    share = [total / procs] * procs
    if mode == "closed":
        share = [int(total) // procs + (i < int(total) % procs) for i in range(procs)]
    ps = [ctx.Process(target=_generator, args=(port, body, mode, s, start, until, i, out))
          for i, s in enumerate(share)]
    for p in ps:
        p.start()
    got = [out.get(timeout=seconds + 120) for _ in ps]
    for p in ps:
        p.join()
    stats = {k: sum(g[0][k] for g in got) for k in ("ok", "refused", "error")}
    lat = sorted(x for g in got for x in g[1])
    gen_cpu = sum(g[2].user + g[2].system for g in got)
    return {**stats, "seconds": seconds, "images_per_s": stats["ok"] / seconds,
            "refused_per_s": stats["refused"] / seconds,
            "p50_s": _pct(lat, 50), "p99_s": _pct(lat, 99), "generator_cpu_s": gen_cpu}


def _pct(xs: list[float], p: float) -> float | None:
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))] if xs else None


# ---- the server's CPU, by thread ----


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds by thread of `pid`: "loop" (the main thread, which runs the event loop)
    and "other" (the model's streams, the decode pool, the rest)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"loop": 0.0, "other": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended
        cpu = (int(fields[11]) + int(fields[12])) / tick
        out["loop" if int(task.name) == pid else "other"] += cpu
    return out


def _metrics(server: ServerProcess):
    import httpx
    import scrape

    return scrape.parse(httpx.get(server.url + "/metrics", timeout=10).text)


def _phase(server: ServerProcess, body: bytes, mode: str, n: float, procs: int,
           seconds: float) -> dict:
    import scrape

    before, metrics_before = thread_cpu(server.pid), _metrics(server)
    t0 = time.time()
    result = load(server.port, body, mode, n, procs, seconds)
    after, metrics_after = thread_cpu(server.pid), _metrics(server)
    result["server_cpu_s"] = {k: after[k] - before[k] for k in before}
    # Batches that ended after the load stopped count too: the queue empties after it.
    image = [b for key, b in scrape.batch_sizes(metrics_before, metrics_after).items()
             if key.endswith("/image")]
    result["batches"] = sum(b["batches"] for b in image)
    result["batched_images"] = sum(b["items"] for b in image)
    result["window"] = (t0 + 0.5, t0 + 0.5 + seconds)
    return result


def _traces(path: Path, window: tuple[float, float]) -> dict | None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    rows = [r for r in rows if window[0] <= r["t"] <= window[1] + 30]
    if not rows:
        return None
    err = [r["predicted_s"] - r["queue_s"] for r in rows]
    return {
        "requests": len(rows),
        "predicted_wait_mean_s": statistics.fmean(r["predicted_s"] for r in rows),
        "measured_wait_mean_s": statistics.fmean(r["queue_s"] for r in rows),
        "error_mean_s": statistics.fmean(err),
        "error_mean_abs_s": statistics.fmean(abs(e) for e in err),
        "predicted_bound_mean_s": statistics.fmean(r["predicted_bound_s"] for r in rows),
        "measured_total_mean_s": statistics.fmean(r["total_s"] for r in rows),
        "measured_total_p99_s": _pct(sorted(r["total_s"] for r in rows), 99),
        "within_predicted_bound": sum(r["total_s"] <= r["predicted_bound_s"] for r in rows)
        / len(rows),
    }


class TracedServer(ServerProcess):
    """`ServerProcess`, started through `serve_traced` instead of `-m service`."""

    def __init__(self, trace: Path, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(trace), *MODEL_ARGS,
             "--host", "127.0.0.1", "--port", str(self.port)],
            env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=open(trace.with_suffix(".log"), "w"))  # noqa: SIM115


def _server(trace: Path, env: dict) -> ServerProcess:
    server = TracedServer(trace, env)
    server.wait_ready(300)
    return server


def small_jpeg() -> bytes:
    """A photo-like JPEG at 256x192, quality 90 (about 10 KB)."""
    import io

    from PIL import Image
    from workloads import photo_jpeg

    buf = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg(0))).convert("RGB").resize((256, 192)).save(
        buf, "JPEG", quality=90)
    return buf.getvalue()


def storm(args: argparse.Namespace) -> dict:
    import base64

    # One small JPEG per request, its base64 in a JSON body.
    body = b'{"images": ["' + base64.b64encode(small_jpeg()) + b'"]}'
    seconds, warm = (4.0, 2.0) if args.quick else (args.seconds, 5.0)
    report: dict = {"loadavg_before": os.getloadavg(), "callers": args.callers,
                    "procs": args.procs, "body_bytes": len(body)}
    tmp = Path(tempfile.mkdtemp(prefix="storm-"))
    phases = {"bound_off": {"CLIP_MAX_QUEUE_WAIT_S": "none"}, "bound_default": {}}
    servers: dict[str, ServerProcess] = {}
    try:
        for name, env in phases.items():
            servers[name] = _server(tmp / f"{name}.jsonl", env)
        # Both servers up (one idles while the other is loaded), the phases alternating
        # in halves: a neighbour's load on this shared machine falls on both alike.
        parts: dict[str, list[dict]] = {name: [] for name in phases}
        for name in [*phases, *phases]:
            if not parts[name]:
                load(servers[name].port, body, "closed", args.callers, args.procs, warm)
            result = _phase(servers[name], body, "closed", args.callers, args.procs,
                            seconds / 2)
            result["prediction"] = _traces(tmp / f"{name}.jsonl", result.pop("window"))
            parts[name].append(result)
        for name in phases:
            report[name] = _merge(parts[name])
        report["honesty"] = honesty(servers["bound_default"], body,
                                    tmp / "bound_default.jsonl", args,
                                    report["bound_off"]["images_per_s"])
    finally:
        for server in servers.values():
            server.stop()
    off, on = report["bound_off"], report["bound_default"]
    report["ratio"] = on["images_per_s"] / off["images_per_s"] if off["images_per_s"] else None
    # The storm's CPU: the loop's CPU beyond what its answers cost it with the bound off.
    per_answer = off["server_cpu_s"]["loop"] / max(1, off["ok"])
    storm_cpu = max(0.0, on["server_cpu_s"]["loop"] - per_answer * on["ok"])
    report["storm_cpu_share"] = storm_cpu / max(1e-9, sum(on["server_cpu_s"].values()))
    report["storm_cpu_ms_per_refusal"] = (1e3 * storm_cpu / on["refused"]
                                          if on["refused"] else None)
    return report


def _merge(halves: list[dict]) -> dict:
    """Two halves of a phase as one: counts and CPU added, rates over both, the
    latencies and predictions of the second half (the first, of the first only)."""
    out = dict(halves[-1])
    for key in ("ok", "refused", "error", "seconds", "generator_cpu_s", "batches",
                "batched_images"):
        out[key] = sum(h[key] for h in halves)
    out["server_cpu_s"] = {k: sum(h["server_cpu_s"][k] for h in halves)
                           for k in halves[0]["server_cpu_s"]}
    out["images_per_s"] = out["ok"] / out["seconds"]
    out["refused_per_s"] = out["refused"] / out["seconds"]
    out["halves_images_per_s"] = [h["images_per_s"] for h in halves]
    return out


def honesty(server: ServerProcess, body: bytes, trace: Path, args: argparse.Namespace,
            capacity: float) -> list[dict]:
    seconds = 3.0 if args.quick else 10.0
    rows = []
    # Closed loop at a half, three quarters and all of the storm's callers (16, 24, 32 by
    # default); open loop at 1x, 1.5x and 2x the capacity the bound-off phase measured.
    closed = (args.callers // 2, args.callers * 3 // 4, args.callers)
    for mode, levels in (("closed", closed), ("open", (1.0, 1.5, 2.0))):
        for level in levels:
            n = level if mode == "closed" else level * capacity
            result = _phase(server, body, mode, n, args.procs, seconds)
            rows.append({"mode": mode, "level": level, "offered": n,
                         "images_per_s": result["images_per_s"],
                         "refused_per_s": result["refused_per_s"],
                         "p99_s": result["p99_s"],
                         "prediction": _traces(trace, result["window"])})
            time.sleep(1.0 if args.quick else 3.0)  # let the queue empty between levels
    return rows


def _fmt(report: dict) -> str:
    off, on = report["bound_off"], report["bound_default"]
    lines = [f"load average before: {' '.join(f'{x:.2f}' for x in report['loadavg_before'])}",
             f"{report['callers']} closed-loop callers in {report['procs']} processes, "
             f"one {report['body_bytes']}-byte JSON body each, 503 retried at once",
             "| bound | images/s | refusals/s | p50 s | p99 s | server CPU s (loop / other) "
             "| generator CPU s | mean image batch |", "|---|---|---|---|---|---|---|---|"]
    for name, r in (("off", off), ("default (2 s)", on)):
        cpu = r["server_cpu_s"]
        lines.append(f"| {name} | {r['images_per_s']:.1f} | {r['refused_per_s']:.1f} | "
                     f"{r['p50_s'] or 0:.2f} | {r['p99_s'] or 0:.2f} | "
                     f"{cpu['loop']:.1f} / {cpu['other']:.1f} | {r['generator_cpu_s']:.1f} | "
                     f"{r['batched_images'] / max(1.0, r['batches']):.1f} |")
    lines.append("images/s by half (off, then default, alternating): "
                 f"{off['halves_images_per_s']} / {on['halves_images_per_s']}")
    lines.append(f"ratio (default / off): {report['ratio']:.2f}; the storm's share of the "
                 f"server's CPU: {100 * report['storm_cpu_share']:.1f} %")
    lines += ["", "| loop | level | offered | images/s | refused/s | predicted wait (mean) "
              "| measured wait (mean) | mean abs error | predicted bound (mean) "
              "| answered (mean / p99) | within predicted bound |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in (("storm, bound off", off), ("storm, default", on)):
        lines.append(_pred_row(name, "", "", r["images_per_s"], r["refused_per_s"],
                               r["prediction"]))
    for r in report["honesty"]:
        offered = f"{r['offered']:.0f} callers" if r["mode"] == "closed" else \
            f"{r['offered']:.1f}/s"
        lines.append(_pred_row(r["mode"], f"{r['level']:g}" + ("" if r["mode"] == "closed"
                                                                else "x"),
                               offered, r["images_per_s"], r["refused_per_s"],
                               r["prediction"]))
    return "\n".join(lines)


def _pred_row(loop: str, level: str, offered: str, ips: float, rps: float,
              p: dict | None) -> str:
    if p is None:
        return f"| {loop} | {level} | {offered} | {ips:.1f} | {rps:.1f} | - | - | - | - | - | - |"
    return (f"| {loop} | {level} | {offered} | {ips:.1f} | {rps:.1f} "
            f"| {p['predicted_wait_mean_s']:.2f} | {p['measured_wait_mean_s']:.2f} "
            f"| {p['error_mean_abs_s']:.2f} | {p['predicted_bound_mean_s']:.2f} "
            f"| {p['measured_total_mean_s']:.2f} / {p['measured_total_p99_s']:.2f} "
            f"| {100 * p['within_predicted_bound']:.0f} % |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds per phase, not tens")
    p.add_argument("--callers", type=int, default=32)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    report = storm(args)
    print(_fmt(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:  # the server process (TracedServer)
        raise SystemExit(serve_traced(sys.argv[2], sys.argv[3:]))
    raise SystemExit(main())

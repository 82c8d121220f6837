"""The service end to end on a GPU, for loadtests/gpu_check.sh: one server on 127.0.0.1 and
closed-loop load from several client processes, one phase per request shape:

    image64_multipart  64 JPEGs as multipart/form-data files, base64 embeddings back
    image64_json       64 JPEGs as base64 in JSON, base64 embeddings back
    text64             64 unique captions (the text cache never answers), base64 back
    text1              one unique caption

    python3 loadtests/gpu_load.py --json out/service.json --server-log out/server.log \\
        --model ViT-B-32 --device cuda --dtype fp16 --clients 2 --duration 8 \\
        --variant device:CLIP_PREPROCESS=device,CLIP_CUDA_GRAPHS=true

With --variant, a second server with those settings on top runs the same phases after the
first (named "device/image64_json"...), so one report compares the two.

With --open PHASE=ITEMS_PER_S a phase runs open loop instead: Poisson arrivals whose mean
is that many items a second, shared by the client processes, every answer checked. Its
line then carries issue 18's verdict at that rate: PASS when every request sent in the
window was answered, the answers' p99 is within --p99-ms (100), and the clients kept to
their schedule, p99 within --max-lag-ms (10; a client that falls behind offers less
than the goal):

    python3 loadtests/gpu_load.py ... --server-env CLIP_PROCESSES=4 \
        --open image64_multipart=5000 --open text64=20000

Per phase: items/s, latency percentiles, refusals and errors, the server's CPU in cores,
GPU utilisation sampled with NVML during the measured window, and the batch sizes the
server formed (its clip_batch_size histogram, scraped at the window's start and end).
Several client processes, because one Python client saturates its core before an H200
server does. The images are the load tests' photo-like ~640x480 JPEGs (workloads.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import scrape
from loadgen import closed_bodies, open_bodies
from serverproc import ServerDidNotStart, ServerProcess, cpu_s, server_processes
from stats import Record, percentiles, summarise
from workloads import Captions, image_pool

PHASES = ("image64_multipart", "image64_json", "text64", "text1")
HERE = Path(__file__).resolve()


# ---- the client process ----

class Bodies:
    """The next request of a phase: a few image bodies built once and sent in turn (building
    a 64-image body costs the client more than sending it), or a fresh caption batch."""

    def __init__(self, phase: str, images: int, seed: int):
        self.phase = phase
        self._captions = Captions(seed)
        self._tag = f"s{seed}"  # captions differ between clients and phases too
        self._built: list[tuple[bytes, str]] = []
        self._i = 0
        self.items = 1 if phase == "text1" else images
        if phase.startswith("image"):
            pool = image_pool(n=max(images, 8), seed=0)
            for k in range(4):
                order = [(k * 7 + i) % len(pool.jpegs) for i in range(images)]
                if phase == "image64_multipart":
                    req = httpx.Request(
                        "POST", "http://x/embed", data={"encoding": "base64"},
                        files=[("images", (f"{i}.jpg", pool.jpegs[i], "image/jpeg"))
                               for i in order])
                    self._built.append((req.read(), req.headers["content-type"]))
                else:
                    body = {"images": [pool.b64[i].decode() for i in order],
                            "encoding": "base64"}
                    self._built.append((json.dumps(body).encode(), "application/json"))

    def next(self) -> tuple[bytes, str]:
        if self._built:
            self._i += 1
            return self._built[self._i % len(self._built)]
        texts = [f"{self._captions()} {self._tag}" for _ in range(self.items)]
        return json.dumps({"texts": texts, "encoding": "base64"}).encode(), "application/json"


def check_answer(r: httpx.Response, items: int) -> str:
    """'' when the answer holds `items` embeddings of dimension * 4 bytes each, else why not."""
    try:
        body = r.json()
        rows = body["images"] or body["texts"]
        if len(rows) != items:
            return f"{len(rows)} embeddings for {items} items"
        if len(base64.b64decode(rows[0]["embedding"])) != 4 * body["dimension"]:
            return "an embedding of the wrong size"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable answer: {type(e).__name__}: {e}"
    return ""


def client(args: argparse.Namespace) -> int:
    """Builds its bodies, says 'ready', reads the shared start time (time.time()) from
    stdin, sends until warm-up + duration after it, and writes its records as JSON."""
    bodies = Bodies(args.phase, args.images, args.seed)
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    t0 = time.perf_counter() + (start_at - time.time())  # the start, on this clock
    time.sleep(max(0.0, t0 - time.perf_counter()))
    lags: list[float] = []
    if args.rate:
        records, problems, lags = asyncio.run(open_bodies(
            args.url, bodies.next, bodies.phase, bodies.items, args.rate, t0,
            args.warmup + args.duration, args.timeout,
            lambda r: check_answer(r, bodies.items), seed=args.seed))
    else:
        records, problems = asyncio.run(closed_bodies(
            args.url, bodies.next, bodies.phase, bodies.items, args.concurrency, t0,
            t0 + args.warmup + args.duration, args.timeout,
            lambda r: check_answer(r, bodies.items)))
    args.json.write_text(json.dumps({"records": [asdict(r) for r in records],
                                     "problems": problems[:20], "lags": lags}))
    return 0


# ---- the parent: server, phases, sampling ----

class Sampler(threading.Thread):
    """During [start, end) of time.time(): GPU utilisation every 0.2 s (NVML), and /metrics
    plus the server's CPU seconds at both ends."""

    def __init__(self, url: str, pid: int, start: float, end: float):
        super().__init__(daemon=True)
        self.url, self.pid, self.start_at, self.end_at = url, pid, start, end
        self.gpu: list[float] = []
        self.gpu_memory: list[float] = []
        self.scrapes: list[scrape.Samples | str] = []
        self.cpu: list[float] = []
        self._nvml = _nvml_handle()

    def _ends(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):  # the server has gone
            # With CLIP_PROCESSES > 1 the server is a supervisor and its children.
            pids = {self.pid, *server_processes(self.pid)}
            self.cpu.append(sum(cpu_s(pid) for pid in pids))
        try:
            self.scrapes.append(scrape.parse(httpx.get(self.url + "/metrics", timeout=10).text))
        except (httpx.HTTPError, ValueError) as e:
            self.scrapes.append(f"{type(e).__name__}: {e}")

    def run(self) -> None:
        time.sleep(max(0.0, self.start_at - time.time()))
        self._ends()
        while time.time() < self.end_at:
            if self._nvml is not None:
                import pynvml

                rates = pynvml.nvmlDeviceGetUtilizationRates(self._nvml)
                self.gpu.append(rates.gpu)
                self.gpu_memory.append(rates.memory)
            time.sleep(0.2)
        self._ends()

    def result(self, duration: float) -> dict:
        out: dict = {"gpu_util_pct": _spread(self.gpu),
                     "gpu_memory_util_pct": _spread(self.gpu_memory)}
        if self._nvml is None:
            out["gpu_util_pct"] = "no NVML (pynvml or a GPU missing)"
        if len(self.cpu) == 2:
            out["server_cpu_cores"] = round((self.cpu[1] - self.cpu[0]) / duration, 2)
        if len(self.scrapes) == 2 and all(isinstance(s, dict) for s in self.scrapes):
            out["batch_sizes"] = scrape.batch_sizes(*self.scrapes)
            out["counters"] = scrape.counters(*self.scrapes)
        else:
            out["scrape_error"] = [s for s in self.scrapes if isinstance(s, str)]
        return out


def _nvml_handle():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no pynvml, no driver, no GPU: utilisation is reported missing
        return None


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    s = sorted(values)
    return {"mean": round(sum(s) / len(s), 1), "p50": s[len(s) // 2], "min": s[0], "max": s[-1],
            "samples": len(s)}


def run_phase(args: argparse.Namespace, server: ServerProcess, phase: str, work: Path) -> dict:
    concurrency = {"image64_multipart": args.image_concurrency,
                   "image64_json": args.image_concurrency,
                   "text64": args.image_concurrency * 2, "text1": args.text1_concurrency}[phase]
    items = 1 if phase == "text1" else args.images
    goal = dict(args.open).get(phase)  # items/s, open loop; None: closed loop
    rate = goal / items / args.clients if goal else 0.0  # requests/s per client
    procs, files = [], []
    for k in range(args.clients):
        files.append(work / f"{phase}-{k}.json")
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE), "client", "--url", server.url, "--phase", phase,
             "--concurrency", str(concurrency), "--warmup", str(args.warmup),
             "--duration", str(args.duration), "--images", str(args.images),
             "--rate", str(rate),
             "--seed", str(100 * PHASES.index(phase) + k), "--json", str(files[-1])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    try:
        for p in procs:  # each builds its bodies first (seconds for the JPEG pool)
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {phase} client exited before it was ready")
        start_at = time.time() + 0.5
        for p in procs:
            p.stdin.write(f"{start_at}\n")
            p.stdin.flush()
        sampler = Sampler(server.url, server.pid, start_at + args.warmup,
                          start_at + args.warmup + args.duration)
        sampler.start()
        for p in procs:
            p.wait(args.warmup + args.duration + args.timeout + 30)
        sampler.join(30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    records, problems, lags = [], [], []
    for f in files:
        data = json.loads(f.read_text())
        records += [Record(**r) for r in data["records"]]
        problems += data["problems"]
        lags += data["lags"]
    summary = summarise(records, args.warmup, args.warmup + args.duration)
    out = {"clients": args.clients, "items_per_request": items, "summary": summary,
           **sampler.result(args.duration), "problems": problems[:10]}
    if goal:
        out["open_loop"] = goal_verdict(summary, items, goal, args.p99_ms / 1000, lags,
                                        args.max_lag_ms / 1000)
    else:
        out["concurrency_per_client"] = concurrency
    return out


def goal_verdict(summary: dict, items: int, goal: float, p99_limit_s: float,
                 lags: list[float], max_lag_s: float) -> dict:
    """Issue 18's reading of an open-loop phase of `items`-item requests at `goal` items/s
    on average (what was offered is reported beside it): every request sent in the
    window answered, their p99 within `p99_limit_s`, and the clients on schedule (the p99
    of how late they sent within `max_lag_s`: a client later than that no longer offers
    the goal's rate)."""
    why = []
    unanswered = summary["requests"] - summary["ok"]
    if unanswered or not summary["requests"]:
        why.append(f"{unanswered} of {summary['requests']} requests not answered")
    lat = summary["latency_ok_s"]
    if lat and lat["p99"] > p99_limit_s:
        why.append(f"p99 {lat['p99'] * 1000:.0f} ms > {p99_limit_s * 1000:.0f} ms")
    lag = percentiles(lags)
    if lag and lag["p99"] > max_lag_s:
        why.append(f"the clients fell behind (p99 {lag['p99'] * 1000:.0f} ms late)")
    return {"goal_items_per_s": goal, "offered_items_per_s": summary["sent_per_s"] * items,
            "p99_limit_s": p99_limit_s,
            "send_lag_s": lag, "verdict": "FAIL: " + "; ".join(why) if why else "PASS"}


def line(phase: str, r: dict) -> str:
    s = r["summary"]
    lat = s["latency_ok_s"] or {}
    gpu = r["gpu_util_pct"]
    batches = r.get("batch_sizes") or {}
    mean_batch = ", ".join(f"{v['mean']:.0f}" for v in batches.values()) or "-"
    goal = r.get("open_loop")
    opened = (f" (open loop, goal {goal['goal_items_per_s']:g}/s, offered "
              f"{goal['offered_items_per_s']:.0f}/s: {goal['verdict']})" if goal else "")
    return (f"{phase}{opened}: {s['items_per_s']:.0f} items/s, "
            f"p50 {lat.get('p50', 0) * 1000:.0f} ms, "
            f"p99 {lat.get('p99', 0) * 1000:.0f} ms, ok {s['ok']}, errors {s['error']}, 503 "
            f"{s['refused_503']}, GPU {gpu['mean'] if isinstance(gpu, dict) else '-'}%, "
            f"mean batch {mean_batch}, server CPU {r.get('server_cpu_cores', '-')} cores")


def parent(args: argparse.Namespace) -> int:
    env = {"CLIP_DEVICE": args.device, "CLIP_DTYPE": args.dtype, "CLIP_LOG_FORMAT": "text",
           "CLIP_LOG_LEVEL": "warning", "CLIP_PREPARE_WORKERS": str(args.prepare_workers),
           "CLIP_MAX_BATCH_SIZE": str(args.max_batch_size),
           "CLIP_MAX_BATCH_TOKENS": str(args.max_batch_size * 77), **dict(args.server_env)}
    server_args = ["--model", args.model, "--random-weights"] if args.model else []
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "server_log")}
    report: dict = {"config": {**settings, "server_env": env, "server_args": server_args},
                    "phases": {}, "variants": {}}
    out = args.json

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str))

    # gpu_check.sh's timeout sends SIGTERM: stop the server on the way out, keep the JSON.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    failed = 0
    with open(args.server_log, "w") as log:
        # The configured server first, then one per variant: its phases are named
        # "label/phase", its server's output follows in the same log.
        failed += serve(args, env, server_args, "", args.phases, report, log, save)
        for label, extra in args.variant:
            failed += serve(args, {**env, **extra}, server_args, label,
                            args.variant_phases or args.phases, report, log, save)
    report["headline"] = "; ".join(
        line(p, r) if "summary" in r else f"{p}: {r['error']}" for p, r in report["phases"].items())
    save()
    return 1 if failed else 0


def serve(args: argparse.Namespace, env: dict[str, str], server_args: list[str], label: str,
          phases: list[str], report: dict, log, save) -> int:
    """One server with `env` through `phases`; the number of phases that failed."""
    prefix = f"{label}/" if label else ""
    variant = report["variants"][label or "default"] = {"server_env": env}
    print(f"=== server {label or 'default'}: "
          f"{' '.join(f'{k}={v}' for k, v in env.items())}", file=log, flush=True)
    server = ServerProcess(server_args, env, stdout=log, stderr=subprocess.STDOUT,
                           python=sys.executable)
    failed = 0
    work = Path(tempfile.mkdtemp(prefix="gpu-load-"))
    try:
        start = time.monotonic()
        try:
            server.wait_ready(args.ready_timeout)
        except ServerDidNotStart as e:
            report["phases"][f"{prefix}start"] = {"error": f"the server did not start: {e} "
                                                           f"(see the server log)"}
            print(f"{prefix}start: FAILED {e}", flush=True)
            return 1
        variant["server_ready_s"] = round(time.monotonic() - start, 1)
        report.setdefault("server_ready_s", variant["server_ready_s"])
        save()
        for phase in phases:
            try:
                report["phases"][prefix + phase] = r = run_phase(args, server, phase, work)
                print(line(prefix + phase, r), flush=True)
                s = r["summary"]
                failed += s["ok"] == 0 or s["error"] + s["timeout"] + s["transport_error"] > 0
            except Exception as e:
                report["phases"][prefix + phase] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{prefix}{phase}: FAILED {type(e).__name__}: {e}", flush=True)
                failed += 1
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        variant["server_exit"] = server.stop()
        save()
    return failed


def _variant(text: str) -> tuple[str, dict[str, str]]:
    label, _, pairs = text.partition(":")
    if not label or "/" in label or not pairs:
        raise argparse.ArgumentTypeError(f"expected LABEL:CLIP_A=1,CLIP_B=2, got {text!r}")
    return label, dict(_env_pair(kv) for kv in pairs.split(","))


def _open_goal(text: str) -> tuple[str, float]:
    phase, _, rate = text.partition("=")
    try:
        value = float(rate)
    except ValueError:
        value = 0.0
    if phase not in PHASES or value <= 0:
        raise argparse.ArgumentTypeError(f"expected PHASE=ITEMS_PER_S with PHASE one of "
                                         f"{', '.join(PHASES)}, got {text!r}")
    return phase, value


def _env_pair(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected CLIP_NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    if argv[:1] == ["client"]:
        p.add_argument("what")
        p.add_argument("--url", required=True)
        p.add_argument("--phase", choices=PHASES, required=True)
        p.add_argument("--concurrency", type=int, required=True)
        p.add_argument("--warmup", type=float, required=True)
        p.add_argument("--duration", type=float, required=True)
        p.add_argument("--images", type=int, required=True)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--rate", type=float, default=0.0, help="requests/s, open loop; 0: closed")
        p.add_argument("--timeout", type=float, default=60.0)
        p.add_argument("--json", type=Path, required=True)
        return client(p.parse_args(argv))
    p.add_argument("--json", type=Path, required=True, help="the report")
    p.add_argument("--server-log", type=Path, required=True, help="the server's output")
    p.add_argument("--model", help="registry name, built with random weights; default: "
                                   "the server's default model")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--prepare-workers", type=int, default=max(1, (os.cpu_count() or 4) - 4),
                   help="the server's decoding threads (default: all cores but four, left "
                        "to the event loop, the worker and the load generators)")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--clients", type=int, default=2, help="load-generator processes")
    p.add_argument("--image-concurrency", type=int, default=4,
                   help="64-image requests in flight per client (64-text: twice that)")
    p.add_argument("--text1-concurrency", type=int, default=32, help="per client")
    p.add_argument("--images", type=int, default=64, help="items per image/text64 request")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds sent first, not counted")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--phases", type=lambda s: [x for x in s.split(",") if x], default=list(PHASES))
    p.add_argument("--server-env", type=_env_pair, action="append", default=[],
                   metavar="CLIP_NAME=VALUE", help="more server settings (repeatable)")
    p.add_argument("--open", type=_open_goal, action="append", default=[],
                   help="PHASE=ITEMS_PER_S: that phase open loop at that mean rate (repeatable)")
    p.add_argument("--p99-ms", type=float, default=100.0,
                   help="the open-loop phases' p99 bound for their verdict")
    p.add_argument("--max-lag-ms", type=float, default=10.0,
                   help="how late (p99) the open-loop clients may send, for their verdict")
    p.add_argument("--variant", type=_variant, action="append", default=[],
                   metavar="LABEL:CLIP_A=1,CLIP_B=2",
                   help="after the configured server, another with these settings on top, "
                        "through the same phases, named LABEL/phase (repeatable)")
    p.add_argument("--variant-phases", type=lambda s: [x for x in s.split(",") if x],
                   default=None, help="the variants' phases (default: --phases)")
    args = p.parse_args(argv)
    unknown = (set(args.phases) | set(args.variant_phases or ())) - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())

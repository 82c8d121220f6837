"""The serving layer's own ceiling: clip-serve with the null engine (CLIP_ENGINE=null: the
named model's shapes, no model) on 127.0.0.1, closed-loop load from client processes, one
phase per request shape:

    images-json/float ...   64 JPEGs as base64 strings in JSON, float embeddings back
    images-json/base64      the same, embeddings as base64 float32
    images-datauri/...      64 JPEGs as data URIs in JSON
    images-multipart/...    64 JPEGs as multipart/form-data files
    texts64/float, texts64/base64   64 unique captions per request
    text1/float             one unique caption per request

    python loadtests/ceiling.py --json out/ceiling.json
    python loadtests/ceiling.py --quick                  # seconds: a smoke test
    python loadtests/ceiling.py --server-env CLIP_PREPROCESS=device   # no decoding here
    python loadtests/ceiling.py --processes 2     # a supervisor and 2 server processes

Per phase: items/s, latency percentiles, and CPU per item, read from /proc at the measured
window's two ends: the server's by thread, grouped by the thread's name (the server names
its OS threads, service.tuning.name_os_threads): the event loop (the main thread), the
pools (image decoding, tokenising), the model's serving threads, the rest (among them
the threads that parse large bodies); and the load generator's processes. With --processes N
the server is a supervisor and N server processes (CLIP_PROCESSES): their threads are
summed, each child's main thread counting as an event loop. Then the projection
to a 16-core GPU host: each item's budget at the goals (5,000 images/s, 20,000 texts/s),
and how many event loops and cores they would need at the measured CPU per item.

The images are the load tests' photo-like ~640x480 JPEGs (workloads.py); each client builds
a few bodies before its phase and sends them in turn. Texts are unique, so the text cache
never answers. Every run is bounded (MAX_PHASE_S per phase, MAX_REPEATS) and sends only to
the server it started on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import multiprocessing as mp
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from loadgen import closed_bodies
from serverproc import ServerProcess, cpu_s, server_processes, stat_fields
from stats import Record, summarise
from workloads import Captions, image_pool

MAX_PHASE_S = 120.0  # warm-up + duration of one phase
MAX_REPEATS = 5
GOALS = {"images": 5_000.0, "texts": 20_000.0}  # items/s on one GPU host (issue 18)
GPU_HOST_CORES = 16


@dataclass(frozen=True)
class Phase:
    name: str
    kind: str  # "images" or "texts"
    form: str  # images: "json", "datauri", "multipart"; texts: "json"
    encoding: str  # "float" or "base64"
    items: int  # per request


def phases(images: int) -> list[Phase]:
    out = [Phase(f"images-{form}/{enc}", "images", form, enc, images)
           for form in ("json", "datauri", "multipart") for enc in ("float", "base64")]
    out += [Phase(f"texts{images}/{enc}", "texts", "json", enc, images)
            for enc in ("float", "base64")]
    out.append(Phase("text1/float", "texts", "json", "float", 1))
    return out


# ---- the client processes ----

class Bodies:
    """The next request body of a phase and its content type: image bodies are built once
    (building one costs the client more than sending it) and sent in turn; texts are fresh
    captions each time."""

    def __init__(self, phase: Phase, pool_size: int, seed: int):
        self.phase = phase
        self._captions = Captions(seed)
        self._tag = f"c{seed}"  # no two clients send the same caption
        self._built: list[tuple[bytes, str]] = []
        self._i = 0
        if phase.kind == "images":
            pool = image_pool(n=pool_size, seed=0)
            for k in range(4):
                order = [(k * 7 + i) % len(pool.jpegs) for i in range(phase.items)]
                self._built.append(self._images_body(pool, order))

    def _images_body(self, pool, order: list[int]) -> tuple[bytes, str]:
        enc = self.phase.encoding
        if self.phase.form == "multipart":
            req = httpx.Request("POST", "http://x/embed", data={"encoding": enc},
                                files=[("images", (f"{i}.jpg", pool.jpegs[i], "image/jpeg"))
                                       for i in order])
            return req.read(), req.headers["content-type"]
        prefix = "data:image/jpeg;base64," if self.phase.form == "datauri" else ""
        body = {"images": [prefix + pool.b64[i].decode() for i in order], "encoding": enc}
        return json.dumps(body).encode(), "application/json"

    def next(self) -> tuple[bytes, str]:
        if self._built:
            self._i += 1
            return self._built[self._i % len(self._built)]
        texts = [f"{self._captions()} {self._tag}" for _ in range(self.phase.items)]
        body = {"texts": texts, "encoding": self.phase.encoding}
        return json.dumps(body).encode(), "application/json"


def check_answer(r: httpx.Response, phase: Phase) -> str:
    """'' when the answer holds one embedding of the model's dimension per item, else why."""
    try:
        body = r.json()
        rows = body[phase.kind]
        if len(rows) != phase.items:
            return f"{len(rows)} embeddings for {phase.items} items"
        first = rows[0]["embedding"]
        size = (len(base64.b64decode(first)) // 4 if phase.encoding == "base64"
                else len(first))
        if size != body["dimension"]:
            return f"an embedding of {size} values, dimension {body['dimension']}"
    except (ValueError, KeyError, TypeError, IndexError) as e:
        return f"unreadable answer: {type(e).__name__}: {e}"
    return ""


def client_main(conn, url: str, pool_size: int, index: int) -> None:
    """One load-generator process, driven over `conn`: for each phase, (phase, concurrency,
    warm-up, duration, timeout, seed) in; 'ready' once its bodies are built; the shared
    start (time.time()) in; its records and problems out. None ends it."""
    image_pool(n=pool_size, seed=0)  # built once, before any clock starts
    conn.send("started")
    while (msg := conn.recv()) is not None:
        phase, concurrency, warmup, duration, timeout, seed = msg
        bodies = Bodies(phase, pool_size, seed * 100 + index)
        conn.send("ready")
        start_at = conn.recv()
        t0 = time.perf_counter() + (start_at - time.time())  # the start, on this clock
        time.sleep(max(0.0, t0 - time.perf_counter()))
        records, problems = asyncio.run(closed_bodies(
            url, bodies.next, phase.name, phase.items, concurrency, t0, t0 + warmup + duration,
            timeout, lambda r, phase=phase: check_answer(r, phase), check_every=False))
        conn.send(([asdict(r) for r in records], problems[:10]))


class Clients:
    """The load-generator processes (spawned: no state inherited from this one)."""

    def __init__(self, n: int, url: str, pool_size: int, start_timeout: float = 120):
        ctx = mp.get_context("spawn")
        self._conns = []
        self.procs = []
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_main, args=(child, url, pool_size, i),
                            name=f"ceiling-client-{i}", daemon=True)
            p.start()
            self._conns.append(parent)
            self.procs.append(p)
        self._expect("started", start_timeout)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _expect(self, what: str, timeout: float) -> None:
        for conn in self._conns:
            if not conn.poll(timeout) or conn.recv() != what:
                raise RuntimeError(f"a load-generator process did not answer {what!r}")

    def prepare(self, msg: tuple, timeout: float = 60) -> None:
        for conn in self._conns:
            conn.send(msg)
        self._expect("ready", timeout)

    def start(self, start_at: float) -> None:
        for conn in self._conns:
            conn.send(start_at)

    def results(self, timeout: float) -> tuple[list[Record], list[str]]:
        records: list[Record] = []
        problems: list[str] = []
        for conn in self._conns:
            if not conn.poll(timeout):
                raise RuntimeError("a load-generator process did not report in time")
            rs, ps = conn.recv()
            records += [Record(**r) for r in rs]
            problems += ps
        return records, problems

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):  # the process has gone already
                conn.send(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


# ---- CPU by thread, from /proc ----

def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (the thread's OS name, user + system CPU seconds), for each live thread."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        # "tid (name) state ...": the name may hold spaces and parentheses.
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def listening(port: int) -> int:
    """IPv4 sockets listening on `port` (/proc/net/tcp, state 0A): one per server process
    that serves, each with its own SO_REUSEPORT socket."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for f in (r.split() for r in rows)
               if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port)


def wait_listening(port: int, n: int, timeout: float) -> None:
    """Until `n` processes listen on `port`: /readyz is answered by the first one up, and
    the kernel spreads connections only over those that listen."""
    deadline = time.monotonic() + timeout
    while listening(port) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{listening(port)} of {n} server processes listen on {port}")
        time.sleep(0.2)


def requests_by_process(url: str) -> dict[str, float]:
    """pid -> requests it answered (clip_process_requests, published each second)."""
    time.sleep(1.5)  # every process's latest count
    text = httpx.get(url + "/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^clip_process_requests\{pid="(\d+)"\} (\S+)$', text, re.M)}


def main_thread_system_s(pids: Collection[int]) -> float:
    """System (kernel) CPU seconds of the processes' main threads, the event loops: the
    socket reads and writes the loop makes, apart from its Python work."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(stat_fields(f"/proc/{pid}/task/{pid}/stat")[12])
    return total / os.sysconf("SC_CLK_TCK")


def server_threads(pids: Collection[int]) -> dict[int, tuple[str, float]]:
    """`thread_cpu` of every process in `pids`, together (thread ids are system-wide)."""
    out: dict[int, tuple[str, float]] = {}
    for pid in pids:
        with contextlib.suppress(OSError):  # a process that ended counts no more
            out |= thread_cpu(pid)
    return out


def group_of(name: str, tid: int, pid: int | Collection[int]) -> str:
    """The part of the server a thread belongs to, by its name (service.tuning names them);
    `pid`: the server process, or each of several (their main threads are event loops)."""
    if tid == pid or (not isinstance(pid, int) and tid in pid):
        return "loop"  # uvicorn runs the event loop on the main thread
    if name.startswith(("prepare-", "decode", "asyncio", "tokeni", "b64", "base64")):
        return "pools"  # the decode pool, the tokenize pool
    if name.startswith("model-worker"):
        return "serving"
    return "other"


def thread_family(name: str) -> str:
    """A pool's threads share one family: "prepare-image_0" -> "prepare-image"."""
    return re.sub(r"[-_#]?\d+$", "", name) or name


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
              pid: int | Collection[int]) -> tuple[dict[str, float], dict[str, float]]:
    """CPU seconds between two `thread_cpu` readings, by group and by thread family. A
    thread born in between counts from zero; one that ended in between is lost (pools
    keep theirs)."""
    groups = {"loop": 0.0, "pools": 0.0, "serving": 0.0, "other": 0.0}
    families: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        d = cpu - before.get(tid, (name, 0.0))[1]
        groups[group_of(name, tid, pid)] += d
        main = tid == pid or (not isinstance(pid, int) and tid in pid)
        fam = "main (event loop)" if main else thread_family(name)
        families[fam] = families.get(fam, 0.0) + d
    return groups, {k: round(v, 3) for k, v in sorted(families.items()) if v > 0}


class Window(threading.Thread):
    """Reads the server's threads (the process `server_pid` and the server processes
    `loop_pids` it supervises, or itself alone) and the clients' CPU at both ends of
    [start, end) of time.time()."""

    def __init__(self, server_pid: int, loop_pids: list[int], client_pids: list[int],
                 start: float, end: float):
        super().__init__(daemon=True)
        self.server_pids = sorted({server_pid, *loop_pids})
        self.loop_pids, self.client_pids = set(loop_pids), client_pids
        self.start_at, self.end_at = start, end
        self.readings: list[tuple[float, dict, float, float]] = []

    def _read(self) -> None:
        clients = sum(cpu_s(p) for p in self.client_pids)
        loops = self.loop_pids or {self.server_pids[0]}
        self.readings.append((time.time(), server_threads(self.server_pids), clients,
                              main_thread_system_s(loops)))

    def run(self) -> None:
        time.sleep(max(0.0, self.start_at - time.time()))
        self._read()
        time.sleep(max(0.0, self.end_at - time.time()))
        self._read()

    def cpu(self) -> dict:
        (t0, s0, c0, k0), (t1, s1, c1, k1) = self.readings
        groups, families = cpu_delta(s0, s1, self.loop_pids)
        return {"window_s": t1 - t0, "server_s": groups, "server_threads_s": families,
                "clients_s": c1 - c0, "loop_system_s": k1 - k0}


# ---- one phase, the run, the report ----

def run_phase(clients: Clients, server: ServerProcess, loop_pids: list[int], phase: Phase,
              concurrency: int, args: argparse.Namespace, seed: int) -> dict:
    clients.prepare((phase, concurrency, args.warmup, args.duration, args.timeout, seed))
    start_at = time.time() + 0.3
    window = Window(server.pid, loop_pids, clients.pids, start_at + args.warmup,
                    start_at + args.warmup + args.duration)
    window.start()
    clients.start(start_at)
    records, problems = clients.results(args.warmup + args.duration + args.timeout + 30)
    window.join(30)
    summary = summarise(records, args.warmup, args.warmup + args.duration)
    cpu = window.cpu()
    items = summary["items_per_s"] * args.duration  # answered inside the window
    per = 1e6 / items if items else math.nan
    server = cpu["server_s"]
    lat = summary["latency_ok_s"] or {}
    return {
        "phase": phase.name, "kind": phase.kind, "items_per_request": phase.items,
        "concurrency": {"clients": len(clients.procs), "per_client": concurrency},
        "items_per_s": summary["items_per_s"],
        "p50_ms": 1e3 * lat.get("p50", math.nan), "p99_ms": 1e3 * lat.get("p99", math.nan),
        "us_per_item": {
            "loop": server["loop"] * per, "loop_kernel": cpu["loop_system_s"] * per,
            "pools": server["pools"] * per,
            "serving": server["serving"] * per, "other": server["other"] * per,
            "server": sum(server.values()) * per, "client": cpu["clients_s"] * per},
        "cores": {"loop": server["loop"] / cpu["window_s"],
                  "server": sum(server.values()) / cpu["window_s"],
                  "client": cpu["clients_s"] / cpu["window_s"]},
        "cpu": cpu, "summary": summary, "problems": problems,
    }


def median_run(runs: list[dict]) -> dict:
    """The run of median items/s, whole (its fields measured together), with every run's
    items/s beside it."""
    ordered = sorted(runs, key=lambda r: r["items_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["items_per_s_runs"] = [r["items_per_s"] for r in runs]
    return chosen


def projection(result: dict, cores: int = GPU_HOST_CORES) -> dict:
    """At the goal for the phase's kind: the loop's budget per item, one loop's ceiling,
    and the event loops and cores (serving layer only: no model, no load generator) the
    goal would need at the measured CPU per item, on cores as fast as these."""
    goal = GOALS[result["kind"]]
    us = result["us_per_item"]
    return {
        "goal_per_s": goal,
        "loop_budget_us": 1e6 / goal,  # one loop, 100 % busy
        "host_budget_us": cores * 1e6 / goal,  # every core of the host
        "one_loop_items_per_s": 1e6 / us["loop"] if us["loop"] > 0 else math.inf,
        "event_loops": goal * us["loop"] / 1e6,
        "server_cores": goal * us["server"] / 1e6,
        "client_cores": goal * us["client"] / 1e6,
    }


def _f(x: float, digits: int = 0) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def format_tables(report: dict) -> str:
    rows = report["phases"]
    lines = ["| phase | items/s | p50 ms | p99 ms | loop µs/item | of which kernel | "
             "pools µs/item | serving µs/item | other µs/item | server µs/item | "
             "server cores | client µs/item | client cores |",
             "|---|" + "---:|" * 12]
    for r in rows.values():
        u, c = r["us_per_item"], r["cores"]
        lines.append(f"| {r['phase']} | {_f(r['items_per_s'])} | {_f(r['p50_ms'])} | "
                     f"{_f(r['p99_ms'])} | {_f(u['loop'])} | {_f(u.get('loop_kernel'))} | "
                     f"{_f(u['pools'])} | "
                     f"{_f(u['serving'])} | {_f(u['other'])} | {_f(u['server'])} | "
                     f"{_f(c['server'], 2)} | {_f(u['client'])} | {_f(c['client'], 2)} |")
    lines += ["", f"Projection to a {GPU_HOST_CORES}-core GPU host (serving layer only, cores "
              "as fast as these): at 5,000 images/s each image may take 200 µs of one event "
              f"loop and {GPU_HOST_CORES * 200:,} µs of the host's cores; at 20,000 texts/s, "
              f"50 µs and {GPU_HOST_CORES * 50:,} µs.", "",
              "| phase | goal items/s | loop µs/item (budget) | one loop's ceiling items/s | "
              "event loops needed | server cores needed | load-generator cores |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        p = r["projection"]
        lines.append(f"| {r['phase']} | {_f(p['goal_per_s'])} | {_f(r['us_per_item']['loop'])} "
                     f"({_f(p['loop_budget_us'])}) | {_f(p['one_loop_items_per_s'])} | "
                     f"{_f(p['event_loops'], 1)} | {_f(p['server_cores'], 1)} | "
                     f"{_f(p['client_cores'], 1)} |")
    return "\n".join(lines)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args: argparse.Namespace) -> dict:
    env = {"CLIP_ENGINE": "null", "CLIP_LOG_FORMAT": "text", "CLIP_LOG_LEVEL": "warning",
           "CLIP_MAX_BATCH_SIZE": str(args.max_batch_size),
           "CLIP_MAX_BATCH_TOKENS": str(args.max_batch_size * 77),
           "CLIP_PROCESSES": str(args.processes),
           **({"CLIP_PREPARE_WORKERS": str(args.prepare_workers)} if args.prepare_workers
              else {}),
           **dict(args.server_env)}
    chosen = [p for p in phases(args.images) if not args.phases or p.name in args.phases]
    report: dict = {
        "config": {k: v for k, v in vars(args).items() if k != "json"} | {"server_env": env},
        "machine": {"cpus": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
                    "load_average_before": load_average()},
        "phases": {},
    }
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL  # noqa: SIM115
    server = ServerProcess(["--model", args.model], env, stdout=log, stderr=subprocess.STDOUT)
    clients = None
    try:
        server.wait_ready(args.ready_timeout)
        model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
        if model["engine"] != "null":
            raise RuntimeError(f"the server serves {model['name']} with {model['engine']}")
        report["model"] = model
        # The server processes: the supervisor's children, or the server alone.
        loop_pids = [server.pid]
        if args.processes > 1:
            wait_listening(server.port, args.processes, args.ready_timeout)
            loop_pids = server_processes(server.pid)
        if len(loop_pids) != args.processes:
            raise RuntimeError(f"{len(loop_pids)} server processes, {args.processes} asked for")
        report["server_pids"] = loop_pids
        clients = Clients(args.clients, server.url, args.pool_size)
        for i, phase in enumerate(chosen):
            concurrency = {"images": args.image_concurrency,
                           "texts": args.text_concurrency}[phase.kind]
            if phase.items == 1:
                concurrency = args.text1_concurrency
            runs = [run_phase(clients, server, loop_pids, phase, concurrency, args,
                              seed=i * 10 + k)
                    for k in range(args.repeats)]
            result = median_run(runs)
            result["projection"] = projection(result)
            report["phases"][phase.name] = result
            print(f"{phase.name}: {result['items_per_s']:,.0f} items/s, loop "
                  f"{result['us_per_item']['loop']:,.0f} µs/item, server "
                  f"{result['us_per_item']['server']:,.0f} µs/item", flush=True)
        if args.processes > 1:
            report["requests_by_process"] = requests_by_process(server.url)
            print(f"requests answered by each server process: "
                  f"{report['requests_by_process']}", flush=True)
    finally:
        if clients is not None:
            clients.close()
        report["server_exit"] = server.stop()
        if args.server_log:
            log.close()
    report["machine"]["load_average_after"] = load_average()
    return report


def _env_pair(text: str) -> tuple[str, str]:
    if "=" not in text or not text.startswith("CLIP_"):
        raise argparse.ArgumentTypeError(f"expected CLIP_NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="seconds, for a test: short phases, a small image pool, few callers")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--server-log", type=Path, help="the server's output (default: dropped)")
    p.add_argument("--model", default="ViT-B-32",
                   help="its shapes and preprocessing only: the null engine loads no weights")
    p.add_argument("--images", type=int, default=64,
                   help="items per request, but for text1 (--quick: 16)")
    p.add_argument("--clients", type=int, default=2, help="load-generator processes (>= 2)")
    p.add_argument("--image-concurrency", type=int, default=2, help="per client")
    p.add_argument("--text-concurrency", type=int, default=4, help="64-text requests per client")
    p.add_argument("--text1-concurrency", type=int, default=16, help="per client")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds sent first, not counted")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    p.add_argument("--repeats", type=int, default=1, help="runs per phase; the median is kept")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request")
    p.add_argument("--pool-size", type=int, default=64, help="distinct JPEGs")
    p.add_argument("--prepare-workers", type=int, default=None,
                   help="the server's decode threads (default: the server's own)")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--processes", type=int, default=1,
                   help="server processes (CLIP_PROCESSES); >1: a supervisor and its children")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--phases", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="a comma list of phase names (default: all)")
    p.add_argument("--server-env", type=_env_pair, action="append", default=[],
                   metavar="CLIP_NAME=VALUE", help="more server settings (repeatable)")
    args = p.parse_args(argv)
    if args.quick:
        # Short phases, 16 items per request: even on a busy 2-core machine, some 16-image
        # requests are answered inside the 2 s window.
        args.warmup, args.duration, args.repeats = 0.5, 2.0, 1
        args.images, args.pool_size = min(args.images, 16), min(args.pool_size, 8)
        args.image_concurrency, args.text_concurrency, args.text1_concurrency = 1, 2, 4
    known = {ph.name for ph in phases(args.images)}
    if args.phases and set(args.phases) - known:
        p.error(f"unknown phases {sorted(set(args.phases) - known)}; known: {sorted(known)}")
    if args.clients < 2:
        p.error("--clients: at least 2, so that one client's core does not bound the server")
    if not (args.duration > 0 and args.warmup >= 0 and args.warmup + args.duration <= MAX_PHASE_S):
        p.error(f"need duration > 0, warmup >= 0 and warmup + duration <= {MAX_PHASE_S:.0f} s")
    if not 1 <= args.repeats <= MAX_REPEATS:
        p.error(f"--repeats: 1 to {MAX_REPEATS}")
    if min(args.images, args.image_concurrency, args.text_concurrency,
           args.text1_concurrency, args.pool_size, args.processes) < 1:
        p.error("counts must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"load average before: {load_average()}", flush=True)
    report = run(args)
    print()
    print(format_tables(report))
    print(f"\nload average after: {report['machine']['load_average_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    problems = [f"{name}: {pr}" for name, r in report["phases"].items() for pr in r["problems"]]
    for pr in problems[:10]:
        print(f"problem: {pr}", file=sys.stderr)
    bad = [n for n, r in report["phases"].items()
           if r["summary"]["ok"] == 0 or r["summary"]["error"] + r["summary"]["timeout"]
           + r["summary"]["transport_error"] > 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

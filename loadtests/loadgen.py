"""Load generator for clip-serve on this machine: asyncio + one httpx client.

    python loadtests/loadgen.py --url http://127.0.0.1:8000 --workload image1 --concurrency 16 --duration 30
    python loadtests/loadgen.py --workload mix --rate 20 --duration 60 --json out/mix.json
    python loadtests/loadgen.py --workload image1 --sweep-concurrency 1,4,16 --plots out/

Closed loop (--concurrency N): N callers, each sending its next request as soon as the
previous one is answered (after a refusal, once its Retry-After has passed); throughput is
what the server sustains. Open loop (--rate R):
Poisson arrivals at R requests/s whatever the server does, as independent users would
send them; latency then includes queueing, and past capacity the server must refuse.

Workloads (loadtests/workloads.py): image1, image16, text (unique captions, so the text
cache cannot help), classify (one image, the same 10 labels every time), mix (40% image1,
40% text, 20% classify). The first --warmup seconds are sent but not counted. Throughput
counts the successful answers that arrive inside the measured window; latencies are those
of every request sent inside it, waited for to the end. /metrics is scraped at the start
and end of the window, and the report gives the batch sizes the server formed between.

Only loopback addresses (127.0.0.0/8, localhost, ::1) are accepted, and a run stops by
itself: warm-up plus duration may not exceed MAX_RUN_S.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx
import scrape
from stats import Record, format_report, format_sweep, percentiles, summarise, timeline
from workloads import WORKLOADS, Call, ImagePool, Workload, image_pool

MAX_RUN_S = 600.0  # warm-up + duration of one run
MAX_SWEEP_POINTS = 20
def check_local(url: str) -> str:
    """The URL without a trailing slash, if it names this machine; else ValueError."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: only http(s) URLs")
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise ValueError(f"{url!r}: load is only sent to this machine (127.0.0.1, localhost)")
    return url.rstrip("/")


@dataclass(frozen=True)
class RunConfig:
    url: str = "http://127.0.0.1:8000"
    workload: str = "image1"
    mode: Literal["closed", "open"] = "closed"
    concurrency: int = 16  # closed loop: callers
    rate: float = 0.0  # open loop: mean requests/s
    duration: float = 30.0  # measured seconds
    warmup: float = 5.0  # seconds sent first and not counted
    timeout: float = 60.0  # client timeout per request
    max_outstanding: int = 512  # open loop: past this, arrivals are dropped by the client
    honour_retry_after: bool = True  # closed loop: a refused caller waits before resending
    seed: int = 0  # the request sequence (texts, image order, mix, arrivals)
    image_seed: int = 0  # the image pool
    api_key: str | None = None
    scrape: bool = True  # read /metrics before and after

    def check(self) -> None:
        check_local(self.url)
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; known: {', '.join(WORKLOADS)}")
        if self.duration <= 0 or self.warmup < 0 or self.warmup + self.duration > MAX_RUN_S:
            raise ValueError(f"need duration > 0, warmup >= 0 and warmup + duration <= "
                             f"{MAX_RUN_S:.0f} s")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError("closed loop needs concurrency >= 1")
        if self.mode == "open" and not (self.rate > 0 and self.max_outstanding >= 1):
            raise ValueError("open loop needs rate > 0 and max_outstanding >= 1")
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0")

    def describe(self) -> str:
        load = (f"closed loop, {self.concurrency} callers" if self.mode == "closed"
                else f"open loop, {self.rate:.4g} req/s Poisson")
        return (f"{self.workload}, {load}, {self.duration:g} s measured "
                f"(+{self.warmup:g} s warm-up)")


def poisson_arrivals(rate: float, duration: float, seed: int) -> list[float]:
    """Arrival times in [0, duration): exponential gaps of mean 1/rate."""
    rng = random.Random(seed)
    out, t = [], rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


class Clients:
    """Single-connection httpx clients, one per request in flight, reused.

    One AsyncClient with N connections would be simpler, but httpcore looks at every
    connection of its pool for each request and each answer: at 32 connections that cost
    the client about 2.5 ms of CPU per request here, as much as the server spends on a
    short text, on a machine whose two cores the client shares with the server. A stack
    of one-connection clients costs the same at any concurrency.
    """

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float):
        self._kwargs = {
            "base_url": base_url, "headers": headers, "timeout": timeout, "trust_env": False,
            # One context for all: building one per client costs ~25 ms of CPU each.
            "verify": httpx.create_ssl_context(),
            "limits": httpx.Limits(max_connections=1, max_keepalive_connections=1),
        }
        self._idle: list[httpx.AsyncClient] = []
        self._all: list[httpx.AsyncClient] = []

    def take(self) -> httpx.AsyncClient:
        if self._idle:
            return self._idle.pop()
        client = httpx.AsyncClient(**self._kwargs)
        self._all.append(client)
        return client

    def give_back(self, client: httpx.AsyncClient) -> None:
        self._idle.append(client)

    @property
    def opened(self) -> int:
        return len(self._all)

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._all))


def _seconds(retry_after: str | None) -> float | None:
    """Retry-After in seconds; an HTTP date (which this service never sends) counts as 1 s."""
    if retry_after is None:
        return None
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        return 1.0


def _outcome(status: int) -> str:
    if 200 <= status < 300:
        return "ok"
    return {503: "refused_503", 429: "refused_429"}.get(status, "error")


async def post_body(client: httpx.AsyncClient, content: bytes, ctype: str, kind: str,
                    items: int, t0: float, check: Callable[[httpx.Response], str] | None,
                    problems: list[str], path: str = "/embed") -> Record:
    """One POST of a built body, as a Record; `check` (None: not this time) reads an OK
    answer and says what is wrong with it, and what went wrong lands in `problems`."""
    start = time.perf_counter()
    status, retry_after, exc, outcome = 0, None, "", "ok"
    try:
        r = await client.post(path, content=content, headers={"content-type": ctype})
        status, outcome = r.status_code, _outcome(r.status_code)
        retry_after = _seconds(r.headers.get("retry-after"))
        if outcome == "ok" and check is not None and (why := check(r)):
            outcome = "error"
            problems.append(why)
        elif outcome == "error":
            problems.append(f"HTTP {status}: {r.text[:200]}")
    except httpx.TimeoutException as e:
        outcome, exc = "timeout", type(e).__name__
    except httpx.HTTPError as e:  # refused or reset connections, protocol errors
        outcome, exc = "transport_error", type(e).__name__
        problems.append(f"{exc}: {e}")
    return Record(kind, start - t0, time.perf_counter() - start, status, items, outcome,
                  retry_after, exc)


async def send(client: httpx.AsyncClient, call: Call, t0: float) -> Record:
    """A workload's call, unchecked (its problems are not kept)."""
    return await post_body(client, call.body, "application/json", call.kind, call.items, t0,
                           None, [], call.path)


async def closed_bodies(
    url: str,
    next_body: Callable[[], tuple[bytes, str]],
    kind: str,
    items: int,
    concurrency: int,
    t0: float,
    end: float,
    timeout: float,
    check: Callable[[httpx.Response], str],
    check_every: bool = True,
) -> tuple[list[Record], list[str]]:
    """Closed loop on /embed: `concurrency` callers, one connection each, posting
    `next_body()` (content, content type) until `end` and sleeping out each Retry-After.
    `check` reads an OK answer and says what is wrong with it ('' when nothing); with
    `check_every` False each caller checks only its first, so the client's CPU goes to
    sending rather than to reading float JSON. The records and the problems seen."""
    records: list[Record] = []
    problems: list[str] = []

    async def caller() -> None:
        checked = False
        async with httpx.AsyncClient(base_url=url, timeout=timeout, trust_env=False,
                                     limits=httpx.Limits(max_connections=1)) as client:
            while time.perf_counter() < end:
                content, ctype = next_body()
                record = await post_body(client, content, ctype, kind, items, t0,
                                         check if check_every or not checked else None,
                                         problems)
                checked = checked or record.outcome == "ok"
                records.append(record)
                if record.retry_after:
                    await asyncio.sleep(min(record.retry_after,
                                            max(0.0, end - time.perf_counter())))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return records, problems


async def open_bodies(
    url: str,
    next_body: Callable[[], tuple[bytes, str]],
    kind: str,
    items: int,
    rate: float,
    t0: float,
    duration: float,
    timeout: float,
    check: Callable[[httpx.Response], str],
    seed: int,
    max_outstanding: int = 256,
) -> tuple[list[Record], list[str], list[float]]:
    """Open loop on /embed: Poisson arrivals of mean `rate` requests/s in [t0, t0 +
    duration), each sent when it is due however many are outstanding (up to
    `max_outstanding`, then recorded as client_dropped), on a single-connection client
    taken from a reused stack (`Clients`). Every answer is checked. The records, the
    problems, and how late each request was sent against its schedule: a client that
    falls behind offers less than `rate`, which a report must say."""
    records: list[Record] = []
    problems: list[str] = []
    clients = Clients(url, {}, timeout)

    async def one(at: float) -> None:
        content, ctype = next_body()
        client = clients.take()
        try:
            records.append(await post_body(client, content, ctype, kind, items, t0, check,
                                           problems))
        finally:
            clients.give_back(client)

    def dropped(at: float) -> None:
        records.append(Record(kind, at, 0.0, 0, items, "client_dropped", None))

    try:
        lags = await launch_on_schedule(poisson_arrivals(rate, duration, seed), t0,
                                        max_outstanding, one, dropped)
    finally:
        await clients.aclose()
    return records, problems, lags


async def _closed(clients: Clients, workload: Workload, cfg: RunConfig, t0: float) -> list[Record]:
    records: list[Record] = []
    end = t0 + cfg.warmup + cfg.duration

    async def caller() -> None:
        client = clients.take()
        while time.perf_counter() < end:
            record = await send(client, workload.next(), t0)
            records.append(record)
            if cfg.honour_retry_after and record.retry_after is not None:
                # As well-behaved clients do; resending at once would measure how fast
                # the server can refuse, not what it serves.
                await asyncio.sleep(min(record.retry_after, max(0.0, end - time.perf_counter())))

    await asyncio.gather(*(caller() for _ in range(cfg.concurrency)))
    return records


async def launch_on_schedule(arrivals: list[float], t0: float, max_outstanding: int,
                             start: Callable[[float], Awaitable[None]],
                             dropped: Callable[[float], None]) -> list[float]:
    """Starts `start(at)` as its own task at t0 + at for each arrival, however many are
    outstanding, up to `max_outstanding` (then `dropped(at)` instead), and waits for them
    all. Returns how late each was started against its schedule: a late client would
    understate the offered load."""
    lags: list[float] = []
    outstanding: set[asyncio.Task] = set()
    for at in arrivals:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(max(0.0, -delay))
        if len(outstanding) >= max_outstanding:
            dropped(at)
            continue
        task = asyncio.create_task(start(at))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
    if outstanding:
        await asyncio.gather(*outstanding)
    return lags


async def _open(clients: Clients, workload: Workload, cfg: RunConfig, t0: float) -> tuple[list[Record], list[float]]:
    """Poisson arrivals at cfg.rate, each its own request (`launch_on_schedule`)."""
    records: list[Record] = []

    async def one(at: float) -> None:
        client = clients.take()
        try:
            records.append(await send(client, workload.next(), t0))
        finally:
            clients.give_back(client)

    def dropped(at: float) -> None:
        call = workload.next()
        records.append(Record(call.kind, at, 0.0, 0, call.items, "client_dropped", None))

    lags = await launch_on_schedule(poisson_arrivals(cfg.rate, cfg.warmup + cfg.duration, cfg.seed),
                                    t0, cfg.max_outstanding, one, dropped)
    return records, lags


async def _scrape(client: httpx.AsyncClient) -> scrape.Samples | str:
    try:
        r = await client.get("/metrics", timeout=10)
        r.raise_for_status()
        return scrape.parse(r.text)
    except (httpx.HTTPError, ValueError) as e:
        return f"/metrics: {type(e).__name__}: {e}"


async def run(cfg: RunConfig, pool: ImagePool | None = None) -> dict:
    """One run; the report as a JSON-ready dict."""
    cfg.check()
    workload = Workload(cfg.workload, cfg.seed, pool, cfg.image_seed)
    if workload.uses_images:
        workload.pool  # noqa: B018 (built now, before the clock starts)
    headers = {"authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    clients = Clients(check_local(cfg.url), headers, cfg.timeout)
    scraper = clients.take()
    cpu0 = time.process_time()
    try:
        t0 = time.perf_counter()

        async def scrape_at_window_start() -> scrape.Samples | str | None:
            if not cfg.scrape:
                return None
            await asyncio.sleep(max(0.0, t0 + cfg.warmup - time.perf_counter()))
            return await _scrape(scraper)

        before_task = asyncio.create_task(scrape_at_window_start())
        lags: list[float] = []
        if cfg.mode == "closed":
            records = await _closed(clients, workload, cfg, t0)
        else:
            records, lags = await _open(clients, workload, cfg, t0)
        before = await before_task
        after = await _scrape(scraper) if cfg.scrape else None
    finally:
        await clients.aclose()
    # The client shares the machine's cores with the server it measures: say how much.
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0

    report: dict = {"config": {**asdict(cfg), "api_key": bool(cfg.api_key)},
                    "describe": cfg.describe(),
                    "summary": summarise(records, cfg.warmup, cfg.warmup + cfg.duration),
                    "client_cpu": {"seconds": cpu, "share_of_one_core": cpu / wall,
                                   "ms_per_request": 1000 * cpu / max(1, len(records))}}
    kinds = sorted({r.kind for r in records})
    if len(kinds) > 1:
        report["by_kind"] = {
            k: summarise([r for r in records if r.kind == k], cfg.warmup,
                         cfg.warmup + cfg.duration) for k in kinds}
    report["timeline"] = timeline(records)
    if lags:
        report["schedule_lag_s"] = percentiles(lags)
    if isinstance(before, dict) and isinstance(after, dict):
        report["batch_sizes"] = scrape.batch_sizes(before, after)
        report["counters"] = scrape.counters(before, after)
    elif cfg.scrape:
        report["scrape_error"] = next(x for x in (before, after) if isinstance(x, str))
    return report


async def settle(url: str, timeout: float = 60.0, api_key: str | None = None) -> bool:
    """Waits until the server's queues are empty (work left by a previous run): True if so."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=check_local(url), headers=headers) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            samples = await _scrape(client)
            if isinstance(samples, str):
                return False
            if sum(v for (name, _), v in samples.items() if name == "clip_queue_depth") == 0:
                return True
            await asyncio.sleep(0.5)
    return False


async def sweep(cfg: RunConfig, points: list[float], pool: ImagePool | None = None) -> list[dict]:
    """One run per point: concurrencies (closed loop) or rates (open loop), in order."""
    if not 1 <= len(points) <= MAX_SWEEP_POINTS:
        raise ValueError(f"a sweep has 1 to {MAX_SWEEP_POINTS} points")
    reports = []
    for i, p in enumerate(points):
        point = (replace(cfg, concurrency=int(p)) if cfg.mode == "closed"
                 else replace(cfg, rate=float(p)))
        point = replace(point, seed=cfg.seed + i)  # fresh texts: the cache must not help
        point.check()
        await settle(cfg.url, api_key=cfg.api_key)
        print(f"  {point.describe()} ...", flush=True)
        reports.append(await run(point, pool))
    return reports


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="this machine only")
    p.add_argument("--workload", default="image1", choices=WORKLOADS)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=16, help="closed loop: callers")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument("--sweep-concurrency", type=_floats, help="closed loop at each: 1,4,16")
    load.add_argument("--sweep-rates", type=_floats, help="open loop at each: 2,4,8")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds sent first, not counted")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request")
    p.add_argument("--max-outstanding", type=int, default=512,
                   help="open loop: arrivals past this many in flight are dropped (counted)")
    p.add_argument("--seed", type=int, default=None,
                   help="request sequence; default: from the clock (printed), so a second run "
                        "does not resend texts the server has cached")
    p.add_argument("--image-seed", type=int, default=0)
    p.add_argument("--ignore-retry-after", action="store_true",
                   help="closed loop: resend at once after a 503/429 instead of waiting")
    p.add_argument("--api-key", help="sent as a Bearer token")
    p.add_argument("--no-scrape", action="store_true", help="do not read /metrics")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--plots", type=Path, help="write PNG plots into this folder")
    args = p.parse_args(argv)

    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    open_loop = args.rate is not None or args.sweep_rates is not None
    cfg = RunConfig(
        url=args.url, workload=args.workload, mode="open" if open_loop else "closed",
        concurrency=args.concurrency, rate=args.rate or 0.0, duration=args.duration,
        warmup=args.warmup, timeout=args.timeout, max_outstanding=args.max_outstanding,
        seed=seed, image_seed=args.image_seed, api_key=args.api_key, scrape=not args.no_scrape,
        honour_retry_after=not args.ignore_retry_after,
    )
    points = args.sweep_rates or args.sweep_concurrency
    try:
        if points:
            replace(cfg, concurrency=max(1, int(points[0])), rate=points[0]).check()
        else:
            cfg.check()
    except ValueError as e:
        p.error(str(e))
    print(f"seed {seed}", flush=True)
    pool = image_pool(seed=args.image_seed) if Workload(args.workload).uses_images else None
    # Bounded: every run ends by itself; this is the backstop for a server that hangs.
    per_run = cfg.warmup + cfg.duration + cfg.timeout + 30
    if points:
        reports = asyncio.run(asyncio.wait_for(sweep(cfg, points, pool),
                                               len(points) * (per_run + 60)))
        for r in reports:
            print(format_report(r), end="\n\n")
        print(format_sweep(reports))
        out: dict = {"sweep": reports}
    else:
        out = asyncio.run(asyncio.wait_for(run(cfg, pool), per_run))
        print(format_report(out))
        reports = [out]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    if args.plots:
        import plots  # matplotlib only when asked for

        written = plots.write_all(reports, args.plots)
        print("plots: " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

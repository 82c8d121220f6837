"""What a load-generator run found: one record per request, the summary of a measured
window, a per-second timeline, and the printed tables."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

import numpy as np

OUTCOMES = ("ok", "error", "timeout", "transport_error", "refused_503", "refused_429",
            "client_dropped")


@dataclass(slots=True)
class Record:
    kind: str
    start: float  # seconds since the run began
    latency: float  # seconds; 0 for client_dropped
    status: int  # HTTP status; 0 when there was no answer
    items: int
    outcome: str  # one of OUTCOMES
    retry_after: float | None  # seconds the answer's Retry-After asked for; None: absent
    exception: str = ""  # timeouts and transport errors: httpx's exception class


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99),
            "mean": statistics.fmean(values), "max": max(values)}


def summarise(records: list[Record], start: float, end: float) -> dict:
    """Counts and rates of the requests sent in [start, end), seconds since the run began.

    Throughput (`ok_per_s`, `items_per_s`) counts successful answers that arrived in the
    window; `accepted` latencies are those of every request the server did not refuse.
    """
    sent = [r for r in records if start <= r.start < end]
    span = end - start
    answered = [r for r in records if r.outcome == "ok" and start <= r.start + r.latency < end]
    counts = Counter(r.outcome for r in sent)
    refusals = [r for r in sent if r.outcome in ("refused_503", "refused_429")]
    return {
        "requests": len(sent),
        **{k: counts.get(k, 0) for k in OUTCOMES},
        "refused_without_retry_after": sum(r.retry_after is None for r in refusals),
        "sent_per_s": len(sent) / span,
        "ok_per_s": len(answered) / span,
        "items_per_s": sum(r.items for r in answered) / span,
        "latency_ok_s": percentiles([r.latency for r in sent if r.outcome == "ok"]),
        "latency_accepted_s": percentiles(
            [r.latency for r in sent if r.outcome in ("ok", "error", "timeout")]),
        "status": dict(sorted(Counter(str(r.status) for r in sent if r.status).items())),
        "exceptions": dict(Counter(r.exception for r in sent if r.exception)),
    }


def timeline(records: list[Record], step: float = 1.0) -> list[dict]:
    """Per `step` seconds of answer time: answers by outcome and the p50 latency of the
    successful ones; shows a run's course (a queue filling, refusals starting)."""
    bins: dict[int, list[Record]] = {}
    for r in records:
        if r.outcome != "client_dropped":
            bins.setdefault(int((r.start + r.latency) // step), []).append(r)
    out = []
    for i in range(max(bins, default=-1) + 1):
        rs = bins.get(i, [])
        ok = [r.latency for r in rs if r.outcome == "ok"]
        out.append({"t": i * step, **Counter(r.outcome for r in rs),
                    "ok_p50_s": float(np.median(ok)) if ok else None})
    return out


def _ms(lat: dict | None, key: str) -> str:
    return f"{lat[key] * 1000:8.1f}" if lat else "       -"


def format_report(report: dict) -> str:
    s = report["summary"]
    lines = [f"# {report['describe']}",
             f"requests {s['requests']}: ok {s['ok']}, errors {s['error']}, timeouts "
             f"{s['timeout']}, transport errors {s['transport_error']}, 503 {s['refused_503']}, "
             f"429 {s['refused_429']} (without Retry-After: {s['refused_without_retry_after']}), "
             f"client-dropped {s['client_dropped']}"
             + (f" {s['exceptions']}" if s["exceptions"] else ""),
             f"throughput {s['ok_per_s']:.2f} ok req/s, {s['items_per_s']:.2f} items/s "
             f"(sent {s['sent_per_s']:.2f} req/s)",
             "latency ms        p50      p90      p99      max"]
    for name, key in (("ok", "latency_ok_s"), ("accepted", "latency_accepted_s")):
        lat = s[key]
        lines.append(f"  {name:<10} {_ms(lat, 'p50')} {_ms(lat, 'p90')} {_ms(lat, 'p99')} "
                     f"{_ms(lat, 'max')}")
    for kind, ks in report.get("by_kind", {}).items():
        lines.append(f"  {kind:<10} {_ms(ks['latency_ok_s'], 'p50')} "
                     f"{_ms(ks['latency_ok_s'], 'p90')} {_ms(ks['latency_ok_s'], 'p99')} "
                     f"{_ms(ks['latency_ok_s'], 'max')}  ({ks['ok']} ok, "
                     f"{ks['items_per_s']:.1f} items/s)")
    c = report["client_cpu"]
    lines.append(f"client CPU {c['share_of_one_core']:.0%} of a core, "
                 f"{c['ms_per_request']:.2f} ms per request"
                 + (f"; send lag p99 {report['schedule_lag_s']['p99'] * 1000:.1f} ms"
                    if report.get("schedule_lag_s") else ""))
    for key, b in report.get("batch_sizes", {}).items():
        spread = "  ".join(f"{row['sizes']}:{row['batches']}" for row in b["buckets"]
                           if row["batches"])
        lines.append(f"batches {key}: {b['batches']}, mean size {b['mean']:.1f}  [{spread}]")
    if report.get("counters"):
        lines.append("server counters: " + ", ".join(
            f"{k} {v:g}" for k, v in report["counters"].items()))
    if report.get("scrape_error"):
        lines.append(f"(no batch sizes: {report['scrape_error']})")
    return "\n".join(lines)


def format_sweep(reports: list[dict]) -> str:
    lines = ["| offered | ok req/s | items/s | p50 ms | p99 ms | 503 | errors | timeouts |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        c, s = r["config"], r["summary"]
        offered = f"{c['concurrency']} callers" if c["mode"] == "closed" else f"{c['rate']:.4g}/s"
        lat = s["latency_ok_s"]
        lines.append(f"| {offered} | {s['ok_per_s']:.2f} | {s['items_per_s']:.2f} | "
                     f"{_ms(lat, 'p50').strip()} | {_ms(lat, 'p99').strip()} | "
                     f"{s['refused_503']} | {s['error']} | {s['timeout']} |")
    return "\n".join(lines)



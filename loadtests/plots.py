"""PNG plots of load-generator reports (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend
from matplotlib.ticker import FuncFormatter


def _offered(report: dict) -> float:
    c = report["config"]
    return c["concurrency"] if c["mode"] == "closed" else c["rate"]


def _label(report: dict) -> str:
    c = report["config"]
    return (f"{c['workload']}, {c['concurrency']} callers" if c["mode"] == "closed"
            else f"{c['workload']}, {c['rate']:.4g}/s")


def sweep(reports: list[dict], path: Path) -> Path:
    """Throughput and latency against offered load, one point per report."""
    closed = reports[0]["config"]["mode"] == "closed"
    x = [_offered(r) for r in reports]
    s = [r["summary"] for r in reports]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(x, [v["ok_per_s"] for v in s], "o-", label="ok requests/s")
    a.plot(x, [v["items_per_s"] for v in s], "s--", label="items/s")
    if not closed:
        a.plot(x, x, ":", color="grey", label="offered requests/s")
    a.set_xlabel("callers (closed loop)" if closed else "offered requests/s (Poisson)")
    a.set_ylabel("per second")
    a.set_title("throughput")
    a.legend()
    for key, style in (("p50", "o-"), ("p99", "s-")):
        b.plot(x, [v["latency_ok_s"][key] * 1000 if v["latency_ok_s"] else float("nan")
                   for v in s], style, label=f"{key} (ok)")
    b.set_xlabel(a.get_xlabel())
    b.set_ylabel("ms")
    b.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    b.yaxis.set_major_formatter(plain)
    b.yaxis.set_minor_formatter(plain)
    b.set_title("latency")
    b.legend()
    fig.suptitle(f"{reports[0]['config']['workload']}: load sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def batch_sizes(reports: list[dict], path: Path, labels: list[str] | None = None) -> Path | None:
    """Share of batches per size bucket, per model/modality, one bar group per report."""
    keys = sorted({k for r in reports for k in r.get("batch_sizes", {})})
    if not keys:
        return None
    labels = labels or [_label(r) for r in reports]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        series = [(lab, r["batch_sizes"][key]) for lab, r in zip(labels, reports, strict=True)
                  if key in r.get("batch_sizes", {})]
        # Up to the largest bucket any series reached: the rest is empty by definition.
        used = max(max(i for i, row in enumerate(b["buckets"]) if row["batches"])
                   for _, b in series)
        buckets = [row["sizes"] for row in series[0][1]["buckets"][: used + 1]]
        width = 0.8 / len(series)
        for i, (lab, b) in enumerate(series):
            share = [row["batches"] / b["batches"] for row in b["buckets"][: used + 1]]
            ax.bar([j + i * width for j in range(len(buckets))], share, width,
                   label=f"{lab} (mean {b['mean']:.1f})")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(buckets))], buckets)
        ax.set_xlabel("items per batch")
        ax.set_ylabel("share of batches")
        ax.set_title(key)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def timeline(report: dict, path: Path, rss: list[tuple[float, float]] | None = None) -> Path:
    """Answers per second by outcome over one run; the server's RSS beside it if given."""
    rows = report["timeline"]
    t = [row["t"] for row in rows]
    fig, ax = plt.subplots(figsize=(10, 4))
    for outcome in ("ok", "refused_503", "error", "timeout"):
        ax.plot(t, [row.get(outcome, 0) for row in rows], label=outcome)
    warmup = report["config"]["warmup"]
    if warmup:
        ax.axvspan(0, warmup, color="grey", alpha=0.15, label="warm-up (not counted)")
    ax.set_xlabel("seconds (answer time)")
    ax.set_ylabel("answers per second")
    ax.legend(loc="upper left")
    if rss:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in rss], [m for _, m in rss], "k--", label="server RSS MB")
        ax2.set_ylabel("RSS MB")
        ax2.legend(loc="upper right")
    ax.set_title(report["describe"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_all(reports: list[dict], folder: Path) -> list[Path]:
    """The sweep plot (when there are several reports) and the batch-size plot."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    if len(reports) > 1:
        out.append(sweep(reports, folder / "sweep.png"))
    else:
        out.append(timeline(reports[0], folder / "timeline.png"))
    b = batch_sizes(reports, folder / "batch_sizes.png")
    if b is not None:
        out.append(b)
    return out

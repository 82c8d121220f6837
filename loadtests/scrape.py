"""What the server counted during a run: two /metrics scrapes and their difference.

The names are service/metrics.py's: `clip_batch_size` is a histogram by model and
modality (buckets 1, 2, 4, ... 256 items); the counters are exported with `_total`.
"""

from __future__ import annotations

import math
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Counters worth a line in a report: name -> labels to keep (summed over the others).
COUNTERS = {
    "clip_items_total": ("modality",),
    "clip_rejected_items_total": ("modality",),
    "clip_dropped_items_total": ("reason",),
    "clip_cache_hits_total": (),
    "clip_cache_misses_total": (),
    "clip_batch_failures_total": ("modality",),
}


def parse(text: str) -> Samples:
    """Every sample of an exposition text, keyed by (sample name, sorted labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _le(value: str) -> float:
    return math.inf if value == "+Inf" else float(value)


def _range(lo: float, hi: float) -> str:
    """Integer batch sizes in (lo, hi]: '1', '3-4', '>256'."""
    first = math.floor(lo) + 1
    if math.isinf(hi):
        return f">{math.floor(lo)}"
    last = math.floor(hi)
    return str(last) if first >= last else f"{first}-{last}"


def batch_sizes(before: Samples, after: Samples) -> dict[str, dict]:
    """Batches formed between the scrapes, per 'model/modality': their count, mean size and
    how many fell in each bucket (not cumulative; empty buckets kept, so plots line up)."""
    cumulative: dict[str, dict[float, float]] = defaultdict(dict)
    totals: dict[str, dict[str, float]] = defaultdict(dict)
    for (name, labels), value in after.items():
        if not name.startswith("clip_batch_size_"):
            continue
        lab = dict(labels)
        key = f"{lab.get('model', '')}/{lab.get('modality', '')}"
        delta = value - before.get((name, labels), 0.0)
        if name == "clip_batch_size_bucket":
            # Summed: with several replicas each device exports its own series.
            le = _le(lab["le"])
            cumulative[key][le] = cumulative[key].get(le, 0.0) + delta
        elif name in ("clip_batch_size_count", "clip_batch_size_sum"):
            part = name.rsplit("_", 1)[1]
            totals[key][part] = totals[key].get(part, 0.0) + delta
    out = {}
    for key, buckets in sorted(cumulative.items()):
        count, total = totals[key].get("count", 0.0), totals[key].get("sum", 0.0)
        if count <= 0:
            continue
        rows, prev_le, prev_n = [], 0.0, 0.0
        for le in sorted(buckets):
            rows.append({"le": le if not math.isinf(le) else "+Inf",
                         "sizes": _range(prev_le, le), "batches": int(buckets[le] - prev_n)})
            prev_le, prev_n = le, buckets[le]
        out[key] = {"batches": int(count), "items": int(total), "mean": total / count,
                    "buckets": rows}
    return out


def counters(before: Samples, after: Samples) -> dict[str, float]:
    """The COUNTERS' increase between the scrapes, e.g. {'clip_items_total{modality=image}': 96}."""
    out: dict[str, float] = defaultdict(float)
    for (name, labels), value in after.items():
        keep = COUNTERS.get(name)
        if keep is None:
            continue
        lab = dict(labels)
        tag = ",".join(f"{k}={lab.get(k, '')}" for k in keep)
        out[f"{name}{{{tag}}}" if tag else name] += value - before.get((name, labels), 0.0)
    return dict(sorted(out.items()))

"""The load generator: its pieces on synthetic input, and short runs against a real server."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import statistics
import time

import pytest
from loadtest_support import start_server  # first: it puts loadtests/ on the path
from PIL import Image

# isort: split
import loadgen
import scrape
from loadgen import RunConfig, check_local, poisson_arrivals
from stats import Record, summarise
from workloads import MODERATION_LABELS, Workload, image_pool, photo_jpeg

# ---- without a server ----


def test_only_this_machine_is_a_target():
    for url in ("http://127.0.0.1:8000", "http://localhost:1/", "http://127.9.9.9", "http://[::1]:80"):
        assert check_local(url) == url.rstrip("/")
    for url in ("http://10.0.0.1:8000", "http://192.168.1.2", "http://example.com",
                "http://127.0.0.1.example.com", "ftp://127.0.0.1", "http://0.0.0.0:8000"):
        with pytest.raises(ValueError):
            check_local(url)
    with pytest.raises(SystemExit) as e:
        loadgen.main(["--url", "http://10.1.2.3:8000", "--duration", "1"])
    assert e.value.code == 2


def test_runs_are_bounded():
    with pytest.raises(ValueError):
        RunConfig(duration=loadgen.MAX_RUN_S, warmup=1).check()
    RunConfig(duration=loadgen.MAX_RUN_S - 1, warmup=1).check()


def test_poisson_arrivals_have_the_asked_rate():
    rate, duration = 50.0, 400.0
    times = poisson_arrivals(rate, duration, seed=3)
    assert times == poisson_arrivals(rate, duration, seed=3)
    assert times == sorted(times) and times[0] >= 0 and times[-1] < duration
    # 20,000 arrivals expected, standard deviation sqrt(20,000) ~ 141: within 5 of them.
    assert abs(len(times) - rate * duration) < 5 * (rate * duration) ** 0.5
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    # Exponential gaps: standard deviation equal to the mean.
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.05)
    # Poisson counts per second: variance equal to the mean (not a regular tick).
    counts = [0] * int(duration)
    for t in times:
        counts[int(t)] += 1
    assert statistics.variance(counts) / statistics.fmean(counts) == pytest.approx(1.0, abs=0.25)


def _rec(start, latency, outcome="ok", status=200, items=1, retry_after=None):
    return Record("image1", start, latency, status, items, outcome, retry_after)


def test_summary_counts_the_window_only():
    records = [
        _rec(0.5, 0.1),  # warm-up: not counted
        _rec(1.0, 0.2, items=16),
        _rec(1.5, 0.4),
        _rec(2.5, 1.0),  # sent in the window, answered after it: latency counted, rate not
        _rec(2.0, 0.01, "refused_503", 503, retry_after=1.0),
        _rec(2.1, 0.01, "refused_429", 429),  # no Retry-After
        _rec(2.2, 3.0, "error", 504),
        _rec(2.3, 60.0, "timeout", 0),
        _rec(3.5, 0.1),  # after the window
    ]
    s = summarise(records, 1.0, 3.0)
    assert s["requests"] == 7
    assert (s["ok"], s["refused_503"], s["refused_429"], s["error"], s["timeout"]) == (3, 1, 1, 1, 1)
    assert s["refused_without_retry_after"] == 1
    assert s["ok_per_s"] == pytest.approx(2 / 2.0)
    assert s["items_per_s"] == pytest.approx(17 / 2.0)
    assert s["latency_ok_s"]["max"] == pytest.approx(1.0)
    assert s["latency_accepted_s"]["max"] == pytest.approx(60.0)  # refusals left out
    assert s["status"] == {"200": 3, "429": 1, "503": 1, "504": 1}


BEFORE = """\
# TYPE clip_batch_size histogram
clip_batch_size_bucket{model="m",modality="image",le="1.0"} 5.0
clip_batch_size_bucket{model="m",modality="image",le="2.0"} 5.0
clip_batch_size_bucket{model="m",modality="image",le="4.0"} 7.0
clip_batch_size_bucket{model="m",modality="image",le="+Inf"} 7.0
clip_batch_size_count{model="m",modality="image"} 7.0
clip_batch_size_sum{model="m",modality="image"} 12.0
# TYPE clip_items counter
clip_items_total{model="m",modality="image"} 12.0
clip_items_created{model="m",modality="image"} 1.7e9
# TYPE clip_cache_hits counter
clip_cache_hits_total{model="m"} 4.0
"""
AFTER = """\
# TYPE clip_batch_size histogram
clip_batch_size_bucket{model="m",modality="image",le="1.0"} 6.0
clip_batch_size_bucket{model="m",modality="image",le="2.0"} 8.0
clip_batch_size_bucket{model="m",modality="image",le="4.0"} 12.0
clip_batch_size_bucket{model="m",modality="image",le="+Inf"} 13.0
clip_batch_size_count{model="m",modality="image"} 13.0
clip_batch_size_sum{model="m",modality="image"} 47.0
clip_batch_size_bucket{model="m",modality="text",le="1.0"} 0.0
clip_batch_size_bucket{model="m",modality="text",le="+Inf"} 0.0
clip_batch_size_count{model="m",modality="text"} 0.0
clip_batch_size_sum{model="m",modality="text"} 0.0
# TYPE clip_items counter
clip_items_total{model="m",modality="image"} 47.0
clip_items_created{model="m",modality="image"} 1.7e9
# TYPE clip_cache_hits counter
clip_cache_hits_total{model="m"} 4.0
"""


def test_batch_size_delta_from_two_scrapes():
    before, after = scrape.parse(BEFORE), scrape.parse(AFTER)
    b = scrape.batch_sizes(before, after)
    assert list(b) == ["m/image"]  # no text batches ran: no entry
    img = b["m/image"]
    assert (img["batches"], img["items"]) == (6, 35)
    assert img["mean"] == pytest.approx(35 / 6)
    assert [(r["sizes"], r["batches"]) for r in img["buckets"]] == [
        ("1", 1), ("2", 2), ("3-4", 2), (">4", 1)]
    assert scrape.counters(before, after) == {
        "clip_cache_hits_total": 0.0, "clip_items_total{modality=image}": 35.0}


def test_image_pool_is_deterministic_and_photo_sized():
    assert photo_jpeg(5) == photo_jpeg(5) != photo_jpeg(6)
    pool = image_pool()
    assert len(pool.jpegs) == 64 and len(set(pool.jpegs)) == 64
    sizes = []
    for jpeg in pool.jpegs:
        img = Image.open(io.BytesIO(jpeg))
        assert img.format == "JPEG" and img.mode == "RGB"
        sizes.append(img.size)
        assert 10_000 < len(jpeg) < 200_000
    for w, h in sizes:
        assert 440 <= min(w, h) <= 520 and 600 <= max(w, h) <= 680
    portrait = sum(h > w for w, h in sizes)
    assert 0 < portrait < 32


def test_workloads_send_what_real_callers_send():
    img16 = Workload("image16").next()
    assert (img16.path, img16.items, len(json.loads(img16.body)["images"])) == ("/embed", 16, 16)
    w = Workload("classify")
    bodies = [json.loads(w.next().body) for _ in range(3)]
    assert all(b["labels"] == list(MODERATION_LABELS) and len(b["images"]) == 1 for b in bodies)
    assert len({b["images"][0] for b in bodies}) == 3
    text = Workload("text", seed=1)
    captions = [json.loads(text.next().body)["texts"][0] for _ in range(2000)]
    assert len(set(captions)) == 2000
    assert all(2 <= len(c.split()) <= 12 for c in captions)
    assert not Workload("text").uses_images
    mix = Workload("mix", seed=2)
    kinds = [mix.next().kind for _ in range(2000)]
    assert [round(kinds.count(k) / 2000, 1) for k in ("image1", "text", "classify")] == [
        0.4, 0.4, 0.2]


# ---- against a real server ----


@pytest.fixture(scope="module")
def server():
    s = start_server()
    yield s
    assert s.stop() == 0


def _clean(summary: dict) -> None:
    assert summary["ok"] > 0
    assert summary["error"] == summary["timeout"] == summary["transport_error"] == 0, summary
    lat = summary["latency_ok_s"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


def test_closed_loop_counts_images_and_reads_the_batches(server):
    cfg = RunConfig(url=server.url, workload="image16", concurrency=2, duration=2, warmup=0.5)
    report = asyncio.run(loadgen.run(cfg))
    s = report["summary"]
    _clean(s)
    assert s["items_per_s"] == pytest.approx(16 * s["ok_per_s"])
    (key,) = [k for k in report["batch_sizes"] if k.endswith("/image")]
    b = report["batch_sizes"][key]
    assert b["items"] == report["counters"]["clip_items_total{modality=image}"] >= 16
    assert sum(r["batches"] for r in b["buckets"]) == b["batches"]
    assert sum(row.get("ok", 0) for row in report["timeline"]) >= s["ok"]


def test_texts_are_never_answered_from_the_cache(server):
    cfg = RunConfig(url=server.url, workload="text", concurrency=4, duration=1, warmup=0)
    report = asyncio.run(loadgen.run(cfg))
    _clean(report["summary"])
    assert report["counters"]["clip_cache_hits_total"] == 0
    assert report["counters"]["clip_cache_misses_total"] > 0


def test_open_loop_mix_sends_at_the_asked_rate(server):
    cfg = RunConfig(url=server.url, workload="mix", mode="open", rate=20, duration=2.5,
                    warmup=0.5, seed=4)
    report = asyncio.run(loadgen.run(cfg))
    s = report["summary"]
    _clean(s)
    assert 8 < s["sent_per_s"] < 35  # ~50 Poisson arrivals in 2.5 s
    assert set(report["by_kind"]) == {"image1", "text", "classify"}
    assert report["schedule_lag_s"]["p50"] < 0.1


def test_open_bodies_sends_built_bodies_on_schedule_and_checks_each(server):
    # gpu_load.py's open loop: Poisson arrivals of a built body, every answer checked.
    body = json.dumps({"texts": ["a red square", "a blue circle"], "encoding": "base64"})
    checked: list[int] = []

    def check(r) -> str:
        checked.append(len(r.json()["texts"]))
        return "" if len(checked) != 5 else "the fifth answer is called wrong"

    async def go():
        return await loadgen.open_bodies(
            server.url, lambda: (body.encode(), "application/json"), "text2", 2, rate=20,
            t0=time.perf_counter(), duration=1.5, timeout=30, check=check, seed=3)

    records, problems, lags = asyncio.run(go())
    assert len(records) == len(lags) == len(poisson_arrivals(20, 1.5, 3)) > 10
    assert checked == [2] * len(records)
    outcomes = [r.outcome for r in sorted(records, key=lambda r: r.start)]
    assert outcomes.count("error") == 1 and outcomes.count("ok") == len(records) - 1
    assert problems == ["the fifth answer is called wrong"]
    assert all(r.kind == "text2" and r.items == 2 and r.latency > 0 for r in records)
    # None was sent before its scheduled time (an offset from t0).
    starts = sorted(r.start for r in records)
    assert all(s >= at - 1e-3 for s, at in zip(starts, poisson_arrivals(20, 1.5, 3), strict=True))


def test_cli_sweep_writes_json_and_plots(server, tmp_path):
    out = tmp_path / "sweep.json"
    assert loadgen.main(["--url", server.url, "--workload", "image1", "--sweep-concurrency",
                         "1,2", "--duration", "1", "--warmup", "0", "--seed", "1",
                         "--json", str(out), "--plots", str(tmp_path)]) == 0
    reports = json.loads(out.read_text())["sweep"]
    assert [r["config"]["concurrency"] for r in reports] == [1, 2]
    for name in ("sweep.png", "batch_sizes.png"):
        assert Image.open(tmp_path / name).format == "PNG"


def test_overload_is_refused_with_503_and_retry_after():
    server = start_server(CLIP_MAX_QUEUE_ITEMS="2")
    try:
        cfg = RunConfig(url=server.url, workload="image1", mode="open", rate=150,
                        duration=1.5, warmup=0, timeout=30, seed=5)
        s = asyncio.run(loadgen.run(cfg))["summary"]
    finally:
        assert server.stop() == 0
    assert s["refused_503"] > 0
    assert s["refused_without_retry_after"] == 0
    assert s["ok"] > 0 and s["error"] == s["timeout"] == s["transport_error"] == 0


def test_the_pool_is_encoded_once_however_it_is_asked_for():
    # The Locust file builds image_pool() before users start; the users then read
    # Workload.pool, which asks for image_pool(seed=0). One encoding must serve both.
    assert image_pool() is image_pool(seed=0) is image_pool(64, 0) is Workload("image1").pool
    assert image_pool(seed=1) is not image_pool()

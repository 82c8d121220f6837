"""The service benchmark: its verdicts on given numbers, and a short run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import LOADTESTS
from PIL import Image

# isort: split
import bench


def _summary(ok_per_s=10.0, items=1, p99=0.5, **counts):
    base = {"ok": 100, "error": 0, "timeout": 0, "transport_error": 0, "refused_503": 0,
            "refused_429": 0, "client_dropped": 0, "refused_without_retry_after": 0,
            "requests": 100, "status": {"200": 100}}
    base.update(counts)
    return {**base, "ok_per_s": ok_per_s, "items_per_s": ok_per_s * items,
            "latency_ok_s": {"p50": p99 / 2, "p99": p99},
            "latency_accepted_s": {"p50": p99 / 2, "p99": p99}}


def _results(raw_best=20.0, image1=19.0, text=600.0, classify=17.0, idle_ms=60.0,
             overload=None, rss_growth=5.0, rss_end=900.0):
    raw = {"image_best": {"batch": 8, "items_per_s": raw_best}, "image_batch1_ms": 50.0,
           "open_clip": {"text77_best": {"batch": 32, "items_per_s": 100.0}}}
    phases = {name: {"median": {"items_per_s": v, "ok_per_s": v}}
              for name, v in (("image1", image1), ("text", text), ("classify", classify),
                              ("image16", image1))}
    samples = [(float(t), 800.0 + (rss_growth if t > 10 else 0.0)) for t in range(60)]
    svc = {"phases": phases, "idle": {"latency_ok_s": {"p50": idle_ms / 1000}},
           "overload": {"report": {"config": {"rate": 2 * image1},
                                   "summary": overload or _summary(refused_503=40, p99=1.5)},
                        "rss": bench.rss_flatness(samples, 10)},
           "rss_end_mb": rss_end, "rss_peak_mb": rss_end + 50}
    return raw, svc


def _verdicts(raw, svc):
    rows = bench.targets(raw, svc)
    assert [r["key"] for r in rows] == list(bench.TARGET_KEYS)
    return {r["key"]: r["result"] for r in rows}


def test_every_target_passes_when_the_numbers_do():
    assert set(_verdicts(*_results()).values()) == {"PASS"}


@pytest.mark.parametrize(("change", "failed"), [
    ({"image1": 17.0}, "image1_throughput"),  # < 0.9 x 20
    ({"text": 499.0}, "text_throughput"),  # < 5 x 100
    ({"classify": 16.0}, "classify_throughput"),  # < 0.85 x 19
    ({"idle_ms": 66.0}, "idle_latency"),  # > 50 + 15
    ({"overload": _summary(refused_503=40, p99=2.5)}, "overload_p99"),
    ({"overload": _summary(p99=1.0)}, "overload_refusals"),  # nothing refused
    ({"overload": _summary(refused_503=4, refused_without_retry_after=1)}, "overload_refusals"),
    ({"overload": _summary(refused_503=4, timeout=1)}, "overload_clean"),
    ({"overload": _summary(refused_503=4, error=2)}, "overload_clean"),
    ({"rss_growth": 25.0}, "overload_rss_flat"),  # > max(20 MB, 2% of 800 MB)
    ({"rss_end": 1400.0}, "server_rss"),
    ({"rss_end": 1250.0}, "server_rss"),  # 1,250 MiB is 1.31 x 10^9 bytes: over 1.3 GB
])
def test_a_missed_target_fails_alone(change, failed):
    verdicts = _verdicts(*_results(**change))
    assert {k for k, v in verdicts.items() if v != "PASS"} == {failed}
    assert verdicts[failed] == "FAIL"


def test_without_open_clip_the_text_target_is_not_judged():
    raw, svc = _results()
    raw["open_clip"] = {"unavailable": "ModuleNotFoundError: No module named 'open_clip'"}
    assert _verdicts(raw, svc)["text_throughput"] == "n/a"


@pytest.mark.parametrize(("text", "result"), [(600.0, "PASS"), (530.0, "FAIL")])
def test_against_an_exported_engine_texts_are_held_to_its_raw_best_batch(text, result):
    """With --engine onnxruntime the raw numbers are the engine's, and the service's texts
    must reach 0.9 x its best batch (600 texts/s here: 540)."""
    raw, svc = _results(text=text)
    raw.update(engine="onnxruntime", text_best={"batch": 16, "items_per_s": 600.0},
               open_clip={"unavailable": "not timed"})
    rows = {r["key"]: r for r in bench.targets(raw, svc)}
    assert list(rows) == [*bench.TARGET_KEYS[:2], "text_vs_engine", *bench.TARGET_KEYS[2:]]
    assert rows["text_vs_engine"]["result"] == result
    assert "onnxruntime raw best-batch" in rows["text_vs_engine"]["target"]
    assert rows["text_throughput"]["result"] == "n/a"


def test_idle_memory_is_reported_beside_the_judged_figure():
    raw, svc = _results(rss_end=1400.0)
    svc["rss_idle_mb"] = 1200.0
    row = next(r for r in bench.targets(raw, svc) if r["key"] == "server_rss")
    assert "1200 MB once idle" in row["measured"]
    assert row["result"] == "FAIL"  # judged as the run ends, not once idle


def test_a_server_on_another_torch_build_is_named():
    # The interpreter is asked, not assumed: here it is this one, so the versions agree.
    assert bench.torch_version(sys.executable) == bench.torch.__version__
    svc = {"server_torch": "2.13.0+cpu", "server_python": "/venv/bin/python"}
    note = bench._other_build("2.14.1+cu130", svc)
    assert "server ran torch 2.13.0+cpu" in note and "two builds" in note
    assert bench._other_build("2.14.1+cu130", {**svc, "server_torch": "2.14.1+cu130"}) == ""


def test_server_settings_must_be_clip_variables():
    with pytest.raises(SystemExit):
        bench.main(["--out", "/nonexistent", "--server-env", "MAX_QUEUE_ITEMS=4"])


def test_quick_bench_reports_every_target(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(LOADTESTS / "bench.py"), "--quick", "--model", "builtin/clip-shapes",
         "--duration", "1", "--warmup", "0.5", "--overload-duration", "3", "--out", str(out),
         "--server-env", "CLIP_LOG_LEVEL=warning"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["key"] for r in report["targets"]] == list(bench.TARGET_KEYS)
    assert {r["result"] for r in report["targets"]} <= {"PASS", "FAIL", "n/a"}
    raw, svc = report["raw"], report["service"]
    assert set(raw["image_per_s"]) == {"1", "4", "8", "16", "32"}
    assert raw["image_batch1_ms"] > 0 and "text77_best" in raw["open_clip"]
    assert svc["idle"]["ok"] == svc["idle"]["requests"]
    assert set(svc["phases"]) == {"image1", "text", "classify", "image16"}
    assert svc["phases"]["image1"]["median"]["ok_per_s"] > 0
    assert len(svc["overload"]["rss_samples"]) >= 3
    assert svc["server_exit"] == 0 and svc["rss_peak_mb"] >= svc["rss_end_mb"] > 0
    assert 0 < svc["rss_idle_mb"] <= svc["rss_peak_mb"]
    assert report["machine"]["cpu"] and report["machine"]["torch"]
    assert "| target | measured | reference | result |" in (out / "report.md").read_text()
    for name in ("batch_sizes.png", "overload.png"):
        assert Image.open(out / name).format == "PNG"


def test_lanes_are_timed_together_each_from_its_own_thread():
    import threading

    from bench_raw import together

    made: list[int] = []
    calls: dict[int, int] = {}
    lock = threading.Lock()

    def lane():
        me = threading.get_ident()
        made.append(me)

        def call():
            with lock:
                calls[me] = calls.get(me, 0) + 1
        return call

    rate = together([lane, lane], batch=3, min_time=0.01)
    assert len(set(made)) == 2 and threading.get_ident() not in made
    assert set(calls) == set(made) and min(calls.values()) >= 2  # one untimed, then timed
    assert rate > 0


def test_the_report_gives_texts_on_two_lanes_by_batch_size():
    raw, svc = _results()
    raw.update(image_per_s={8: 20.0}, text_per_s={8: 200.0}, preprocess_ms=4.0,
               streams={"streams": 2, "image_batch": 8, "text_batch": 32, "image_per_s": 21.0,
                        "text_per_s": 250.0, "text_by_batch": {8: 229.3, 32: 250.0}})
    for ph in svc["phases"].values():
        ph["median"].update(p50_s=0.1, p99_s=0.2, errors=0, refused=0, server_cpu_s=1.0,
                            client_cpu_share=0.1)
    svc.update(server_args=[], server_env={})
    report = {"model": "m", "dtype": "fp32", "raw": {**raw, "threads": 2}, "service": svc,
              "targets": bench.targets(raw, svc),
              "machine": {"cpu": "c", "usable_cores": 2, "torch": bench.torch.__version__,
                          "date": "d", "loadavg_1min_before": 0.0}}
    text = bench.markdown(report)
    assert "texts on two lanes side by side, texts/s by batch size: 8: 229.3, 32: 250.0" in text


def test_the_lanes_cap_takes_the_services_mean_batch_and_the_cores_the_client_left():
    raw = {"text_best": {"batch": 32, "items_per_s": 300.0},
           "streams": {"text_by_batch": {"1": 100.0, "4": 200.0, "8": 280.0, "16": 290.0}}}
    runs = [{"batch_sizes": {"m/text": {"mean": m}}} for m in (7.0, 9.0, 12.0)]
    svc = {"phases": {"text": {"runs": runs, "median": {"client_cpu_share": 0.5}}}}
    cap = bench.lanes_cap(raw, svc, cores=2)
    assert cap["mean_batch"] == 9.0 and cap["batch"] == 8  # the median run, rounded down
    assert cap["cap_per_s"] == 280.0 * 1.5 / 2 and cap["of_best"] == cap["cap_per_s"] / 300.0
    runs[:] = [{"batch_sizes": {"m/text": {"mean": 0.5}}}]  # below every timed size
    assert bench.lanes_cap(raw, svc, cores=2)["batch"] == 1
    assert bench.lanes_cap({"text_best": raw["text_best"]}, svc, cores=2) is None

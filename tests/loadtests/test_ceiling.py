"""loadtests/ceiling.py: its CPU accounting and projection, and one --quick run end to end
(a null-engine server on 127.0.0.1, two client processes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from ceiling import (
    GOALS,
    cpu_delta,
    group_of,
    median_run,
    parse_args,
    phases,
    projection,
    thread_cpu,
    thread_family,
)

from service.tuning import name_os_threads

CEILING = Path(__file__).resolve().parents[2] / "loadtests" / "ceiling.py"


def test_the_phases_cover_every_input_form_and_encoding():
    names = [p.name for p in phases(64)]
    assert names == [
        "images-json/float", "images-json/base64", "images-datauri/float",
        "images-datauri/base64", "images-multipart/float", "images-multipart/base64",
        "texts64/float", "texts64/base64", "text1/float"]
    assert {p.items for p in phases(64)} == {64, 1}


def test_threads_are_grouped_by_name():
    pid = 100
    assert group_of("python", 100, pid) == "loop"  # the main thread, whatever its name
    assert group_of("prepare-image_1", 101, pid) == "pools"
    assert group_of("asyncio_0", 102, pid) == "pools"
    assert group_of("model-worker-op", 103, pid) == "serving"
    assert group_of("watchdog-openai", 104, pid) == "other"
    assert thread_family("prepare-image_12") == "prepare-image"
    before = {100: ("python", 1.0), 101: ("prepare-image_0", 2.0)}
    after = {100: ("python", 1.5), 101: ("prepare-image_0", 2.25),
             105: ("prepare-image_1", 0.25)}  # born inside the window: counts from zero
    groups, families = cpu_delta(before, after, pid)
    assert groups == {"loop": 0.5, "pools": 0.5, "serving": 0.0, "other": 0.0}
    assert families == {"main (event loop)": 0.5, "prepare-image": 0.5}


def test_the_projection_at_the_goals():
    r = {"kind": "images", "us_per_item": {"loop": 400.0, "server": 5000.0, "client": 100.0}}
    p = projection(r)
    assert p["goal_per_s"] == GOALS["images"] == 5000
    assert p["loop_budget_us"] == 200 and p["host_budget_us"] == 3200
    assert p["one_loop_items_per_s"] == 2500
    assert p["event_loops"] == 2.0 and p["server_cores"] == 25.0 and p["client_cores"] == 0.5
    t = projection({"kind": "texts", "us_per_item": {"loop": 25.0, "server": 40.0, "client": 0.0}})
    assert t["loop_budget_us"] == 50 and t["event_loops"] == 0.5


def test_the_median_run_is_kept_whole():
    runs = [{"items_per_s": 30.0, "x": "c"}, {"items_per_s": 10.0, "x": "a"},
            {"items_per_s": 20.0, "x": "b"}]
    m = median_run(runs)
    assert m["x"] == "b" and m["items_per_s_runs"] == [30.0, 10.0, 20.0]


def test_runs_are_bounded():
    with pytest.raises(SystemExit):
        parse_args(["--clients", "1"])
    with pytest.raises(SystemExit):
        parse_args(["--duration", "500"])
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "50"])
    with pytest.raises(SystemExit):
        parse_args(["--phases", "images-json/float,nope"])


def test_threads_carry_their_python_names_in_the_os():
    """What the CPU accounting reads: the server names its OS threads at start-up (cut to
    the 15 bytes Linux keeps)."""
    tids: list[int] = []
    ready, stop = threading.Event(), threading.Event()

    def live() -> None:
        tids.append(threading.get_native_id())
        ready.set()
        stop.wait(10)

    threads = [threading.Thread(target=live, name=n)
               for n in ("decode-3", "model-worker-openai/ViT-B-32")]
    name_os_threads()
    try:
        for t in threads:
            t.start()
            assert ready.wait(10)
            ready.clear()
        names = {tid: name for tid, (name, _) in thread_cpu(os.getpid()).items()}
        assert [names[tid] for tid in tids] == ["decode-3", "model-worker-op"]
        assert names[os.getpid()] != "decode-3"  # the calling thread keeps its own
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
        threading.setprofile(None)  # this process's later threads as they were


def test_a_quick_run_reports_every_phase(tmp_path):
    out = tmp_path / "ceiling.json"
    r = subprocess.run([sys.executable, str(CEILING), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| phase | items/s | p50 ms | p99 ms | loop µs/item" in r.stdout
    assert "event loops needed" in r.stdout and "load average before" in r.stdout
    report = json.loads(out.read_text())
    assert report["model"]["engine"] == "null" and report["model"]["dimension"] == 512
    assert report["server_exit"] == 0
    assert len(report["machine"]["load_average_before"]) == 3
    assert list(report["phases"]) == [p.name for p in phases(16)]
    for name, ph in report["phases"].items():
        assert ph["problems"] == [], name
        assert ph["summary"]["error"] == 0 and ph["items_per_s"] > 0, name
        us = ph["us_per_item"]
        assert set(us) == {"loop", "loop_kernel", "pools", "serving", "other", "server",
                           "client"}
        assert 0 <= us["loop_kernel"] <= us["loop"], name  # a part of the loop's CPU
        assert us["loop"] > 0 and math.isclose(
            us["server"], us["loop"] + us["pools"] + us["serving"] + us["other"])
        assert ph["concurrency"]["clients"] == 2
        assert set(ph["projection"]) >= {"event_loops", "server_cores", "loop_budget_us"}
        threads = ph["cpu"]["server_threads_s"]
        assert "main (event loop)" in threads
        if ph["kind"] == "images":
            # Decoding runs in the named pool, not on the loop.
            assert threads.get("prepare-image", 0) > 0 and us["pools"] > us["loop"], name

"""loadtests/gpu_check.sh, which only a lent GPU machine runs for real: its dry run on the
CPU goes through every step, and what it leaves in $OUT fits what that machine sends back
(at most 8 files, no deeper than $OUT/a/b/file, plain names)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LOADTESTS

# isort: split
import gpu_load
import gpu_report
import serverproc
from stats import Record, summarise

SCRIPT = LOADTESTS / "gpu_check.sh"
ROOT = LOADTESTS.parent
# Steps that must pass in a dry run; wheels and nvidia-smi are skipped there, and the
# parts benchmark runs when loadtests/bench_gpu_parts.py exists.
MUST_PASS = ("env", "tests", "parity", "syncs", "oom", "raw", "service", "goal")
MAY_SKIP = ("wheels", "nvidia-smi", "graphs", "preprocess")


def test_script_is_executable_bash():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu") / "out"
    env = {**os.environ, "OUT": str(out), "PY": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    return result, out


def test_dry_run_passes_every_step(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    status = dict(re.findall(r"^\| ([\w-]+) \| (ok|FAIL|TIMEOUT|SKIP) \|", summary, re.M))
    assert set(MUST_PASS) | set(MAY_SKIP) <= set(status), summary
    assert {s: status[s] for s in MUST_PASS} == dict.fromkeys(MUST_PASS, "ok"), summary
    parts_exist = (LOADTESTS / "bench_gpu_parts.py").exists()
    assert status["graphs"] == ("ok" if parts_exist else "SKIP")
    # The gpu tests are named by file, and the table ends up in the log too.
    assert "tests/clip_core/test_host_syncs.py" in summary
    assert summary.strip() in result.stdout


def test_dry_run_output_fits_what_the_device_sends_back(dry_run):
    _, out = dry_run
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert 5 <= len(files) <= 8, files
    for f in files:
        assert len(f.parts) <= 3, f  # $OUT/a/b/file at the deepest
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in f.parts), f
    assert {"summary.md", "log.txt", "tests.txt", "probe.json", "service.json"} <= {
        f.name for f in files}
    assert not [p for p in out.rglob("*") if p.is_dir()]  # no folders left behind


def test_pytest_output_is_counted_per_file():
    text = "\n".join([
        "tests/a/test_x.py::test_one PASSED                    [ 25%]",
        "tests/a/test_x.py::test_two[fp16] FAILED              [ 50%]",
        "tests/b/test_y.py::test_three SKIPPED (needs a CUDA)  [ 75%]",
        "ERROR tests/c/test_z.py - ModuleNotFoundError: No module named 'open_clip'",
        "=========== 1 failed, 1 passed, 1 skipped, 1 error in 2.50s ===========",
    ])
    closing, per_file = gpu_report.pytest_headline(text)
    assert closing == "1 failed, 1 passed, 1 skipped, 1 error in 2.50s"
    assert per_file["tests/a/test_x.py"] == {"passed": 1, "failed": 1}
    assert per_file["tests/b/test_y.py"] == {"skipped": 1}
    assert per_file["tests/c/test_z.py"] == {"error": 1}


def test_server_keeps_the_callers_pythonpath(monkeypatch):
    # The GPU machine's missing packages sit in a --target folder on PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/tmp/site", "/opt/more"]))
    assert serverproc._pythonpath() == os.pathsep.join([str(ROOT), "/tmp/site", "/opt/more"])
    monkeypatch.delenv("PYTHONPATH")
    assert serverproc._pythonpath() == str(ROOT)


def _open_loop(latencies_ms: list[float], outcome: str = "ok") -> dict:
    records = [Record("image64_multipart", 1 + i / 100, ms / 1000, 200, 64, "ok", None)
               for i, ms in enumerate(latencies_ms)]
    if records:
        records[-1].outcome = outcome
    return summarise(records, 1, 3)


def test_goal_verdict_needs_every_answer_within_the_p99_and_the_clients_on_schedule():
    def verdict(latencies_ms, lags, outcome="ok") -> dict:
        return gpu_load.goal_verdict(_open_loop(latencies_ms, outcome), 64, 5000, 0.1, lags,
                                     0.01)

    quick, on_time = [20.0] * 150, [0.001] * 150
    ok = verdict(quick, on_time)
    assert ok["verdict"] == "PASS"
    assert ok["offered_items_per_s"] == 150 / 2 * 64  # 150 requests sent in the 2 s window
    assert verdict([20.0] * 140 + [150.0] * 10, on_time)["verdict"].startswith("FAIL: p99 1")
    assert verdict(quick, on_time, "refused_503")["verdict"] == (
        "FAIL: 1 of 150 requests not answered")
    late = verdict(quick, [0.001] * 140 + [0.05] * 10)
    assert late["verdict"].startswith("FAIL: the clients fell behind")
    assert verdict([], [])["verdict"].startswith("FAIL")


def test_open_goals_are_parsed_and_checked():
    assert gpu_load._open_goal("text64=20000") == ("text64", 20000.0)
    for bad in ("text64", "text64=fast", "text64=0", "image9=5"):
        with pytest.raises(argparse.ArgumentTypeError):
            gpu_load._open_goal(bad)


def test_the_dry_runs_goal_step_ran_open_loop_on_two_processes(dry_run):
    _, out = dry_run
    goal = json.loads((out / "probe.json").read_text())["goal"]
    assert goal["config"]["server_env"]["CLIP_PROCESSES"] == "2"
    assert goal["config"]["server_env"]["CLIP_PREPROCESS"] == "device"
    summary = (out / "summary.md").read_text()
    for phase, goal_rate in (("image64_multipart", 40), ("text64", 80)):
        r = goal["phases"][phase]
        # Every request answered; the verdict's latency and lateness parts depend on how
        # busy this machine is, so they are not asserted here (the unit test above is).
        assert r["summary"]["ok"] == r["summary"]["requests"] > 0, r
        assert r["open_loop"]["goal_items_per_s"] == goal_rate
        assert "not answered" not in r["open_loop"]["verdict"]
        assert f"{phase}, open loop at {goal_rate}/s: {r['open_loop']['verdict']}" in summary

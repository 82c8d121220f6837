"""loadtests/gpu_check.sh, which only a lent GPU machine runs for real: its dry run on the
CPU goes through every step, and what it leaves in $OUT fits what that machine sends back
(at most 8 files, no deeper than $OUT/a/b/file, plain names)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LOADTESTS

# isort: split
import gpu_report
import serverproc

SCRIPT = LOADTESTS / "gpu_check.sh"
ROOT = LOADTESTS.parent
# Steps that must pass in a dry run; wheels and nvidia-smi are skipped there, and the
# parts benchmark runs when loadtests/bench_gpu_parts.py exists.
MUST_PASS = ("env", "tests", "parity", "syncs", "oom", "raw", "service")
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

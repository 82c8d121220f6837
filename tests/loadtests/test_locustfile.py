"""The Locust users, run headless for a few seconds against a real server."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LOADTESTS
from loadtest_support import start_server

LOCUST = shutil.which("locust", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(LOCUST is None, reason="locust comes with the test extra")


def _locust(host: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    # A process of its own: importing locust patches the standard library (gevent).
    return subprocess.run(
        [LOCUST, "-f", str(LOADTESTS / "locustfile.py"), "--headless", "--host", host,
         "--only-summary", "--csv", str(tmp_path / "run"), *extra],
        capture_output=True, text=True, timeout=90, cwd=tmp_path,
    )


def test_every_user_gets_answers(tmp_path):
    server = start_server()
    try:
        proc = _locust(server.url, tmp_path, "-u", "4", "-r", "4", "-t", "5s")
    finally:
        assert server.stop() == 0
    with open(tmp_path / "run_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert {"image1", "text", "classify"} <= set(rows), proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ("image1", "text", "classify"):
        assert int(rows[name]["Request Count"]) > 0
    # Refusals under load are the server's right; anything else is a failure.
    with open(tmp_path / "run_failures.csv") as f:
        failures = [row["Error"] for row in csv.DictReader(f)]
    assert all("503" in error for error in failures), failures
    assert proc.returncode in (0, 1) and (proc.returncode == 0 or failures)


def test_other_hosts_are_refused_before_any_request(tmp_path):
    proc = _locust("http://10.0.0.1:8000", tmp_path, "-u", "1", "-r", "1", "-t", "2s")
    assert proc.returncode != 0
    assert "only sent to this machine" in proc.stderr
    stats = tmp_path / "run_stats.csv"
    if stats.exists():  # Locust may write its empty table on the way out
        with open(stats) as f:
            assert sum(int(row["Request Count"]) for row in csv.DictReader(f)) == 0

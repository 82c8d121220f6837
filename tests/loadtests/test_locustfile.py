"""The Locust users, run headless for a few seconds against a real server."""

from __future__ import annotations

import json
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
    # --json prints the final table to stdout at shutdown; --csv is not used because
    # Locust rewrites its CSV files once a second while running and never at the end,
    # so a short run on a busy machine can leave a table from before the first request.
    return subprocess.run(
        [LOCUST, "-f", str(LOADTESTS / "locustfile.py"), "--headless", "--host", host,
         "--only-summary", "--json", *extra],
        capture_output=True, text=True, timeout=90, cwd=tmp_path,
    )


def _final_stats(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    """Locust's end-of-run entries by request name (stdout holds only the JSON)."""
    return {entry["name"]: entry for entry in json.loads(proc.stdout)} if proc.stdout.strip() else {}


def _error_report(proc: subprocess.CompletedProcess) -> list[str]:
    """The rows of the error report Locust logs at shutdown: 'count  method name: error'."""
    lines = proc.stderr.splitlines()
    if "Error report" not in lines:
        return []
    rows = lines[lines.index("Error report") + 3:]  # past the title, column names and rule
    return [row for row in rows[:next(i for i, row in enumerate(rows) if row.startswith("---"))]]


def test_every_user_gets_answers(tmp_path):
    server = start_server()
    try:
        proc = _locust(server.url, tmp_path, "-u", "4", "-r", "4", "-t", "5s")
    finally:
        assert server.stop() == 0
    rows = _final_stats(proc)
    assert {"image1", "text", "classify"} <= set(rows), proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ("image1", "text", "classify"):
        assert rows[name]["num_requests"] > 0
    # Refusals under load are the server's right; anything else is a failure.
    failures = _error_report(proc)
    assert sum(entry["num_failures"] for entry in rows.values()) == 0 or failures
    assert all("503" in error for error in failures), failures
    assert proc.returncode in (0, 1) and (proc.returncode == 0 or failures)


def test_other_hosts_are_refused_before_any_request(tmp_path):
    proc = _locust("http://10.0.0.1:8000", tmp_path, "-u", "1", "-r", "1", "-t", "2s")
    assert proc.returncode != 0
    assert "only sent to this machine" in proc.stderr
    assert sum(entry["num_requests"] for entry in _final_stats(proc).values()) == 0

"""Several server processes on one port (CLIP_PROCESSES, service.processes), each a real
process on 127.0.0.1 serving the null engine: both children answer, /metrics is one view
whichever child is scraped, SIGTERM drains them all, a child that dies takes the others
down, and one process is still no supervisor at all."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from conftest import metric_total
from prometheus_client.parser import text_string_to_metric_families
from serverproc import ServerDidNotStart, ServerProcess

# The null engine: the model's shapes, no weights, no compute (the serving layer alone).
NULL = {"CLIP_ENGINE": "null", "CLIP_DEVICE": "cpu", "CLIP_LOG_FORMAT": "text",
        "CLIP_DRAIN_TIMEOUT_S": "5"}
BOUND_S = 25.0  # every wait below, so that each test stays under 30 s


class Served(ServerProcess):
    """`python -m service --model ViT-B-32` with the null engine, its output in a file,
    ready once /readyz answers and every server process listens."""

    def __init__(self, processes: int, model: str = "ViT-B-32",
                 env: dict[str, str] | None = None):
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the server)
        super().__init__(["--model", model],
                         {**NULL, "CLIP_PROCESSES": str(processes), **(env or {})},
                         stdout=self._log, stderr=subprocess.STDOUT)
        self.processes = processes

    def wait_serving(self) -> None:
        try:
            self.wait_ready(BOUND_S)
            # /readyz is answered by the first child up; each listens once its model is
            # loaded, with a socket of its own (SO_REUSEPORT).
            _until(lambda: len(listening(self.port)) == self.processes, "every child listens")
        except (ServerDidNotStart, AssertionError) as e:
            self.stop(5)
            raise AssertionError(f"{e}; its output:\n{self.output()}") from None

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def answered_by(self, path: str) -> list[int]:
        """The pid of the process that answered each request for `path`, from the access
        log: several processes name theirs ("uvicorn.access[PID]: ... "POST /embed
        HTTP/1.1" 200"), one process does not (its log is as it was)."""
        return [int(pid) if pid else self.pid for pid in re.findall(
            rf'uvicorn\.access(?:\[(\d+)\])?: \S+ - "\w+ {re.escape(path)} HTTP',
            self.output())]


def _until(condition, what: str, timeout: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


def listening(port: int) -> list[str]:
    """The inodes of the IPv4 sockets listening on `port` (/proc/net/tcp, state 0A)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return [f[9] for f in (r.split() for r in rows)
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port]


def children(pid: int) -> list[int]:
    """The supervisor's server processes: its children but multiprocessing's resource
    tracker."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"resource_tracker" not in (stat.parent / "cmdline").read_bytes():
                out.append(int(stat.parent.name))
    return sorted(out)


def alive(pid: int) -> bool:
    """Still running: neither gone nor a zombie (an orphan's, reaped by whatever runs as
    pid 1, may linger)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def embed(url: str, i: int, key: str | None = None) -> httpx.Response:
    # A new connection each time (no pool): the kernel picks a child per connection.
    return httpx.post(url + "/embed", json={"texts": [f"caption {i}", f"another {i}"]},
                      headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10)


def _process_series(exposition: str) -> dict[int, float]:
    return {int(s.labels["pid"]): s.value
            for family in text_string_to_metric_families(exposition)
            for s in family.samples if s.name == "clip_process_requests"}


@pytest.fixture
def two():
    server = Served(2)
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop(15)


def test_both_processes_answer_and_metrics_are_one_view_whichever_answers(two):
    kids = children(two.pid)
    assert len(kids) == 2 and two.pid not in kids
    sent = 24
    for i in range(sent):
        r = embed(two.url, i)
        assert r.status_code == 200 and len(r.json()["texts"]) == 2
    # Each request on its own connection: the kernel's hash spread them over both (all 24
    # on one child would happen once in 2**23 runs).
    by = two.answered_by("/embed")
    assert len(by) == sent and set(by) == set(kids), by

    # A request is counted just after its answer is sent: let the last one land.
    _until(lambda: metric_total(httpx.get(two.url + "/metrics", timeout=10).text,
                                "clip_requests_total", endpoint="/embed") == sent,
           "the last request counted")
    # Scrape until both children have answered a scrape (each scrape a new connection);
    # every scrape counts every request, whichever child renders it.
    seen: set[int] = set()
    deadline = time.monotonic() + BOUND_S
    while seen != set(kids):
        assert time.monotonic() < deadline, f"scrapes answered by {seen} only"
        text = httpx.get(two.url + "/metrics", timeout=10).text
        assert metric_total(text, "clip_requests_total", endpoint="/embed", status="200") == sent
        assert metric_total(text, "clip_items_total", modality="text") == 2 * sent
        assert metric_total(text, "clip_model_ready") == 1
        seen = set(two.answered_by("/metrics"))
    # One series per child, each published by its own process (at most a second late).
    _until(lambda: set(_process_series(
        httpx.get(two.url + "/metrics", timeout=10).text)) == set(kids), "both pids published")

    code = two.stop(15)
    assert code == 0, two.output()[-3000:]
    assert not any(alive(p) for p in kids)


def metrics_folder(pid: int) -> Path:
    """The PROMETHEUS_MULTIPROC_DIR a server process was given."""
    env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
               if b"=" in kv)
    return Path(env[b"PROMETHEUS_MULTIPROC_DIR"].decode())


def test_sigterm_drains_every_child_and_the_supervisor_exits_0(two):
    kids = children(two.pid)
    folder = metrics_folder(kids[0])
    assert embed(two.url, 0).status_code == 200
    assert any(folder.glob("counter_*.db"))  # the request was counted there
    two.proc.send_signal(signal.SIGTERM)
    code = two.proc.wait(BOUND_S)
    out = two.output()
    assert code == 0, out[-3000:]
    assert out.count("drained cleanly") == 2, out[-3000:]
    assert not any(alive(p) for p in kids)
    assert listening(two.port) == []
    assert not folder.exists()  # the supervisor removed the metrics files


def test_children_stop_when_the_supervisor_is_killed(two):
    kids = children(two.pid)
    folder = metrics_folder(kids[0])
    try:
        two.proc.kill()  # no forwarding: each child gets SIGTERM from the kernel
        two.proc.wait(BOUND_S)
        _until(lambda: not any(alive(p) for p in kids), "the children ended")
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the supervisor could not


def test_a_child_that_dies_stops_the_others_and_the_supervisor_fails(two):
    kids = children(two.pid)
    victim, other = kids
    os.kill(victim, signal.SIGKILL)
    code = two.proc.wait(BOUND_S)
    assert code != 0
    assert not alive(other)
    lines = [line for line in two.output().splitlines() if "ended on its own" in line]
    assert len(lines) == 1 and f"pid {victim}" in lines[0] and "-9 (SIGKILL)" in lines[0], lines


def test_a_model_that_does_not_load_ends_the_start_up_with_exit_1():
    server = Served(2, model="no-such-model-anywhere")
    try:
        code = server.proc.wait(BOUND_S)
    finally:
        server.stop(5)
    assert code == 1, server.output()[-3000:]
    assert "cannot start" in server.output()


def test_one_process_is_no_supervisor():
    server = Served(1)
    try:
        server.wait_serving()
        assert children(server.pid) == []  # the server itself, no spawned processes
        assert embed(server.url, 0).status_code == 200
        text = httpx.get(server.url + "/metrics", timeout=10).text
        assert "clip_process_requests" not in text
        assert metric_total(text, "clip_requests_total", endpoint="/embed") == 1
        assert server.answered_by("/embed") == [server.pid]
    finally:
        code = server.stop(15)
    assert code == 0


def test_a_keys_rate_limit_is_divided_between_the_processes():
    key = "k" * 16
    # A burst of 4 and no refill to speak of: 2 requests per child, 4 in all.
    server = Served(2, env={"CLIP_API_KEYS": key, "CLIP_RATE_LIMIT_PER_S": "0.001",
                            "CLIP_RATE_LIMIT_BURST": "4"})
    try:
        server.wait_serving()
        statuses = [embed(server.url, i, key).status_code for i in range(30)]
        # 30 connections reach both children (fewer than 2 on one: 62 runs in 2**30).
        assert sorted(set(statuses)) == [200, 429] and statuses.count(200) == 4, statuses
        ok_by = server.answered_by("/embed")
        assert len(ok_by) == 30 and len(set(ok_by)) == 2
    finally:
        assert server.stop(15) == 0

"""loadtests/ceiling.py --processes N: the server's CPU is read from the supervisor and each
of its server processes, whose main threads are the event loops."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ceiling import cpu_delta, parse_args
from serverproc import server_processes


def test_every_server_process_main_thread_is_an_event_loop():
    # Server processes 10 and 20 (10 with a decoding thread 11); 5 is their supervisor.
    before = {5: ("python", 0.0), 10: ("python", 1.0), 11: ("prepare-image_0", 1.0),
              20: ("python", 2.0)}
    after = {5: ("python", 0.25), 10: ("python", 1.5), 11: ("prepare-image_0", 2.0),
             20: ("python", 2.5)}
    groups, families = cpu_delta(before, after, {10, 20})
    assert groups == {"loop": 1.0, "pools": 1.0, "serving": 0.0, "other": 0.25}
    assert families == {"main (event loop)": 1.0, "prepare-image": 1.0, "python": 0.25}


def test_the_server_processes_are_the_supervisors_children():
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "c = subprocess.Popen(['sleep', '30']); print(c.pid, flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        child = int(parent.stdout.readline())
        assert server_processes(parent.pid) == [child]
        assert server_processes(child) == [child]  # no children: the server alone
    finally:
        parent.kill()
        parent.wait(10)
        if child:
            subprocess.run(["kill", str(child)], check=False)


def test_the_process_count_is_checked():
    assert parse_args(["--processes", "4"]).processes == 4
    with pytest.raises(SystemExit):
        parse_args(["--processes", "0"])

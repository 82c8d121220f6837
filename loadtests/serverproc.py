"""A clip-serve process on 127.0.0.1 for the load tools: start it, wait for /readyz, read
its memory from /proc, stop it (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[1]


class ServerDidNotStart(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory line of /proc/PID/status in MB: VmRSS (resident now), VmHWM (its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def rss_mb(pid: int) -> float:
    return proc_status_mb(pid, "VmRSS")


def stat_fields(path: str | Path) -> list[str]:
    """The fields of a /proc stat file after the name, so that index 11 is utime and 12
    stime (proc(5)'s fields 14 and 15). The name may hold spaces and parentheses; the
    fields after its last closing parenthesis do not."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used, all its threads (/proc/PID/stat)."""
    fields = stat_fields(f"/proc/{pid}/stat")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_processes(pid: int) -> list[int]:
    """The server's processes: `pid` alone, or with CLIP_PROCESSES > 1 the children of
    the supervisor `pid` that serve (not multiprocessing's resource tracker)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_fields(stat)
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid and b"resource_tracker" not in cmdline:
            children.append(int(stat.parent.name))
    return sorted(children) or [pid]


def _pythonpath() -> str:
    """The repository root, then this process's PYTHONPATH."""
    return os.pathsep.join([str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(
        os.pathsep))])


class ServerProcess:
    """`python -m service ARGS --host 127.0.0.1 --port PORT`, started at construction.

    `env` adds to (or overrides) this process's environment; the repository root is put
    first on PYTHONPATH so the working tree's service runs, installed or not, and what
    PYTHONPATH held stays after it (packages installed with `pip --target`).
    """

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        stdout: int | IO | None = subprocess.DEVNULL,
        stderr: int | IO | None = None,
        python: str | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [python or sys.executable, "-m", "service", *args, "--host", "127.0.0.1",
             "--port", str(self.port)],
            env={**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})},
            cwd=ROOT, stdout=stdout, stderr=stderr,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerDidNotStart(f"the server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise ServerDidNotStart(f"the server was not ready within {timeout:.0f} s")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (the server drains), SIGKILL after `timeout`; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

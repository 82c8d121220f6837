"""Several complete server processes on one port (CLIP_PROCESSES > 1).

One process is bound by its GIL long before 16 cores are busy (docs/architecture.md,
"Several processes"), so `clip-serve` becomes a small supervisor that starts N children
(multiprocessing 'spawn': nothing inherited but the arguments) and only watches them.
Each child is the whole server: its own models, batcher, admission, caches and event
loop, run by `service.__main__`'s DrainingServer.

- **One port, a socket per child.** Each child binds its own listening socket with
  SO_REUSEPORT, and the kernel spreads new connections over them by a hash of the
  4-tuple. The other way, one socket bound here and accepted on by every child, was
  measured against it (docs/benchmarks.md, "Several processes"): every child's event
  loop wakes for each connection and the first to call accept() takes it, so the few
  long-lived connections of a load balancer or a client pool gathered on whichever
  child woke first, where the kernel's hash spreads them. The supervisor binds the port
  too, without listening (it receives no connections), to hold it and to fail at once,
  as one process would, when it is taken; with port 0 that fixes the port the children
  share.
- **Cores.** Each child sizes its default thread counts on its share of the cores
  (`service.tuning.share_cores`).
- **Rate limits** are per process state, so a key's rate and burst are divided between
  the children (`for_one_process`): a key never gets more than its limit in all, and a
  caller on a single connection, which reaches one child, gets 1/N of it. Queue bounds
  stay per process (each child has its own worker; the queue-wait bound, which is what
  a caller sees, holds in each).
- **Metrics.** The supervisor makes a fresh PROMETHEUS_MULTIPROC_DIR before the children
  start, marks each one dead as it ends (its live gauges leave the merge) and removes the
  folder at exit; service.metrics merges the files.
- **Lifecycle.** SIGTERM and SIGINT are forwarded to every child, which drains as one
  process does; the supervisor exits 0 when every child exited 0. A child that ends on
  its own (a crash, an OOM kill, a model that does not load) makes the supervisor stop
  the others and exit 1, after one log line naming it: the orchestrator restarts the
  pod, and nothing here restarts a child. Children run in a process group of their own
  (a terminal's Ctrl-C reaches the supervisor alone, which forwards it once) and get
  SIGTERM if the supervisor dies without stopping them.

This module imports no web framework and no torch: the child's server is the function
`supervise` is given by name ("module:function"), imported in the child.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.context import SpawnProcess
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from .settings import Settings
from .tuning import machine_cores, share_cores, usable_cores

log = logging.getLogger("service.processes")

# After the drain timeout, how long the children get to finish their shutdown before
# they are killed.
EXIT_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1  # prctl option: a signal for this process when its parent ends


@dataclass(frozen=True)
class Child:
    """What one child is told: its index, how many there are, the port they share."""

    index: int
    processes: int
    port: int


def for_one_process(settings: Settings) -> Settings:
    """The settings one of `settings.processes` children serves with: each API key's rate
    limit and burst divided between them (the burst at least 1)."""
    n = settings.processes
    if n == 1 or settings.rate_limit_per_s is None:
        return settings
    return settings.model_copy(update={"rate_limit_per_s": settings.rate_limit_per_s / n,
                                       "rate_limit_burst": max(1, settings.rate_limit_burst // n)})


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def enter_child(child: Child) -> None:
    """A child's first steps, before it builds anything: its own process group, SIGTERM
    when the supervisor dies, and its share of the cores."""
    parent = os.getppid()
    os.setpgrp()
    if sys.platform == "linux":
        with contextlib.suppress(AttributeError, OSError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor ended before the line above
            os.kill(os.getpid(), signal.SIGTERM)
    share_cores(child.processes)
    log.info("process %d of %d (pid %d) on %d of %d cores", child.index, child.processes,
             os.getpid(), usable_cores(), machine_cores())


def supervise(settings: Settings, entry: str) -> int:
    """Run `settings.processes` children, each calling `entry` ("module:function") with
    (settings, Child), on one port until they end: 0 when a signal stopped them and each
    exited 0 (or was stopped by it before it could catch it), else 1."""
    try:
        holder = reuseport_socket(settings.host, settings.port)
    except OSError as e:
        log.error("cannot bind %s:%d: %s", settings.host, settings.port, e)
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="clip-metrics-")
    # Read by prometheus_client when a child imports it (service.metrics).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _Supervisor(settings, entry, holder.getsockname()[1], metrics_dir).run()
    finally:
        holder.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_child(entry: str, settings: Settings, child: Child) -> None:
    # By name: a function of `python -m service`'s main module cannot be pickled by
    # reference (a spawned child does not re-import a package's __main__).
    module, function = entry.split(":")
    getattr(importlib.import_module(module), function)(settings, child)


class _Supervisor:
    def __init__(self, settings: Settings, entry: str, port: int, metrics_dir: str):
        self.settings = settings
        self.metrics_dir = metrics_dir
        ctx = mp.get_context("spawn")
        n = settings.processes
        self.procs: list[SpawnProcess] = [
            ctx.Process(target=_run_child, args=(entry, settings, Child(i, n, port)),
                        name=f"clip-serve-{i}")
            for i in range(n)]
        self.port = port
        self.stopping = False
        self.failed = False
        self.deadline = float("inf")  # when children still running are killed

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for p in self.procs:
                p.start()
                if self.stopping:  # a signal came while the others started
                    os.kill(_pid(p), signal.SIGTERM)
            log.info("%d server processes on %s:%d: pids %s", len(self.procs),
                     self.settings.host, self.port, [p.pid for p in self.procs])
            self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        # A child stopped by a signal passed on before it could catch it (still starting)
        # had nothing to drain.
        clean = (0, -signal.SIGTERM, -signal.SIGINT)
        return 0 if not self.failed and all(p.exitcode in clean for p in self.procs) else 1

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        # Every signal is forwarded: a second one stops a draining child at once, as it
        # stops one process.
        log.info("signal %d: passed to the %d server processes", sig, len(self._live()))
        self._stop(sig)

    def _stop(self, sig: int) -> None:
        if not self.stopping:
            self.stopping = True
            self.deadline = time.monotonic() + self.settings.drain_timeout_s + EXIT_GRACE_S
        for p in self._live():
            with contextlib.suppress(ProcessLookupError):
                os.kill(_pid(p), sig)

    def _live(self) -> list[SpawnProcess]:
        return [p for p in self.procs if p.pid is not None and p.exitcode is None]

    def _watch(self) -> None:
        ended: set[int] = set()
        while len(ended) < len(self.procs):
            live = [p for p in self.procs if p.pid not in ended]
            timeout = min(1.0, max(0.0, self.deadline - time.monotonic()))
            wait([p.sentinel for p in live], timeout)
            for p in live:
                if p.exitcode is None:
                    continue
                ended.add(_pid(p))
                p.join()
                self._mark_dead(_pid(p))
                if not self.stopping:
                    log.error("server process %d (pid %d) ended on its own with exit code "
                              "%s; stopping the others", self.procs.index(p), p.pid,
                              _describe(p.exitcode))
                    self.failed = True
                    self._stop(signal.SIGTERM)
            if time.monotonic() > self.deadline:
                for p in self._live():
                    log.error("server process %d (pid %d) still runs %.0f s after the "
                              "drain timeout; killed", self.procs.index(p), p.pid,
                              EXIT_GRACE_S)
                    p.kill()
                self.failed = True
                self.deadline = float("inf")

    def _mark_dead(self, pid: int) -> None:
        mark_process_dead(pid, self.metrics_dir)  # its live* gauges leave the merge


def _pid(p: SpawnProcess) -> int:
    pid = p.pid
    assert pid is not None  # called only on started processes
    return pid


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)

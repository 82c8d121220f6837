"""`clip-serve` / `python -m service`: settings from flags and CLIP_* variables, then uvicorn
in this process, or in CLIP_PROCESSES children of a supervisor (service.processes)."""

from __future__ import annotations

import os

from .tuning import environment_defaults  # imports no torch

# Before anything imports torch: MKL reads its settings at its first allocation. An
# operator's own values win.
os.environ.update(environment_defaults(os.environ))

import argparse
import asyncio
import json
import logging
import socket
import sys
import time
import warnings

import uvicorn
from PIL import Image
from pydantic import ValidationError

from .app import create_app, drain
from .processes import Child, enter_child, for_one_process, reuseport_socket, supervise
from .settings import Settings
from .tuning import name_os_threads

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: readiness off and new requests refused at once, accepted requests
    answered (up to the drain timeout), and only then uvicorn's own shutdown.

    uvicorn alone would close the listening socket first, so a load balancer that has
    not yet seen the pod leave would get connection errors instead of a clean 503.
    """

    def __init__(self, config: uvicorn.Config, app, timeout: float):
        super().__init__(config)
        self._app = app
        self._timeout = timeout
        self._draining = False
        self._publishing: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if getattr(self._app.state, "startup_error", None):
            self.should_exit = True  # the lifespan logged why; main() exits non-zero
        elif self._app.state.metrics.multiprocess:
            # One of several processes: its gauges read from state reach the others'
            # scrapes through its metrics file (service.metrics).
            self._publishing = asyncio.get_running_loop().create_task(
                self._app.state.metrics.publish())

    async def shutdown(self, sockets=None) -> None:
        if self._publishing is not None:
            self._publishing.cancel()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        log.info("signal %d: draining for up to %.0f s", sig, self._timeout)
        # Signal handlers run between bytecodes of the loop's thread; hand the work to the
        # loop properly (and wake it) rather than touching it from here.
        loop = asyncio.get_event_loop()
        self._draining = True
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        try:
            clean = await drain(self._app, self._timeout)
            log.info("drained %s", "cleanly" if clean else "with requests cut short")
        finally:
            self.should_exit = True


class JsonLines(logging.Formatter):
    """One JSON object per record, what container log collectors expect; with several
    server processes, each names its process (`pid`)."""

    def __init__(self, pid: bool = False):
        super().__init__()
        self._pid = pid

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._pid:
            entry["pid"] = record.process
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    several = settings.processes > 1
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines(pid=several) if settings.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s"
                                           f"{'[%(process)d]' if several else ''}: "
                                           "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


def parse_args(argv: list[str] | None) -> dict:
    p = argparse.ArgumentParser(prog="clip-serve", description="Serve CLIP over HTTP.",
                                epilog="Every setting can also come from CLIP_<NAME> variables.")
    p.add_argument("--model", dest="models", action="append",
                   help="registry name or checkpoint path (repeatable; first is the default)")
    p.add_argument("--random-weights", action="store_const", const=True,
                   help="random weights instead of downloading (tests and benchmarks only)")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-queue-items", type=int)
    p.add_argument("--max-wait-ms", type=float)
    p.add_argument("--max-batch-compute-ms", type=float)
    p.add_argument("--max-queue-wait-s", type=float)
    p.add_argument("--streams", type=int)
    p.add_argument("--torch-threads", type=int)
    p.add_argument("--processes", type=int,
                   help="complete server processes on one port (default 1: no supervisor)")
    p.add_argument("--request-timeout-s", type=float)
    p.add_argument("--cache-dir")
    p.add_argument("--offline", action="store_const", const=True)
    p.add_argument("--log-format", choices=["json", "text"])
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings(**parse_args(argv))
    except ValidationError as e:
        # Without the values: one of them may be an API key.
        problems = "\n".join(f"  {'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}"
                             for err in e.errors(include_input=False))
        print(f"clip-serve: invalid settings:\n{problems}", file=sys.stderr)
        return 2
    configure_logging(settings)
    if settings.processes > 1:
        return supervise(settings, "service.__main__:serve_child")
    return serve(settings)


def serve(settings: Settings, sockets: list[socket.socket] | None = None) -> int:
    """One complete server in this process, on `sockets` or on the settings' host and
    port, until a signal has drained it; the exit status."""
    name_os_threads()  # per-thread CPU in /proc, by name (loadtests/ceiling.py reads it)
    # Pillow's decompression-bomb warning is an error in the server process (the image
    # preparer also checks the size itself, whatever the filters say).
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            timeout_graceful_shutdown=int(settings.drain_timeout_s) or None)
    server = DrainingServer(config, app, settings.drain_timeout_s)
    server.run(sockets)
    # uvicorn returns normally on SIGTERM; a model that could not load, or a failed bind,
    # must be a non-zero exit so orchestrators see it.
    if getattr(app.state, "startup_error", None) or not server.started:
        return 1
    return 0


def serve_child(settings: Settings, child: Child) -> None:
    """One of several server processes (spawned by service.processes.supervise): the whole
    server on its own SO_REUSEPORT socket; its exit status is the process's."""
    configure_logging(settings)
    enter_child(child)
    try:
        sock = reuseport_socket(settings.host, child.port)
    except OSError as e:
        log.error("cannot bind %s:%d: %s", settings.host, child.port, e)
        sys.exit(1)
    sys.exit(serve(for_one_process(settings), [sock]))


if __name__ == "__main__":
    sys.exit(main())

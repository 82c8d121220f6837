"""A real server on 127.0.0.1 for the tests here (loadtests/ is put on the import path by
tests/conftest.py: it holds scripts that import each other by name)."""

from __future__ import annotations

from serverproc import ServerProcess  # loadtests/ is on the path: tests/conftest.py


def start_server(**env: str) -> ServerProcess:
    """The default model (builtin/clip-shapes), ready; CLIP_* settings from `env`."""
    server = ServerProcess([], {"CLIP_LOG_FORMAT": "text", "CLIP_LOG_LEVEL": "warning", **env})
    try:
        server.wait_ready(120)
    except BaseException:
        server.stop()
        raise
    return server

"""loadtests/ on the import path, and a real server on 127.0.0.1 for the tests here.

loadtests/ holds scripts, not a package; its modules import each other by name, as they
do when run as `python loadtests/NAME.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

LOADTESTS = Path(__file__).resolve().parents[2] / "loadtests"
if str(LOADTESTS) not in sys.path:
    sys.path.insert(0, str(LOADTESTS))

from serverproc import ServerProcess  # noqa: E402 (needs the path above)


def start_server(**env: str) -> ServerProcess:
    """The default model (builtin/clip-shapes), ready; CLIP_* settings from `env`."""
    server = ServerProcess([], {"CLIP_LOG_FORMAT": "text", "CLIP_LOG_LEVEL": "warning", **env})
    try:
        server.wait_ready(120)
    except BaseException:
        server.stop()
        raise
    return server

"""`clip-serve` / `python -m service`: settings from flags and CLIP_* variables, then uvicorn."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import uvicorn
from pydantic import ValidationError

from .app import create_app
from .settings import Settings


class JsonLines(logging.Formatter):
    """One JSON object per record, what container log collectors expect."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if settings.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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
    p.add_argument("--request-timeout-s", type=float)
    p.add_argument("--cache-dir")
    p.add_argument("--offline", action="store_const", const=True)
    p.add_argument("--log-format", choices=["json", "text"])
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings(**parse_args(argv))
    except ValidationError as e:
        print(f"clip-serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    configure_logging(settings)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            timeout_graceful_shutdown=int(settings.drain_timeout_s) or None)
    server = uvicorn.Server(config)
    server.run()
    # uvicorn returns normally on SIGTERM; a failed start (model not loadable) sets started
    # False, and that must be a non-zero exit so orchestrators see it.
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())

"""`clip-fetch MODEL...`: download registry weights into the cache and verify them, then exit.

Meant for a one-shot step before the server starts (a Kubernetes init container, a
`docker compose run`), so that the server can then run with downloads off. The cache
directory is the one `clip-serve` uses: `--cache-dir`, else `CLIP_CACHE_DIR`, else the
default cache.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from . import hub
from .errors import ClipCoreError
from .registry import get_entry


def fetch_model(name: str, cache_dir: Path, *, progress: bool = True) -> Path | None:
    """The verified local file of registry model `name`, downloaded if needed; None when
    its weights ship inside the package and there is nothing to download."""
    entry = get_entry(name)
    if urlsplit(entry.url).scheme not in ("http", "https"):
        return None
    return hub.fetch(entry.url, entry.sha256, cache_dir, entry.filename, progress=progress)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="clip-fetch", description="Download and verify model weights into the cache.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="registry name (e.g. ViT-B-32); a comma-separated list also works, "
                        "as in CLIP_MODELS")
    p.add_argument("--cache-dir", type=Path, help="default: $CLIP_CACHE_DIR, else "
                   f"{hub.default_cache_dir()}")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")

    env_dir = os.environ.get("CLIP_CACHE_DIR")
    cache_dir = args.cache_dir or (Path(env_dir) if env_dir else hub.default_cache_dir())
    names = [n.strip() for arg in args.models for n in arg.split(",") if n.strip()]
    for name in names:
        try:
            path = fetch_model(name, cache_dir, progress=not args.quiet)
        except (ClipCoreError, ValueError) as e:
            print(f"clip-fetch: {name}: {e}", file=sys.stderr)
            return 1
        print(f"{name}: {path if path else 'ships with the package; nothing to download'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

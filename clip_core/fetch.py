"""`clip-fetch MODEL...`: download registry weights into the cache and verify them, then exit.

Meant for a one-shot step before the server starts (a Kubernetes init container, a
`docker compose run`), or for filling a folder on a connected machine that is then copied
to an air-gapped one (README, "Air-gapped installs"), so that the server can then run with
downloads off. The cache directory is the one `clip-serve` uses: `--cache-dir`, else
`CLIP_CACHE_DIR`, else the default cache (and, for hub weights, huggingface_hub's cache).

Layout of a cache directory DIR:
    DIR/<file>.pt                       URL downloads (OpenAI's weights), verified by SHA-256
    DIR/huggingface/models--ORG--REPO/  hub downloads, in huggingface_hub's cache layout
    DIR/hf-sha256.json                  SHA-256s recorded at the first hub download
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
from .registry import ModelEntry, get_entry


def fetch_entry(entry: ModelEntry, cache_dir: Path | None, *, offline: bool = False,
                progress: bool = True) -> Path | None:
    """The verified local file of a registry entry's weights, downloaded if needed; None
    when they ship inside the package and there is nothing to download.

    `cache_dir` None: URL downloads go to the default cache, hub downloads to
    huggingface_hub's own cache (HF_HOME, HF_HUB_CACHE).
    """
    if entry.hf_repo:
        record_dir = cache_dir if cache_dir is not None else hub.default_cache_dir()
        return hub.fetch_hf(entry.hf_repo, entry.hf_files, entry.sha256 or None, cache_dir,
                            record_dir=record_dir, offline=offline, progress=progress)
    if urlsplit(entry.url).scheme not in ("http", "https"):
        return None
    directory = cache_dir if cache_dir is not None else hub.default_cache_dir()
    return hub.fetch(entry.url, entry.sha256, directory, entry.filename, offline=offline,
                     progress=progress)


def fetch_model(name: str, cache_dir: Path | None, *, progress: bool = True) -> Path | None:
    """`fetch_entry` for the registry model called `name`."""
    return fetch_entry(get_entry(name), cache_dir, progress=progress)


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
    # None: the defaults the server uses when CLIP_CACHE_DIR is unset (fetch_entry).
    cache_dir = args.cache_dir or (Path(env_dir) if env_dir else None)
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

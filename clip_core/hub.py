"""Download weights into a local cache and verify them before use.

A file reaches its final name only through `os.replace` from a verified temporary file in the
same directory, so a reader never sees a partial or unverified file there, and two processes
fetching the same file at once each install a complete copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import httpx
from tqdm import tqdm

from clip_core.errors import ChecksumMismatch, WeightsUnavailable

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class DownloadError(WeightsUnavailable):
    """A download that failed: HTTP error status, network error, truncated body, disk error."""

    def __init__(self, url: str, target: Path, reason: str):
        self.url = url
        self.target = target
        self.reason = reason
        super().__init__(
            f"could not fetch {url}: {reason}; to install it by hand, download that URL "
            f"and save it as {target}"
        )


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CACHE_HOME/clip-server`, else `~/.cache/clip-server`.

    Only the caller's start-up code should use this; everything below takes the directory as
    an argument. `environ` defaults to `os.environ`.
    """
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CACHE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "clip-server"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Lower-case hex SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_in_url(url: str) -> str | None:
    """The SHA-256 a URL carries as one of its path segments, as OpenAI's weight URLs do."""
    for segment in urlsplit(url).path.split("/"):
        if _SHA256_RE.fullmatch(segment.lower()):
            return segment.lower()
    return None


def fetch(
    url: str,
    sha256: str | None,
    cache_dir: str | os.PathLike[str],
    filename: str | None = None,
    *,
    offline: bool = False,
    progress: bool = True,
    timeout: float = 30.0,
    client: httpx.Client | None = None,
) -> Path:
    """Return the path of `url`'s file in `cache_dir`, downloading it if needed.

    A cached file is used only if its SHA-256 equals `sha256` (any cached file is used when
    `sha256` is None); a cached file with another hash is downloaded again, never returned.
    `filename` defaults to the URL's last path segment. `timeout` bounds connecting and each
    read, not the whole transfer.

    Raises WeightsUnavailable when offline and no valid file is cached, DownloadError (a
    WeightsUnavailable) when the download fails, and ChecksumMismatch when the downloaded
    bytes do not have the expected hash. No partial file is ever left at the target path.
    """
    expected = _normalise_sha256(sha256)
    directory = Path(cache_dir)
    name = filename if filename is not None else _filename_from_url(url)
    _check_filename(name)
    target = directory / name

    if target.is_file():
        if expected is None:
            return target
        actual = sha256_file(target)
        if actual == expected:
            return target
        if offline:
            raise WeightsUnavailable(
                f"cached file {target} is corrupt (SHA-256 {actual}, expected {expected}) and "
                f"downloads are off; replace it with a fresh copy of {url}"
            )
        logger.warning(
            "cached file %s has SHA-256 %s, expected %s; downloading it again",
            target,
            actual,
            expected,
        )
    elif offline:
        raise WeightsUnavailable(
            f"model file {name!r} is not in the cache directory {directory} and downloads are "
            f"off; download {url} and save it as {target}"
        )

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(url, target, f"cannot create {directory}: {exc}") from exc

    if client is not None:
        _download(client, url, expected, target, progress=progress, timeout=timeout)
        return target
    with httpx.Client(timeout=timeout) as http:
        _download(http, url, expected, target, progress=progress, timeout=timeout)
    return target


def _download(
    client: httpx.Client,
    url: str,
    expected: str | None,
    target: Path,
    *,
    progress: bool,
    timeout: float,
) -> None:
    logger.info("downloading %s to %s", url, target)
    try:
        # A unique name per call keeps concurrent fetchers of the same file apart; the same
        # directory keeps the final os.replace on one filesystem, hence atomic.
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    except OSError as exc:
        raise DownloadError(url, target, f"cannot write to {target.parent}: {exc}") from exc
    part_path = Path(name)
    try:
        with os.fdopen(fd, "wb") as part:
            if os.name == "posix":
                # mkstemp makes the file 0600; weights are not secret, and a cache shared by
                # several users (or containers) must be readable by all of them.
                os.fchmod(part.fileno(), 0o644)
            actual = _stream(client, url, target, part, progress=progress, timeout=timeout)
            part.flush()
            os.fsync(part.fileno())
        if expected is not None and actual != expected:
            raise ChecksumMismatch(url, expected, actual)
        os.replace(part_path, target)
    except OSError as exc:
        part_path.unlink(missing_ok=True)
        raise DownloadError(url, target, f"cannot write {part_path}: {exc}") from exc
    except BaseException:
        # Also on KeyboardInterrupt: an abandoned .part would only waste disk space.
        part_path.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    if expected is None:
        logger.info("saved %s (unverified; its SHA-256 is %s)", target, actual)
    else:
        logger.info("saved %s (SHA-256 verified)", target)


def _stream(
    client: httpx.Client,
    url: str,
    target: Path,
    out: BinaryIO,
    *,
    progress: bool,
    timeout: float,
) -> str:
    """Write the body of `url` to `out` and return its SHA-256."""
    digest = hashlib.sha256()
    try:
        with client.stream("GET", url, follow_redirects=True, timeout=timeout) as response:
            if not response.is_success:
                raise DownloadError(url, target, f"HTTP {response.status_code}")
            length = _content_length(response)
            # Content-Length and num_bytes_downloaded both count bytes on the wire, which
            # differ from the decoded bytes when the server compresses.
            with tqdm(
                total=length,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=target.name,
                disable=None if progress else True,  # None: off when stderr is not a TTY
            ) as bar:
                seen = 0
                for chunk in response.iter_bytes(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(response.num_bytes_downloaded - seen)
                    seen = response.num_bytes_downloaded
            # httpx already raises on a short body; this guards transports that do not.
            if length is not None and response.num_bytes_downloaded != length:
                raise DownloadError(
                    url,
                    target,
                    f"transfer ended after {response.num_bytes_downloaded} of {length} bytes",
                )
    except httpx.HTTPError as exc:
        raise DownloadError(url, target, f"{type(exc).__name__}: {exc}") from exc
    except httpx.InvalidURL as exc:
        raise DownloadError(url, target, f"invalid URL: {exc}") from exc
    return digest.hexdigest()


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened this way on Windows.
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _normalise_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not _SHA256_RE.fullmatch(value):
        raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
    return value


def _filename_from_url(url: str) -> str:
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if not name:
        raise ValueError(f"cannot take a file name from {url!r}; pass filename")
    return name


def _check_filename(name: str) -> None:
    # The name comes from a URL or a registry; it must not point outside the cache directory.
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"unsafe cache file name: {name!r}")


# ---- the Hugging Face hub ----------------------------------------------------------------
#
# Files on the hub are fetched by huggingface_hub, so its cache layout, HF_ENDPOINT
# (mirrors), HF_HUB_OFFLINE, HF_TOKEN and resumable downloads behave as in every other tool.
# The hub publishes no SHA-256 we could pin ahead of time for open_clip's weights, so the
# first download records the file's hash in `SHA256_RECORD` in our cache directory and every
# later load checks the file against it (trust on first use; a registry entry that knows the
# hash checks against that instead).

SHA256_RECORD = "hf-sha256.json"
HF_CACHE_SUBDIR = "huggingface"


def hf_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path | None:
    """Where hub files go: `<cache_dir>/huggingface` (a hub cache, its own layout) when a
    cache directory is given, so one folder holds a whole air-gapped install; else None,
    huggingface_hub's own cache (HF_HUB_CACHE, HF_HOME, ~/.cache/huggingface/hub)."""
    return None if cache_dir is None else Path(cache_dir) / HF_CACHE_SUBDIR


def fetch_hf(
    repo: str,
    filenames: tuple[str, ...] | list[str],
    sha256: str | None,
    cache_dir: str | os.PathLike[str] | None,
    *,
    record_dir: str | os.PathLike[str],
    revision: str | None = None,
    offline: bool = False,
    progress: bool = True,
) -> Path:
    """The local path of the first of `filenames` that hub repository `repo` has, fetched
    through huggingface_hub into `hf_cache_dir(cache_dir)` and verified.

    `sha256` is checked when given; otherwise the hash recorded in `record_dir` at the
    first download is, and a file seen for the first time has its hash recorded. A cached
    file that fails the check is downloaded once more (unless offline) before
    ChecksumMismatch is raised. `offline` uses the cache only, as HF_HUB_OFFLINE=1 does.
    Raises WeightsUnavailable when no file can be had.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    expected = _normalise_sha256(sha256) if sha256 else None
    hub_cache = hf_cache_dir(cache_dir)
    reasons: list[str] = []
    for filename in filenames:
        _check_filename(filename)
        key = f"{repo}/{filename}"
        try:
            path = Path(
                hf_hub_download(
                    repo, filename, revision=revision, cache_dir=hub_cache,
                    local_files_only=offline, library_name="clip-server",
                    tqdm_class=None if progress else _SilentTqdm,
                )
            )
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
            # Not cached, and downloads are off or the endpoint cannot be reached.
            reasons.append(f"{filename}: not in the cache ({_first_line(exc)})")
            continue
        except EntryNotFoundError:
            # The repository has no such file: try the next name.
            reasons.append(f"{filename}: not in the repository")
            continue
        except HfHubHTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                # A mirror may answer a plain 404 without the hub's X-Error-Code.
                reasons.append(f"{filename}: HTTP 404")
                continue
            raise WeightsUnavailable(
                f"could not fetch {key} from the Hugging Face hub: {_first_line(exc)}; "
                f"{_offline_hint(repo, cache_dir)}"
            ) from exc
        except Exception as exc:  # HTTP errors, network errors, bad repository names
            raise WeightsUnavailable(
                f"could not fetch {key} from the Hugging Face hub: {_first_line(exc)}; "
                f"{_offline_hint(repo, cache_dir)}"
            ) from exc
        record = Path(record_dir) / SHA256_RECORD
        want = expected or _recorded(record, key)
        actual = sha256_file(path)
        if want is not None and actual != want and not offline:
            # A cache damaged on disk is repaired by a fresh copy; a changed file is not.
            logger.warning("%s has SHA-256 %s, expected %s; downloading it again",
                           path, actual, want)
            try:
                path = Path(hf_hub_download(repo, filename, revision=revision,
                                            cache_dir=hub_cache, force_download=True,
                                            library_name="clip-server",
                                            tqdm_class=None if progress else _SilentTqdm))
                actual = sha256_file(path)
            except Exception as exc:  # offline by HF_HUB_OFFLINE, or the fetch failed
                logger.warning("could not fetch %s again: %s", key, _first_line(exc))
        if want is not None and actual != want:
            source = "the registry's" if expected else f"the one recorded in {record}"
            err = ChecksumMismatch(f"{key} at {path}", want, actual)
            fix = "" if expected else (f". If the repository really changed, delete its "
                                       f"line from {record}")
            err.args = (f"{err} ({source}); the file is not used{fix}",)
            raise err
        if want is None:
            _record(record, key, actual, commit=path.parent.name)
            logger.info("%s: first download, SHA-256 %s recorded in %s", key, actual, record)
        return path
    raise WeightsUnavailable(
        f"no weights for {repo} ({'; '.join(reasons)}); {_offline_hint(repo, cache_dir)}"
    )


def _offline_hint(repo: str, cache_dir: str | os.PathLike[str] | None) -> str:
    where = f"--cache-dir {cache_dir}" if cache_dir is not None else "the same cache settings"
    return (f"on a machine with access to the hub (or an HF_ENDPOINT mirror) run "
            f"`clip-fetch hf-hub:{repo} {where}` and copy the cache folder here")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _recorded(record: Path, key: str) -> str | None:
    try:
        data = json.loads(record.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise WeightsUnavailable(f"cannot read the SHA-256 record {record}: {exc}") from exc
    value = data.get(key, {}).get("sha256") if isinstance(data, dict) else None
    return _normalise_sha256(value) if isinstance(value, str) else None


def _record(record: Path, key: str, sha256: str, *, commit: str) -> None:
    """Adds `key` to the JSON record, under a file lock and through an atomic replace, so
    two processes downloading different models at once both keep their line."""
    from filelock import FileLock

    record.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(record) + ".lock"):
        try:
            data = json.loads(record.read_text())
        except FileNotFoundError:
            data = {}
        data.setdefault(key, {"sha256": sha256, "commit": commit})
        fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=record.name + ".", suffix=".part")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, record)


class _SilentTqdm(tqdm):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)

"""Machine tuning: how the server shares this machine's cores and memory with itself.

Every setting that exists for speed or memory rather than for correctness lives here,
with the reason it is needed; docs/benchmarks.md says how much each one measured.

- Cores. On CPU the model gets every core this process may use (`usable_cores`: with
  several server processes, its share of them, `share_cores`),
  shared out over the worker's streams by `thread_share`. OpenMP's thread count belongs
  to the calling thread, so each serving thread sets its own (service.backend). Only
  the serving threads should run parallel torch ops: libgomp keeps a team of threads
  for each thread that ever ran one, and once it manages more threads than there are
  cores it stops spinning between parallel regions, so every op of a forward pass pays
  a wake-up. Hence only stream 0 ever runs wide, the model loads in a thread that then
  ends (`in_passing_thread`), and image preprocessing makes its tensors without torch
  kernels (clip_core.preprocess).
- Streams. Two single-threaded batches side by side beat one batch on two cores: a
  batch that runs alone never waits at a barrier for a thread that lost its core
  (`default_streams`).
- Decoding threads run at a lower priority (`lower_priority`), so that they take only
  what the model leaves of a core; by default there are as many as the cores the model
  does not need (`decode_workers`).
- Names. Every thread the server starts carries its Python name in the OS as well
  (`name_os_threads`), so per-thread CPU in /proc/PID/task, `top -H` and profilers tell
  the event loop (the main thread), the decode pool and the serving threads apart.
- Memory. MKL's per-thread GEMM buffer pools are off (`environment_defaults`), and the C
  heap's free pages go back to the system after a burst (`release_heap`).

This module imports neither torch nor numpy: `service.__main__` reads
`environment_defaults` before torch loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

# MKL keeps per-thread pools of its GEMM buffers, which stay allocated after the model
# has loaded; without them MKL allocates per call, at no measurable cost here. MKL reads
# the variable at its first allocation, so it must be set before torch is imported.
_ENVIRONMENT = {"MKL_DISABLE_FAST_MM": "1"}

# How much nicer than the process the decoding threads run. On a small CPU they share
# cores with torch's threads, and a torch thread waiting for a core stalls its whole
# parallel region (the others wait at the barrier): at a lower priority the decoders
# give a core back to the model at once and use what it leaves.
DECODER_NICENESS = 10


def environment_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set before torch is imported, less those the operator has set."""
    return {k: v for k, v in _ENVIRONMENT.items() if k not in environ}


def usable_cores() -> int:
    """Cores this process may use: its share (`share_cores`) of those it may run on, a
    container's cpuset rather than the host's count."""
    return max(1, machine_cores() // _processes)


def machine_cores() -> int:
    """Cores this process may run on, shared with its sibling server processes."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Complete server processes sharing the machine's cores (CLIP_PROCESSES), set once by
# `share_cores` before a server process builds its app. Module state rather than a
# setting passed down: every default that counts cores (torch threads, streams, the
# decode pool, the exported engines' threads) reads `usable_cores`, and each must count
# this process's share, not the machine.
_processes = 1


def share_cores(processes: int) -> None:
    """From now on `usable_cores` is this process's share of the cores: 1/`processes` of
    them (at least one), so that N processes with their default thread counts do not
    oversubscribe the machine. Explicit thread settings stay per process."""
    global _processes
    if processes < 1:
        raise ValueError("processes must be >= 1")
    _processes = processes


class _Placed(Protocol):
    @property
    def device(self) -> Any: ...  # a torch.device

    @property
    def cpu_threads(self) -> int: ...


def default_streams(backend: _Placed) -> int:
    """Two streams on a CPU with two cores or more, one on a GPU (see service.batcher).

    Two single-threaded batches side by side beat one batch on both cores, and a lone
    request still gets every core (`thread_share`). More streams on larger CPUs are not
    measured, so two stays the default.
    """
    return 2 if backend.device.type == "cpu" and backend.cpu_threads >= 2 else 1


def decode_workers(setting: int | str, *, accelerator: bool, model_threads: int | None,
                   cores: int | None = None) -> int:
    """The decode pool's size for the `prepare_workers` setting: a number as given;
    "auto" the cores the model does not need, out of `cores` (default: `usable_cores`).

    Beside an accelerator the model needs the event loop's core and one for its serving
    threads, which mostly wait on the device: every other core decodes (all but one on
    up to 3 cores); with several server processes those two are kept once and the rest
    shared out, so that processes x decoders is about the machine's cores. On CPU the
    model needs its torch threads: the decoders get the cores `model_threads` leaves,
    or, where the model may use every core, a quarter of them (at least 2). They run
    niced (`lower_priority`), so they take only what the model leaves of a core either
    way, and a CPU model costs several times what decoding an image does, so the model
    stays the bottleneck.
    """
    if setting != "auto":
        return int(setting)
    if accelerator and cores is None and _processes > 1:
        # Several processes feeding one device keep its two cores once for the machine,
        # not once each: their serving threads mostly wait, and the decoders run niced,
        # so every event loop still gets its turn (docs/benchmarks.md, run 6).
        return max(1, round((machine_cores() - 2) / _processes))
    n = cores or usable_cores()
    if accelerator:
        return max(1, n - (2 if n >= 4 else 1))
    if model_threads is not None and model_threads < n:
        return n - model_threads
    return max(2, n // 4)


def thread_share(total: int, stream: int, streams: int, alone: bool) -> int:
    """Threads for stream `stream`'s next batch out of `total` cores: every core when it
    runs alone on stream 0, else an even split, the first streams taking what does not
    divide. Only stream 0 runs wide, so that no other thread grows an OpenMP team."""
    if alone and stream == 0:
        return total
    return max(1, total // streams + (stream < total % streams))


async def in_passing_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a thread of its own that ends with it.

    Loading runs parallel torch ops, and OpenMP keeps a team of threads for every thread
    that ran one, for as long as that thread lives; an executor thread that loaded the
    model and stayed alive would slow every forward pass after it.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="load-model") as pool:
        return await asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(fn, *args, **kwargs))


def lower_priority() -> None:
    """Lower the calling thread's priority by DECODER_NICENESS (a thread pool's initializer)."""
    if sys.platform != "linux":  # a thread id names one thread only on Linux
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid,
                       min(19, os.getpriority(os.PRIO_PROCESS, tid) + DECODER_NICENESS))


def name_os_threads() -> None:
    """From now on, each thread started with `threading` gives the OS its Python name
    ("prepare-image_0", "model-worker-..."), cut to the 15 bytes Linux keeps.

    Python 3.11 names no OS thread, so all of them read "python" in /proc/PID/task/TID/comm.
    threading.setprofile is the one hook that runs inside every new thread before its
    target; it names the thread and removes itself at its first event.
    """
    if _PRCTL is None:
        return

    def name_then_forget(frame: Any, event: str, arg: Any) -> None:
        sys.setprofile(None)
        _name_os_thread(threading.current_thread().name)

    threading.setprofile(name_then_forget)


def _name_os_thread(name: str) -> None:
    if _PRCTL is not None:
        _PRCTL(_PR_SET_NAME, name.encode("utf-8", "replace")[:15], 0, 0, 0)


def release_heap() -> None:
    """Give the C heap's free pages back to the system.

    Every serving thread allocates its batches' activations from its own glibc arena,
    and glibc keeps what they free: after a burst the process holds its largest batches'
    worth per thread. malloc_trim(0) returns it; the next batch faults back only what it
    uses. It is process-wide and locks one arena at a time, so another model's worker may
    keep computing while it runs. Nothing where the C library has no malloc_trim.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # TypeError: CDLL(None) on Windows
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()

_PR_SET_NAME = 15  # prctl option: the calling thread's name, 16 bytes with its NUL


def _find_prctl() -> Callable[..., int] | None:
    """Linux's prctl, or None elsewhere."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None).prctl
    except (AttributeError, OSError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _find_prctl()

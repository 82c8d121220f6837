"""The worker's backend for one clip_core model on its device.

Payloads arrive prepared (see `service.prepare`): an image is a uint8 (3, S, S) tensor,
already decoded, resized and cropped; a text is its token ids [sot, ..., eot] without
padding. `run` only collates, moves to the device, runs the model and splits the output.

Results are raw fp32 embeddings, one numpy vector (E,) per payload. Callers normalise
(the API's default) or not (`normalize: false`); one cached text vector serves both.

Threads: on CPU the model gets `threads` cores (default: every core this process may
use), shared out over the worker's streams by `place`: with two streams on two cores,
each batch runs single-threaded, except that a batch running alone on stream 0 uses
both. torch's thread count belongs to the calling thread (OpenMP's setting is per
thread), so each serving thread sets its own. On CUDA it is left alone.
Only the serving threads should run parallel torch ops: libgomp keeps a team of threads
for each thread that ever ran one, and when it manages more threads than there are cores
it stops spinning between regions, which slowed a 2-core CPU's forward passes by 20-25%.
Hence only stream 0 ever runs wide, the model loads in a thread that then ends
(service.core), and image preprocessing makes its tensors without torch kernels
(clip_core.preprocess).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clip_core.loader import LoadedModel

from .batcher import BatcherConfig, Kind
from .errors import OutOfMemory

log = logging.getLogger(__name__)

_OOM_MESSAGES = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")
_WARMUP_TEXT_LENGTHS = (7, 12, 20)  # sot + words + eot, as typical label prompts


@dataclass(frozen=True)
class BackendInfo:
    name: str
    embed_dim: int
    image_size: int  # S of the (3, S, S) pixels the backend takes
    device: str  # "cpu", "cuda:0"
    dtype: str  # "float32", "float16", "bfloat16"
    context_length: int  # most tokens per text, sot and eot included


class ClipBackend:
    """`service.batcher.Backend` for one loaded CLIP model; called from the worker thread."""

    def __init__(
        self,
        loaded: LoadedModel,
        batching: BatcherConfig | None = None,
        *,
        threads: int | None = None,
    ):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.model = loaded.model.eval()
        self.preprocess = loaded.preprocess
        self.batching = batching or BatcherConfig()
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.threads = threads
        cfg = self.model.config
        self.info = BackendInfo(
            name=loaded.name,
            embed_dim=cfg.embed_dim,
            image_size=loaded.preprocess.image_size,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            context_length=cfg.text.context_length,
        )
        if loaded.preprocess.image_size != cfg.vision.image_size:
            log.warning("model %s: preprocessing makes %d px images, the tower was built "
                        "for %d px", loaded.name, loaded.preprocess.image_size,
                        cfg.vision.image_size)
        # ImageTransform.normalize's constants, kept on the device: (3, 1, 1) fp32.
        self._mean = torch.tensor(self.preprocess.mean, dtype=torch.float32,
                                  device=self.device).view(3, 1, 1)
        self._std = torch.tensor(self.preprocess.std, dtype=torch.float32,
                                 device=self.device).view(3, 1, 1)
        self._cuda = self.device.type == "cuda"
        self._local = threading.local()  # .threads: what this thread last set torch to

    @property
    def logit_scale(self) -> float:
        """The factor cosines are multiplied by before the softmax: exp of the stored log."""
        return float(self.model.logit_scale.detach().float().exp())

    # ---- the Backend protocol ----

    def warmup(self) -> None:
        """An image batch and a text batch of realistic shape; on CUDA also the largest
        batches the batcher may form, so their memory is reserved before traffic."""
        if not self._cuda:
            self._use_threads(self.cpu_threads)
        g = torch.Generator().manual_seed(0)
        self.run("image", self._warmup_images(min(4, self.batching.max_batch_size), g))
        self.run("text", [self._warmup_text(n, g) for n in _WARMUP_TEXT_LENGTHS])
        if not self._cuda:
            return
        ctx = self.info.context_length
        largest = [
            ("image", self._warmup_images(self.batching.max_batch_size, g)),
            ("text", [self._warmup_text(ctx, g)
                      for _ in range(max(1, self.batching.max_batch_tokens // ctx))]),
        ]
        for kind, payloads in largest:
            try:
                self.run(kind, payloads)
            except OutOfMemory:
                # Not fatal: the worker halves its batches when traffic meets the limit.
                log.warning("model %s: a full %s batch (%d) does not fit on %s; "
                            "batches will shrink", self.info.name, kind, len(payloads),
                            self.device)
        torch.cuda.synchronize(self.device)

    @property
    def cpu_threads(self) -> int:
        """Cores the model may use on CPU, all streams together."""
        return self.threads or _usable_cores()

    def place(self, stream: int, streams: int, alone: bool) -> None:
        """Size the calling serving thread's torch pool for its next batch: every core
        when alone on stream 0, else stream `stream`'s share of them."""
        if self._cuda:
            return
        total = self.cpu_threads
        if alone and stream == 0:
            self._use_threads(total)
        else:  # an even split; the first streams take what does not divide
            self._use_threads(max(1, total // streams + (stream < total % streams)))

    def _use_threads(self, n: int) -> None:
        # Only on a change: torch.set_num_threads also clears oneDNN's primitive cache.
        if getattr(self._local, "threads", None) != n:
            torch.set_num_threads(n)
            self._local.threads = n

    def release_memory(self) -> None:
        """Give the C heap's free pages back to the system; the worker calls it once the
        server has been idle a while.

        Every serving thread allocates its batches' activations from its own glibc arena,
        and glibc keeps what they free: after a burst the process holds its largest
        batches' worth per thread (~180 MB above the live set for ViT-B/32 on 2 cores).
        malloc_trim(0) returns it in a few ms; the next batch faults back only what it
        uses. The CUDA cache is left alone: warm-up reserved it on purpose. The trim is
        process-wide and locks one arena at a time, so another model's worker may keep
        computing while it runs.
        """
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)

    def run(self, kind: Kind, payloads: list[object]) -> list[np.ndarray]:
        """One fp32 (E,) vector per payload, in order. OutOfMemory when the batch does not
        fit; any other error propagates so the worker can isolate the bad payload."""
        if not payloads:
            return []
        if kind == "image":
            return self._guarded(kind, len(payloads), lambda: self._images(payloads))
        if kind == "text":
            return self._guarded(kind, len(payloads), lambda: self._texts(payloads))
        raise ValueError(f"unknown kind {kind!r}")

    # ---- collation and the model ----

    def _images(self, payloads: Sequence[object]) -> torch.Tensor:
        s = self.info.image_size
        for i, p in enumerate(payloads):
            if not (isinstance(p, torch.Tensor) and p.dtype == torch.uint8
                    and tuple(p.shape) == (3, s, s)):
                raise ValueError(f"image payload {i} is not a uint8 (3, {s}, {s}) tensor")
        # (B, 3, S, S) uint8: a quarter of the bytes of fp32 cross to the device.
        pixels = torch.empty((len(payloads), 3, s, s), dtype=torch.uint8, pin_memory=self._cuda)
        torch.stack(payloads, out=pixels)  # type: ignore[arg-type]
        # From pinned memory the copy is asynchronous; the stream orders it before the model.
        x = pixels.to(self.device, non_blocking=self._cuda)
        # ToTensor and Normalize in fp32, in ImageTransform.normalize's order of operations.
        x = x.to(torch.float32).div_(255).sub_(self._mean).div_(self._std)
        return self.model.encode_image(x.to(self.dtype))  # (B, E) fp32

    def _texts(self, payloads: Sequence[object]) -> torch.Tensor:
        ctx = self.info.context_length
        rows: list[list[int]] = []
        for i, p in enumerate(payloads):
            if not isinstance(p, (list, tuple)) or not 2 <= len(p) <= ctx:
                raise ValueError(f"text payload {i} is not a list of 2 to {ctx} token ids")
            rows.append(list(p))
        longest = max(len(r) for r in rows)
        # (B, L) int64, zero padded to the batch's longest; the tower trims and packs itself.
        ids = torch.tensor([r + [0] * (longest - len(r)) for r in rows], dtype=torch.int64)
        return self.model.encode_text(ids.to(self.device, non_blocking=self._cuda))

    def _guarded(self, kind: Kind, n: int, compute: Callable[[], torch.Tensor]) -> list[np.ndarray]:
        reason: str | None = None
        try:
            with torch.inference_mode():
                out = compute().float().cpu().numpy()  # (B, E); .cpu() waits for the device
            return [row.copy() for row in out]  # own buffers: a cached row frees alone
        except (RuntimeError, MemoryError) as err:  # CUDA's OutOfMemoryError is a RuntimeError
            if not _is_oom(err):
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        # Out of the except block, so the traceback's frames and their tensors are gone
        # before the cache is emptied.
        if self._cuda:
            torch.cuda.empty_cache()
        log.debug("model %s: out of memory on a %s batch of %d: %s", self.info.name, kind, n,
                  reason)
        raise OutOfMemory(f"a {kind} batch of {n} does not fit on {self.device}")

    def _warmup_images(self, n: int, g: torch.Generator) -> list[torch.Tensor]:
        s = self.info.image_size
        return list(torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g))

    def _warmup_text(self, n_tokens: int, g: torch.Generator) -> list[int]:
        n = min(n_tokens, self.info.context_length)
        vocab = self.model.config.text.vocab_size
        sot, eot = vocab - 2, vocab - 1  # CLIP's specials are the two largest ids
        return [sot, *torch.randint(1, sot, (n - 2,), generator=g).tolist(), eot]


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # TypeError: CDLL(None) on Windows
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    message = str(err)
    return any(m in message for m in _OOM_MESSAGES)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores a container's cpuset allows
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

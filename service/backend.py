"""The worker's backend for one clip_core model on its device.

Payloads arrive prepared (see `service.prepare`): an image is a uint8 (3, S, S) tensor,
already decoded, resized and cropped; a text is its token ids [sot, ..., eot] without
padding. `run` only collates, moves to the device, runs the model and splits the output.

Results are raw fp32 embeddings, one numpy vector (E,) per payload. Callers normalise
(the API's default) or not (`normalize: false`); one cached text vector serves both.

Threads: on CPU the model gets `threads` cores (default: every core this process may
use), shared out over the worker's streams by `place` as service.tuning decides. torch's
thread count belongs to the calling thread (OpenMP's setting is per thread), so each
serving thread sets its own. On CUDA it is left alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clip_core.loader import LoadedModel

from .batcher import BatcherConfig, Kind
from .device_errors import is_sticky_device_error
from .errors import DeviceFailed, OutOfMemory
from .tuning import release_heap, thread_share, usable_cores

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
        # The factor cosines are multiplied by before the softmax: exp of the stored log.
        # Read once here, as a float: on CUDA each read of the parameter is a device sync.
        self.logit_scale = float(self.model.logit_scale.detach().float().exp())
        self._cuda = self.device.type == "cuda"
        self._local = threading.local()  # .threads: what this thread last set torch to


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
        return self.threads or usable_cores()

    def place(self, stream: int, streams: int, alone: bool) -> None:
        """Size the calling serving thread's torch pool for its next batch: every core
        when alone on stream 0, else stream `stream`'s share of them."""
        if not self._cuda:
            self._use_threads(thread_share(self.cpu_threads, stream, streams, alone))

    def _use_threads(self, n: int) -> None:
        # Only on a change: torch.set_num_threads also clears oneDNN's primitive cache.
        if getattr(self._local, "threads", None) != n:
            torch.set_num_threads(n)
            self._local.threads = n

    def release_memory(self) -> None:
        """Give the C heap's free pages back to the system (service.tuning.release_heap);
        the worker calls it once the server has been idle a while. The CUDA cache is left
        alone: warm-up reserved it on purpose."""
        release_heap()

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
        # Host-side lengths: the tower trims, packs and pools without reading the device.
        return self.model.encode_text(ids, lengths=[len(r) for r in rows])

    def _guarded(self, kind: Kind, n: int, compute: Callable[[], torch.Tensor]) -> list[np.ndarray]:
        reason: str | None = None
        try:
            with torch.inference_mode():
                out = compute().float().cpu().numpy()  # (B, E); .cpu() waits for the device
            return [row.copy() for row in out]  # own buffers: a cached row frees alone
        except (RuntimeError, MemoryError) as err:  # CUDA's OutOfMemoryError is a RuntimeError
            if is_sticky_device_error(err):
                # The context is poisoned: no later call on this device can succeed.
                raise DeviceFailed(f"{self.device} failed while computing a {kind} batch; "
                                   "the model stops serving") from err
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


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    message = str(err)
    return any(m in message for m in _OOM_MESSAGES)


"""The worker's backend for one clip_core model on its device.

Payloads arrive prepared (see `service.prepare`): an image is a uint8 (3, S, S) tensor,
already decoded, resized and cropped, or with `preprocess="device"` a JPEG's bytes
(`EncodedImage`) that the backend decodes and resizes with the rest of its batch on the
model's device (clip_core.tensor_preprocess); a text is its token ids [sot, ..., eot]
without padding. `run` collates, moves to the device, runs the model and splits the output.

Results are raw fp32 embeddings, one numpy vector (E,) per payload. Callers normalise
(the API's default) or not (`normalize: false`); one cached text vector serves both.

Threads: on CPU the model gets `threads` cores (default: every core this process may
use), shared out over the worker's streams by `place` as service.tuning decides. torch's
thread count belongs to the calling thread (OpenMP's setting is per thread), so each
serving thread sets its own. On CUDA it is left alone.

CUDA: the model's work runs on a stream of its own, created at load, so it never queues
behind another model's or the default stream's work; the only host sync of a batch is the
result's read back, ordered on that stream. Warm-up runs every image batch-size bucket
and a spread of text lengths, so no shape meets the allocator or the kernel heuristics
for the first time under live traffic. With `cuda_graphs`, the image tower replays one
captured graph per bucket (clip_core.graphs), a batch padded to its bucket.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from clip_core.errors import InvalidInput
from clip_core.graphs import EagerRunner, GraphRunner, default_buckets
from clip_core.loader import LoadedModel

from .batcher import Kind
from .device_errors import is_sticky_device_error
from .errors import DeviceFailed, OutOfMemory
from .prepare import EncodedImage
from .tuning import release_heap, thread_share, usable_cores

log = logging.getLogger(__name__)

_OOM_MESSAGES = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")
_WARMUP_TEXT_LENGTHS = (7, 12, 20)  # sot + words + eot, as typical label prompts
# On CUDA, full text batches at these lengths too (cut to the context length): the
# packed tower's shapes follow the batch's tokens, so a spread warms its range.
_WARMUP_FULL_TEXT_LENGTHS = (8, 16, 32, 77)


def warmup_plan(device_type: str, warmup_images: int, warmup_tokens: int,
                context_length: int, bucketed: bool = False) -> list[tuple[Kind, int, int]]:
    """The batches warm-up runs, as (kind, items, tokens per text; 0 for images).

    Always a small batch of each kind. On CUDA, or wherever image batches are bucketed,
    also every bucket up to `warmup_images` (default_buckets), largest first so the
    allocator's first blocks are the largest; on CUDA full text batches of
    `warmup_tokens` at a spread of lengths too.
    """
    small: list[tuple[Kind, int, int]] = [("image", min(4, warmup_images), 0)]
    small += [("text", 1, n) for n in _WARMUP_TEXT_LENGTHS]
    if device_type == "cpu" and not bucketed:
        return small
    buckets: list[tuple[Kind, int, int]] = [("image", n, 0) for n in reversed(default_buckets(warmup_images))]
    texts: list[tuple[Kind, int, int]] = []
    if device_type != "cpu":
        lengths = sorted({min(n, context_length) for n in _WARMUP_FULL_TEXT_LENGTHS})
        texts = [("text", max(1, warmup_tokens // n), n) for n in lengths]
    return [*buckets, *small, *texts]


@dataclass(frozen=True)
class BackendInfo:
    name: str
    embed_dim: int
    image_size: int  # S of the (3, S, S) pixels the backend takes
    device: str  # "cpu", "cuda:0"
    dtype: str  # "float32", "float16", "bfloat16"
    context_length: int  # most tokens per text, sot and eot included
    # What computes the embeddings: "torch" (this module), "null" (service.null_backend,
    # meaningless vectors for measuring the serving layer).
    engine: str = "torch"


class ClipBackend:
    """`service.batcher.Backend` for one loaded CLIP model; called from the worker thread.

    `warmup_images` and `warmup_tokens` are the largest batches warm-up pre-runs on CUDA
    (the batcher's `max_batch_size` and `max_batch_tokens`); `preprocess="device"` takes
    `EncodedImage` payloads too; `cuda_graphs` runs the image tower as CUDA graphs per
    batch-size bucket (on a CPU the same buckets run eagerly).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        threads: int | None = None,
        warmup_images: int = 32,
        warmup_tokens: int = 64 * 77,
        preprocess: Literal["exact", "device"] = "exact",
        cuda_graphs: bool = False,
    ):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if warmup_images < 1 or warmup_tokens < 1:
            raise ValueError("warmup_images and warmup_tokens must be >= 1")
        if preprocess not in ("exact", "device"):
            raise ValueError(f"preprocess must be 'exact' or 'device', got {preprocess!r}")
        self.model = loaded.model.eval()
        self.preprocess = loaded.preprocess
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.threads = threads
        self.warmup_images = warmup_images
        self.warmup_tokens = warmup_tokens
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
        # This model's own stream: its batches never queue behind other work on the
        # device's default stream, and other models' batches not behind its.
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._decoder = self._tensor_preprocessor() if preprocess == "device" else None
        self._runner = self._image_runner() if cuda_graphs else None

    def _tensor_preprocessor(self):  # -> clip_core.tensor_preprocess.TensorPreprocessor
        from clip_core.tensor_preprocess import TensorPreprocessor

        try:
            return TensorPreprocessor(self.preprocess, self.device)
        except ImportError as err:  # torchvision decodes the JPEGs
            raise RuntimeError(f"preprocess=device needs torchvision: {err}") from err

    def _image_runner(self) -> EagerRunner | GraphRunner:
        s = self.info.image_size
        buckets = default_buckets(self.warmup_images)
        args = (self.model.encode_image, buckets, (3, s, s), self.dtype, self.device)
        if self._cuda:
            return GraphRunner(*args)
        log.info("model %s: CUDA graphs need a CUDA device; image batches run eagerly, "
                 "padded to the same buckets", self.info.name)
        return EagerRunner(*args)

    @property
    def buckets(self) -> list[int] | None:
        """The image batch sizes the tower runs at (a batch is padded up to one), or
        None when it runs every size as it comes."""
        return None if self._runner is None else list(self._runner.buckets)

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        if self._stream is None:
            yield
            return
        # The device too: with several GPUs each serving thread must address its own, and
        # calls that use the current device (empty_cache, new streams) must follow it.
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            yield

    # ---- the Backend protocol ----

    def warmup(self) -> None:
        """The batches of `warmup_plan`: on CUDA every image bucket (with graphs: their
        capture) and full text batches at several lengths, so their memory is reserved
        and their kernels chosen before traffic; a small batch of each kind elsewhere."""
        if not self._cuda:
            self._use_threads(self.cpu_threads)
        g = torch.Generator().manual_seed(0)
        plan = warmup_plan(self.device.type, self.warmup_images, self.warmup_tokens,
                           self.info.context_length, bucketed=self._runner is not None)
        for kind, n, tokens in plan:
            payloads: list[object] = (
                list(self._warmup_images(n, g)) if kind == "image"
                else [self._warmup_text(tokens, g) for _ in range(n)])
            try:
                self.run(kind, payloads)
            except OutOfMemory:
                if not self._cuda:
                    raise
                # Not fatal: the worker halves its batches when traffic meets the limit.
                log.warning("model %s: a %s batch of %d does not fit on %s; batches will "
                            "shrink", self.info.name, kind, n, self.device)
        if self._decoder is not None:  # the decoder's first batch sets up its state
            self.run("image", self._warmup_jpegs(min(8, self.warmup_images), g))
        if self._cuda:
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
        fit; an `EncodedImage` that does not decode raises ImageDecodeError (naming it by
        its index in its request when it is alone); any other error propagates so the
        worker can isolate the bad payload."""
        if not payloads:
            return []
        if kind == "image":
            return self._guarded(kind, len(payloads), lambda: self._images(payloads))
        if kind == "text":
            return self._guarded(kind, len(payloads), lambda: (self._texts(payloads), None))
        raise ValueError(f"unknown kind {kind!r}")

    # ---- collation and the model ----

    def _images(self, payloads: Sequence[object]) -> tuple[torch.Tensor, np.ndarray | None]:
        """(B, E) embeddings, and when their rows are not in the payloads' order, the
        row of each payload: pixels first, then the JPEGs the device decodes."""
        s = self.info.image_size
        pixels_at: list[int] = []
        encoded_at: list[int] = []
        for i, p in enumerate(payloads):
            if isinstance(p, EncodedImage) and self._decoder is not None:
                encoded_at.append(i)
            elif (isinstance(p, torch.Tensor) and p.dtype == torch.uint8
                  and tuple(p.shape) == (3, s, s)):
                pixels_at.append(i)
            else:
                also = " or an EncodedImage" if self._decoder is not None else ""
                raise ValueError(f"image payload {i} is not a uint8 (3, {s}, {s}) tensor{also}")
        parts: list[torch.Tensor] = []  # (n, 3, S, S) uint8 on the device each
        if pixels_at:
            # (n, 3, S, S) uint8: a quarter of the bytes of fp32 cross to the device.
            host = torch.empty((len(pixels_at), 3, s, s), dtype=torch.uint8,
                               pin_memory=self._cuda)
            torch.stack([payloads[i] for i in pixels_at], out=host)  # type: ignore[misc]
            # From pinned memory the copy is asynchronous, ordered on this model's stream.
            parts.append(host.to(self.device, non_blocking=self._cuda))
        if encoded_at:
            parts.append(self._decode([payloads[i] for i in encoded_at]))  # type: ignore[misc]
        x = parts[0] if len(parts) == 1 else torch.cat(parts)  # (B, 3, S, S) uint8
        # ToTensor and Normalize in fp32, in ImageTransform.normalize's order of operations.
        x = x.to(torch.float32).div_(255).sub_(self._mean).div_(self._std).to(self.dtype)
        out = self._runner(x) if self._runner is not None else self.model.encode_image(x)
        # Rows are pixels then JPEGs; argsort maps each payload back to its row.
        rows = np.argsort(pixels_at + encoded_at) if pixels_at and encoded_at else None
        return out, rows  # (B, E) fp32

    def _decode(self, images: list[EncodedImage]) -> torch.Tensor:
        """(n, 3, S, S) uint8 on the device; what the tensor path cannot read goes through
        the exact path, and an image neither decodes raises its error."""
        assert self._decoder is not None
        try:
            return self._decoder.pixels([im.data for im in images])
        except InvalidInput as err:  # ImageDecodeError, or pixels with no RGB
            if len(images) > 1:
                raise  # the worker splits the batch down to the culprit
            index = images[0].index
            new = type(err)(f"image {index}: {err}")
            new.index = index  # type: ignore[attr-defined]
            raise new from err

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

    def _guarded(self, kind: Kind, n: int,
                 compute: Callable[[], tuple[torch.Tensor, np.ndarray | None]],
                 ) -> list[np.ndarray]:
        reason: str | None = None
        try:
            with torch.inference_mode(), self._on_stream():
                embeddings, rows = compute()
                # (B, E); .cpu() waits for this model's stream: the batch's one host sync.
                out = embeddings.float().cpu().numpy()
            if rows is not None:
                out = out[rows]
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
            with torch.cuda.device(self.device):
                torch.cuda.empty_cache()
        log.debug("model %s: out of memory on a %s batch of %d: %s", self.info.name, kind, n,
                  reason)
        raise OutOfMemory(f"a {kind} batch of {n} does not fit on {self.device}")

    def _warmup_images(self, n: int, g: torch.Generator) -> torch.Tensor:
        s = self.info.image_size
        return torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g)

    def _warmup_jpegs(self, n: int, g: torch.Generator) -> list[object]:
        # Noise at twice the crop size: the decoder, the resize and the crop all run.
        s = 2 * self.info.image_size
        noise = torch.randint(0, 256, (s, s, 3), dtype=torch.uint8, generator=g).numpy()
        buf = io.BytesIO()
        Image.fromarray(noise).save(buf, "JPEG", quality=90)
        return [EncodedImage(buf.getvalue(), i) for i in range(n)]

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


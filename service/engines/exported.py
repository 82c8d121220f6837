"""The backend both exported engines share (ONNX Runtime, OpenVINO): a model's two towers
as clip_core.export graphs, opened by the engine; only the session differs between them.

Payloads are the torch engine's: uint8 (3, S, S) pixels, and unpadded token id rows. The
image graph normalises the pixels itself. A text batch is padded to its longest text here;
the text graph packs the real tokens itself (clip_core.export.TextTower), so a text costs
its own tokens, as on the torch engine's packed path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np
import torch

from clip_core.export import Export, ExportTarget, Towers, ensure, open_export
from clip_core.hub import default_cache_dir

from ..backend import BackendInfo
from ..batcher import Kind
from ..errors import EngineUnavailable, OutOfMemory
from ..settings import Settings
from ..tuning import in_passing_thread, release_heap, usable_cores
from . import EngineModel, backend_preprocess, require
from .torch_engine import clip_tokenizer

log = logging.getLogger(__name__)

_WARMUP_TEXT_LENGTHS = (7, 12, 20)  # sot + words + eot, as typical label prompts
# How the runtimes word an allocation that failed (ONNX Runtime's arena, OpenVINO's).
_OOM_MESSAGES = ("bad_alloc", "Failed to allocate", "out of memory", "Cannot allocate")


class ExportedBackend:
    """`service.batcher.Backend` over an exported model; called from the serving threads."""

    def __init__(self, export: Export, towers: Towers, *, engine: str,
                 threads: int | None = None, warmup_images: int = 32):
        card = export.card
        self.export = export
        self.preprocess = card.preprocess
        self.device = torch.device("cpu")  # ServedModels asks for its .type
        self.threads = threads
        self._opened_threads = self.cpu_threads  # what `towers` computes on, lanes aside
        self.warmup_images = warmup_images
        self.logit_scale = card.logit_scale
        self._towers = towers
        self._local = threading.local()  # .towers: what this serving thread's runs call
        self._vocab = card.vocab_size
        self.info = BackendInfo(name=card.name, embed_dim=card.embed_dim,
                                image_size=card.image_size, device="cpu", dtype=towers.dtype,
                                context_length=card.context_length, engine=engine)

    @property
    def cpu_threads(self) -> int:
        """Cores the engine's thread pool uses, all streams together."""
        return self.threads or usable_cores()

    def place(self, stream: int, streams: int, alone: bool) -> None:
        """Which session the calling serving thread's next batch runs on: every thread
        when alone on stream 0 (as `service.tuning.thread_share` gives torch), else the
        stream's lane (`clip_core.export.Towers.lanes`). A CPU replica, given a share of
        the threads (service.models), always runs on a lane: the replicas beside it may
        be computing too."""
        lanes = self._towers.lanes
        whole = alone and stream == 0 and self.cpu_threads >= self._opened_threads
        self._local.towers = self._towers if whole or not lanes else lanes[stream % len(lanes)]

    def warmup(self) -> None:
        """A small image batch and texts of a few lengths on every session, lanes too: the
        runtimes plan and allocate each shape's kernels on its first run."""
        rng = np.random.default_rng(0)
        s = self.info.image_size
        n = min(4, self.warmup_images)
        images: list[object] = list(rng.integers(0, 256, (n, 3, s, s), dtype=np.uint8))
        texts: list[list[object]] = []  # one batch of one text per length
        for length in _WARMUP_TEXT_LENGTHS:
            k = min(length, self.info.context_length)
            words = rng.integers(1, self._vocab - 2, k - 2).tolist()
            texts.append([[self._vocab - 2, *words, self._vocab - 1]])
        placed = getattr(self._local, "towers", None)
        try:
            for towers in self._towers.sessions():
                self._local.towers = towers
                self.run("image", images)
                for text in texts:
                    self.run("text", text)
        finally:
            self._local.towers = placed

    def release_memory(self) -> None:
        release_heap()

    def run(self, kind: Kind, payloads: list[object]) -> list[np.ndarray]:
        """One fp32 (E,) vector per payload, in order."""
        if not payloads:
            return []
        towers = getattr(self._local, "towers", None) or self._towers
        if kind == "image":
            x, compute = self._images(payloads), towers.image
        elif kind == "text":
            x, compute = self._texts(payloads), towers.text
        else:
            raise ValueError(f"unknown kind {kind!r}")
        try:
            out = np.asarray(compute(x), dtype=np.float32)  # (B, E)
        except MemoryError as err:
            raise OutOfMemory(f"a {kind} batch of {len(payloads)} does not fit") from err
        except Exception as err:  # the runtimes raise their own RuntimeError-like types
            if any(m in str(err) for m in _OOM_MESSAGES):
                raise OutOfMemory(f"a {kind} batch of {len(payloads)} does not fit") from err
            raise
        return [row.copy() for row in out]  # own buffers: a cached row frees alone

    def _images(self, payloads: Sequence[object]) -> np.ndarray:
        s = self.info.image_size
        arrays = []
        for i, p in enumerate(payloads):
            a = np.asarray(p)  # a torch uint8 tensor shares its memory
            if a.dtype != np.uint8 or a.shape != (3, s, s):
                raise ValueError(f"image payload {i} is not a uint8 (3, {s}, {s}) tensor")
            arrays.append(a)
        return np.stack(arrays)  # (B, 3, S, S) uint8

    def _texts(self, payloads: Sequence[object]) -> np.ndarray:
        ctx = self.info.context_length
        for i, p in enumerate(payloads):
            if not isinstance(p, (list, tuple)) or not 2 <= len(p) <= ctx:
                raise ValueError(f"text payload {i} is not a list of 2 to {ctx} token ids")
        rows: list[list[int]] = [list(p) for p in payloads]  # type: ignore[call-overload]
        longest = max(len(r) for r in rows)
        ids = np.zeros((len(rows), longest), dtype=np.int64)  # (B, L), zero padded
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        return ids


async def load_exported(engine: str, settings: Settings, spec: str,
                        devices: list[str]) -> EngineModel:
    """The cached export of `spec` for `engine` (built now when missing or unsound), opened
    once and shared by every CPU replica; an `ExportedBackend` per device."""
    s = settings
    if any(d != "cpu" for d in devices):
        raise EngineUnavailable(f"the {engine} engine serves on the CPU only; devices "
                                f"{', '.join(devices)} asked for")
    if backend_preprocess(s) != "exact":
        raise EngineUnavailable(f"the {engine} engine takes decoded pixels: preprocess=exact "
                                f"or fast")
    bf16 = s.dtype == "bf16"
    if s.dtype == "fp16" or (bf16 and engine != "openvino"):
        raise EngineUnavailable(f"the {engine} engine on a CPU computes in fp32"
                                f"{' or bf16' if engine == 'openvino' else ''}, or int8 "
                                f"(CLIP_INT8=true); dtype {s.dtype} is not offered")
    if s.int8 and engine == "openvino":
        require("nncf", "openvino", engine)  # OpenVINO's int8 is NNCF's quantisation
    target = ExportTarget(engine, "int8" if s.int8 else "fp32")  # type: ignore[arg-type]
    cache = s.cache_dir or default_cache_dir()
    export = await in_passing_thread(ensure, spec, target, cache_dir=cache, offline=s.offline,
                                     random_weights=s.random_weights)
    threads = s.torch_threads or usable_cores()
    streams = s.streams or (2 if threads >= 2 else 1)
    towers = await in_passing_thread(open_export, export, threads, streams, bf16)
    backends = [ExportedBackend(export, towers, engine=engine, threads=s.torch_threads,
                                warmup_images=s.max_batch_size) for _ in devices]
    # fp32 graphs compute the traced weights' embeddings (within 1e-5): the same
    # fingerprint, so heads trained on the torch engine apply; int8 and bf16 change them.
    fingerprint = export.card.fingerprint
    changed = "int8" if s.int8 else "bf16" if bf16 else None
    if fingerprint and changed:
        fingerprint = f"{fingerprint}+{engine}-{changed}"
    return EngineModel(name=export.card.name, preprocess=export.card.preprocess,
                       backends=backends, tokenizer=clip_tokenizer(), fingerprint=fingerprint)

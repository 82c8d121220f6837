"""The serving core: loaded models, their workers, and the operations the API offers.

It knows nothing of HTTP. Routes call `Engine` with decoded inputs and get arrays back;
errors are domain errors, turned into status codes by `service.api.errors`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from clip_core.errors import ModelNotFound
from clip_core.loader import load
from clip_core.tokenizer import Tokenizer
from clip_core.zeroshot import DEFAULT_TEMPLATES, combine_prompts, format_prompts

from .backend import ClipBackend
from .cache import EmbeddingCache
from .errors import InvalidRequest
from .metrics import Metrics
from .prepare import ImagePreparer, PreparedTexts, TextPreparer
from .settings import Settings
from .worker import ModelWorker

log = logging.getLogger(__name__)

_CLASSIFIERS_KEPT = 64  # label sets per model; each is (labels, E) floats


@dataclass
class ServedModel:
    name: str
    backend: ClipBackend
    worker: ModelWorker
    images: ImagePreparer
    texts: TextPreparer
    classifiers: OrderedDict[tuple, np.ndarray] = field(default_factory=OrderedDict)

    @property
    def ready(self) -> bool:
        return self.worker.ready


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.cache = EmbeddingCache(settings.cache_size)
        self.models: dict[str, ServedModel] = {}
        self.default: str | None = None
        self.draining = False
        self._drained = False

    # ---- lifecycle ----

    async def start(self) -> None:
        """Loads every model and warms it up; raises (and the process exits) on failure."""
        s = self.settings
        device = s.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = Tokenizer()
        for spec in s.models:
            loaded = await asyncio.to_thread(
                load, spec, device=device, dtype=s.dtype, cache_dir=s.cache_dir,
                offline=s.offline, random_weights=s.random_weights, progress=False,
            )
            backend = ClipBackend(loaded, s.batcher(), threads=s.torch_threads)
            worker = ModelWorker(backend, s.batcher(), name=loaded.name,
                                 events=self.metrics.for_worker(loaded.name))
            await worker.start()
            served = ServedModel(
                name=loaded.name,
                backend=backend,
                worker=worker,
                images=ImagePreparer(loaded.preprocess, s.prepare_workers),
                texts=TextPreparer(tokenizer),
            )
            self.models[loaded.name] = served
            self.default = self.default or loaded.name
            info = backend.info
            self.metrics.model_info.labels(info.name, info.device, info.dtype).set(1)
            self.metrics.model_ready.labels(info.name).set(1)
            log.info("model %s ready on %s (%s)", info.name, info.device, info.dtype)

    @property
    def ready(self) -> bool:
        return (not self.draining and bool(self.models)
                and all(m.ready for m in self.models.values()))

    async def drain(self, timeout: float) -> None:
        """Stops every worker after its accepted work (idempotent)."""
        self.draining = True
        if self._drained:
            return
        self._drained = True
        for m in self.models.values():
            self.metrics.model_ready.labels(m.name).set(0)
        await asyncio.gather(*(m.worker.drain(timeout) for m in self.models.values()))
        for m in self.models.values():
            m.images.close()

    def refresh_gauges(self) -> None:
        """Values read at scrape time rather than tracked: CUDA memory, readiness."""
        for m in self.models.values():
            self.metrics.model_ready.labels(m.name).set(1 if m.ready and not self.draining else 0)
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                self.metrics.cuda_memory.labels(f"cuda:{i}").set(torch.cuda.memory_allocated(i))

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            name = self.default
        served = self.models.get(name) if name is not None else None
        if served is None:
            raise ModelNotFound(f"model {name!r} is not loaded; loaded: {', '.join(self.models)}")
        return served

    def deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (timeout_s or self.settings.request_timeout_s)

    # ---- operations ----

    async def embed_texts(
        self, m: ServedModel, texts: list[str], truncate: bool, deadline: float
    ) -> tuple[np.ndarray, PreparedTexts]:
        """(N, E) raw fp32 embeddings; repeated texts are computed once and cached."""
        prepared = await m.texts.aprepare(texts, truncate)
        lookup = self.cache.lookup(m.name, texts)
        self.metrics.cache_hits.labels(m.name).inc(len(texts) - len(lookup.missing))
        self.metrics.cache_misses.labels(m.name).inc(len(lookup.missing))
        computed: list[np.ndarray] = []
        if lookup.missing:
            index = {t: i for i, t in enumerate(texts)}
            ids = [prepared.ids[index[t]] for t in lookup.missing]
            results = await m.worker.submit_many("text", ids, [len(x) for x in ids],
                                                 deadline=deadline)
            self._observe_waits(m.name, "text", results)
            computed = [r.value for r in results]
        values = self.cache.complete(lookup, computed)
        return np.stack(values).astype(np.float32, copy=False), prepared

    async def embed_images(
        self, m: ServedModel, images: list[bytes], deadline: float
    ) -> np.ndarray:
        pixels = await m.images.prepare(images)
        results = await m.worker.submit_many("image", pixels, deadline=deadline)
        self._observe_waits(m.name, "image", results)
        return np.stack([r.value for r in results]).astype(np.float32, copy=False)

    async def classifier(
        self, m: ServedModel, labels: list[str], templates: list[str] | None, deadline: float
    ) -> np.ndarray:
        """(C, E) unit-norm class embeddings, built once per label set and kept."""
        templates = list(templates or DEFAULT_TEMPLATES)
        key = (tuple(labels), tuple(templates))
        cached = m.classifiers.get(key)
        if cached is not None:
            m.classifiers.move_to_end(key)
            return cached
        try:
            prompts = format_prompts(labels, templates)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        emb, _ = await self.embed_texts(m, prompts, truncate=True, deadline=deadline)
        clf = combine_prompts(torch.from_numpy(emb), len(labels)).numpy()
        m.classifiers[key] = clf
        if len(m.classifiers) > _CLASSIFIERS_KEPT:
            m.classifiers.popitem(last=False)
        return clf

    def _observe_waits(self, model: str, kind: str, results) -> None:
        hist = self.metrics.queue_wait.labels(model, kind)
        for r in results:
            hist.observe(r.queue_s)

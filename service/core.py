"""The serving core: loaded models, their workers, and the operations the API offers.

It knows nothing of HTTP. Routes call `Engine` with decoded inputs and get arrays back;
errors are domain errors, turned into status codes by `service.api.errors`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from clip_core.errors import ModelNotFound
from clip_core.loader import load
from clip_core.tokenizer import Tokenizer
from clip_core.zeroshot import DEFAULT_TEMPLATES, combine_prompts, format_prompts

from .backend import ClipBackend
from .cache import EmbeddingCache
from .errors import InvalidRequest, ModelUnavailable, UrlNotAllowed
from .fetch import FetchConfig, UrlFetcher
from .limits import Limits
from .metrics import Metrics
from .prepare import ImagePreparer, PreparedTexts, TextPreparer
from .settings import Settings
from .worker import ModelWorker

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLASSIFIERS_KEPT = 64  # label sets per model; each is (labels, E) floats
_FETCHES_PER_REQUEST = 8  # image URLs of one request fetched at once


@dataclass
class ServedModel:
    name: str
    backend: ClipBackend
    worker: ModelWorker
    images: ImagePreparer
    texts: TextPreparer
    classifiers: OrderedDict[tuple, np.ndarray] = field(default_factory=OrderedDict)
    # Label sets being embedded now: concurrent requests for a new set share one build.
    building: dict[tuple, asyncio.Future[np.ndarray]] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.worker.ready


async def _in_passing_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn` in a thread of its own that ends with it.

    Loading runs parallel torch ops, and OpenMP keeps a team of threads for every thread
    that ran one, for as long as that thread lives. Once libgomp manages more threads
    than there are cores it stops spinning between parallel regions, and the worker's
    forward passes pay a wake-up per op: a ViT-B/32 image took 88 ms instead of 74 on 2
    cores while an executor thread that had loaded the model stayed alive.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="load-model") as pool:
        return await asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(fn, *args, **kwargs))


def _default_streams(backend: ClipBackend) -> int:
    """Two streams on a CPU with two cores or more, one on a GPU (see service.batcher).

    On the 2-core development VM, two single-threaded ViT-B/32 batches side by side
    against one batch on both cores: texts +27% to +48%, images -4% to +17%, depending
    on how busy the host was; through the server, images rose from 10.7 to 16.7-18.0/s
    (docs/benchmarks.md). A lone request still gets every core. More streams on larger
    CPUs are not measured here, so two stays the default.
    """
    return 2 if backend.device.type == "cpu" and backend.cpu_threads >= 2 else 1


def _retrieved(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.cache = EmbeddingCache(settings.cache_size)
        self.models: dict[str, ServedModel] = {}
        self.unavailable: dict[str, str] = {}  # spec -> why it did not load
        self.default: str | None = None
        self.limits = Limits.from_settings(settings)
        self.fetcher: UrlFetcher | None = None
        self.draining = False
        self._drained = False

    # ---- lifecycle ----

    async def start(self) -> None:
        """Loads every model and warms it up. A model that fails raises (the process
        exits), or with on_model_load_failure=serve_others is kept out and reported
        unavailable; a model is served whole or not at all."""
        s = self.settings
        # Pillow's decompression-bomb warning is an error in this process (the preparer
        # also checks the size itself, whatever the filters say).
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if s.url_inputs:
            self.fetcher = UrlFetcher(
                FetchConfig(tuple(s.url_allow_networks), s.url_connect_timeout_s,
                            s.url_timeout_s, s.url_max_bytes, s.url_max_redirects),
                on_outcome=lambda outcome: self.metrics.url_fetches.labels(outcome).inc(),
            )
        device = s.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = Tokenizer()
        for i, spec in enumerate(s.models):
            try:
                served = await self._load(spec, device, tokenizer)
            except Exception as e:
                if s.on_model_load_failure == "exit":
                    raise
                log.error("model %s failed to load and is unavailable: %s", spec, e)
                self.unavailable[spec] = str(e)
                self.metrics.model_ready.labels(spec).set(0)
                if i == 0:
                    self.default = spec
                continue
            self.models[served.name] = served
            self.default = self.default or served.name
            info = served.backend.info
            self.metrics.model_info.labels(info.name, info.device, info.dtype).set(1)
            self.metrics.model_ready.labels(info.name).set(1)
            log.info("model %s ready on %s (%s)", info.name, info.device, info.dtype)
        if not self.models:  # serve_others with nothing to serve: exit as "exit" would
            raise ModelUnavailable(f"no model could be loaded ({', '.join(self.unavailable)})")

    async def _load(self, spec: str, device: str, tokenizer: Tokenizer) -> ServedModel:
        s = self.settings
        loaded = await _in_passing_thread(
            load, spec, device=device, dtype=s.dtype, cache_dir=s.cache_dir,
            offline=s.offline, random_weights=s.random_weights, progress=False,
        )
        backend = ClipBackend(loaded, s.batcher(), threads=s.torch_threads)
        batching = dataclasses.replace(backend.batching,
                                       streams=s.streams or _default_streams(backend))
        if device == "cpu":
            log.info("model %s: %d CPU threads, %d stream(s)", loaded.name,
                     backend.cpu_threads, batching.streams)
        worker = ModelWorker(backend, batching, name=loaded.name,
                             events=self.metrics.for_worker(loaded.name))
        await worker.start()  # WorkerUnavailable when the warm-up fails; nothing is kept
        images = ImagePreparer(
            loaded.preprocess, s.prepare_workers, max_pixels=s.max_image_pixels,
            max_frames=s.max_image_frames, formats=s.image_formats,
            exif_orientation=s.exif_orientation,
        )
        return ServedModel(name=loaded.name, backend=backend, worker=worker, images=images,
                           texts=TextPreparer(tokenizer))

    @property
    def ready(self) -> bool:
        """Every model that loaded serves (those that failed to load are reported apart)."""
        return (not self.draining and bool(self.models)
                and all(m.ready for m in self.models.values()))

    @property
    def alive(self) -> bool:
        """False when a model's worker stopped on its own and will not come back."""
        return not any(m.worker.failed for m in self.models.values())

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
        if self.fetcher is not None:
            await self.fetcher.aclose()

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
            if name in self.unavailable:
                raise ModelUnavailable("the requested model failed to load and is unavailable")
            # The caller's name is not echoed; the loaded ones are ours to name.
            raise ModelNotFound(f"the requested model is not loaded; loaded: "
                                f"{', '.join(self.models) or 'none'}")
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

    async def load_images(self, sources: list[bytes | str]) -> list[bytes]:
        """Image bytes, with URL sources fetched (when URL inputs are on) concurrently."""
        urls = [i for i, s in enumerate(sources) if isinstance(s, str)]
        if not urls:
            return sources  # type: ignore[return-value]
        if self.fetcher is None:
            raise UrlNotAllowed(f"image {urls[0]}: image URLs are not enabled on this server")
        fetcher, gate = self.fetcher, asyncio.Semaphore(_FETCHES_PER_REQUEST)

        async def one(i: int) -> bytes:
            async with gate:
                return await fetcher.fetch(sources[i], i)  # type: ignore[arg-type]

        tasks = [asyncio.ensure_future(one(i)) for i in urls]
        try:
            bodies = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()  # the first failure stops the rest
        out = list(sources)
        for i, body in zip(urls, bodies, strict=True):
            out[i] = body
        return out  # type: ignore[return-value]

    async def embed_images(
        self, m: ServedModel, images: list[bytes], deadline: float
    ) -> np.ndarray:
        # Decoding and resizing take CPU that accepted requests need: under overload,
        # refuse before it, so that refusing stays cheap.
        m.worker.check_admission("image", len(images))
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
        build = m.building.get(key)
        if build is None:
            # A task of its own, shielded below: a caller that leaves does not cancel
            # the build the others wait for. It fails them all alike (503 when overloaded).
            build = asyncio.ensure_future(self._build_classifier(m, key, prompts, len(labels),
                                                                 deadline))
            build.add_done_callback(_retrieved)  # also when every caller has left
            m.building[key] = build
        return await asyncio.shield(build)

    async def _build_classifier(self, m: ServedModel, key: tuple, prompts: list[str],
                                n_labels: int, deadline: float) -> np.ndarray:
        try:
            emb, _ = await self.embed_texts(m, prompts, truncate=True, deadline=deadline)
        finally:
            del m.building[key]
        clf = combine_prompts(torch.from_numpy(emb), n_labels).numpy()
        m.classifiers[key] = clf
        if len(m.classifiers) > _CLASSIFIERS_KEPT:
            m.classifiers.popitem(last=False)
        return clf

    def _observe_waits(self, model: str, kind: str, results) -> None:
        hist = self.metrics.queue_wait.labels(model, kind)
        for r in results:
            hist.observe(r.queue_s)

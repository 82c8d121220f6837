"""The served models' lifecycle: load, warm up, report health, drain.

`ServedModels` owns every configured model from start-up to shutdown and answers
whether they serve; it computes nothing for callers (that is `service.core.Engine`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from clip_core.errors import ModelNotFound

from .backend import BackendInfo, ClipBackend
from .engines import Scoring, loader, split_engine
from .errors import ModelUnavailable
from .metrics import Metrics
from .null_backend import NullBackend
from .prepare import ImagePreparer, TextPreparer
from .replicas import Replicas, replica_labels, resolve_devices
from .settings import Settings
from .tuning import decode_workers, default_streams, thread_share
from .worker import ModelWorker

log = logging.getLogger(__name__)

# What computes a model's embeddings, by its engine (service.engines).
ModelBackend = ClipBackend | NullBackend


@dataclass
class ServedModel:
    """One loaded model: its workers that batch for it, one per device with a backend
    each (`service.replicas`), and the preparers that turn request inputs into the
    workers' payloads."""

    name: str
    worker: Replicas
    images: ImagePreparer
    texts: TextPreparer
    engine: str = "torch"  # the service.engines name that serves it
    scoring: Scoring = "softmax"  # how /classify scores labels (service.engines.Scoring)
    logit_bias: float = 0.0
    # The engine's fingerprint of its weights and preprocessing, computed once at load
    # (clip_core.moderation.fingerprint): /moderate answers carry it, head files are
    # checked against it.
    fingerprint: str = ""

    @property
    def backend(self) -> ModelBackend:
        """The first replica's backend: every replica has the same weights, so the same
        `info` but for the device, and the same `logit_scale`."""
        return self.worker.workers[0].backend  # type: ignore[return-value]

    @property
    def info(self) -> BackendInfo:
        return self.backend.info

    @property
    def devices(self) -> list[str]:
        return [w.backend.info.device for w in self.worker.workers]  # type: ignore[attr-defined]

    @property
    def ready(self) -> bool:
        return self.worker.ready


def cuda_memory_allocated() -> dict[str, int]:
    """Bytes held by tensors on each CUDA device, by device name; nothing before this
    process has used CUDA. Reads the caching allocator's counters: no device sync."""
    if not torch.cuda.is_initialized():
        return {}
    return {f"cuda:{i}": torch.cuda.memory_allocated(i)
            for i in range(torch.cuda.device_count())}


class ServedModels(Mapping[str, ServedModel]):
    """The configured models by name, from loading to drain.

    A model is served whole or not at all: one that fails to load or warm up either
    stops start-up, or with on_model_load_failure=serve_others is kept out and listed in
    `unavailable`.
    """

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.unavailable: dict[str, str] = {}  # spec -> why it did not load
        self.default: str | None = None  # the first configured model, loaded or not
        self._served: dict[str, ServedModel] = {}
        self._draining = False
        self._drained = False

    # ---- the mapping: loaded models only ----

    def __getitem__(self, name: str) -> ServedModel:
        return self._served[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._served)

    def __len__(self) -> int:
        return len(self._served)

    def resolve(self, name: str | None) -> ServedModel:
        """The model a request names (None: the default), or ModelNotFound / ModelUnavailable."""
        if name is None:
            name = self.default
        served = self._served.get(name) if name is not None else None
        if served is None:
            if name in self.unavailable:
                raise ModelUnavailable("the requested model failed to load and is unavailable")
            # The caller's name is not echoed; the loaded ones are ours to name.
            raise ModelNotFound(f"the requested model is not loaded; loaded: "
                                f"{', '.join(self._served) or 'none'}")
        return served

    # ---- lifecycle ----

    async def start(self) -> None:
        """Load every model and warm it up; raises when one fails (the process exits), or
        with serve_others when none at all could be loaded."""
        s = self.settings
        devices = resolve_devices(
            s.device, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        for i, spec in enumerate(s.models):
            try:
                served = await self._load(spec, devices)
            except Exception as e:
                if s.on_model_load_failure == "exit":
                    raise
                log.error("model %s failed to load and is unavailable: %s", spec, e)
                self.unavailable[spec] = str(e)
                if i == 0:
                    self.default = spec
                continue
            self._served[served.name] = served
            self.default = self.default or served.name
            info = served.info
            for device in served.devices:
                self.metrics.model_info.labels(info.name, device, info.dtype,
                                                served.engine).set(1)
            log.info("model %s ready on %s (%s)", info.name, ", ".join(served.devices),
                     info.dtype)
        if not self._served:  # serve_others with nothing to serve: exit as "exit" would
            raise ModelUnavailable(f"no model could be loaded ({', '.join(self.unavailable)})")

    async def _load(self, spec: str, devices: list[str]) -> ServedModel:
        s = self.settings
        engine, spec = split_engine(spec, s.engine)
        loaded = await loader(engine)(s, spec, devices)
        name, backends = loaded.name, loaded.backends
        n_cpu = devices.count("cpu")
        for i, (device, backend) in enumerate(zip(devices, backends, strict=True)):
            if device == "cpu" and n_cpu > 1:
                # Replicas side by side split the cores evenly, as streams do; each one
                # shares its part out over its own streams (service.replicas).
                nth = devices[:i].count("cpu")
                backend.threads = thread_share(backend.cpu_threads, nth, n_cpu, alone=False)
        # Named by the device each backend is on ("cuda" resolves to "cuda:0").
        labels = replica_labels([b.info.device for b in backends])
        workers = []
        for backend, label in zip(backends, labels, strict=True):
            batching = dataclasses.replace(s.batcher(),
                                           streams=s.streams or default_streams(backend))
            if backend.device.type == "cpu":
                log.info("model %s on %s: %d CPU threads, %d stream(s)", name, label,
                         backend.cpu_threads, batching.streams)
            worker_name = name if len(backends) == 1 else f"{name}@{label}"
            workers.append(ModelWorker(backend, batching, name=worker_name,
                                       events=self.metrics.for_worker(name, label)))
        replicas = Replicas(workers, labels)
        await replicas.start()  # WorkerUnavailable when a warm-up fails; nothing is kept
        pool = decode_workers(s.prepare_workers, model_threads=s.torch_threads,
                              accelerator=any(d != "cpu" for d in devices))
        log.info("model %s: %d decoding threads, %s preprocessing", name, pool, s.preprocess)
        images = ImagePreparer(
            loaded.preprocess, pool, max_pixels=s.max_image_pixels,
            max_frames=s.max_image_frames, formats=s.image_formats,
            exif_orientation=s.exif_orientation, mode=s.preprocess,
        )
        return ServedModel(name=name, worker=replicas, images=images,
                           texts=TextPreparer(loaded.tokenizer), engine=engine,
                           scoring=loaded.scoring, logit_bias=loaded.logit_bias,
                           fingerprint=loaded.fingerprint)

    @property
    def ready(self) -> bool:
        """Every model that loaded serves (those that failed to load are reported apart)."""
        return (not self._draining and bool(self._served)
                and all(m.ready for m in self._served.values()))

    @property
    def alive(self) -> bool:
        """False when a model's worker stopped on its own and will not come back."""
        return not any(m.worker.failed for m in self._served.values())

    def stop_admitting(self) -> None:
        """Readiness off at once, before the accepted requests are waited for."""
        self._draining = True

    async def drain(self, timeout: float) -> None:
        """Stop every worker after its accepted work (idempotent)."""
        self._draining = True
        if self._drained:
            return
        self._drained = True
        await asyncio.gather(*(m.worker.drain(timeout) for m in self._served.values()))
        for m in self._served.values():
            m.images.close()
            m.texts.close()

    def refresh_gauges(self) -> None:
        """Set the gauges that are read from state rather than tracked: whether each
        model serves (0 once its worker has died, while draining, or when it failed to
        load) and CUDA memory. `Metrics.render` calls it on every scrape."""
        for spec in self.unavailable:
            self.metrics.model_ready.labels(spec).set(0)
        for m in self._served.values():
            serving = m.ready and not self._draining
            self.metrics.model_ready.labels(m.name).set(1 if serving else 0)
        for device, allocated in cuda_memory_allocated().items():
            self.metrics.cuda_memory.labels(device).set(allocated)


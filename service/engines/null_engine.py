"""The null engine's loader (`service.null_backend`): a model's shapes, no weights."""

from __future__ import annotations

import logging

from ..null_backend import NullBackend, model_shape
from ..settings import Settings
from ..tuning import in_passing_thread
from . import EngineModel, backend_preprocess
from .torch_engine import clip_tokenizer

log = logging.getLogger(__name__)


async def load_null(settings: Settings, spec: str, devices: list[str]) -> EngineModel:
    """A `NullBackend` per device from the model's shapes alone: no weights, no model."""
    shape = await in_passing_thread(model_shape, spec)  # a checkpoint path is read
    log.warning("model %s is served by the null engine: its embeddings are hashed from "
                "the inputs and mean nothing (serving-layer benchmarks only)", shape.name)
    backends = [NullBackend(shape, device=device, threads=settings.torch_threads,
                            preprocess=backend_preprocess(settings)) for device in devices]
    return EngineModel(name=shape.name, preprocess=shape.preprocess, backends=backends,
                       tokenizer=clip_tokenizer(), fingerprint=f"null:{shape.name}")

"""The default engine: clip_core's PyTorch model (`service.backend.ClipBackend`)."""

from __future__ import annotations

import functools

from clip_core.loader import LoadedModel, load
from clip_core.moderation.fingerprint import model_fingerprint
from clip_core.tokenizer import Tokenizer

from ..backend import ClipBackend
from ..settings import Settings
from ..tuning import in_passing_thread
from . import EngineModel, backend_preprocess


@functools.cache
def clip_tokenizer() -> Tokenizer:
    """CLIP's BPE tokenizer, built once and shared by every model that uses it."""
    return Tokenizer()


async def load_torch(settings: Settings, spec: str, devices: list[str]) -> EngineModel:
    """The model's weights on each device (CPU replicas share one copy), a `ClipBackend`
    each; the name and the preprocessing its weights carry."""
    s = settings
    loaded_on: dict[str, LoadedModel] = {}
    backends: list[ClipBackend] = []
    for device in devices:
        loaded = loaded_on.get(device)
        if loaded is None:
            loaded = loaded_on[device] = await in_passing_thread(
                load, spec, device=device, dtype=s.dtype, cache_dir=s.cache_dir,
                offline=s.offline, random_weights=s.random_weights, progress=False,
            )
        backends.append(ClipBackend(loaded, threads=s.torch_threads,
                                    warmup_images=s.max_batch_size,
                                    warmup_tokens=s.max_batch_tokens,
                                    preprocess=backend_preprocess(s), cuda_graphs=s.cuda_graphs))
    first = backends[0]  # settings never yield an empty device list
    # Every replica holds the same weights: the first one's name them all.
    fingerprint = await in_passing_thread(model_fingerprint, first.model, first.preprocess)
    return EngineModel(name=first.info.name, preprocess=first.preprocess, backends=backends,
                       tokenizer=clip_tokenizer(), fingerprint=fingerprint)

"""One entry point from a model name or path to a ready model and its preprocessing."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .checkpoint import build_model, read_checkpoint
from .config import CLIPConfig, PreprocessConfig, load_architecture
from .errors import ModelNotFound
from .fetch import fetch_entry
from .model import CLIP
from .registry import ModelEntry, get_entry

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    model: CLIP
    preprocess: PreprocessConfig
    source: str  # a file path, or "random"


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/"auto": fp16 on CUDA, fp32 elsewhere (CPU half kernels are slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _random_model(
    name: str, arch: str | CLIPConfig, preprocess: PreprocessConfig | None
) -> LoadedModel:
    cfg = load_architecture(arch) if isinstance(arch, str) else arch
    log.warning(
        "model %s uses RANDOM weights: its embeddings mean nothing (tests and benchmarks only)",
        name,
    )
    model = CLIP(cfg).eval()
    preprocess = preprocess or PreprocessConfig(image_size=cfg.vision.image_size)
    return LoadedModel(name, model, preprocess, "random")


def _builtin_file(entry: ModelEntry, builtin: str) -> Path:
    """`builtin`: the entry's file in clip_core/weights/."""
    file = Path(str(resources.files("clip_core") / "weights" / builtin))
    if not file.is_file():
        raise ModelNotFound(
            f"{entry.name}: its weights {file} are missing from this installation; "
            f"train them with `clip-train --config recipes/clip-shapes.json` (see "
            f"docs/models/clip-shapes.md) or reinstall the package"
        )
    return file


def load(
    name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    offline: bool = False,
    random_weights: bool = False,
    progress: bool = True,
) -> LoadedModel:
    """Loads a registry model (downloading and verifying it once), or any checkpoint path.

    `random_weights=True` builds the named architecture with random weights instead of
    fetching anything; it is logged loudly because its outputs are meaningless.
    """
    device = torch.device(device)
    path = Path(name_or_path)
    entry: ModelEntry | None = None
    if path.exists():
        ckpt = read_checkpoint(path)
        model = build_model(ckpt)
        preprocess = ckpt.preprocess
        if preprocess is None:
            preprocess = PreprocessConfig(image_size=model.config.vision.image_size)
            log.info("%s carries no preprocessing; using CLIP's (OpenAI mean/std)", path)
        loaded = LoadedModel(path.stem, model, preprocess, str(path))
    else:
        try:
            entry = get_entry(name_or_path)
        except ModelNotFound:
            if not random_weights:
                raise
            loaded = _random_model(name_or_path, name_or_path, None)
        else:
            if random_weights:
                # Named after the architecture: these are not the entry's weights.
                name = f"{entry.architecture}-random"
                loaded = _random_model(name, entry.config(), entry.preprocess)
            elif entry.builtin:
                file = _builtin_file(entry, entry.builtin)
                model = build_model(read_checkpoint(file), entry.config())
                loaded = LoadedModel(entry.name, model, entry.preprocess, str(file))
            else:
                fetched = fetch_entry(entry, Path(cache_dir) if cache_dir else None,
                                      offline=offline, progress=progress)
                if fetched is None:
                    raise ModelNotFound(f"{entry.name}: the registry names no weights file")
                model = build_model(read_checkpoint(fetched), entry.config())
                loaded = LoadedModel(entry.name, model, entry.preprocess, str(fetched))
    loaded.model = loaded.model.to(device=device, dtype=resolve_dtype(dtype, device))
    return loaded

"""Inference engines: what computes a served model's embeddings, chosen per model.

`Settings.engine` names the default engine; a model spec may name its own with a prefix,
`CLIP_MODELS=ViT-B-32,onnxruntime:ViT-B-32`. An engine is a loader that turns a spec and
the devices into an `EngineModel`: one backend per device (`service.batcher.Backend`),
the preprocessing the model's images need, its tokenizer and how its labels are scored.
The batcher, workers and API see only that, so adding an engine changes none of them.

Loaders are imported when a model asks for them, so an engine whose optional packages
are not installed costs nothing until it is named, and then ends start-up with one line
naming the package (`EngineUnavailable`).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from service.errors import EngineUnavailable

if TYPE_CHECKING:
    from clip_core.config import PreprocessConfig
    from clip_core.tokenizer import TokenRows

    from ..settings import Settings

# Engine name -> "module:function" of its loader, an `EngineLoader`.
_LOADERS: dict[str, str] = {
    "torch": "service.engines.torch_engine:load_torch",
    "null": "service.engines.null_engine:load_null",
    "open_clip": "service.engines.open_clip_engine:load_open_clip",
    "onnxruntime": "service.engines.onnx_engine:load_onnxruntime",
    "openvino": "service.engines.openvino_engine:load_openvino",
}
ENGINE_NAMES: tuple[str, ...] = tuple(_LOADERS)

# How /classify turns a model's cosines into label scores: a softmax over the labels
# (CLIP's contrastive training), or an independent sigmoid per label (SigLIP's).
Scoring = Literal["softmax", "sigmoid"]


class TextTokenizer(Protocol):
    """Texts -> the unpadded token id rows the engine's backends take."""

    def rows(self, texts: Sequence[str], truncate: bool = True) -> TokenRows: ...


@dataclass
class EngineModel:
    """One model as an engine serves it, before the workers are built around it."""

    name: str
    preprocess: PreprocessConfig
    backends: list[Any]  # one `service.batcher.Backend` per device, in the devices' order
    tokenizer: TextTokenizer
    scoring: Scoring = "softmax"
    logit_bias: float = 0.0  # added to logit_scale x cosine before a sigmoid
    # Names the weights and preprocessing exactly (clip_core.moderation.fingerprint, or
    # the engine's own scheme with its name as prefix): a stored decision and a trained
    # head are checked against it. "" when the engine has no weights to name.
    fingerprint: str = ""


EngineLoader = Callable[["Settings", str, list[str]], Awaitable[EngineModel]]


def backend_preprocess(settings: Settings) -> Literal["exact", "device"]:
    """What a backend takes as an image: encoded JPEGs with device preprocessing, pixels
    otherwise (`fast` differs from `exact` only in the decode pool)."""
    return "device" if settings.preprocess == "device" else "exact"


def split_engine(spec: str, default: str) -> tuple[str, str]:
    """("onnxruntime", "ViT-B-32") from "onnxruntime:ViT-B-32"; a spec without a known
    engine's prefix (a path may hold a colon) is served by `default`."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in _LOADERS:
        return prefix, rest
    return default, spec


def loader(engine: str) -> EngineLoader:
    """The engine's loader, importing its module now (EngineUnavailable when an optional
    package it needs is missing; the engine module raises it with the package's name)."""
    target = _LOADERS.get(engine)
    if target is None:
        raise EngineUnavailable(f"unknown engine {engine!r}; known: {', '.join(_LOADERS)}")
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def require(package: str, extra: str, engine: str) -> Any:
    """Import an engine's optional package, or EngineUnavailable naming what to install."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise EngineUnavailable(
            f"the {engine} engine needs the package {package!r}, which is not installed "
            f"(pip install 'clip-server[{extra}]'): {e}") from None

"""The onnxruntime engine: clip_core.export's ONNX graphs in ONNX Runtime on the CPU
(sessions: clip_core.export.open_onnxruntime)."""

from __future__ import annotations

from ..settings import Settings
from . import EngineModel, require

require("onnxruntime", "onnx", "onnxruntime")  # at import: a missing package ends start-up
require("onnx", "onnx", "onnxruntime")


async def load_onnxruntime(settings: Settings, spec: str, devices: list[str]) -> EngineModel:
    from .exported import load_exported

    return await load_exported("onnxruntime", settings, spec, devices)

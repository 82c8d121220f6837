"""The openvino engine: clip_core.export's graphs as OpenVINO IR compiled for the CPU
(clip_core.export.open_openvino: fp32, bf16 with CLIP_DTYPE=bf16, or int8 through NNCF)."""

from __future__ import annotations

from ..settings import Settings
from . import EngineModel, require

require("openvino", "openvino", "openvino")  # at import: a missing package ends start-up
require("onnx", "openvino", "openvino")  # the export goes through ONNX


async def load_openvino(settings: Settings, spec: str, devices: list[str]) -> EngineModel:
    from .exported import load_exported

    return await load_exported("openvino", settings, spec, devices)

"""clip_core stands alone: no HTTP layer, no reference implementation, nothing heavy at import."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("service", "fastapi", "starlette", "open_clip", "clip", "transformers", "torchvision")


def test_clip_core_imports_no_service_and_no_reference_implementation():
    code = (
        "import json, pkgutil, importlib, sys, clip_core\n"
        "for m in pkgutil.walk_packages(clip_core.__path__, 'clip_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert not bad, f"clip_core pulled in {bad}"


def test_no_model_or_tokenizer_is_built_at_import():
    import importlib
    import pkgutil

    import torch

    import clip_core
    from clip_core.tokenizer import Tokenizer

    for info in pkgutil.walk_packages(clip_core.__path__, "clip_core."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            assert not isinstance(value, (Tokenizer, torch.nn.Module)), f"{info.name}.{name}"

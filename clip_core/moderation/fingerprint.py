"""A fingerprint of a model's weights and preprocessing, for auditing decisions.

A moderation decision is stored with the policy's version and this fingerprint, so that
it can be traced to the exact weights and image preparation that made it; a head file
records the fingerprint of the model it was trained on, and is refused for any other.

"sha256:" + hex SHA-256 over, for each state-dict entry in sorted name order, its name,
its shape and its values as float32 little-endian bytes (so an fp32 checkpoint hashes the
same on a CPU and on a GPU), then the preprocessing config as canonical JSON. Weights
served in half precision are other numbers and hash differently: their embeddings differ
too, so a head trained on fp32 embeddings is refused for an fp16 model (train it in the
dtype it is served in). Computed once, when a model loads: it reads every weight.
"""

from __future__ import annotations

import hashlib
import json

import torch

from ..config import PreprocessConfig


def model_fingerprint(model: torch.nn.Module, preprocess: PreprocessConfig) -> str:
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        # float32, CPU, contiguous; `<f4` so the bytes do not depend on the host.
        h.update(t.to(device="cpu", dtype=torch.float32).contiguous().numpy().astype("<f4").tobytes())
    h.update(json.dumps(preprocess.to_dict(), sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + h.hexdigest()

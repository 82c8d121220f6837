"""The null engine: a `service.batcher.Backend` that computes nothing.

It serves a named model's shapes (embedding width, image size, context length, the
preprocessing its weights carry) with no weights and no model: each payload's embedding
is a unit vector derived from a hash of its bytes, so equal inputs give equal vectors and
different inputs different ones. What remains is the serving layer (HTTP, JSON, base64,
decoding and resizing, tokenising, batching), whose own ceiling it measures, as Triton's
identity models serve perf_analyzer. Selected with `CLIP_ENGINE=null`; never the default,
and the embeddings mean nothing.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from clip_core.checkpoint import read_checkpoint
from clip_core.config import CLIPConfig, PreprocessConfig, load_architecture
from clip_core.errors import ModelNotFound
from clip_core.model import infer_config
from clip_core.registry import get_entry

from .backend import BackendInfo
from .batcher import Kind
from .prepare import EncodedImage
from .tuning import usable_cores

# The digest is 4 bytes (CRC-32); each byte picks one of 256 rows per position.
_DIGEST_BYTES = 4
# CLIP's trained temperature sits at its clamp, exp(4.6052) = 100.
_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class ModelShape:
    """What the null engine needs of a model: its name, architecture and preprocessing."""

    name: str
    config: CLIPConfig
    preprocess: PreprocessConfig


def model_shape(name_or_path: str) -> ModelShape:
    """A registry model, a checkpoint path or an architecture config's name, without
    building the model: a registry entry's weights are never fetched; a checkpoint is read
    only for its architecture (from its metadata, else its tensor shapes)."""
    path = Path(name_or_path)
    if path.exists():
        ckpt = read_checkpoint(path)
        config = ckpt.config or infer_config(ckpt.state_dict)
        preprocess = ckpt.preprocess or PreprocessConfig(image_size=config.vision.image_size)
        return ModelShape(path.stem, config, preprocess)
    try:
        entry = get_entry(name_or_path)
    except ModelNotFound as unknown:
        try:
            config = load_architecture(name_or_path)
        except ModelNotFound:
            raise unknown from None
        return ModelShape(name_or_path, config,
                          PreprocessConfig(image_size=config.vision.image_size))
    return ModelShape(entry.name, entry.config(), entry.preprocess)


class NullBackend:
    """Deterministic (E,) fp32 unit vectors for a model's payloads, checked as
    `ClipBackend` checks them: an image is a uint8 (3, S, S) tensor (or, with
    `preprocess="device"`, an `EncodedImage`), a text a list of 2 to context-length ids.

    `device` is the device the real model would serve on: the worker sizes its streams
    by it, so the serving layer runs as it would with the model there.
    """

    def __init__(self, shape: ModelShape, *, device: str = "cpu", threads: int | None = None,
                 preprocess: Literal["exact", "device"] = "exact"):
        cfg = shape.config
        self.preprocess = shape.preprocess
        self.device = torch.device(device)  # names a device; nothing is put on it
        self.threads = threads  # what the model would get; only the streams follow it
        self.logit_scale = _LOGIT_SCALE
        self._encoded = preprocess == "device"
        self.info = BackendInfo(
            name=shape.name, embed_dim=cfg.embed_dim, image_size=shape.preprocess.image_size,
            device=str(self.device), dtype="float32", context_length=cfg.text.context_length,
            engine="null",
        )
        # (4, 256, E): row [i, b] is added when digest byte i is b. Fixed by E alone, so
        # every process and replica gives an input the same vector.
        rng = np.random.default_rng(cfg.embed_dim)
        self._basis = rng.standard_normal((_DIGEST_BYTES, 256, cfg.embed_dim),
                                          dtype=np.float32)

    @property
    def cpu_threads(self) -> int:
        return self.threads or usable_cores()

    def warmup(self) -> None:
        """One payload of each kind through `run`: the shapes are checked before traffic."""
        s = self.info.image_size
        self.run("image", [torch.zeros((3, s, s), dtype=torch.uint8)])
        self.run("text", [[1, 2]])

    def run(self, kind: Kind, payloads: list[object]) -> list[np.ndarray]:
        """One fp32 (E,) unit vector per payload, in order."""
        if not payloads:
            return []
        if kind == "image":
            digests = [self._image_digest(i, p) for i, p in enumerate(payloads)]
        elif kind == "text":
            digests = [self._text_digest(i, p) for i, p in enumerate(payloads)]
        else:
            raise ValueError(f"unknown kind {kind!r}")
        return self.vectors(digests)

    def vectors(self, digests: list[int]) -> list[np.ndarray]:
        """(E,) unit vectors, one per 32-bit digest: the sum of one basis row per byte."""
        # (B, 4) byte values of each digest, little end first.
        b = (np.asarray(digests, dtype=np.uint32)[:, None]
             >> (8 * np.arange(_DIGEST_BYTES, dtype=np.uint32))) & 0xFF
        out = self._basis[np.arange(_DIGEST_BYTES), b].sum(axis=1)  # (B, E)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return [row.copy() for row in out]  # own buffers: a cached row frees alone

    def _image_digest(self, i: int, p: object) -> int:
        s = self.info.image_size
        if self._encoded and isinstance(p, EncodedImage):
            return zlib.crc32(p.data)
        if (isinstance(p, torch.Tensor) and p.dtype == torch.uint8
                and tuple(p.shape) == (3, s, s)):
            # CRC-32 of the pixels' bytes: ~4 GB/s, and it releases the GIL.
            return zlib.crc32(p.contiguous().numpy().data)
        also = " or an EncodedImage" if self._encoded else ""
        raise ValueError(f"image payload {i} is not a uint8 (3, {s}, {s}) tensor{also}")

    def _text_digest(self, i: int, p: object) -> int:
        ctx = self.info.context_length
        if not isinstance(p, (list, tuple)) or not 2 <= len(p) <= ctx:
            raise ValueError(f"text payload {i} is not a list of 2 to {ctx} token ids")
        return zlib.crc32(np.asarray(p, dtype=np.int64).tobytes())

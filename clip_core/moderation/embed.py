"""Embeddings for the offline moderation tools, made by the server's own model code.

`clip-train-head` and `clip-calibrate` must see the vectors the server will see: the model
comes from `clip_core.loader.load` (the same registry, checkpoint reader and dtype rule),
images go through `ImageTransform` with the weights' own preprocessing, texts through the
`Tokenizer`, and every vector is scaled to unit length as the server's moderation scoring
expects. Batched, with a tqdm bar on stderr.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..loader import LoadedModel, load
from ..preprocess import ImageTransform, open_image
from ..tokenizer import Tokenizer
from .fingerprint import model_fingerprint

ImageSource = str | os.PathLike[str] | Image.Image


class Embedder:
    """One loaded model, embedding images and texts in batches as unit-norm fp32 numpy."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 64, progress: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.batch_size = batch_size
        self.progress = progress
        self.transform = ImageTransform(loaded.preprocess)
        self.tokenizer = Tokenizer(context_length=self.model.config.text.context_length)

    @classmethod
    def from_name(cls, name_or_path: str, *, device: str = "cpu", dtype: str | None = None,
                  batch_size: int = 64, progress: bool = True) -> Embedder:
        return cls(load(name_or_path, device=device, dtype=dtype, progress=progress),
                   batch_size=batch_size, progress=progress)

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def fingerprint(self) -> str:
        """The weights' and preprocessing's fingerprint, as the server computes it."""
        return model_fingerprint(self.model, self.loaded.preprocess)

    @cached_property
    def logit_scale(self) -> float:
        """The exponentiated temperature, read once as a float (as the server does)."""
        return float(self.model.logit_scale.detach().float().exp())

    @property
    def dim(self) -> int:
        return int(self.model.embed_dim)

    @torch.no_grad()
    def images(self, items: Sequence[ImageSource], desc: str = "embedding images") -> np.ndarray:
        """Paths or PIL images -> (N, D) fp32, unit rows."""
        out = np.empty((len(items), self.dim), dtype=np.float32)
        bar = tqdm(total=len(items), desc=desc, unit="img", disable=not self.progress)
        with bar:
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                pixels = torch.stack([self.transform.pixels(_image(x)) for x in chunk])
                # uint8 (B, 3, S, S) -> fp32 normalised on the device, as the server does.
                x = self.transform.normalize(pixels.to(self.device))
                emb = self.model.encode_image(x.to(self.model.dtype), normalize=True)
                out[start : start + len(chunk)] = emb.float().cpu().numpy()
                bar.update(len(chunk))
        return out

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, D) fp32, unit rows (truncated to the context, as the server may)."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            ids = self.tokenizer(chunk, truncate=True).ids.to(self.device)
            out[start : start + len(chunk)] = (
                self.model.encode_text(ids, normalize=True).float().cpu().numpy())
        return out


def _image(x: ImageSource) -> Image.Image:
    if isinstance(x, Image.Image):
        return x
    # An operator's files: any format Pillow reads, not only the server's allow-list.
    return open_image(Path(x), formats=None)

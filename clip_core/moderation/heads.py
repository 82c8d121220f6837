"""Trained heads: small classifiers over a model's L2-normalised embeddings.

A head file is safetensors (fp32 tensors plus str metadata, format "clip-head/1"):

- kind "linear": `weight` (C, D), `bias` (C,)
- kind "mlp": `hidden.weight` (H, D), `hidden.bias` (H,), `out.weight` (C, H), `out.bias` (C,),
  ReLU between

Metadata: `format`, `kind`, `multi_label` ("true"/"false"), `classes` (JSON list, len C),
`model` (name), `fingerprint` (`fingerprint.model_fingerprint` of the model whose
embeddings it was trained on), `embedding_dim` (D), optional `metrics` (JSON) and
`inputs` (comma list of "image"/"text": the embeddings it was trained on; "image" when
absent). A head is meaningful only over the embeddings of the model it was trained on,
so `load_head` refuses one whose fingerprint differs from the model it is loaded for.
Prediction is pure numpy, so it is the same in the server and in the offline tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from ..errors import HeadInvalid, HeadModelMismatch, PolicyInvalid
from .policy import Policy

FORMAT = "clip-head/1"
KINDS = {"linear": ("weight", "bias"),
         "mlp": ("hidden.weight", "hidden.bias", "out.weight", "out.bias")}
INPUTS = ("image", "text")


@dataclass
class Head:
    kind: str  # "linear" | "mlp"
    multi_label: bool
    classes: list[str]
    model: str
    fingerprint: str
    tensors: dict[str, np.ndarray]
    metrics: dict[str, Any] | None = None
    # The kinds of embedding it was trained on; a policy applies it to those only.
    inputs: tuple[str, ...] = ("image",)
    path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.tensors = {k: np.ascontiguousarray(v, dtype=np.float32)
                        for k, v in self.tensors.items()}
        self._check()

    @property
    def embedding_dim(self) -> int:
        first = "weight" if self.kind == "linear" else "hidden.weight"
        return int(self.tensors[first].shape[1])

    def index(self, name: str) -> int:
        """The column of class `name` in `predict`'s output."""
        return self.classes.index(name)

    def predict(self, emb: np.ndarray) -> np.ndarray:
        """(N, D) embeddings (normalised here, as in training) -> (N, C) probabilities:
        a sigmoid per class when multi-label, else a softmax over the classes. Each row
        is computed from its own embedding alone, in float64."""
        x = np.asarray(emb, dtype=np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        t = {k: v.astype(np.float64) for k, v in self.tensors.items()}
        if self.kind == "linear":
            logits = x @ t["weight"].T + t["bias"]  # (N, C)
        else:
            h = np.maximum(x @ t["hidden.weight"].T + t["hidden.bias"], 0.0)  # (N, H)
            logits = h @ t["out.weight"].T + t["out.bias"]  # (N, C)
        if self.multi_label:
            return 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid without overflow
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)

    def _check(self) -> None:
        where = self.path or "head"
        if self.kind not in KINDS:
            raise HeadInvalid(where, f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        missing = set(KINDS[self.kind]) - set(self.tensors)
        extra = set(self.tensors) - set(KINDS[self.kind])
        if missing or extra:
            raise HeadInvalid(where, f"{self.kind} head tensors: missing {sorted(missing)}, "
                              f"unexpected {sorted(extra)}")
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise HeadInvalid(where, "classes must be a non-empty list of distinct names")
        if not set(self.inputs) <= set(INPUTS) or not self.inputs:
            raise HeadInvalid(where, f"inputs {self.inputs} must be among {INPUTS}")
        t, c = self.tensors, len(self.classes)
        if self.kind == "linear":
            shapes_ok = (t["weight"].ndim == 2 and t["weight"].shape[0] == c
                         and t["bias"].shape == (c,))
        else:
            hidden = t["hidden.weight"].shape[0] if t["hidden.weight"].ndim == 2 else -1
            shapes_ok = (hidden > 0 and t["hidden.bias"].shape == (hidden,)
                         and t["out.weight"].shape == (c, hidden) and t["out.bias"].shape == (c,))
        if not shapes_ok:
            raise HeadInvalid(where, f"tensor shapes {({k: v.shape for k, v in t.items()})} "
                              f"do not fit a {self.kind} head over {c} classes")


def save_head(path: str | Path, head: Head) -> None:
    metadata = {
        "format": FORMAT,
        "kind": head.kind,
        "multi_label": "true" if head.multi_label else "false",
        "classes": json.dumps(head.classes),
        "model": head.model,
        "fingerprint": head.fingerprint,
        "embedding_dim": str(head.embedding_dim),
        "inputs": ",".join(head.inputs),
    }
    if head.metrics is not None:
        metadata["metrics"] = json.dumps(head.metrics)
    save_file(head.tensors, str(path), metadata=metadata)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="np") as f:
        return dict(f.metadata() or {})


def load_head(path: str | Path, expect_fingerprint: str | None = None) -> Head:
    """Reads a head file; with `expect_fingerprint`, refuses (HeadModelMismatch) a head
    trained on another model."""
    path = Path(path)
    try:
        meta = _metadata(path)
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise HeadInvalid(path, f"cannot be read as safetensors: {e}") from None
    if meta.get("format") != FORMAT:
        raise HeadInvalid(path, f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        classes = json.loads(meta["classes"])
        metrics = json.loads(meta["metrics"]) if "metrics" in meta else None
        head = Head(
            kind=meta["kind"], multi_label=meta["multi_label"] == "true",
            classes=[str(c) for c in classes], model=meta["model"],
            fingerprint=meta["fingerprint"], tensors=tensors, metrics=metrics,
            inputs=tuple(meta.get("inputs", "image").split(",")), path=str(path),
        )
        dim = int(meta["embedding_dim"])
    except (KeyError, ValueError, TypeError) as e:
        raise HeadInvalid(path, f"metadata is incomplete or malformed: {e!r}") from None
    if dim != head.embedding_dim:
        raise HeadInvalid(path, f"embedding_dim {dim} but the weights take {head.embedding_dim}")
    if expect_fingerprint is not None and head.fingerprint != expect_fingerprint:
        raise HeadModelMismatch(path, expected=expect_fingerprint, actual=head.fingerprint)
    return head


def load_policy_heads(policy: Policy, expect_fingerprint: str | None = None
                      ) -> dict[str, Head]:
    """The heads `policy`'s categories name, by the path as written in the policy (the
    key `scoring.PolicyScorer` looks them up by), each read once; a class a head does not
    have is a PolicyInvalid naming the category's field."""
    heads: dict[str, Head] = {}
    for name, cat in policy.categories.items():
        if cat.head is None:
            continue
        ref = cat.head
        if ref.path not in heads:
            heads[ref.path] = load_head(policy.head_path(ref), expect_fingerprint)
        head = heads[ref.path]
        if ref.class_ not in head.classes:
            raise PolicyInvalid(policy.source or policy.name, f"categories.{name}.head.class",
                                f"class {ref.class_!r} is not in {ref.path}'s classes "
                                f"{head.classes}")
    return heads

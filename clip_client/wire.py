"""What goes over the wire, with no I/O: images to base64, embeddings from base64, the
server's limits, and each call's plan (the request bodies a call is split into, and how
their answers merge back into one result in the caller's order)."""

from __future__ import annotations

import base64
import io
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, Union

import numpy as np

T = TypeVar("T")

# A path, raw bytes, a PIL image, or a string the server reads itself (a data URI; an
# http(s) URL when the server allows URL inputs).
ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]

# Bytes a body may hold besides its items ({"model": ..., "labels": [...]}); each item
# adds its own size plus its quotes and comma. Items are sized by their JSON, so only
# the fixed part is estimated.
_BODY_SLACK = 1024
_ITEM_OVERHEAD = 4


@dataclass(frozen=True)
class Limits:
    """The server's request limits (GET /v1/limits); None: not published, so a call is
    sent whole and the server's answer says whether it fits."""

    max_items_per_request: int | None = None
    max_body_bytes: int | None = None
    max_text_chars: int | None = None
    max_labels: int | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Limits:
        return cls(**{k: body.get(k) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float  # softmax over the request's labels
    cosine: float


@dataclass(frozen=True)
class Classification:
    labels: list[LabelScore]  # most probable first

    @property
    def top(self) -> LabelScore:
        return self.labels[0]


@dataclass(frozen=True)
class Similarity:
    cosine: np.ndarray  # (Q, C) float32: queries x candidates
    logits: np.ndarray  # (Q, C): the model's logit_scale x cosine


@dataclass
class Plan(Generic[T]):
    """A call as request bodies, all POSTed to `path`, and how to merge their answers
    (given in the bodies' order). `sizes`: items per body, for a progress bar."""

    path: str
    bodies: list[dict[str, Any]]
    merge: Callable[[list[Any]], T]
    sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sizes:
            self.sizes = [1] * len(self.bodies)


def encode_image(image: ImageInput) -> str:
    """One image as the API reads it: base64 of its file bytes, or a data URI / URL as
    given. A PIL image is written as PNG; Pillow is used only if the caller passes one."""
    if isinstance(image, str) and image.startswith(("data:", "http://", "https://")):
        return image
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            data = f.read()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif _is_pil_image(image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise TypeError(f"an image is a path, bytes or a PIL image, not {type(image).__name__}")
    return base64.b64encode(data).decode("ascii")


def _is_pil_image(obj: object) -> bool:
    pil = sys.modules.get("PIL.Image")  # loaded already if the caller holds a PIL image
    return pil is not None and isinstance(obj, pil.Image)


def decode_vectors(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """(N, E) float32 from the `embedding` of each row: base64 little-endian float32 bytes,
    or a list of floats from a server that ignored `encoding`."""
    vecs = [np.frombuffer(base64.b64decode(e), dtype="<f4") if isinstance(e, str)
            else np.asarray(e, dtype=np.float32) for e in (r["embedding"] for r in rows)]
    if not vecs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(vecs).astype(np.float32, copy=False)


def _text_size(t: str) -> int:
    return len(t.encode("utf-8")) + _ITEM_OVERHEAD


def _image_size(s: str) -> int:
    return len(s) + _ITEM_OVERHEAD


def split(sizes: Sequence[int], max_items: int | None, max_bytes: int | None) -> list[range]:
    """Consecutive runs of items, each at most `max_items` long and at most `max_bytes`
    in all (an item larger than that on its own goes alone; the server will say 413)."""
    runs: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        n = i - start
        if n and ((max_items is not None and n >= max_items)
                  or (max_bytes is not None and total + size > max_bytes)):
            runs.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs


def _budget(limits: Limits, fixed_items: int = 0, fixed_bytes: int = 0,
            share: int = 1) -> tuple[int | None, int | None]:
    """Items and bytes left for the split list in one body, out of 1/share of the
    limits, after the body's fixed part."""
    items = None if limits.max_items_per_request is None else max(
        1, limits.max_items_per_request // share - fixed_items)
    size = None if limits.max_body_bytes is None else max(
        1, limits.max_body_bytes // share - fixed_bytes - _BODY_SLACK)
    return items, size


def _common(model: str | None) -> dict[str, Any]:
    return {} if model is None else {"model": model}


def embed_plan(kind: str, items: Sequence[str], limits: Limits, *, model: str | None,
               normalize: bool, truncate: bool | None = None) -> Plan[np.ndarray]:
    """/embed for `kind` ("texts" or "images", already encoded): (N, E) float32."""
    if not items:
        raise ValueError(f"no {kind} given")
    sizes = [_text_size(t) if kind == "texts" else _image_size(t) for t in items]
    runs = split(sizes, *_budget(limits))
    base = {**_common(model), "normalize": normalize, "encoding": "base64"}
    if truncate is not None:
        base["truncate"] = truncate
    bodies = [{**base, kind: list(items[r.start:r.stop])} for r in runs]

    def merge(answers: list[Any]) -> np.ndarray:
        return np.concatenate([decode_vectors(a[kind]) for a in answers])

    return Plan("/embed", bodies, merge, [len(r) for r in runs])


def classify_plan(images: Sequence[str], labels: Sequence[str], limits: Limits, *,
                  templates: Sequence[str] | None, top_k: int | None,
                  model: str | None) -> Plan[list[Classification]]:
    if not images:
        raise ValueError("no images given")
    base: dict[str, Any] = {**_common(model), "labels": list(labels)}
    if templates is not None:
        base["templates"] = list(templates)
    if top_k is not None:
        base["top_k"] = top_k
    fixed = len(labels) + len(templates or ())
    fixed_bytes = sum(_text_size(t) for t in [*labels, *(templates or ())])
    runs = split([_image_size(s) for s in images], *_budget(limits, fixed, fixed_bytes))
    bodies = [{**base, "images": list(images[r.start:r.stop])} for r in runs]

    def merge(answers: list[Any]) -> list[Classification]:
        return [Classification([LabelScore(s["label"], float(s["probability"]),
                                           float(s["cosine"])) for s in res["labels"]])
                for a in answers for res in a["results"]]

    return Plan("/classify", bodies, merge, [len(r) for r in runs])


def similarity_plan(queries: tuple[str, Sequence[str]], candidates: tuple[str, Sequence[str]],
                    limits: Limits, *, model: str | None) -> Plan[Similarity]:
    """`queries` and `candidates` are (kind, items). Too many for one request: each side
    is split within half the limits, and each pair of runs is one request, one block of
    the (Q, C) matrix."""
    (qk, qs), (ck, cs) = queries, candidates
    if not qs or not cs:
        raise ValueError("give at least one query and one candidate")

    def sizes(kind: str, items: Sequence[str]) -> list[int]:
        return [_text_size(t) if kind == "texts" else _image_size(t) for t in items]

    q_sizes, c_sizes = sizes(qk, qs), sizes(ck, cs)
    whole = split(q_sizes + c_sizes, *_budget(limits))
    share = 1 if len(whole) == 1 else 2
    q_runs = split(q_sizes, *_budget(limits, share=share))
    c_runs = split(c_sizes, *_budget(limits, share=share))
    blocks = [(q, c) for q in q_runs for c in c_runs]
    bodies = [{**_common(model), "queries": {qk: list(qs[q.start:q.stop])},
               "candidates": {ck: list(cs[c.start:c.stop])}} for q, c in blocks]

    def merge(answers: list[Any]) -> Similarity:
        cosine = np.zeros((len(qs), len(cs)), dtype=np.float32)
        logits = np.zeros_like(cosine)
        for (q, c), a in zip(blocks, answers, strict=True):
            cosine[q.start:q.stop, c.start:c.stop] = np.asarray(a["cosine"], dtype=np.float32)
            logits[q.start:q.stop, c.start:c.stop] = np.asarray(a["logits"], dtype=np.float32)
        return Similarity(cosine, logits)

    return Plan("/similarity", bodies, merge, [len(q) * len(c) for q, c in blocks])


def moderate_plan(policy: str, images: Sequence[str] | None, texts: Sequence[str] | None,
                  categories: Sequence[str] | None) -> Plan[dict[str, Any]]:
    """/moderate, sent whole (a policy names its model): its answer's shape is the
    server's, returned as parsed."""
    if not images and not texts:
        raise ValueError("give images or texts to moderate")
    body: dict[str, Any] = {"policy": policy}
    if categories is not None:
        body["categories"] = list(categories)
    if images:
        body["images"] = list(images)
    if texts:
        body["texts"] = list(texts)
    return Plan("/moderate", [body], lambda answers: answers[0])

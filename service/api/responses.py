"""Inference response bodies written straight from numpy by orjson.

The routes keep their pydantic response models for the OpenAPI schema, but return a
`Response`, which FastAPI sends as it is: validating and serialising a model with one
Python float per value costs the event loop milliseconds for a 64 x 512 answer. The
bodies here carry the models' fields, in their order, with the same values:

- floats: each fp32 value widened to float64, which orjson prints as its shortest
  float64 repr, the very text pydantic wrote for `ndarray.tolist()`; NaN and infinities
  as null, as pydantic writes them. Byte for byte today's answers.
- `encoding=base64`: each row's little-endian float32 bytes, in base64.

tests/service/test_responses.py checks each body against its response model.
"""

from __future__ import annotations

import binascii
from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

from ..core import TextEmbeddings

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class OrjsonResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_OPTIONS)


def rows(vectors: np.ndarray, encoding: str) -> list:
    """One JSON value per row of (N, E) fp32 `vectors`: a float64 array (orjson writes it
    as a list), or the base64 of the row's little-endian float32 bytes."""
    if encoding == "base64":
        # Each (E,) row of the C-contiguous array is a buffer as it stands: no copy of
        # the whole array into bytes first, which cost the loop more than the encoding.
        data = np.ascontiguousarray(vectors, dtype="<f4")
        return [binascii.b2a_base64(row, newline=False).decode() for row in data]
    return list(vectors.astype(np.float64))  # (E,) views of one (N, E) array


def embed(model: str, dimension: int, encoding: str, texts: TextEmbeddings | None,
          images: np.ndarray | None) -> OrjsonResponse:
    """`EmbedResponse`; `images` (N, E) fp32."""
    texts_out = []
    if texts is not None:
        texts_out = [{"embedding": e, "n_tokens": n, "truncated": t}
                     for e, n, t in zip(rows(texts.vectors, encoding), texts.n_tokens,
                                        texts.truncated, strict=True)]
    images_out = [] if images is None else [{"embedding": e} for e in rows(images, encoding)]
    return OrjsonResponse({"model": model, "dimension": dimension, "encoding": encoding,
                           "texts": texts_out, "images": images_out})


def openai_embeddings(model: str, vectors: np.ndarray, encoding: str,
                      tokens: int) -> OrjsonResponse:
    """`OpenAIEmbeddingResponse`."""
    data = [{"object": "embedding", "index": i, "embedding": e}
            for i, e in enumerate(rows(vectors, encoding))]
    return OrjsonResponse({"object": "list", "data": data, "model": model,
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def similarity(model: str, cosine: np.ndarray, logits: np.ndarray) -> OrjsonResponse:
    """`SimilarityResponse`, from (Q, C) fp32 arrays."""
    return OrjsonResponse({"model": model, "cosine": cosine.astype(np.float64),
                           "logits": logits.astype(np.float64)})


def classify(model: str, labels: list[str], probabilities: np.ndarray, cosine: np.ndarray,
             top_k: int | None) -> OrjsonResponse:
    """`ClassifyResponse` from (N, C) fp32 arrays: each image's top_k labels (all when
    None) by falling probability, ties in the labels' order."""
    k = min(top_k or len(labels), len(labels))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]  # (N, k)
    # fp32 widened to float64, as float(p[j]) did; tolist() gives Python floats at C speed.
    probs = np.take_along_axis(probabilities, order, axis=1).astype(np.float64).tolist()
    cos = np.take_along_axis(cosine, order, axis=1).astype(np.float64).tolist()
    results = [{"labels": [{"label": labels[j], "probability": p, "cosine": c}
                           for j, p, c in zip(js, ps, cs, strict=True)]}
               for js, ps, cs in zip(order.tolist(), probs, cos, strict=True)]
    return OrjsonResponse({"model": model, "results": results})

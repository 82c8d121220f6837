"""The endpoints. Each decodes its body, calls the engine, and shapes the response."""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse

from ..core import Engine, ServedModel, unit
from ..errors import InvalidRequest
from ..metrics import CONTENT_TYPE
from .errors import OPENAPI_ERRORS, not_ready
from .inputs import decode_image_field
from .schemas import (
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    ImageEmbedding,
    Inputs,
    LabelScore,
    ModelCard,
    ModelList,
    SimilarityRequest,
    SimilarityResponse,
    TextEmbedding,
)


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]
TimeoutHeader = Annotated[
    float | None,
    Header(alias="X-Request-Timeout", gt=0, le=600, description="seconds; default: server's"),
]

inference = APIRouter(responses=OPENAPI_ERRORS)
health = APIRouter()


def _encode(vectors: np.ndarray, encoding: str) -> list:
    if encoding == "base64":
        return [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    return vectors.tolist()


def _images(values: list[str]) -> list[bytes]:
    return [decode_image_field(v, i) for i, v in enumerate(values)]


async def _embed_inputs(engine: Engine, m: ServedModel, inputs: Inputs, deadline: float):
    if inputs.texts:
        emb, _ = await engine.embed_texts(m, inputs.texts, truncate=True, deadline=deadline)
    else:
        emb = await engine.embed_images(m, _images(inputs.images), deadline)
    return unit(emb)


@inference.post("/embed", response_model=EmbedResponse)
async def embed(body: EmbedRequest, engine: EngineDep, request: Request,
                timeout: TimeoutHeader = None) -> EmbedResponse:
    """Embeddings of any mix of texts and images, in the order given."""
    m = engine.model(body.model)
    request.state.model = m.name
    deadline = engine.deadline(timeout)
    images = _images(body.images)
    texts_out: list[TextEmbedding] = []
    images_out: list[ImageEmbedding] = []
    if body.texts:
        emb, prep = await engine.embed_texts(m, body.texts, body.truncate, deadline)
        emb = unit(emb) if body.normalize else emb
        texts_out = [
            TextEmbedding(embedding=e, n_tokens=n, truncated=t)
            for e, n, t in zip(_encode(emb, body.encoding), prep.n_tokens, prep.truncated,
                               strict=True)
        ]
    if images:
        emb = await engine.embed_images(m, images, deadline)
        emb = unit(emb) if body.normalize else emb
        images_out = [ImageEmbedding(embedding=e) for e in _encode(emb, body.encoding)]
    return EmbedResponse(model=m.name, dimension=m.backend.info.embed_dim,
                         encoding=body.encoding, texts=texts_out, images=images_out)


@inference.post("/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, engine: EngineDep, request: Request,
                   timeout: TimeoutHeader = None) -> ClassifyResponse:
    """Zero-shot labels per image: softmax of logit_scale x cosine over the labels."""
    if len(set(body.labels)) != len(body.labels):
        raise InvalidRequest("labels must be distinct")
    m = engine.model(body.model)
    request.state.model = m.name
    deadline = engine.deadline(timeout)
    images = _images(body.images)
    clf = await engine.classifier(m, body.labels, body.templates, deadline)  # (C, E)
    cosine = unit(await engine.embed_images(m, images, deadline)) @ clf.T  # (N, C)
    logits = m.backend.logit_scale * cosine
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(body.top_k or len(body.labels), len(body.labels))
    results = []
    for p, c in zip(probs, cosine, strict=True):
        order = np.argsort(-p, kind="stable")[:k]
        results.append(Classification(labels=[
            LabelScore(label=body.labels[j], probability=float(p[j]), cosine=float(c[j]))
            for j in order
        ]))
    return ClassifyResponse(model=m.name, results=results)


@inference.post("/similarity", response_model=SimilarityResponse)
async def similarity(body: SimilarityRequest, engine: EngineDep, request: Request,
                     timeout: TimeoutHeader = None) -> SimilarityResponse:
    """Cosine of every query against every candidate, either modality on either side."""
    m = engine.model(body.model)
    request.state.model = m.name
    deadline = engine.deadline(timeout)
    q = await _embed_inputs(engine, m, body.queries, deadline)
    c = await _embed_inputs(engine, m, body.candidates, deadline)
    cosine = q @ c.T
    return SimilarityResponse(model=m.name, cosine=cosine.tolist(),
                              logits=(m.backend.logit_scale * cosine).tolist())


@inference.get("/v1/models", response_model=ModelList)
async def models(engine: EngineDep) -> ModelList:
    cards = []
    for m in engine.models.values():
        info = m.backend.info
        cards.append(ModelCard(
            name=info.name, dimension=info.embed_dim, image_size=info.image_size,
            context_length=info.context_length, device=info.device, dtype=info.dtype,
            status="ready" if m.ready else "unavailable",
        ))
    return ModelList(data=cards)


@health.get("/healthz")
async def healthz() -> dict:
    """Liveness: answering at all means the process and its event loop run."""
    return {"status": "ok"}


@health.get("/readyz")
async def readyz(request: Request) -> Response:
    """Ready when every model is loaded, warmed up and accepting work."""
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None or not engine.ready:
        return not_ready()
    return JSONResponse({"status": "ready"})


@health.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

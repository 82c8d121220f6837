"""The endpoints. Each decodes its body, calls the engine, and shapes the response.

/embed, /classify and /similarity read JSON or multipart/form-data on the same path
(see `inputs`); /v1/embeddings speaks OpenAI's JSON only.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from ..core import Engine, Items, TextEmbeddings
from ..engines import split_engine
from ..errors import InvalidRequest
from ..metrics import CONTENT_TYPE
from . import responses
from .errors import OPENAPI_ERRORS, not_alive, not_ready
from .inputs import JsonOrRaw, load_images, read_body
from .schemas import (
    CLASSIFY_FORM,
    EMBED_FORM,
    SIMILARITY_FORM,
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    ModelCard,
    ModelList,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    SimilarityRequest,
    SimilarityResponse,
)


async def get_engine(request: Request) -> Engine:
    # async: FastAPI runs a plain `def` dependency in its thread pool, one hop per request.
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]
TimeoutHeader = Annotated[
    float | None,
    Header(alias="X-Request-Timeout", gt=0, le=600, description="seconds; default: server's"),
]



def parse_json(body: bytes) -> Any:
    """orjson, in a fraction of the stdlib's time. What orjson refuses goes to the
    stdlib, which accepts a little more (NaN, 1e400, lone surrogates, UTF-16) and words
    its own errors, so the same bodies pass or fail as before. One difference remains:
    an integer beyond 64 bits comes back as a float, which only a 422's echoed `input`
    can show (no field takes such an integer)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


# Bodies past this are parsed in a worker thread: a thread hop costs the loop tens of
# microseconds, parsing a body of 64 base64 images milliseconds.
JSON_INLINE_MAX_BYTES = 256 * 1024


class _OrjsonRequest(Request):
    """A large body is joined from its chunks and parsed (`parse_json`) off the event loop."""

    async def body(self) -> bytes:
        # Starlette joins the chunks on the loop: a copy of the whole body (~1 ms for 8 MB).
        # bytes.join lets go of the GIL past 1 MB, so in a thread it costs the loop a hop.
        if not hasattr(self, "_body"):
            chunks = await self._chunks()
            if len(chunks) == 1:
                self._body = chunks[0]
            elif sum(len(c) for c in chunks) <= JSON_INLINE_MAX_BYTES:
                self._body = b"".join(chunks)
            else:
                loop = asyncio.get_running_loop()
                self._body = await loop.run_in_executor(None, b"".join, chunks)
        return self._body

    async def _chunks(self) -> list[bytes]:
        """The body's non-empty chunks, read from `receive` directly: Starlette's
        `stream()` adds an async generator's round trip per chunk, and an 8 MB body
        arrives in dozens of them."""
        if self._stream_consumed:
            raise RuntimeError("Stream consumed")
        chunks = []
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._is_disconnected = True
                raise ClientDisconnect()
            if message["type"] != "http.request":
                continue
            if body := message.get("body", b""):
                chunks.append(body)
            if not message.get("more_body", False):
                self._stream_consumed = True
                return chunks

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) <= JSON_INLINE_MAX_BYTES:
                self._json = parse_json(body)
            else:
                loop = asyncio.get_running_loop()
                self._json = await loop.run_in_executor(None, parse_json, body)
        return self._json


class _InferenceRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(_OrjsonRequest(request.scope, request.receive))

        return handle


inference = APIRouter(responses=OPENAPI_ERRORS, route_class=_InferenceRoute)
health = APIRouter()


@inference.post("/embed", response_model=EmbedResponse, openapi_extra=EMBED_FORM.openapi())
async def embed(raw: JsonOrRaw[EmbedRequest], engine: EngineDep, request: Request,
                timeout: TimeoutHeader = None) -> Response:
    """Embeddings of any mix of texts and images, in the order given.

    JSON, or multipart/form-data with image files in `images` and repeated `texts`."""
    decoded = await read_body(request, raw, EmbedRequest, EMBED_FORM)
    body, sources = decoded.body, decoded.images["images"]
    engine.limits.check_count(len(body.texts) + len(sources))
    engine.limits.check_texts("text", body.texts)
    m = engine.model(body.model)
    request.state.model = m.name
    deadline = engine.deadline(timeout)
    texts: TextEmbeddings | None = None
    emb: np.ndarray | None = None
    if body.texts:
        texts = await engine.embed_texts(m, body.texts, body.truncate, deadline,
                                         normalize=body.normalize)
    if sources:
        emb = await engine.embed_images(m, await load_images(engine, sources), deadline,
                                        normalize=body.normalize)
    return responses.embed(m.name, m.info.embed_dim, body.encoding, texts, emb)


@inference.post("/classify", response_model=ClassifyResponse,
                openapi_extra=CLASSIFY_FORM.openapi())
async def classify(raw: JsonOrRaw[ClassifyRequest], engine: EngineDep, request: Request,
                   timeout: TimeoutHeader = None) -> Response:
    """Zero-shot labels per image: softmax of logit_scale x cosine over the labels.

    JSON, or multipart/form-data with image files in `images` and repeated `labels`."""
    decoded = await read_body(request, raw, ClassifyRequest, CLASSIFY_FORM)
    body, sources = decoded.body, decoded.images["images"]
    engine.limits.check_count(len(sources) + len(body.labels) + len(body.templates or ()))
    engine.limits.check_texts("label", body.labels)
    engine.limits.check_texts("template", body.templates or [])
    if len(set(body.labels)) != len(body.labels):
        raise InvalidRequest("labels must be distinct")
    m = engine.model(body.model)
    request.state.model = m.name
    deadline = engine.deadline(timeout)
    images = await load_images(engine, sources)
    scores = await engine.classify(m, images, body.labels, body.templates, deadline)
    return responses.classify(m.name, body.labels, scores.probabilities, scores.cosine,
                              body.top_k)


@inference.post("/similarity", response_model=SimilarityResponse,
                openapi_extra=SIMILARITY_FORM.openapi())
async def similarity(raw: JsonOrRaw[SimilarityRequest], engine: EngineDep, request: Request,
                     timeout: TimeoutHeader = None) -> Response:
    """Cosine of every query against every candidate, either modality on either side.

    JSON, or multipart/form-data with `query_images` or `query_texts`, and
    `candidate_images` or `candidate_texts`."""
    decoded = await read_body(request, raw, SimilarityRequest, SIMILARITY_FORM)
    body = decoded.body
    engine.limits.check_count(sum(len(v) for v in decoded.images.values())
                              + len(body.queries.texts) + len(body.candidates.texts))
    engine.limits.check_texts("query text", body.queries.texts)
    engine.limits.check_texts("candidate text", body.candidates.texts)
    m = engine.model(body.model)
    request.state.model = m.name
    deadline = engine.deadline(timeout)
    queries = Items(body.queries.texts,
                    await load_images(engine, decoded.images["queries.images"]))
    candidates = Items(body.candidates.texts,
                       await load_images(engine, decoded.images["candidates.images"]))
    result = await engine.similarity(m, queries, candidates, deadline)
    return responses.similarity(m.name, result.cosine, result.logits)


@inference.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse)
async def openai_embeddings(body: OpenAIEmbeddingRequest, engine: EngineDep, request: Request,
                            timeout: TimeoutHeader = None) -> Response:
    """OpenAI-compatible embeddings, unit length as OpenAI's are.

    `modality: "image"` (an extra body field) reads every input as a base64 image or
    data URI. Texts longer than the model's context are truncated; `prompt_tokens`
    counts them in full."""
    given = [body.input] if isinstance(body.input, str) else body.input
    items = [x for x in given if isinstance(x, str)]
    if len(items) != len(given):
        raise InvalidRequest("token arrays are not supported; send the input as strings")
    engine.limits.check_count(len(items))
    if body.modality == "text":
        engine.limits.check_texts("input", items)
    m = engine.model(body.model)
    request.state.model = m.name
    dim = m.info.embed_dim
    if body.dimensions is not None and body.dimensions != dim:
        raise InvalidRequest(f"dimensions must be {dim} for model {m.name!r}")
    deadline = engine.deadline(timeout)
    if body.modality == "image":
        emb = await engine.embed_images(m, await load_images(engine, items), deadline,
                                        normalize=True)
        tokens = 0
    else:
        texts = await engine.embed_texts(m, items, truncate=True, deadline=deadline,
                                         normalize=True)
        emb, tokens = texts.vectors, sum(texts.n_tokens)
    return responses.openai_embeddings(m.name, emb, body.encoding_format, tokens)


@inference.get("/v1/models", response_model=ModelList)
async def models(engine: EngineDep) -> ModelList:
    cards = []
    for spec in engine.models.unavailable:
        cards.append(ModelCard(name=spec, dimension=0, image_size=0, context_length=0,
                               device="none", devices=[], dtype="none",
                               engine=split_engine(spec, engine.models.settings.engine)[0],
                               status="unavailable"))
    for m in engine.models.values():
        info = m.info
        cards.append(ModelCard(
            name=info.name, dimension=info.embed_dim, image_size=info.image_size,
            context_length=info.context_length, device=",".join(m.devices),
            devices=m.devices, dtype=info.dtype, engine=m.engine,
            status="ready" if m.ready else "unavailable", fingerprint=m.fingerprint,
            scoring=m.scoring,
        ))
    return ModelList(data=cards)


@health.get("/healthz")
async def healthz(request: Request) -> Response:
    """Liveness: the event loop answers and no model's worker has stopped for good."""
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is not None and not engine.models.alive:
        return not_alive()
    return JSONResponse({"status": "ok"})


@health.get("/readyz")
async def readyz(request: Request) -> Response:
    """Ready when every model is loaded, warmed up and accepting work."""
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None or not engine.models.ready:
        return not_ready()
    body: dict = {"status": "ready"}
    if engine.models.unavailable:  # serve_others: these failed to load; the rest serve
        body["unavailable"] = sorted(engine.models.unavailable)
    return JSONResponse(body)


@health.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {}},
                             "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

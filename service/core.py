"""The operations the API offers: embeddings, zero-shot labels and similarity.

`Engine` computes over the served models (`service.models` loads and watches them) and
knows nothing of HTTP: routes call it with decoded inputs and get domain results back;
errors are domain errors, turned into status codes by `service.api.errors`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from clip_core.zeroshot import (
    DEFAULT_TEMPLATES,
    combine_prompts,
    format_prompts,
    scores,
    sigmoid_scores,
)

from .cache import EmbeddingCache
from .errors import InvalidRequest, UrlNotAllowed
from .fetch import FetchConfig, UrlFetcher
from .limits import Limits
from .metrics import Metrics
from .models import ServedModel, ServedModels
from .prepare import ImageSource
from .settings import Settings

_CLASSIFIERS_KEPT = 64  # label sets per model; each is (labels, E) floats
_FETCHES_PER_REQUEST = 8  # image URLs of one request fetched at once


@dataclass(frozen=True)
class TextEmbeddings:
    vectors: np.ndarray  # (N, E) fp32, raw or unit length as asked
    n_tokens: list[int]  # per text, sot and eot included, before truncation
    truncated: list[bool]


@dataclass(frozen=True)
class LabelScores:
    """Zero-shot scores of N images against C labels, in the labels' order."""

    # (N, C) fp32: softmax over the labels of logit_scale x cosine, or for sigmoid-scored
    # models (ServedModel.scoring) each label's own sigmoid(logit_scale x cosine + bias).
    probabilities: np.ndarray
    cosine: np.ndarray  # (N, C) fp32


@dataclass(frozen=True)
class Similarity:
    cosine: np.ndarray  # (Q, C) fp32: every query against every candidate
    logits: np.ndarray  # (Q, C) fp32: logit_scale x cosine


@dataclass(frozen=True)
class Items:
    """One side of a similarity: texts, or else images (bytes or base64)."""

    texts: Sequence[str] = ()
    images: Sequence[ImageSource] = ()


@dataclass
class ClassifierCache:
    """One model's classifiers by (labels, templates), the most recently used kept."""

    kept: OrderedDict[tuple, np.ndarray] = field(default_factory=OrderedDict)
    # Label sets being embedded now: concurrent requests for a new set share one build.
    building: dict[tuple, asyncio.Future[np.ndarray]] = field(default_factory=dict)


def _retrieved(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Engine:
    """The operations, over `models`; and what requests share: the text-embedding cache,
    each model's classifiers, the URL fetcher."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.models = ServedModels(settings, metrics)
        self.cache = EmbeddingCache(settings.cache_size)
        self.classifiers: dict[str, ClassifierCache] = {}  # by model name
        self.limits = Limits.from_settings(settings)
        self.fetcher: UrlFetcher | None = None
        self._closed = False

    async def start(self) -> None:
        """Loads and warms up every model (see ServedModels.start)."""
        s = self.settings
        if s.url_inputs:
            self.fetcher = UrlFetcher(
                FetchConfig(tuple(s.url_allow_networks), s.url_connect_timeout_s,
                            s.url_timeout_s, s.url_max_bytes, s.url_max_redirects),
                on_outcome=lambda outcome: self.metrics.url_fetches.labels(outcome).inc(),
            )
        await self.models.start()

    async def drain(self, timeout: float) -> None:
        """Stops every model's worker after its accepted work, then the fetcher (idempotent)."""
        await self.models.drain(timeout)
        if self.fetcher is not None and not self._closed:
            self._closed = True
            await self.fetcher.aclose()

    def model(self, name: str | None) -> ServedModel:
        """The model a request names (None: the default one)."""
        return self.models.resolve(name)

    def deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (timeout_s or self.settings.request_timeout_s)

    # ---- embeddings ----

    async def embed_texts(
        self, m: ServedModel, texts: list[str], truncate: bool, deadline: float, *,
        normalize: bool = False,
    ) -> TextEmbeddings:
        """(N, E) fp32 embeddings; repeated texts are computed once and cached (raw)."""
        prepared = await m.texts.aprepare(texts, truncate)
        lookup = self.cache.lookup(m.name, texts)
        self.metrics.cache_hits.labels(m.name).inc(len(texts) - len(lookup.missing))
        self.metrics.cache_misses.labels(m.name).inc(len(lookup.missing))
        computed: list[np.ndarray] = []
        if lookup.missing:
            index = {t: i for i, t in enumerate(texts)}
            ids = [prepared.ids[index[t]] for t in lookup.missing]
            # A text's cost is the tokens the model computes for it.
            results = await m.worker.submit_many("text", ids, [len(x) for x in ids],
                                                 deadline=deadline)
            self.observe_waits(m.name, "text", results)
            computed = [r.value for r in results]
        values = np.stack(self.cache.complete(lookup, computed)).astype(np.float32, copy=False)
        return TextEmbeddings(unit(values) if normalize else values, prepared.n_tokens,
                              prepared.truncated)

    async def embed_images(
        self, m: ServedModel, images: Sequence[ImageSource], deadline: float, *,
        normalize: bool = False,
    ) -> np.ndarray:
        """(N, E) fp32 embeddings of encoded images (bytes, or base64 that the decode
        pool decodes), in order."""
        # Decoding and resizing take CPU that accepted requests need: under overload,
        # refuse before it, so that refusing stays cheap.
        m.worker.check_admission("image", len(images))
        pixels = await m.images.prepare(images)
        results = await m.worker.submit_many("image", pixels, deadline=deadline)
        self.observe_waits(m.name, "image", results)
        values = np.stack([r.value for r in results]).astype(np.float32, copy=False)
        return unit(values) if normalize else values

    async def load_images(self, sources: list[ImageSource | str]) -> list[ImageSource]:
        """The sources with URLs (str) fetched into bytes (when URL inputs are on),
        concurrently; bytes and base64 pass as they are."""
        urls = [i for i, s in enumerate(sources) if isinstance(s, str)]
        if not urls:
            return sources  # type: ignore[return-value]
        if self.fetcher is None:
            raise UrlNotAllowed(f"image {urls[0]}: image URLs are not enabled on this server")
        fetcher, gate = self.fetcher, asyncio.Semaphore(_FETCHES_PER_REQUEST)

        async def one(i: int) -> bytes:
            async with gate:
                return await fetcher.fetch(sources[i], i)  # type: ignore[arg-type]

        tasks = [asyncio.ensure_future(one(i)) for i in urls]
        try:
            bodies = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()  # the first failure stops the rest
        out = list(sources)
        for i, body in zip(urls, bodies, strict=True):
            out[i] = body
        return out  # type: ignore[return-value]

    # ---- zero-shot labels and similarity ----

    async def classify(
        self, m: ServedModel, images: Sequence[ImageSource], labels: list[str],
        templates: list[str] | None, deadline: float,
    ) -> LabelScores:
        """Each image scored against every label: a softmax over the labels
        (clip_core.zeroshot.scores), or for a sigmoid-trained model an independent
        sigmoid per label (clip_core.zeroshot.sigmoid_scores)."""
        clf = await self.classifier(m, labels, templates, deadline)  # (C, E)
        emb = await self.embed_images(m, images, deadline)  # (N, E)
        img, cls = torch.from_numpy(emb), torch.from_numpy(clf)
        if m.scoring == "sigmoid":
            probs, cosine = sigmoid_scores(img, cls, m.backend.logit_scale, m.logit_bias)
        else:
            probs, cosine = scores(img, cls, m.backend.logit_scale)
        return LabelScores(probs.numpy(), cosine.numpy())

    async def similarity(
        self, m: ServedModel, queries: Items, candidates: Items, deadline: float
    ) -> Similarity:
        q = await self._embed_items(m, queries, deadline)  # (Q, E)
        c = await self._embed_items(m, candidates, deadline)  # (C, E)
        cosine = q @ c.T
        return Similarity(cosine, m.backend.logit_scale * cosine)

    async def _embed_items(self, m: ServedModel, items: Items, deadline: float) -> np.ndarray:
        if items.texts:
            return (await self.embed_texts(m, list(items.texts), truncate=True,
                                           deadline=deadline, normalize=True)).vectors
        return await self.embed_images(m, list(items.images), deadline, normalize=True)

    async def classifier(
        self, m: ServedModel, labels: list[str], templates: list[str] | None, deadline: float
    ) -> np.ndarray:
        """(C, E) unit-norm class embeddings, built once per label set and kept."""
        templates = list(templates or DEFAULT_TEMPLATES)
        key = (tuple(labels), tuple(templates))
        cache = self.classifiers.setdefault(m.name, ClassifierCache())
        cached = cache.kept.get(key)
        if cached is not None:
            cache.kept.move_to_end(key)
            return cached
        try:
            prompts = format_prompts(labels, templates)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        build = cache.building.get(key)
        if build is None:
            # A task of its own, shielded below: a caller that leaves does not cancel
            # the build the others wait for. It fails them all alike (503 when overloaded).
            build = asyncio.ensure_future(self._build_classifier(m, cache, key, prompts,
                                                                 len(labels), deadline))
            build.add_done_callback(_retrieved)  # also when every caller has left
            cache.building[key] = build
        return await asyncio.shield(build)

    async def _build_classifier(self, m: ServedModel, cache: ClassifierCache, key: tuple,
                                prompts: list[str], n_labels: int, deadline: float
                                ) -> np.ndarray:
        try:
            emb = await self.embed_texts(m, prompts, truncate=True, deadline=deadline)
        finally:
            del cache.building[key]
        clf = combine_prompts(torch.from_numpy(emb.vectors), n_labels).numpy()
        cache.kept[key] = clf
        if len(cache.kept) > _CLASSIFIERS_KEPT:
            cache.kept.popitem(last=False)
        return clf

    def observe_waits(self, model: str, kind: str, results) -> None:
        """Each item's queue wait into the histogram (also for /moderate's own calls)."""
        hist = self.metrics.queue_wait.labels(model, kind)
        for r in results:
            hist.observe(r.queue_s)

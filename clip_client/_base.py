"""What `Client` and `AsyncClient` share: settings, headers, the plans of each call, and
turning an answer into a result or a typed error. The two differ only in how they send."""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import errors
from .retry import RetryPolicy, parse_retry_after
from .wire import (
    ImageInput,
    Limits,
    Plan,
    classify_plan,
    embed_plan,
    encode_image,
    moderate_plan,
    similarity_plan,
)

Side = tuple[str, Sequence[str]]


class _Base:
    def __init__(self, url: str, api_key: str | None, timeout: float, *,
                 retry: RetryPolicy | None, max_concurrency: int, progress: bool,
                 headers: Mapping[str, str] | None, clock: Callable[[], float],
                 random: Callable[[], float] | None):
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_concurrency = max_concurrency
        self.progress = progress
        self._clock = clock
        self._random = random or _random.Random().random
        self._headers = dict(headers or {})
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._limits: Limits | None = None

    # ---- answers ----
    def _result(self, status: int, body: bytes, headers: Mapping[str, str]) -> errors.ClipError:
        return errors.from_response(status, body, parse_retry_after(headers.get("retry-after")))

    def _wait(self, attempt: int, err: errors.ClipError, deadline: float) -> float | None:
        """Seconds to sleep before retrying `err`, or None to raise it."""
        assert err.status is not None
        return self.retry.delay(attempt, err.status, err.retry_after, self._clock(), deadline,
                                self._random)

    def _request_timeout(self, deadline: float) -> float:
        return max(0.001, min(self.timeout, deadline - self._clock()))

    @staticmethod
    def _limits_from(status: int, body: Any) -> Limits:
        # A server from before /v1/limits answers 404: send calls whole and let it judge.
        return Limits() if status == 404 else Limits.from_json(body)

    # ---- plans ----
    @staticmethod
    def _embed_texts(texts: Sequence[str], model: str | None, normalize: bool,
                     truncate: bool) -> Callable[[Limits], Plan]:
        if isinstance(texts, str):
            raise TypeError("texts is a list of strings, not one string")
        return lambda lim: embed_plan("texts", list(texts), lim, model=model,
                                      normalize=normalize, truncate=truncate)

    @staticmethod
    def _embed_images(images: Sequence[ImageInput], model: str | None,
                      normalize: bool) -> Callable[[Limits], Plan]:
        encoded = [encode_image(i) for i in images]
        return lambda lim: embed_plan("images", encoded, lim, model=model, normalize=normalize)

    @staticmethod
    def _classify(images: Sequence[ImageInput], labels: Sequence[str],
                  templates: Sequence[str] | None, top_k: int | None,
                  model: str | None) -> Callable[[Limits], Plan]:
        encoded = [encode_image(i) for i in images]
        return lambda lim: classify_plan(encoded, list(labels), lim, templates=templates,
                                         top_k=top_k, model=model)

    @staticmethod
    def _similarity(query_texts: Sequence[str] | None, query_images: Sequence[ImageInput] | None,
                    candidate_texts: Sequence[str] | None,
                    candidate_images: Sequence[ImageInput] | None,
                    model: str | None) -> Callable[[Limits], Plan]:
        q = _side("query", query_texts, query_images)
        c = _side("candidate", candidate_texts, candidate_images)
        return lambda lim: similarity_plan(q, c, lim, model=model)

    @staticmethod
    def _moderate(policy: str, images: Sequence[ImageInput] | None,
                  texts: Sequence[str] | None,
                  categories: Sequence[str] | None) -> Callable[[Limits], Plan]:
        encoded = None if images is None else [encode_image(i) for i in images]
        plan = moderate_plan(policy, encoded, texts, categories)
        return lambda lim: plan


def _side(name: str, texts: Sequence[str] | None, images: Sequence[ImageInput] | None) -> Side:
    if (texts is None) == (images is None):
        raise ValueError(f"give either {name}_texts or {name}_images")
    if texts is not None:
        return "texts", list(texts)
    assert images is not None
    return "images", [encode_image(i) for i in images]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """tqdm's bar when asked for and installed; else one that shows nothing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="item", desc=desc)

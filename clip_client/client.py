"""`Client`: the blocking client. The chunks of a long call go out on a thread pool."""

from __future__ import annotations

import random as _random
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import httpx
import numpy as np

from ._base import _Base, progress_bar
from .retry import RetryPolicy
from .wire import Classification, ImageInput, Limits, Plan, Similarity

T = TypeVar("T")


class Client(_Base):
    """A clip-server client.

    `Client("http://127.0.0.1:8000", api_key=...)`; a call over the server's limits is
    split into requests sent `max_concurrency` at a time; 429 and 503 are retried
    (`retry`); every error is a `clip_client.errors.ClipError` subclass. `clock`,
    `sleep` and `random` are there for tests.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0, *,
                 retry: RetryPolicy | None = None, max_concurrency: int = 4,
                 progress: bool = False, headers: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 random: Callable[[], float] | None = None):
        super().__init__(url, api_key, timeout, retry=retry, max_concurrency=max_concurrency,
                         progress=progress, headers=headers, clock=clock,
                         random=random or _random.Random().random)
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the API ----
    def models(self) -> list[dict[str, Any]]:
        """The served models, as /v1/models lists them."""
        return self._send("GET", "/v1/models", None, self._deadline())["data"]

    def limits(self) -> Limits:
        """The server's request limits, read once and kept."""
        if self._limits is None:
            r = self._call("GET", "/v1/limits", None, self._deadline(), allow_404=True)
            self._limits = self._limits_from(*r)
        return self._limits

    def embed_texts(self, texts: Sequence[str], *, model: str | None = None,
                    normalize: bool = True, truncate: bool = True,
                    progress: bool | None = None) -> np.ndarray:
        """(N, E) float32, in the order given."""
        return self._run(self._embed_texts(texts, model, normalize, truncate), progress)

    def embed_images(self, images: Sequence[ImageInput], *, model: str | None = None,
                     normalize: bool = True, progress: bool | None = None) -> np.ndarray:
        """(N, E) float32 for paths, bytes or PIL images, in the order given."""
        return self._run(self._embed_images(images, model, normalize), progress)

    def classify(self, images: Sequence[ImageInput], labels: Sequence[str], *,
                 templates: Sequence[str] | None = None, top_k: int | None = None,
                 model: str | None = None, progress: bool | None = None
                 ) -> list[Classification]:
        """Zero-shot labels per image, most probable first."""
        return self._run(self._classify(images, labels, templates, top_k, model), progress)

    def similarity(self, *, query_texts: Sequence[str] | None = None,
                   query_images: Sequence[ImageInput] | None = None,
                   candidate_texts: Sequence[str] | None = None,
                   candidate_images: Sequence[ImageInput] | None = None,
                   model: str | None = None, progress: bool | None = None) -> Similarity:
        """Cosine (Q, C) of queries against candidates; texts or images on either side."""
        return self._run(self._similarity(query_texts, query_images, candidate_texts,
                                          candidate_images, model), progress)

    def moderate(self, policy: str, *, images: Sequence[ImageInput] | None = None,
                 texts: Sequence[str] | None = None,
                 categories: Sequence[str] | None = None) -> dict[str, Any]:
        """POST /moderate; the server's answer as parsed JSON."""
        return self._run(self._moderate(policy, images, texts, categories), False)

    # ---- sending ----
    def _deadline(self) -> float:
        return self._clock() + self.retry.deadline_s

    def _run(self, make: Callable[[Limits], Plan[T]], progress: bool | None) -> T:
        plan = make(self.limits())
        deadline = self._deadline()
        n = len(plan.bodies)
        if n == 1:
            return plan.merge([self._send("POST", plan.path, plan.bodies[0], deadline)])
        bar = progress_bar(sum(plan.sizes), self.progress if progress is None else progress,
                           plan.path)
        answers: list[Any] = [None] * n
        pool = ThreadPoolExecutor(min(n, self.max_concurrency), thread_name_prefix="clip-client")
        try:
            pending = {pool.submit(self._send, "POST", plan.path, body, deadline): i
                       for i, body in enumerate(plan.bodies)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    i = pending.pop(f)
                    answers[i] = f.result()  # the first error ends the call
                    bar.update(plan.sizes[i])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return plan.merge(answers)

    def _send(self, method: str, path: str, body: Any, deadline: float) -> Any:
        return self._call(method, path, body, deadline)[1]

    def _call(self, method: str, path: str, body: Any, deadline: float,
              allow_404: bool = False) -> tuple[int, Any]:
        """(status, parsed JSON) of a success (or an allowed 404), after any retries."""
        attempt = 0
        while True:
            r = self._http.request(method, path, json=body,
                                   timeout=self._request_timeout(deadline))
            if r.status_code < 400:
                return r.status_code, r.json()
            if allow_404 and r.status_code == 404:
                return r.status_code, None
            err = self._result(r.status_code, r.content, r.headers)
            pause = self._wait(attempt, err, deadline)
            if pause is None:
                raise err
            self._sleep(pause)
            attempt += 1

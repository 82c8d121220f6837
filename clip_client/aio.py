"""`AsyncClient`: the asyncio client. The chunks of a long call are gathered, at most
`max_concurrency` in flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import httpx
import numpy as np

from ._base import _Base, progress_bar
from .retry import RetryPolicy
from .wire import Classification, ImageInput, Limits, Plan, Similarity

T = TypeVar("T")


class AsyncClient(_Base):
    """The same calls as `Client`, awaited; see there."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0, *,
                 retry: RetryPolicy | None = None, max_concurrency: int = 4,
                 progress: bool = False, headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 random: Callable[[], float] | None = None):
        super().__init__(url, api_key, timeout, retry=retry, max_concurrency=max_concurrency,
                         progress=progress, headers=headers, clock=clock, random=random)
        self._sleep = sleep
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers,
                                       timeout=timeout, transport=transport)
        self._limits_lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- the API ----
    async def models(self) -> list[dict[str, Any]]:
        return (await self._send("GET", "/v1/models", None, self._deadline()))["data"]

    async def limits(self) -> Limits:
        async with self._limits_lock:  # concurrent first calls read them once
            if self._limits is None:
                r = await self._call("GET", "/v1/limits", None, self._deadline(),
                                     allow_404=True)
                self._limits = self._limits_from(*r)
        return self._limits

    async def embed_texts(self, texts: Sequence[str], *, model: str | None = None,
                          normalize: bool = True, truncate: bool = True,
                          progress: bool | None = None) -> np.ndarray:
        return await self._run(self._embed_texts(texts, model, normalize, truncate), progress)

    async def embed_images(self, images: Sequence[ImageInput], *, model: str | None = None,
                           normalize: bool = True, progress: bool | None = None) -> np.ndarray:
        return await self._run(self._embed_images(images, model, normalize), progress)

    async def classify(self, images: Sequence[ImageInput], labels: Sequence[str], *,
                       templates: Sequence[str] | None = None, top_k: int | None = None,
                       model: str | None = None, progress: bool | None = None
                       ) -> list[Classification]:
        return await self._run(self._classify(images, labels, templates, top_k, model),
                               progress)

    async def similarity(self, *, query_texts: Sequence[str] | None = None,
                         query_images: Sequence[ImageInput] | None = None,
                         candidate_texts: Sequence[str] | None = None,
                         candidate_images: Sequence[ImageInput] | None = None,
                         model: str | None = None, progress: bool | None = None) -> Similarity:
        return await self._run(self._similarity(query_texts, query_images, candidate_texts,
                                                candidate_images, model), progress)

    async def moderate(self, policy: str, *, images: Sequence[ImageInput] | None = None,
                 texts: Sequence[str] | None = None,
                 categories: Sequence[str] | None = None) -> dict[str, Any]:
        return await self._run(self._moderate(policy, images, texts, categories), False)

    # ---- sending ----
    def _deadline(self) -> float:
        return self._clock() + self.retry.deadline_s

    async def _run(self, make: Callable[[Limits], Plan[T]], progress: bool | None) -> T:
        plan = make(await self.limits())
        deadline = self._deadline()
        n = len(plan.bodies)
        if n == 1:
            return plan.merge([await self._send("POST", plan.path, plan.bodies[0], deadline)])
        bar = progress_bar(sum(plan.sizes), self.progress if progress is None else progress,
                           plan.path)
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(i: int) -> Any:
            async with gate:
                answer = await self._send("POST", plan.path, plan.bodies[i], deadline)
            bar.update(plan.sizes[i])
            return answer

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        try:
            answers = await asyncio.gather(*tasks)
        finally:
            for t in tasks:  # the first error ends the call: the rest are cancelled
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            bar.close()
        return plan.merge(list(answers))

    async def _send(self, method: str, path: str, body: Any, deadline: float) -> Any:
        return (await self._call(method, path, body, deadline))[1]

    async def _call(self, method: str, path: str, body: Any, deadline: float,
                    allow_404: bool = False) -> tuple[int, Any]:
        attempt = 0
        while True:
            r = await self._http.request(method, path, json=body,
                                         timeout=self._request_timeout(deadline))
            if r.status_code < 400:
                return r.status_code, r.json()
            if allow_404 and r.status_code == 404:
                return r.status_code, None
            err = self._result(r.status_code, r.content, r.headers)
            pause = self._wait(attempt, err, deadline)
            if pause is None:
                raise err
            await self._sleep(pause)
            attempt += 1

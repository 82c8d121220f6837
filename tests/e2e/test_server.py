"""The real server process on 127.0.0.1: concurrent mixed traffic, metrics, disconnects,
and SIGTERM under load."""

from __future__ import annotations

import asyncio
import base64
import io
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import pytest
import torch
from conftest import TINY_VIT, metric_total, random_clip
from PIL import Image
from serverproc import ServerDidNotStart, ServerProcess, free_port

from clip_core.checkpoint import save_checkpoint
from clip_core.config import PreprocessConfig
from clip_core.preprocess import ImageTransform
from clip_core.tokenizer import Tokenizer

TINY = TINY_VIT
PREP = PreprocessConfig(image_size=32)


def _png(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Server(ServerProcess):
    """`python -m service --model CHECKPOINT EXTRA...`, ready; its output kept in a file."""

    def __init__(self, checkpoint, *extra: str, env: dict[str, str] | None = None):
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the server)
        super().__init__(["--model", str(checkpoint), *extra],
                         {"CLIP_LOG_FORMAT": "text", **(env or {})},
                         stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready(90)
        except ServerDidNotStart as e:
            self.stop()
            raise AssertionError(f"{e}; its output:\n{self.output()}") from None

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read()


@pytest.fixture(scope="module")
def model():
    return random_clip(TINY, seed=4)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("e2e") / "tiny.safetensors"
    save_checkpoint(model, path, PREP)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    # 300 large photos in one request (the disconnect test) are ~110 MB of JSON, and
    # more items than the default cap allows.
    s = Server(checkpoint, "--max-batch-size", "8", env={"CLIP_MAX_BODY_BYTES": str(256 << 20),
                                                         "CLIP_MAX_ITEMS_PER_REQUEST": "512"})
    yield s
    assert s.stop() == 0


def _metric(url: str, name: str, **labels) -> float:
    return metric_total(httpx.get(url + "/metrics", timeout=5).text, name, **labels)


def test_concurrent_mixed_requests_match_clip_core(server, model):
    texts = [f"a photo of thing number {i}" for i in range(12)]
    images = [_png(i) for i in range(12)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            calls = []
            for i in range(12):
                calls.append(c.post("/embed", json={"texts": [texts[i]]}))
                calls.append(c.post("/embed", json={"images": [base64.b64encode(images[i]).decode()]}))
            calls.append(c.post("/classify", json={
                "images": [base64.b64encode(b).decode() for b in images[:3]],
                "labels": ["cat", "dog", "car"]}))
            calls.append(c.post("/similarity", json={
                "queries": {"texts": texts[:2]}, "candidates": {"texts": texts[:2]}}))
            return await asyncio.gather(*calls)

    responses = asyncio.run(asyncio.wait_for(run(), 60))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    with torch.no_grad():
        want_t = model.encode_text(Tokenizer()(texts).ids, normalize=True).numpy()
        t = ImageTransform(PREP)
        px = torch.stack([t(Image.open(io.BytesIO(b))) for b in images])
        want_i = model.encode_image(px, normalize=True).numpy()
    got_t = np.array([responses[2 * i].json()["texts"][0]["embedding"] for i in range(12)])
    got_i = np.array([responses[2 * i + 1].json()["images"][0]["embedding"] for i in range(12)])
    np.testing.assert_allclose(got_t, want_t, atol=1e-5)
    np.testing.assert_allclose(got_i, want_i, atol=1e-5)
    assert len(responses[-2].json()["results"]) == 3
    # Batches formed under concurrency, and the scrape shows the traffic.
    assert _metric(server.url, "clip_items_total", modality="image") >= 15
    assert _metric(server.url, "clip_requests_total", endpoint="/embed", status="200") >= 24
    assert _metric(server.url, "clip_batch_size_count") > 0


def test_a_client_that_leaves_stops_its_work(server):
    """A caller that hangs up mid-request: its images are not all computed, the request
    is counted as 499, and the next caller is served."""
    def books() -> tuple[float, float]:
        """Images computed by the model, and images dropped from its queue, so far."""
        text = httpx.get(server.url + "/metrics", timeout=5).text
        return (metric_total(text, "clip_items_total", modality="image"),
                metric_total(text, "clip_dropped_items_total", modality="image"))

    n = 300
    computed_before, dropped_before = books()
    many = [base64.b64encode(_png(100 + i, (400, 300))).decode() for i in range(n)]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/embed", json={"images": many},
                   timeout=httpx.Timeout(5, read=0.3))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if _metric(server.url, "clip_requests_total", endpoint="/embed", status="499") >= 1:
            break
        time.sleep(0.2)
    assert _metric(server.url, "clip_requests_total", endpoint="/embed", status="499") >= 1
    # The 499 is counted once the handler has unwound: by then its items still queued
    # were dropped, and only those in a running batch (a few, of 300) can still finish.
    # So the books close at n (each image computed or dropped), or stay at 0 if the caller
    # left before the images were queued (while they were decoded). Wait for them to
    # close instead of for a guessed time, then ask how many images the model computed.
    deadline = time.monotonic() + 60
    while True:
        computed, dropped = (now - before for now, before in
                             zip(books(), (computed_before, dropped_before), strict=True))
        if computed + dropped in (0, n) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert computed + dropped in (0, n), f"{computed} computed and {dropped} dropped of {n}"
    assert computed < n
    assert httpx.post(server.url + "/embed", json={"texts": ["still here"]},
                      timeout=10).status_code == 200


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(checkpoint):
    # 240 images queued at once: on a slow machine more than the default queue-wait bound
    # predicts, and a refusal at admission is not what this test is about.
    server = Server(checkpoint, "--max-batch-size", "4", "--max-queue-wait-s", "600")
    payload = {"images": [base64.b64encode(_png(i, (320, 240))).decode() for i in range(40)]}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            tasks = [asyncio.create_task(c.post("/embed", json=payload)) for _ in range(6)]
            # SIGTERM once all six are accepted (a fixed sleep is too short on a loaded
            # machine, and too long on an idle one, where they would all be done).
            for _ in range(1000):
                await asyncio.sleep(0.02)
                if metric_total((await c.get("/metrics")).text, "clip_requests_in_flight") >= 6:
                    break
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.05)
            ready = await c.get("/readyz")
            late = await c.post("/embed", json={"texts": ["too late"]})
            return await asyncio.gather(*tasks), ready, late

    try:
        accepted, ready, late = asyncio.run(asyncio.wait_for(run(), 90))
        assert [r.status_code for r in accepted] == [200] * 6, [r.text[:200] for r in accepted]
        assert ready.status_code == 503
        assert late.status_code == 503 and late.headers.get("retry-after")
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def test_a_model_that_cannot_load_exits_non_zero_with_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "service", "--model", "RN50", "--offline", "--cache-dir",
         str(tmp_path), "--port", str(free_port()), "--log-format", "text"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines()
              if "ERROR" in line]
    assert len(errors) == 1 and "RN50.pt" in errors[0] and "Traceback" not in proc.stderr

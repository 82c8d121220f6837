"""Idle memory release: the worker asks the backend to give memory back once the server
has been idle a while, once per idle spell, from one thread, never while it works."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from fake_backend import FakeBackend, FakeClock
from test_batcher import run, serving, until

from service.errors import BatchStalled
from service.idle import IdleRelease

ROOT = Path(__file__).resolve().parents[2]


class ReleasingBackend(FakeBackend):
    """Records when release_memory ran, on which thread, and what was computing then."""

    def __init__(self, *args: Any, fail: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.releases: list[tuple[float, str, int]] = []  # (time, thread, calls in progress)
        self.fail = fail
        self.running = 0
        self.last_end = 0.0
        self._counting = threading.Lock()  # two streams call run at once

    def run(self, kind: str, payloads: list[Any]) -> list[Any]:
        with self._counting:
            self.running += 1
        try:
            return super().run(kind, payloads)
        finally:
            with self._counting:
                self.running -= 1
                self.last_end = self.now()

    def release_memory(self) -> None:
        self.releases.append((self.now(), threading.current_thread().name, self.running))
        if self.fail:
            raise RuntimeError("fake: release failed")


def test_released_once_per_idle_spell_after_the_delay_on_stream_zero():
    backend = ReleasingBackend(delay_s=0.02)

    async def scenario():
        async with serving(backend, streams=2, release_after_idle_s=0.15) as worker:
            await until(lambda: len(backend.releases) == 1)  # idle since the warm-up
            await asyncio.sleep(0.4)
            assert len(backend.releases) == 1  # once per spell, not every 0.15 s
            await asyncio.gather(*(worker.submit("image", i) for i in range(8)))
            await until(lambda: len(backend.releases) == 2)
            at, _, running = backend.releases[1]
            assert at - backend.last_end >= 0.15 - 0.01  # the idle delay, from the last batch
            assert running == 0
            assert {name for _, name, _ in backend.releases} == {"model-worker-fake-s0"}

    run(scenario)


def test_never_released_while_batches_keep_coming():
    """On a simulated clock: 30 ms batches with gaps of 0.25 s between them, well past a
    second in all, and no release, for no gap reaches the 0.3 s delay; then one gap
    does, and the release follows."""
    clock = FakeClock()
    backend = ReleasingBackend(delay_s=0.03, clock=clock)

    async def scenario():
        async with serving(backend, release_after_idle_s=0.3) as worker:
            for i in range(6):
                await worker.submit("image", i)
                clock.advance(0.25)
                await asyncio.sleep(0.01)  # time for the worker to look at its clock
            assert backend.releases == []
            await worker.submit("image", "last")
            # The answer comes before the stream leaves the books; the idle spell starts then.
            await until(lambda: not worker.dispatcher.streams.busy)
            clock.advance(0.3)
            await until(lambda: len(backend.releases) == 1)
            at, _, running = backend.releases[0]
            assert at - backend.last_end == pytest.approx(0.3)
            assert running == 0

    run(scenario)


def test_the_idle_rule_on_a_clock():
    """`due_at`: stream 0 only, `after_s` after the last batch ended, once per spell, and
    never while anything computes or waits."""
    idle = IdleRelease("m", 0.3, hook=lambda: None, now=10.0)
    assert idle.due_at(0, busy=False) == pytest.approx(10.3)
    assert idle.due_at(1, busy=False) is None  # stream 0 alone gives memory back
    assert idle.due_at(0, busy=True) is None
    idle.batch_ended(10.25)  # a batch within the delay: the spell starts again
    assert idle.due_at(0, busy=False) == pytest.approx(10.55)
    idle.claim()
    assert idle.due_at(0, busy=False) is None  # once per spell
    idle.batch_ended(11.0)
    assert idle.due_at(0, busy=False) == pytest.approx(11.3)
    assert IdleRelease("m", None, hook=lambda: None, now=0).due_at(0, busy=False) is None
    assert IdleRelease("m", 0.3, hook=None, now=0).due_at(0, busy=False) is None


def test_not_released_while_an_abandoned_call_is_still_inside_the_backend():
    backend = ReleasingBackend(hang_on={"stuck"})

    async def scenario():
        async with serving(backend, stall_timeout_s=0.2, release_after_idle_s=0.1) as worker:
            await until(lambda: len(backend.releases) == 1)  # idle since the warm-up
            await worker.submit("image", "a")  # a batch ends: the next idle spell may release
            with pytest.raises(BatchStalled):
                await worker.submit("image", "stuck")
            await asyncio.sleep(0.4)  # idle, but the stuck call has not returned
            assert len(backend.releases) == 1
            backend.release_hang()
            await until(lambda: len(backend.releases) == 2)
            assert backend.releases[1][2] == 0  # nothing inside the backend by then

    run(scenario)


def test_none_never_releases():
    backend = ReleasingBackend()

    async def scenario():
        async with serving(backend, release_after_idle_s=None) as worker:
            await worker.submit("image", 1)
            await asyncio.sleep(0.3)
        assert backend.releases == []

    run(scenario)


def test_a_failing_release_does_not_stop_serving():
    backend = ReleasingBackend(fail=True)

    async def scenario():
        async with serving(backend, release_after_idle_s=0.05) as worker:
            await until(lambda: len(backend.releases) == 1)
            result = await worker.submit("image", 7)
            assert result.value == ("image", 7)
            await until(lambda: len(backend.releases) == 2)

    run(scenario)


_FRAGMENTED_HEAP = """
import sys
from service.backend import ClipBackend

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

# 2,000 blocks of 60 KB (below glibc's mmap threshold, so from the heap), with a small
# block after each that stays alive: freeing the big ones leaves holes that free() alone
# cannot return, as a burst's activations do.
keep, big = [], []
for _ in range(2000):
    big.append(bytearray(60_000))
    keep.append(bytearray(1000))  # over pymalloc's 512 bytes: from the C heap too
del big
before = rss_mb()
ClipBackend.release_memory(None)
print(before, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_memory_gives_the_heaps_free_pages_back():
    out = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True,
                         text=True, timeout=120, check=True, cwd=ROOT)
    before, after = map(float, out.stdout.split())
    assert before - after > 80  # of ~114 MB freed

"""Machine tuning (service.tuning): streams, each stream's share of the cores, the
environment set before torch loads, and the loading thread that ends."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch

from service.tuning import (
    default_streams,
    environment_defaults,
    in_passing_thread,
    thread_share,
)


def test_two_streams_by_default_on_a_cpu_with_two_cores_one_on_a_gpu():
    def fake(device: str, cores: int):
        return SimpleNamespace(device=torch.device(device), cpu_threads=cores)

    assert default_streams(fake("cpu", 2)) == 2
    assert default_streams(fake("cpu", 16)) == 2
    assert default_streams(fake("cpu", 1)) == 1
    assert default_streams(fake("cuda", 16)) == 1


@pytest.mark.parametrize(("total", "streams", "expected"), [
    (2, 2, [1, 1]),
    (3, 2, [2, 1]),  # what does not divide goes to the first streams
    (16, 3, [6, 5, 5]),
    (1, 2, [1, 1]),  # never fewer than one thread
])
def test_streams_split_the_cores_evenly(total, streams, expected):
    assert [thread_share(total, s, streams, alone=False) for s in range(streams)] == expected


def test_only_stream_zero_takes_every_core_when_alone():
    assert thread_share(8, 0, 2, alone=True) == 8
    assert thread_share(8, 1, 2, alone=True) == 4


def test_environment_defaults_leave_an_operators_values_alone():
    assert environment_defaults({}) == {"MKL_DISABLE_FAST_MM": "1"}
    assert environment_defaults({"MKL_DISABLE_FAST_MM": "0"}) == {}


def test_work_in_a_passing_thread_runs_off_the_loop_in_a_thread_that_ends():
    async def scenario():
        return await in_passing_thread(lambda x, *, y: (threading.current_thread(), x + y),
                                       1, y=2)

    thread, value = asyncio.run(scenario())
    assert value == 3
    assert thread is not threading.main_thread() and not thread.is_alive()

"""Several server processes (service.processes) without starting any: the setting's
validation, each process's share of the cores and of the rate limits, and metrics merged
from per-process files, with two processes simulated in this one
(tests/e2e/test_processes_e2e.py runs the real ones)."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest
from conftest import metric_total
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from service import tuning
from service.__main__ import JsonLines, main
from service.metrics import Metrics
from service.processes import for_one_process
from service.settings import Settings

KEY = "k" * 16


@pytest.mark.parametrize("bad", ["0", "-1", "1.5", "two", ""])
def test_a_bad_process_count_is_refused_at_start_up(bad, monkeypatch, capsys):
    monkeypatch.setenv("CLIP_PROCESSES", bad)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and "processes:" in err


def test_the_flag_is_checked_too(capsys):
    assert main(["--processes", "0"]) == 2
    assert "processes: Input should be greater than or equal to 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--processes", "1.5"])  # argparse: "invalid int value"


def test_one_process_by_default():
    assert Settings().processes == 1
    assert Settings(processes="3").processes == 3


def test_each_process_gets_its_share_of_a_keys_rate_limit():
    s = Settings(processes=4, api_keys=[KEY], rate_limit_per_s=8.0, rate_limit_burst=10)
    one = for_one_process(s)
    assert (one.rate_limit_per_s, one.rate_limit_burst) == (2.0, 2)  # never more than 8/s, 10
    assert s.rate_limit_per_s == 8.0  # the settings given are not changed
    tiny = for_one_process(s.model_copy(update={"rate_limit_burst": 3}))
    assert tiny.rate_limit_burst == 1  # at least one request may go
    single = Settings(processes=1, api_keys=[KEY], rate_limit_per_s=8.0)
    assert for_one_process(single) is single
    unlimited = Settings(processes=4)
    assert for_one_process(unlimited).rate_limit_per_s is None


@pytest.fixture
def sixteen_cores(monkeypatch):
    monkeypatch.setattr(tuning, "machine_cores", lambda: 16)
    monkeypatch.setattr(tuning, "_processes", 1)  # restored after the test


def test_a_process_sizes_its_threads_on_its_share_of_the_cores(sixteen_cores):
    assert tuning.usable_cores() == 16
    assert tuning.decode_workers("auto", accelerator=True, model_threads=None) == 14
    tuning.share_cores(4)
    assert tuning.usable_cores() == 4
    # Beside a GPU the two cores for a loop and the serving threads are kept once for
    # the machine, the other 14 shared out: 4 decoders each, 2 each for 8 processes.
    assert tuning.decode_workers("auto", accelerator=True, model_threads=None) == 4
    assert tuning.decode_workers("auto", accelerator=True, model_threads=None, cores=4) == 2
    tuning.share_cores(8)
    assert tuning.decode_workers("auto", accelerator=True, model_threads=None) == 2
    tuning.share_cores(4)
    assert tuning.decode_workers("auto", accelerator=False, model_threads=None) == 2
    assert tuning.decode_workers(6, accelerator=True, model_threads=None) == 6  # as given
    tuning.share_cores(32)
    assert tuning.usable_cores() == 1  # never none
    with pytest.raises(ValueError):
        tuning.share_cores(0)


def test_several_processes_need_the_multiprocess_folder():
    # Here prometheus_client was imported without PROMETHEUS_MULTIPROC_DIR.
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        Metrics(multiprocess=True)


@pytest.fixture
def two_processes(tmp_path, monkeypatch):
    """Two processes' Metrics in this one, as pids 1001 and 1002, and `become(pid)`: each
    process's series must be made while its value class is prometheus_client's."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    classes = {pid: prometheus_values.MultiProcessValue(lambda pid=pid: pid)
               for pid in (1001, 1002)}

    def become(pid: int) -> None:
        monkeypatch.setattr(prometheus_values, "ValueClass", classes[pid])

    made = []
    for pid in classes:
        become(pid)
        made.append(Metrics(multiprocess=True))
    yield tmp_path, made, become
    prometheus_values.close_all_multiprocess_files()


def _by_pid(text: str) -> dict[str, float]:
    return {s.labels["pid"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "clip_process_requests"}


def test_metrics_are_merged_over_the_processes(two_processes):
    folder, (a, b), become = two_processes
    for pid, m, answered, depth, ready, in_flight in ((1001, a, 3, 4, 1, 2),
                                                      (1002, b, 2, 1, 0, 5)):
        become(pid)
        m.requests.labels("/embed", "m", "200").inc(answered)
        m.batch_size.labels("m", "image", "cpu").observe(8)
        m.queue_depth.labels("m", "image", "cpu").set(depth)
        m.model_ready.labels("m").set(ready)
        m.model_info.labels("m", "cuda:0", "float16", "torch").set(1)
        m.count_in_flight(lambda n=in_flight: n)

    become(1001)
    text = a.render().decode()  # a refreshes its own gauges; b has not published yet
    assert metric_total(text, "clip_requests_total", endpoint="/embed") == 5
    assert metric_total(text, "clip_batch_size_count", modality="image") == 2
    assert metric_total(text, "clip_queue_depth", modality="image") == 5  # livesum
    assert metric_total(text, "clip_model_ready", model="m") == 0  # livemin: not everywhere
    assert metric_total(text, "clip_model_info", model="m") == 1  # max: one series, not two
    assert metric_total(text, "clip_requests_in_flight") == 2
    assert _by_pid(text) == {"1001": 3.0, "1002": 0.0}

    b.refresh()  # what b's publishing does every second
    text = a.render().decode()
    assert metric_total(text, "clip_requests_in_flight") == 7
    assert _by_pid(text) == {"1001": 3.0, "1002": 2.0}

    mark_process_dead(1002, str(folder))  # the supervisor, when b has ended
    text = a.render().decode()
    assert metric_total(text, "clip_requests_total", endpoint="/embed") == 5  # counts stay
    assert metric_total(text, "clip_queue_depth", modality="image") == 4
    assert metric_total(text, "clip_model_ready", model="m") == 1
    assert metric_total(text, "clip_requests_in_flight") == 2


def test_one_process_renders_its_own_registry_as_before():
    m = Metrics()
    m.count_in_flight(lambda: 3)
    text = m.render().decode()
    assert metric_total(text, "clip_requests_in_flight") == 3
    assert "clip_process_requests" not in text and not m.multiprocess


def test_publishing_refreshes_until_cancelled_and_survives_a_failing_hook():
    m = Metrics()
    calls = []

    def hook() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("first call fails")

    m.on_scrape(hook)

    async def run() -> None:
        task = asyncio.create_task(m.publish(0.0))
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert len(calls) >= 2  # the loop went on after the hook raised


def test_log_lines_name_their_process_only_with_several():
    record = logging.LogRecord("service", logging.INFO, __file__, 1, "hello", None, None)
    assert "pid" not in json.loads(JsonLines().format(record))  # one process: as before
    assert json.loads(JsonLines(pid=True).format(record))["pid"] == os.getpid()

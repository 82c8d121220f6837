"""service.engines.exported.ExportedBackend's placement: a lone batch on stream 0 runs on
the export's whole session, a batch beside another on its stream's lane
(clip_core.export.Towers.lanes), and warm-up runs every session, lanes included. The
towers here are recorders; tests/clip_core/test_export.py runs real lanes."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from clip_core.config import PreprocessConfig
from clip_core.export import Export, ExportTarget, ModelCard, Towers
from service.engines.exported import ExportedBackend

E = 4


class Calls:
    """Which session computed each call, by the name it was given."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._lock = threading.Lock()

    def towers(self, name: str) -> Towers:
        def tower(x: np.ndarray) -> np.ndarray:
            with self._lock:
                self.names.append(name)
            return np.full((len(x), E), len(self.names), dtype=np.float32)

        return Towers(tower, tower, "float32")


def backend(lanes: int, *, shared: bool) -> tuple[ExportedBackend, Calls]:
    calls = Calls()
    whole = calls.towers("whole")
    if lanes:
        lane = calls.towers("lane")
        whole.lanes = ([lane] * lanes if shared
                       else [calls.towers(f"lane{i}") for i in range(lanes)])
    pre = PreprocessConfig(image_size=8)
    card = ModelCard(name="m", embed_dim=E, image_size=8, context_length=77, vocab_size=100,
                     logit_scale=100.0, preprocess=pre)
    export = Export(Path("."), ExportTarget("onnxruntime"), card, Path("i"), Path("t"))
    return ExportedBackend(export, whole, engine="onnxruntime", threads=2), calls


IMAGE = np.zeros((3, 8, 8), dtype=np.uint8)


def test_a_lone_batch_on_stream_zero_runs_on_every_thread_and_others_on_their_lane():
    b, calls = backend(2, shared=False)
    b.place(0, 2, alone=True)
    b.run("image", [IMAGE])
    b.place(0, 2, alone=False)
    b.run("text", [[98, 5, 99]])
    b.place(1, 2, alone=False)
    b.run("image", [IMAGE])
    b.place(1, 2, alone=True)  # alone, but not stream 0: only stream 0 runs wide
    b.run("image", [IMAGE])
    assert calls.names == ["whole", "lane0", "lane1", "lane1"]


def test_each_serving_thread_keeps_its_own_placement():
    b, calls = backend(2, shared=False)
    b.place(0, 2, alone=True)  # this thread: the whole session
    placed = threading.Event()
    go = threading.Event()

    def other_stream() -> None:
        b.place(1, 2, alone=False)
        placed.set()
        go.wait(5)
        b.run("image", [IMAGE])

    t = threading.Thread(target=other_stream)
    t.start()
    assert placed.wait(5)
    b.run("image", [IMAGE])  # not moved by the other thread's place()
    go.set()
    t.join(5)
    assert calls.names == ["whole", "lane1"]


def test_without_lanes_every_batch_runs_on_the_one_session():
    b, calls = backend(0, shared=False)
    for stream, alone in [(0, True), (0, False), (1, False)]:
        b.place(stream, 2, alone)
        b.run("image", [IMAGE])
    assert calls.names == ["whole"] * 3


def test_warmup_runs_every_distinct_session_once_per_shape_and_keeps_the_placement():
    b, calls = backend(2, shared=True)  # one one-thread lane that both streams share
    b.place(1, 2, alone=False)
    b.warmup()
    # An image batch and three text lengths on each session; the shared lane once.
    assert calls.names == ["whole"] * 4 + ["lane"] * 4
    b.run("image", [IMAGE])
    assert calls.names[-1] == "lane"


def test_a_cpu_replica_with_a_share_of_the_threads_never_runs_on_them_all():
    b, calls = backend(2, shared=True)
    b.threads = 1  # as service.models shares two cores out over two CPU replicas
    b.place(0, 1, alone=True)
    b.run("image", [IMAGE])
    assert calls.names == ["lane"]

"""Every numpy sink passes the conformance suite; the copy kernel, two-thread
copies, mincore-gated prefetch and commit-after-wait."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

pytest.importorskip("pytest")  # the suite module imports pytest itself

from mmapstore import sinks as sinks_module
from mmapstore.sinks import ArraySink, DictSink, Sink
from mmapstore.testing.sinks import Destination, SinkTests


class TestDictSink(SinkTests):
    def make_sink(self, destinations: Mapping[str, Destination]) -> Sink:
        arrays = {name: np.zeros(d.shape, d.dtype) for name, d in destinations.items()}
        return DictSink(arrays, [name for name, d in destinations.items() if d.transpose])

    def read(self, sink: Sink, param: str) -> np.ndarray:
        assert isinstance(sink, DictSink)
        return sink.arrays[param].copy()


class TestArraySink(SinkTests):
    def make_sink(self, destinations: Mapping[str, Destination]) -> Sink:
        shapes = {name: (d.shape, d.dtype) for name, d in destinations.items()}
        return ArraySink.allocate(shapes, [name for name, d in destinations.items() if d.transpose])

    def read(self, sink: Sink, param: str) -> np.ndarray:
        assert isinstance(sink, ArraySink)
        return np.asarray(sink.buffers[param]).copy()


class TestTwoThreadCopies(TestArraySink):
    """The same suite with every table large enough for two copy threads."""

    @pytest.fixture(autouse=True)
    def _always_parallel(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(sinks_module, "PARALLEL_MIN_NBYTES", 0)

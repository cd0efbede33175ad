"""Every numpy sink passes the conformance suite; the copy kernel, two-thread
copies, mincore-gated prefetch and commit-after-wait."""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np
import pytest

from mmapstore import ArraySink, DictSink, Sink
from mmapstore import _sinks as sinks_module
from mmapstore.io import evict
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


class _Deferred:
    """A completion whose copies happen in wait(), like a GPU stream's."""

    def __init__(self, run):
        self._run = run
        self._result = None
        self.waited = 0

    def done(self) -> bool:
        return self._result is not None

    def wait(self):
        self.waited += 1
        if self._result is None:
            self._result = self._run()
        return self._result


class _AsyncSink(DictSink):
    def __init__(self, arrays, *, fail: bool = False):
        super().__init__(arrays)
        self.fail = fail
        self.completions: list[_Deferred] = []

    def submit(self, table, source):
        self.check(table)

        def run():
            if self.fail:
                raise RuntimeError("device lost")
            return DictSink.submit(self, table, source).wait()

        completion = _Deferred(run)
        self.completions.append(completion)
        return completion


def _one_layer():
    from mmapstore.testing.sinks import _scenario

    return _scenario("stacked")


def test_pools_commit_only_after_the_sink_finished():
    from mmapstore._apply import apply, start
    from mmapstore._planner import plan_refresh
    from mmapstore._pool import ExpertPool

    scenario = _one_layer()
    arrays = {name: np.zeros((2, *values.shape[1:]), values.dtype) for name, values in scenario.values.items()}
    sink = _AsyncSink(arrays)
    pools = [ExpertPool(6, 2)]
    plan = plan_refresh(scenario.geometry, pools, [np.array([4, 5])], step=0)
    assert plan is not None
    pending = start(plan, sink, scenario.source, pools=pools)
    assert not pending.done() and pools[0].generation == 0  # copies in flight: nothing committed
    assert not any(array.any() for array in arrays.values())
    result = pending.wait()
    assert pools[0].generation == 1 and pools[0].resident_experts().tolist() == [4, 5]
    assert result.nbytes == plan.nbytes and pending.wait() is result and sink.completions[0].waited == 1
    for name, values in scenario.values.items():
        np.testing.assert_array_equal(arrays[name], values[4:6])
    failing = _AsyncSink({name: np.zeros_like(array) for name, array in arrays.items()}, fail=True)
    again = plan_refresh(scenario.geometry, pools, [np.array([0, 1])], step=0)
    assert again is not None
    with pytest.raises(RuntimeError, match="device lost"):
        apply(again, failing, scenario.source, pools=pools)
    assert pools[0].generation == 1  # the copy failed: the pool still describes what the buffers hold


def test_copy_slab_tiles_transposed_views_for_every_dtype_pair():
    from mmapstore._kernels import TILE, copy_slab

    rng = np.random.default_rng(0)
    shape = (3, TILE + 5, 2 * TILE + 3)  # ragged edge tiles
    for source_dtype, destination_dtype in [
        (ml_dtypes.bfloat16, ml_dtypes.bfloat16),
        (ml_dtypes.bfloat16, np.float32),
        (np.float32, np.float16),
        (np.int8, np.int32),
    ]:
        source = (rng.standard_normal(shape) * 8).astype(source_dtype)
        view = source.swapaxes(-1, -2)
        destination = np.zeros(view.shape, destination_dtype)
        copy_slab(destination, view)
        np.testing.assert_array_equal(destination, view.astype(destination_dtype))
        plain = np.zeros(source.shape, destination_dtype)
        copy_slab(plain, source)
        np.testing.assert_array_equal(plain, source.astype(destination_dtype))
    with pytest.raises(ValueError, match="shape"):
        copy_slab(np.zeros((2, 3)), np.zeros((3, 2)))


def test_prefetch_hints_only_pages_that_are_not_resident(tmp_path):
    import os

    from mmapstore._mapping import PAGE_NBYTES, MappedFile
    from mmapstore._source import nonresident_spans

    path = tmp_path / "data.bin"
    pages = 1024
    path.write_bytes(os.urandom(pages * PAGE_NBYTES))
    evict(path)
    with MappedFile(str(path)) as mapped:
        if mapped.resident_nbytes() != 0:
            pytest.skip("this file system keeps the file cached (tmpfs?): nothing to observe")
        assert nonresident_spans(mapped, 0, pages * PAGE_NBYTES) == [(0, pages * PAGE_NBYTES)]
        mapped.advise(0, pages * PAGE_NBYTES, 1)  # MADV_RANDOM: no read-ahead around the pages we touch
        view = mapped.view(0, np.dtype(np.uint8), (pages * PAGE_NBYTES,))
        int(view[600 * PAGE_NBYTES : 602 * PAGE_NBYTES : 512].sum())  # fault pages 600 and 601 in
        spans = nonresident_spans(mapped, 500 * PAGE_NBYTES + 100, 200 * PAGE_NBYTES)
        assert spans[0][0] == 500 * PAGE_NBYTES  # page-aligned start
        hinted = {
            page for start, length in spans for page in range(start // PAGE_NBYTES, -(-(start + length) // PAGE_NBYTES))
        }
        assert 600 not in hinted and 601 not in hinted  # resident pages are never hinted
        assert {500, 599, 602, 700} <= hinted
        int(view[::PAGE_NBYTES].sum())
        assert nonresident_spans(mapped, 0, pages * PAGE_NBYTES) == []

"""Register-ahead: the experts routed to but not resident are handed to a
sink that registers windows, between refreshes (CPU parts run everywhere)."""

from __future__ import annotations

import numpy as np
import pytest

from mmapstore import ArraySink, CapturedIdsError, ExpertPool, RefreshPolicy, SlabService, WriteTable, open_store
from mmapstore._planner import geometries_of, plan_candidates
from mmapstore.testing import synth_checkpoint


@pytest.fixture
def store(tmp_path):
    synth_checkpoint(tmp_path / "ckpt", family="mixtral", layers=2, experts=8, hidden=64, ffn=32)
    with open_store(tmp_path / "ckpt") as opened:
        yield opened


def test_candidates_are_the_routed_experts_not_resident(store):
    geometry = geometries_of(store)
    pools = [ExpertPool(8, 3), ExpertPool(8, 8)]
    table = plan_candidates(geometry, pools, [np.array([[0, 5], [5, 7]]), np.array([[6, 7]])])
    names = {table.params[p] for p in table.param.tolist()}
    assert names == {f"blk.0.ffn_{proj}_exps.weight" for proj in ("gate", "up", "down")}
    assert sorted(set(table.expert.tolist())) == [5, 7]  # 0 is resident; layer 1 holds every expert
    for row in range(table.rows):
        part = table.geometries[int(table.param[row])]
        file, offset, extent = part.range_of(int(table.expert[row]))
        assert (int(table.file[row]), int(table.offset[row]), int(table.extent[row])) == (file, offset, extent)
    assert plan_candidates(geometry, pools, [np.array([0, 1]), np.array([2])]).rows == 0
    with pytest.raises(CapturedIdsError):
        plan_candidates(geometry, pools, [np.array([8]), np.array([0])])
    with pytest.raises(CapturedIdsError):
        plan_candidates(geometry, pools, [np.array([0])])


class RecordingSink(ArraySink):
    """An array sink that says it registers ahead and records what it was given."""

    registers_ahead = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.ahead: list[WriteTable] = []

    def register_ahead(self, table: WriteTable, source: object) -> int:
        self.ahead.append(table)
        return 0


def test_service_hands_the_likely_promotions_to_the_sink(store):
    geometry = geometries_of(store)
    sink = RecordingSink.for_geometries(geometry, [3, 3])
    assert isinstance(sink, RecordingSink)
    service = SlabService(store, 3, RefreshPolicy.every_n_decode_steps(2), sink)
    service.step([np.array([[0, 1]]), np.array([[2, 1]])])  # step 0 refreshes: nothing new
    service.step([np.array([[6, 1]]), np.array([[7, 0]])])  # step 1 does not: 6 and 7 are candidates
    assert [sorted(set(table.expert.tolist())) for table in sink.ahead] == [[], [6, 7]]
    assert {sink.ahead[1].params[p].split(".")[1] for p in sink.ahead[1].param.tolist()} == {"0", "1"}
    with pytest.raises(CapturedIdsError):  # bad ids are refused on steps that do not refresh, too
        service.step([np.array([[9]]), np.array([[0]])], step=3)


def test_service_steps_on_counts_as_on_the_ids_they_count(store):
    geometry = geometries_of(store)
    rng = np.random.default_rng(3)
    by_ids = RecordingSink.for_geometries(geometry, [3, 3])
    by_counts = RecordingSink.for_geometries(geometry, [3, 3])
    ids_service = SlabService(store, 3, RefreshPolicy.every_n_decode_steps(2), by_ids)
    counts_service = SlabService(store, 3, RefreshPolicy.every_n_decode_steps(2), by_counts)
    for _ in range(6):
        captured = [rng.integers(0, 8, size=(5, 2)) for _ in range(2)]
        counts = np.stack([np.bincount(ids.reshape(-1), minlength=8) for ids in captured])
        want, got = ids_service.step(captured), counts_service.step(counts, counts=True)
        assert (got.refreshed, got.updates) == (want.refreshed, want.updates)
    assert [table.rows for table in by_counts.ahead] == [table.rows for table in by_ids.ahead]
    for name, array in by_ids.buffers.items():
        np.testing.assert_array_equal(by_counts.buffers[name], array)
    assert ids_service.stats.promotions > 0
    with pytest.raises(CapturedIdsError, match="shape"):
        counts_service.step([np.zeros(8, np.int64), np.zeros(9, np.int64)], counts=True)

"""The planner over hand-built geometries: no file anywhere."""

from __future__ import annotations

import numpy as np
import pytest

from mmapstore import (
    CapturedIdsError,
    Encoding,
    ExecMode,
    ExpertPool,
    FormatError,
    LayerGeometry,
    PartGeometry,
    SinkError,
    StackGeometry,
    StaleRefreshError,
    StoreGeometry,
    plan_full_push,
    plan_refresh,
    plan_resident,
)
from mmapstore._dtypes import dtype_from_code
from mmapstore._planner import plan_candidates
from mmapstore._proposals import count_hits_rows, propose_rows
from mmapstore._writes import WriteTable, merge_ranges
from mmapstore.testing import InMemoryFiles

BF16 = dtype_from_code("BF16")
F32 = dtype_from_code("F32")
PLAIN = Encoding("plain", BF16)
SLAB = 4096  # bytes of one [32, 64] bf16 slab


def stacked_layer(
    layer: int, experts: int, base: int, *, file: int = 0, parts: tuple[str, ...] = ("weight",)
) -> LayerGeometry:
    """gate/up/down stacked back to back from ``base``; each extra part after them."""
    stacks = []
    position = base
    for proj in ("gate", "up", "down"):
        geometries = []
        for part in parts:
            geometries.append(
                PartGeometry.stacked(
                    f"layers.{layer}.{proj}",
                    part,
                    experts,
                    BF16,
                    (32, 64),
                    (128, 2),
                    file=file,
                    base=position,
                    stride=SLAB,
                    extent=SLAB,
                )
            )
            position += experts * SLAB
        stacks.append(StackGeometry(proj, PLAIN, tuple(geometries)))
    return LayerGeometry(layer, tuple(stacks))


def store_geometry(layers: int = 2, experts: int = 8, **kwargs: object) -> StoreGeometry:
    return StoreGeometry(
        tuple(stacked_layer(index + 1, experts, index * 3 * experts * SLAB, **kwargs) for index in range(layers)),  # type: ignore[arg-type]
        ("a.safetensors",),
    )


def rows_of(table: WriteTable, param: str) -> list[tuple[int, int, int, int, int]]:
    index = table.params.index(param)
    return [
        (int(table.slot[r]), int(table.expert[r]), int(table.count[r]), int(table.offset[r]), int(table.extent[r]))
        for r in range(table.rows)
        if table.param[r] == index
    ]


def test_adjacent_pairs_coalesce_into_one_row_per_part():
    geometry = store_geometry()
    pools = [ExpertPool(8, 4), ExpertPool(8, 4)]
    plan = plan_refresh(geometry, pools, [np.arange(4, 8), np.array([0, 6, 7])], step=0)
    assert plan is not None
    table = plan.table
    # layer 1: experts 4..7 into slots 0..3, one run; gate starts at 0
    assert rows_of(table, "blk.1.ffn_gate_exps.weight") == [(0, 4, 4, 4 * SLAB, 4 * SLAB)]
    assert rows_of(table, "blk.1.ffn_down_exps.weight") == [(0, 4, 4, (16 + 4) * SLAB, 4 * SLAB)]
    # layer 2: 6 and 7 replace the coldest (1, 2): slots 1, 2 -> one run of 2
    base = 3 * 8 * SLAB
    assert rows_of(table, "blk.2.ffn_up_exps.weight") == [(1, 6, 2, base + (8 + 6) * SLAB, 2 * SLAB)]
    assert [(u.layer, u.slot, u.old_expert, u.new_expert) for u in plan.updates] == [
        (1, 0, 0, 4),
        (1, 1, 1, 5),
        (1, 2, 2, 6),
        (1, 3, 3, 7),
        (2, 1, 1, 6),
        (2, 2, 2, 7),
    ]
    assert table.nbytes == (4 + 2) * 3 * SLAB
    # reads: the per-layer runs of gate/up/down never touch each other here
    assert plan.read_nbytes == table.nbytes and len(table.reads) == 6
    assert table.files == ("a.safetensors",) and set(table.file.tolist()) == {0}


def test_non_adjacent_pairs_stay_separate_rows():
    geometry = store_geometry(layers=1)
    pools = [ExpertPool(8, 4)]
    plan = plan_refresh(geometry, pools, [np.array([[0, 1], [5, 7]])], step=0)
    assert plan is not None
    # 5 and 7 replace 2 and 3 (slots 2, 3): slots advance by one, experts by two
    assert rows_of(plan.table, "blk.1.ffn_gate_exps.weight") == [(2, 5, 1, 5 * SLAB, SLAB), (3, 7, 1, 7 * SLAB, SLAB)]


def test_gathered_parts_plan_one_row_per_expert_and_back_to_back_ones_coalesce():
    files = InMemoryFiles(2)
    arrays = [np.full((4, 4), e, np.float32) for e in range(6)]
    scattered = files.gathered("layers.0.gate", "weight", arrays, files=[0, 1, 0, 1, 0, 1])
    assert scattered.stride is None
    adjacent = PartGeometry.gathered("layers.0.up", "weight", F32, (4, 4), [0] * 6, [64 * e for e in range(6)], 64)
    assert adjacent.stride == 64
    down = PartGeometry.stacked(
        "layers.0.down", "weight", 6, F32, (4, 4), (16, 4), file=1, base=0, stride=64, extent=64
    )
    plain = Encoding("plain", F32)
    geometry = StoreGeometry(
        (
            LayerGeometry(
                0,
                (
                    StackGeometry("gate", plain, (scattered,)),
                    StackGeometry("up", plain, (adjacent,)),
                    StackGeometry("down", plain, (down,)),
                ),
            ),
        ),
        files.files,
    )
    table = plan_full_push(geometry).table
    gate = rows_of(table, "blk.0.ffn_gate_exps.weight")
    assert [row[:3] for row in gate] == [(e, e, 1) for e in range(6)]
    assert [row[3] for row in gate] == scattered.offsets.tolist()
    assert [int(table.file[r]) for r in range(table.rows) if table.param_name(r).startswith("blk.0.ffn_gate")] == [
        0,
        1,
        0,
        1,
        0,
        1,
    ]
    assert rows_of(table, "blk.0.ffn_up_exps.weight") == [(0, 0, 6, 0, 6 * 64)]
    # the source serves every row with the right values
    source = files.source()
    source.check(table)
    for row in range(table.rows):
        if table.param_name(row) == "blk.0.ffn_gate_exps.weight":
            np.testing.assert_array_equal(source.view(table, row)[0], arrays[int(table.expert[row])])


def test_every_part_moves_with_its_expert():
    geometry = store_geometry(layers=1, parts=("weight", "scale", "bias"))
    plan = plan_refresh(geometry, [ExpertPool(8, 2)], [np.array([6, 7])], step=0)
    assert plan is not None
    names = {plan.table.param_name(r) for r in range(plan.table.rows)}
    assert names == {
        f"blk.1.ffn_{proj}_exps.{part}" for proj in ("gate", "up", "down") for part in ("weight", "scale", "bias")
    }
    assert set(plan.table.count.tolist()) == {2}


def test_resident_and_full_push_plans():
    geometry = store_geometry()
    pools = [ExpertPool(8, 3), ExpertPool(8, 8)]
    table = plan_resident(geometry, pools, names="m.{layer}.{proj}").table
    assert rows_of(table, "m.1.gate") == [(0, 0, 3, 0, 3 * SLAB)]
    assert rows_of(table, "m.2.down")[0][:3] == (0, 0, 8)
    full = plan_full_push(geometry)
    assert full.table.rows == 6 and set(full.table.count.tolist()) == {8} and full.updates == ()
    assert full.nbytes == 2 * 3 * 8 * SLAB


def test_a_name_template_that_collides_is_refused():
    with pytest.raises(FormatError, match="same name"):
        plan_full_push(store_geometry(), names="blk.{layer}.experts")


@pytest.mark.parametrize(
    "pools, captured, match",
    [
        ([ExpertPool(8, 2)], [[1], [1]], "1 pools for 2 MoE layers"),
        ([ExpertPool(8, 2), ExpertPool(9, 2)], [[1], [1]], "layer 2 has 8 experts, its pool was made for 9"),
        ([ExpertPool(8, 2), ExpertPool(8, 2)], [[1]], "for 1 layers"),
        ([ExpertPool(8, 2), ExpertPool(8, 2)], [[1], [8]], "layer 2: .*out of range"),
        ([ExpertPool(8, 2), ExpertPool(8, 2)], [[-1], [1]], "layer 1: .*out of range"),
        ([ExpertPool(8, 2), ExpertPool(8, 2)], [[1], [1.0]], "layer 2: .*integers"),
        ([ExpertPool(8, 2), ExpertPool(8, 2)], [[1], np.array([True])], "layer 2: .*integers"),
        ([ExpertPool(8, 2), ExpertPool(8, 2)], [[1], [[1, 2], [3]]], "layer 2"),
    ],
)
def test_bad_pools_and_ids_are_refused_before_anything_is_planned(pools, captured, match):
    with pytest.raises(CapturedIdsError, match=match):
        plan_refresh(store_geometry(), pools, captured, step=0)
    assert all(pool.generation == 0 for pool in pools)


def test_ids_of_any_integer_dtype_and_shape_and_empty_ones():
    geometry = store_geometry()
    for ids in ([], np.zeros((0, 8), np.int64), np.array([[3, 4]], np.uint8), np.array([3, 4], np.int16)):
        pools = [ExpertPool(8, 2), ExpertPool(8, 2)]
        plan = plan_refresh(geometry, pools, [ids, np.array([5])], step=0)
        assert plan is not None
        assert {u.new_expert for u in plan.updates if u.layer == 1} == ({3, 4} if len(ids) else set())


def test_layers_of_different_shapes_plan_together_in_layer_order():
    layers = (stacked_layer(0, 8, 0), stacked_layer(1, 16, 3 * 8 * SLAB), stacked_layer(2, 8, 3 * 24 * SLAB))
    geometry = StoreGeometry(layers, ("f",))
    pools = [ExpertPool(8, 2), ExpertPool(16, 4), ExpertPool(8, 2)]
    plan = plan_refresh(geometry, pools, [np.array([7]), np.array([15, 14]), np.array([6])], step=0)
    assert plan is not None
    assert [(u.layer, u.new_expert) for u in plan.updates] == [(0, 7), (1, 14), (1, 15), (2, 6)]
    assert [r is not None for r in plan.results] == [True, True, True]
    plan.commit(pools)
    assert pools[1].slot_of(15) is not None and pools[0].slot_of(7) is not None


def test_planning_changes_nothing_and_a_stale_plan_cannot_commit():
    geometry = store_geometry(layers=1)
    pools = [ExpertPool(8, 2)]
    first = plan_refresh(geometry, pools, [np.array([5])], step=0)
    second = plan_refresh(geometry, pools, [np.array([6])], step=0)
    assert first is not None and second is not None and pools[0].generation == 0
    first.commit(pools)
    with pytest.raises(StaleRefreshError):
        second.commit(pools)
    with pytest.raises(CapturedIdsError, match="plan has 1 layers"):
        first.commit(pools * 2)


def test_no_plan_when_no_pool_is_due_and_untouched_layers_are_not_validated():
    geometry = store_geometry()
    full = [ExpertPool(8, 8), ExpertPool(8, 8)]
    assert plan_refresh(geometry, full, [[99], [99]], step=0, mode=ExecMode.REFRESH) is None
    mixed = [ExpertPool(8, 8), ExpertPool(8, 2)]
    plan = plan_refresh(geometry, mixed, [[99], [3]], step=0)  # layer 1 keeps everything resident
    assert plan is not None and plan.results[0] is None and plan.results[1] is not None


@pytest.mark.parametrize("seed", range(6))
def test_batched_proposals_equal_the_pools_own(seed):
    """The matrix form decides exactly what ExpertPool.propose decides, over
    many random states, hit patterns and capacities."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        experts = int(rng.integers(1, 40))
        capacity = int(rng.integers(0, experts))
        count = int(rng.integers(1, 6))
        pools = [ExpertPool(experts, capacity) for _ in range(count)]
        for pool in pools:  # reach a random state
            for _ in range(int(rng.integers(0, 3))):
                pool.refresh_from_indices(rng.integers(0, experts, size=int(rng.integers(0, 3 * experts + 1))))
        # few distinct hit values: many ties to break by id
        hits = rng.integers(0, 4, size=(count, experts)).astype(np.int64)
        batched = propose_rows(pools, list(range(count)), hits)
        for index, pool in enumerate(pools):
            want = pool.propose(pool.select_target(hits[index]), hits[index])
            assert batched.result(index) == want


def test_counting_hits_matches_bincount_on_both_paths():
    rng = np.random.default_rng(0)
    small = [rng.integers(0, 16, size=(3, 2)) for _ in range(4)]
    large = [rng.integers(0, 16, size=(40000,)) for _ in range(2)]
    for captured in (small, large):
        hits = count_hits_rows(captured, 16, list(range(len(captured))))
        for row, ids in enumerate(captured):
            np.testing.assert_array_equal(hits[row], np.bincount(ids.reshape(-1), minlength=16))
    with pytest.raises(CapturedIdsError, match="MoE layer 1: .*16"):
        count_hits_rows([large[0], np.append(large[1], 16)], 16, [0, 1])


def test_merge_ranges_against_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(50):
        rows = int(rng.integers(1, 30))
        file = rng.integers(0, 3, size=rows).astype(np.int64)
        offset = rng.integers(0, 200, size=rows).astype(np.int64)
        nbytes = rng.integers(1, 30, size=rows).astype(np.int64)
        merged = merge_ranges(file, offset, nbytes)
        for which in range(3):
            covered = np.zeros(300, bool)
            for f, o, n in zip(file, offset, nbytes, strict=True):
                if f == which:
                    covered[o : o + n] = True
            mine = np.zeros(300, bool)
            picks = merged.file == which
            starts, lengths = merged.offset[picks], merged.nbytes[picks]
            for o, n in zip(starts, lengths, strict=True):
                assert not mine[o : o + n].any()  # disjoint
                mine[o : o + n] = True
            np.testing.assert_array_equal(mine, covered)
            assert (np.diff(starts) > 0).all()
            assert (starts[1:] > starts[:-1] + lengths[:-1]).all()  # touching ranges merged


def test_write_tables_are_read_only_and_validated():
    table = plan_full_push(store_geometry()).table
    with pytest.raises(ValueError):
        table.slot[0] = 5
    assert not table.reads.offset.flags.writeable
    good = dict(
        params=table.params,
        geometries=table.geometries,
        encodings=table.encodings,
        files=table.files,
        param=table.param,
        slot=table.slot,
        expert=table.expert,
        count=table.count,
        file=table.file,
        offset=table.offset,
        extent=table.extent,
    )
    with pytest.raises(SinkError, match="column 'slot'"):
        WriteTable(**{**good, "slot": table.slot.astype(np.int32)})
    with pytest.raises(SinkError, match="param ids"):
        WriteTable(**{**good, "param": (table.param + 100).astype(np.int32)})
    with pytest.raises(SinkError, match="align"):
        WriteTable(**{**good, "params": table.params[:-1]})
    assert WriteTable.empty().nbytes == 0 and len(WriteTable.empty().reads) == 0


def test_geometries_must_agree_on_experts_and_files():
    a = PartGeometry.stacked("l.gate", "weight", 8, BF16, (2, 2), (4, 2), file=0, base=0, stride=8, extent=8)
    b = PartGeometry.stacked("l.gate", "scale", 7, BF16, (2, 2), (4, 2), file=0, base=64, stride=8, extent=8)
    with pytest.raises(FormatError, match="disagree"):
        LayerGeometry(0, (StackGeometry("gate", PLAIN, (a, b)),))
    with pytest.raises(FormatError, match="file ids"):
        StoreGeometry((LayerGeometry(0, (StackGeometry("gate", PLAIN, (a,)),)),), ())
    with pytest.raises(FormatError, match="distinct"):
        StackGeometry("gate", PLAIN, (a, a))


@pytest.mark.parametrize("seed", range(3))
def test_planning_from_counts_equals_planning_from_ids(seed):
    """Per-expert counts (a bincount on the accelerator) plan exactly what the
    ids they count plan, through refreshes that move pools along."""
    rng = np.random.default_rng(seed)
    geometry = store_geometry(layers=3, experts=16)
    by_ids = [ExpertPool(16, 4) for _ in range(3)]
    by_counts = [ExpertPool(16, 4) for _ in range(3)]
    for step in range(6):
        captured = [rng.integers(0, 16, size=(int(rng.integers(0, 40)), 2)) for _ in range(3)]
        counts = [np.bincount(ids.reshape(-1), minlength=16).astype(dtype) for ids, dtype in
                  zip(captured, (np.int64, np.int32, np.uint16), strict=True)]  # fmt: skip
        want = plan_refresh(geometry, by_ids, captured, step)
        got = plan_refresh(geometry, by_counts, counts, step, counts=True)
        stacked = plan_refresh(geometry, by_counts, np.stack(counts).astype(np.int64), step, counts=True)
        assert want is not None and got is not None and stacked is not None
        assert got.updates == want.updates == stacked.updates
        for field in ("param", "slot", "expert", "count", "offset", "extent"):
            np.testing.assert_array_equal(getattr(got.table, field), getattr(want.table, field))
        want.commit(by_ids)
        got.commit(by_counts)
        candidates = plan_candidates(geometry, by_counts, counts, counts=True)
        assert candidates.rows == plan_candidates(geometry, by_ids, captured).rows


@pytest.mark.parametrize(
    "captured, match",
    [
        ([np.zeros(8, np.int64), np.zeros(7, np.int64)], r"layer 2: .*shape \(8,\), got \(7,\)"),
        ([np.zeros((1, 8), np.int64), np.zeros(8, np.int64)], r"layer 1: .*shape \(8,\), got \(1, 8\)"),
        ([np.zeros(8, np.int64), np.full(8, 0.5)], "layer 2: .*integers, got dtype float64"),
        ([np.zeros(8, bool), np.zeros(8, np.int64)], "layer 1: .*integers, got dtype bool"),
        ([np.zeros(8, np.int64), np.array([0, 0, 0, -1, 0, 0, 0, 0])], "layer 2: .*negative"),
        ([np.zeros(8, np.int64), np.full(8, 2**63, np.uint64)], "layer 2: .*int64"),
        ([[0] * 8, [[0, 1], [2]]], "layer 2: .*integer array"),
    ],
)
def test_bad_counts_are_refused_naming_the_layer(captured, match):
    pools = [ExpertPool(8, 2), ExpertPool(8, 2)]
    with pytest.raises(CapturedIdsError, match=match):
        plan_refresh(store_geometry(), pools, captured, step=0, counts=True)
    assert all(pool.generation == 0 for pool in pools)

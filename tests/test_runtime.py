"""Planner, sinks, apply and SlabService end to end on synthetic stores."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from mmapstore import (
    ArraySink,
    CapturedIdsError,
    DictSink,
    ExecMode,
    ExpertPool,
    RefreshPolicy,
    SinkError,
    SlabService,
    StoreClosedError,
    apply,
    convert,
    geometries_of,
    open_store,
    plan_full_push,
    plan_refresh,
    plan_resident,
)
from mmapstore.testing import routing_trace, synth_checkpoint


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    paths = {}
    for family in ("mixtral", "gpt_oss", "llama4", "qwen3_moe"):
        paths[family] = synth_checkpoint(root / family, family, layers=3, experts=8, hidden=32, ffn=16).path
    paths["slab"] = convert(paths["mixtral"], root / "slab").path
    return paths


def resident_matches(service: SlabService) -> None:
    sink = service.sink
    assert service.buffers is sink.arrays
    for layer, pool in zip(service.store.layers, service.pools, strict=True):
        for slot, expert in enumerate(pool.resident_experts()):
            for proj, stack in layer.stacks:
                name = f"blk.{layer.layer_index}.ffn_{proj}_exps.weight"
                want = stack.native(int(expert))
                if name in sink.transpose:
                    want = want.T
                got = sink.arrays[name][slot]
                assert got.tobytes() == np.ascontiguousarray(want.astype(got.dtype)).tobytes(), (name, slot)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "llama4", "qwen3_moe", "slab"])
@pytest.mark.parametrize("dtype, orientation", [(None, "native"), (np.float32, "kn")])
def test_trace_replay_keeps_every_slot_bit_exact(stores, family, dtype, orientation):
    with open_store(stores[family]) as store:
        service = SlabService(store, 3, RefreshPolicy.every_n_decode_steps(2), dtype=dtype, orientation=orientation)
        resident_matches(service)
        trace = routing_trace(12, store.num_layers, 8, 2, tokens_per_step=3, seed=7, drift_every=4)
        refreshes = 0
        for captured in trace:
            before = {name: array.copy() for name, array in service.sink.arrays.items()}
            result = service.step(captured)
            assert result.refreshed == (result.step % 2 == 0)
            refreshes += result.refreshed
            rewritten = {(u.layer, u.slot) for u in result.updates}
            for name, array in service.sink.arrays.items():
                layer = int(name.split(".")[1])
                for slot in range(array.shape[0]):
                    if (layer, slot) not in rewritten:  # non-promoted slots were not rewritten
                        assert array[slot].tobytes() == before[name][slot].tobytes()
            resident_matches(service)
        assert refreshes == 6
        assert service.stats.promotions == sum(pool.stats.promotions for pool in service.pools)
        assert service.stats.promotions > 0


def test_plan_sources_share_memory_with_the_mapping_and_coalesce(stores):
    with open_store(stores["slab"]) as store:
        pools = [ExpertPool(8, 4) for _ in store.layers]
        # layer 0: experts 4..7 replace 0..3 -> one coalesced write per stack
        captured = [np.array([4, 5, 6, 7]), np.array([0, 1]), np.array([0, 5])]
        plan = plan_refresh(geometries_of(store), pools, captured, step=0)
        assert plan is not None
        table, source = plan.table, store.byte_source()
        layer0 = [row for row in range(table.rows) if table.param_name(row).startswith("blk.0.")]
        assert [(int(table.slot[row]), int(table.count[row])) for row in layer0] == [(0, 4)] * 3
        assert [u for u in plan.updates if u.layer == 1] == []
        views = [source.view(table, row) for row in range(table.rows)]
        for row, view in enumerate(views):
            mapped = source.mapping(int(table.file[row]))
            assert np.shares_memory(view, mapped.view(0, np.dtype(np.uint8), (mapped.nbytes,)))
            assert not view.flags.writeable
            assert mapped.offset_of(view) == int(table.offset[row])
        assert plan.nbytes == sum(view.nbytes for view in views)
        assert plan.read_nbytes == plan.nbytes  # contiguous [E, k, n] slabs: nothing extra read
        for pool in pools:
            assert pool.generation == 0  # planning changes nothing
        plan.commit(pools)
        np.testing.assert_array_equal(pools[0].resident_experts(), [4, 5, 6, 7])


def test_planning_allocates_nothing_weight_sized(tmp_path):
    path = synth_checkpoint(tmp_path / "big", "mixtral", layers=2, experts=16, hidden=256, ffn=512, sparse=True).path
    with open_store(path) as store:
        slab_nbytes = store.layers[0].gate.slab_nbytes
        pools = [ExpertPool(16, 8) for _ in store.layers]
        captured = [np.arange(8, 16), np.arange(8, 16)]
        geometry = geometries_of(store)
        tracemalloc.start()
        plan = plan_refresh(geometry, pools, captured, step=0)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert plan is not None and plan.nbytes >= 8 * 3 * 2 * slab_nbytes
        assert peak < slab_nbytes // 4


def test_no_refresh_when_not_due(stores):
    with open_store(stores["mixtral"]) as store:
        pools = [ExpertPool(8, 2, RefreshPolicy.every_n_decode_steps(3)) for _ in store.layers]
        geometry = geometries_of(store)
        assert plan_refresh(geometry, pools, [[1]] * 3, step=1) is None
        assert plan_refresh(geometry, pools, [[1]] * 3, step=1, mode=ExecMode.REFRESH) is not None
        full = [ExpertPool(8, 8) for _ in store.layers]
        assert plan_refresh(geometry, full, [[1]] * 3, step=0, mode=ExecMode.REFRESH) is None


@pytest.mark.parametrize(
    "captured, match",
    [
        ([[1], [2]], "for 2 layers"),
        ([[1], [2], [8]], "layer 2.*out of range"),
        ([[1], [2.0], [3]], "integers"),
        ([[1], [-1], [3]], "out of range"),
    ],
)
def test_bad_captured_input_writes_nothing(stores, captured, match):
    with open_store(stores["mixtral"]) as store:
        service = SlabService(store, 2)
        before = {name: array.copy() for name, array in service.sink.arrays.items()}
        with pytest.raises(CapturedIdsError, match=match):
            service.step(captured)
        for name, array in service.sink.arrays.items():
            assert array.tobytes() == before[name].tobytes()
        assert all(pool.generation == 0 for pool in service.pools)


def test_sink_with_wrong_shape_or_dtype_gets_nothing(stores):
    with open_store(stores["slab"]) as store:
        pools = [ExpertPool(8, 2) for _ in store.layers]
        plan = plan_refresh(geometries_of(store), pools, [[0, 5]] * 3, step=0)
        assert plan is not None and set(plan.table.slot.tolist()) == {1}
        good = ArraySink.for_store(store, 2)
        cases = {
            "missing": DictSink({}),
            "shape": DictSink({name: np.zeros((2, 3, 3), a.dtype) for name, a in good.arrays.items()}),
            "dtype": DictSink({name: np.zeros(a.shape, np.int8) for name, a in good.arrays.items()}),
            "slots": DictSink({name: np.zeros((1, *a.shape[1:]), a.dtype) for name, a in good.arrays.items()}),
        }
        for sink in cases.values():
            with pytest.raises(SinkError):
                apply(plan, sink, store.byte_source(), pools=pools)
            assert all(not array.any() for array in sink.arrays.values())
            assert all(pool.generation == 0 for pool in pools)  # nothing committed either


def test_plan_applied_to_a_closed_store(stores):
    store = open_store(stores["slab"])
    pools = [ExpertPool(8, 2) for _ in store.layers]
    plan = plan_refresh(geometries_of(store), pools, [[5], [5], [5]], step=0)
    sink = ArraySink.for_store(store, 2)
    source = store.byte_source()
    store.close()
    with pytest.raises(StoreClosedError):
        apply(plan, sink, source)
    with pytest.raises(StoreClosedError):
        geometries_of(store)
    with pytest.raises(StoreClosedError):
        store.byte_source()
    assert all(not array.any() for array in sink.arrays.values())


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "slab"])
def test_full_push_writes_every_stack(stores, family):
    with open_store(stores[family]) as store:
        service = SlabService(store, 2, load=False)
        sink = ArraySink.for_store(store, None, dtype=np.float32, orientation="kn")
        result = service.push_all(sink)
        assert result.nbytes == sum(stack.nbytes for layer in store.layers for _, stack in layer.stacks)
        for layer in store.layers:
            for proj, stack in layer.stacks:
                buffer = sink.arrays[f"blk.{layer.layer_index}.ffn_{proj}_exps.weight"]
                for expert in range(stack.num_experts):
                    np.testing.assert_array_equal(buffer[expert], stack.expert(expert).astype(np.float32))
        if family == "slab":
            assert plan_full_push(geometries_of(store)).table.rows == 3 * store.num_layers  # one row per stack


def test_resident_plan_and_custom_names(stores):
    with open_store(stores["slab"]) as store:
        pools = [ExpertPool(8, 3) for _ in store.layers]
        plan = plan_resident(geometries_of(store), pools, names="model.{layer}.{proj}")
        table = plan.table
        assert {table.param_name(row) for row in range(table.rows)} == {
            f"model.{l}.{p}" for l in range(3) for p in ("gate", "up", "down")
        }
        assert table.count.tolist() == [3] * table.rows and table.slot.tolist() == [0] * table.rows


def test_fused_interleaved_reads_cover_the_fused_slab(stores):
    with open_store(stores["gpt_oss"]) as store:
        pools = [ExpertPool(8, 2) for _ in store.layers]
        plan = plan_refresh(geometries_of(store), pools, [[6], [6], [6]], step=0)
        assert plan is not None
        # the strided gate/up views read the whole fused [hidden, 2*ffn] slab, once
        assert plan.read_nbytes < plan.nbytes * 1.2


@pytest.mark.parametrize("prefetch", ["willneed", "willneed+populate", "none"])
def test_every_prefetch_mode_copies_the_same_bytes(stores, prefetch):
    with open_store(stores["slab"]) as store:
        pools = [ExpertPool(8, 4) for _ in store.layers]
        plan = plan_refresh(geometries_of(store), pools, [np.arange(4, 8)] * 3, step=0)
        sink = ArraySink.for_store(store, 4)
        result = apply(plan, sink, store.byte_source(), prefetch=prefetch)
        assert result.nbytes == plan.nbytes and result.rows == plan.table.rows
        for layer in store.layers:
            np.testing.assert_array_equal(
                sink.arrays[f"blk.{layer.layer_index}.ffn_down_exps.weight"],
                np.stack([layer.down.native(e) for e in range(4, 8)]),
            )
        with pytest.raises(ValueError, match="prefetch"):
            apply(plan, sink, store.byte_source(), prefetch="random")

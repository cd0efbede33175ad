"""Replay: TIDE step for step against ExpertPool, determinism, bounds, geometry from headers."""

from __future__ import annotations

import numpy as np
import pytest

from mmapstore import CapturedIdsError, ExecMode, ExpertPool, RefreshPolicy, open_store
from mmapstore._policies import BeladyPolicy, LFUPolicy, LRUPolicy, StaticPolicy, TidePolicy, policy_from_name
from mmapstore._replay import CostModel, ReplayGeometry, prepare, replay
from mmapstore._trace import Phase, Trace
from mmapstore.testing import bursty_trace, recency_trace, synth_checkpoint, zipf_trace


def with_prefills(trace: Trace, every: int) -> Trace:
    phase = np.where(np.arange(trace.num_steps) % every == 0, Phase.PREFILL, Phase.DECODE)
    return Trace.build(trace.ids, trace.step_offsets, phase=phase)


@pytest.mark.parametrize("intervals", [(1, 1, 1), (3, 3, 3), (2, 5, 1)])
@pytest.mark.parametrize("capacities", [(5, 5, 5), (2, 7, 16)])
def test_tide_matches_expert_pool_step_for_step(intervals, capacities):
    trace = with_prefills(zipf_trace(60, 3, 16, 2, tokens=3, seed=1), every=17)
    geometry = ReplayGeometry.uniform(3, 16, 100)
    states: list[np.ndarray] = []
    report = replay(
        trace,
        geometry,
        TidePolicy(interval=intervals),
        capacities,
        clock="global",
        on_step=lambda step, resident: states.append(resident.copy()),
    )
    pools = [
        ExpertPool(16, c, RefreshPolicy.every_n_decode_steps(i)) for c, i in zip(capacities, intervals, strict=True)
    ]
    misses = np.zeros((trace.num_steps, 3), dtype=np.int64)
    for step in range(trace.num_steps):
        ids = trace.step_ids(step)
        for layer, pool in enumerate(pools):
            if pool.should_refresh(ExecMode.REUSE, step, bool(trace.phase[step] == Phase.PREFILL)):
                pool.refresh_from_indices(ids[:, layer])
            np.testing.assert_array_equal(states[step][layer], pool.resident_mask(), err_msg=f"step {step}")
            misses[step, layer] = int((~pool.resident_mask()[ids[:, layer]]).sum())
    np.testing.assert_array_equal(report.misses, misses)
    assert report.promotions.tolist() == [pool.stats.promotions for pool in pools]


def test_replay_is_deterministic_and_costs_add_up():
    trace = bursty_trace(80, 2, 32, 4, tokens=2, seed=3)
    geometry = ReplayGeometry((32, 40), (1000, 3000))
    cost = CostModel(1e6, 1e-3)
    first = replay(trace, geometry, LFUPolicy(interval=2), [8, 6], cost=cost)
    second = replay(prepare(trace, geometry), geometry, LFUPolicy(interval=2), [8, 6], cost=cost)
    assert first.to_json() == second.to_json()
    np.testing.assert_array_equal(first.misses, second.misses)
    assert first.io_seconds == pytest.approx((first.promotions * [1000, 3000]).sum() / 1e6)
    assert first.cpu_seconds == pytest.approx(first.misses.sum() * 1e-3)
    assert first.nbytes_moved == int(first.refresh_nbytes.sum()) == int((first.promotions * [1000, 3000]).sum())
    assert int(first.hits.sum() + first.misses.sum()) == int(first.routed.sum()) == 80 * 2 * 4 * 2


@pytest.mark.parametrize("interval", [1, 4])
@pytest.mark.parametrize("maker", [zipf_trace, recency_trace, bursty_trace])
def test_belady_bounds_every_policy(maker, interval):
    trace = maker(60, 2, 24, 3, tokens=2, seed=7)
    geometry = ReplayGeometry.uniform(2, 24, 10)
    bound = replay(trace, geometry, BeladyPolicy(interval=interval), 6).hit_rate
    for policy in (
        TidePolicy(interval=interval),
        LRUPolicy(interval=interval),
        LFUPolicy(interval=interval),
        StaticPolicy(interval=interval),
    ):
        assert replay(trace, geometry, policy, 6).hit_rate <= bound + 1e-12, policy


def test_full_capacity_never_moves_and_always_hits():
    trace = zipf_trace(20, 2, 8, 2, seed=0)
    report = replay(trace, ReplayGeometry.uniform(2, 8, 10), TidePolicy(), 8)
    assert report.hit_rate == 1.0 and report.refresh_steps.size == 0 and report.promotions.sum() == 0


def test_static_never_moves():
    report = replay(zipf_trace(30, 2, 16, 2, seed=0), ReplayGeometry.uniform(2, 16, 10), StaticPolicy(), 4)
    assert report.promotions.sum() == 0 and report.hit_rate < 1.0


def test_segment_clock_refreshes_at_every_block():
    blocks = np.repeat(np.arange(3), 5)
    trace = Trace.build(np.zeros((15, 1, 1), np.int16), np.arange(16), phase=np.full(15, Phase.DENOISE), block=blocks)
    report = replay(trace, ReplayGeometry.uniform(1, 4, 10), TidePolicy(interval=4), 2)
    assert report.refresh_steps.tolist() == [0, 4, 5, 9, 10, 14]
    glob = replay(trace, ReplayGeometry.uniform(1, 4, 10), TidePolicy(interval=4), 2, clock="global")
    assert glob.refresh_steps.tolist() == [0, 4, 8, 12]


def test_geometry_from_store_headers_and_ids_beyond_its_experts(tmp_path):
    path = synth_checkpoint(tmp_path / "ckpt", "mixtral", layers=2, experts=8, hidden=64, ffn=32, sparse=True).path
    with open_store(path) as store:
        geometry = ReplayGeometry.from_store(store)
        assert geometry.num_experts == (8, 8)
        assert geometry.expert_nbytes == tuple(layer.expert_nbytes for layer in store.layers)
        report = replay(zipf_trace(10, 2, 8, 2, seed=0), store, TidePolicy(), 4)
        assert report.num_steps == 10
    with pytest.raises(CapturedIdsError, match="routes to expert 1[0-5], the model has 8"):
        replay(zipf_trace(10, 2, 16, 2, seed=0), geometry, TidePolicy(), 4)


def test_bad_capacity_interval_and_names():
    trace = zipf_trace(5, 2, 8, 2, seed=0)
    geometry = ReplayGeometry.uniform(2, 8, 10)
    with pytest.raises(ValueError, match="capacity"):
        replay(trace, geometry, TidePolicy(), [1, 2, 3])
    with pytest.raises(ValueError, match="interval"):
        replay(trace, geometry, TidePolicy(interval=0), 2)
    with pytest.raises(ValueError, match="unknown policy"):
        policy_from_name("fifo")
    assert policy_from_name("lru", 3) == LRUPolicy(interval=3)

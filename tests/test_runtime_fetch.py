"""The chunk plan of fetch on miss, against a pool: every routed expert resident when its pairs run, each copied once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("torch", reason="mmapstore.transformers needs torch (the dev extra installs it)")
pytest.importorskip("transformers", reason="mmapstore.transformers needs transformers 5")

from mmapstore import ExpertPool
from mmapstore.transformers._fetch import plan_fetch


def run_plan(pool: ExpertPool, hits: np.ndarray) -> tuple[int, list[np.ndarray]]:
    """Apply the plan as the runtime does; return experts copied and each chunk's experts."""
    resident = pool.resident_mask()
    chunks = plan_fetch(hits, resident, pool.select_target(hits))
    recency = np.zeros(pool.num_experts, dtype=np.int64)
    copied, seen = 0, []
    for tick, chunk in enumerate(chunks, start=1):
        assert chunk.experts.size <= pool.capacity and (chunk.experts.size > 0 or len(chunks) == 1)
        heat = recency.copy()
        heat[chunk.protected] = heat.max() + 1
        result = pool.propose(chunk.experts, heat)
        pool.commit(result)
        copied += len(result.promoted)
        assert pool.resident_mask()[chunk.experts].all()
        recency[chunk.experts] = tick
        seen.append(chunk.experts)
    return copied, seen


@settings(max_examples=300, deadline=None)
@given(
    experts=st.integers(2, 24),
    data=st.data(),
)
def test_each_routed_expert_runs_once_and_each_missing_one_is_copied_once(experts, data):
    capacity = data.draw(st.integers(1, experts - 1))
    counts = data.draw(st.lists(st.integers(0, 5), min_size=experts, max_size=experts))
    start = data.draw(st.permutations(range(experts)))
    hits = np.asarray(counts, dtype=np.int64)
    pool = ExpertPool(experts, capacity)
    pool.apply_target(np.asarray(start[:capacity]))  # any full pool
    before = pool.resident_mask().copy()
    target = pool.select_target(hits)
    copied, chunks = run_plan(pool, hits)
    used = np.flatnonzero(hits > 0)
    ran = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    assert sorted(ran.tolist()) == used.tolist()  # every routed expert in exactly one chunk
    assert copied == int(np.count_nonzero(~before[used]))  # no expert copied twice
    kept = int(np.count_nonzero(before[target]))
    if used.size <= capacity or kept < capacity:  # room to end with the step's hottest resident
        assert set(target.tolist()) <= set(np.flatnonzero(pool.resident_mask()).tolist())


def test_one_chunk_when_the_routed_experts_fit():
    hits = np.array([0, 3, 0, 1, 0, 0], dtype=np.int64)
    resident = np.array([True, False, True, False, False, False])
    (chunk,) = plan_fetch(hits, resident, np.array([1, 3]))
    assert chunk.experts.tolist() == [1, 3] and chunk.protected.size == 0


def test_resident_experts_outside_the_target_run_first_and_the_target_last():
    # capacity 2, experts 0 and 1 resident; the step routes to 0..4, hottest 4 and 0
    hits = np.array([5, 1, 1, 1, 9], dtype=np.int64)
    resident = np.array([True, True, False, False, False])
    chunks = plan_fetch(hits, resident, np.array([4, 0]))
    assert [c.experts.tolist() for c in chunks] == [[1], [2], [3], [4, 0]]
    assert [c.protected.tolist() for c in chunks] == [[0], [0], [0], []]

"""TIDE reference semantics, and a state machine against a plain model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mmapstore import CapturedIdsError, StaleRefreshError
from mmapstore._pool import ExecMode, ExpertPool, RefreshPolicy, capacity_from_budget, count_hits


def test_hits_are_a_bincount_over_any_shape():
    ids = np.array([[1, 3], [3, 0], [3, 1]])
    np.testing.assert_array_equal(count_hits(ids, 5), [1, 2, 0, 3, 0])
    np.testing.assert_array_equal(count_hits([], 3), [0, 0, 0])


@pytest.mark.parametrize("ids", [[0, 5], [-1, 2], [1.0, 2.0], np.array([True, False]), [[0.5]]])
def test_bad_ids_raise_before_any_state_changes(ids):
    pool = ExpertPool(5, 2)
    before = pool.resident_experts()
    with pytest.raises(CapturedIdsError):
        pool.refresh_from_indices(ids)
    np.testing.assert_array_equal(pool.resident_experts(), before)
    assert pool.generation == 0 and pool.stats.refreshes == 0


def test_target_is_top_by_hits_ties_to_lower_id_zero_hits_never():
    pool = ExpertPool(8, 3)
    hits = np.array([0, 2, 5, 2, 0, 2, 0, 0])
    np.testing.assert_array_equal(pool.select_target(hits), [2, 1, 3])
    only_two = np.array([0, 0, 1, 0, 0, 0, 0, 4])
    np.testing.assert_array_equal(pool.select_target(only_two), [7, 2])


def test_initial_residency():
    pool = ExpertPool(6, 3)
    np.testing.assert_array_equal(pool.resident_experts(), [0, 1, 2])
    np.testing.assert_array_equal(pool.resident_mask(), [1, 1, 1, 0, 0, 0])
    assert pool.slot_of(2) == 2 and pool.slot_of(4) is None and pool.expert_in(1) == 1


def test_full_swap_promotes_and_demotes_all():
    pool = ExpertPool(8, 3)
    result = pool.refresh_from_indices([5, 6, 7, 5])
    assert set(result.promoted) == {5, 6, 7} and set(result.demoted) == {0, 1, 2}
    np.testing.assert_array_equal(pool.resident_experts(), [5, 6, 7])  # id order into slot order
    assert (pool.stats.promotions, pool.stats.demotions, pool.stats.refreshes) == (3, 3, 1)


def test_partial_overlap_moves_only_what_arrives_coldest_leave_first():
    pool = ExpertPool(8, 4)  # residents 0,1,2,3
    # target by hits: 1 (5 hits), 6 (4), 0 (1); 2 and 3 have no hits, 0 has one
    ids = [1] * 5 + [6] * 4 + [0]
    result = pool.refresh_from_indices(ids)
    assert result.promoted == (6,)
    assert result.demoted == (2,)  # 2 and 3 both cold: the lower id leaves first
    assert result.slots == (2,)
    assert int(pool.resident_mask().sum()) == 4  # never shrinks
    np.testing.assert_array_equal(pool.resident_experts(), [0, 1, 6, 3])
    # now 3 is the coldest resident outside the target; 0 has hits but is not in the top
    result = pool.refresh_from_indices([4] * 3 + [5] * 3 + [6] * 3 + [1] * 3 + [0])
    assert result.promoted == (4, 5) and set(result.demoted) == {0, 3}


def test_coldest_demotable_uses_hits():
    pool = ExpertPool(6, 3)  # 0,1,2 resident
    hits = np.array([3, 1, 2, 9, 0, 0])
    result = pool.propose([3], hits)
    assert result.demoted == (1,)  # 1 has the fewest hits among residents outside the target


def test_every_three_steps_prefill_and_refresh_mode():
    pool = ExpertPool(8, 2, RefreshPolicy.every_n_decode_steps(3))
    assert [pool.should_refresh(ExecMode.REUSE, step) for step in range(5)] == [True, False, False, True, False]
    assert pool.should_refresh(ExecMode.REUSE, 1, is_prefill_block=True)
    assert pool.should_refresh(ExecMode.REFRESH, 2)
    denoise = ExpertPool(8, 2, RefreshPolicy.every_n_denoise_steps(2))
    assert [denoise.on_forward_step() for _ in range(4)] == [True, False, True, False]
    assert denoise.step == 4
    assert ExpertPool(8, 2).should_refresh(ExecMode.REUSE, 7)  # every forward


def test_capacity_covering_every_expert_never_refreshes():
    pool = ExpertPool(4, 4)
    assert not pool.should_refresh(ExecMode.REFRESH, 0, True)
    assert not ExpertPool(4, 9).should_refresh(ExecMode.REFRESH, 0)
    assert ExpertPool(4, 9).capacity == 4


def test_per_layer_masks_differ_from_their_union():
    pools = [ExpertPool(8, 2) for _ in range(2)]
    pools[0].refresh_from_indices([4, 4, 5])
    pools[1].refresh_from_indices([6, 7, 7])
    masks = [pool.resident_mask() for pool in pools]
    union = masks[0] | masks[1]
    assert not np.array_equal(masks[0], union) and not np.array_equal(masks[1], union)
    assert union.sum() == 4


def test_stale_proposal_is_refused_and_stats_reset():
    pool = ExpertPool(6, 2)
    first = pool.propose([3])
    second = pool.propose([4])
    pool.commit(first)
    with pytest.raises(StaleRefreshError):
        pool.commit(second)
    pool.reset_stats()
    assert pool.stats.refreshes == 0


def test_bad_targets():
    pool = ExpertPool(6, 2)
    for target in ([1, 2, 3], [1, 1], [6], [0.5]):
        with pytest.raises(CapturedIdsError):
            pool.apply_target(target)


def test_capacity_from_budget():
    assert capacity_from_budget(10_000, 1_000, 100, 3, 64) == 30
    assert capacity_from_budget(10_000, 1_000, 100, 3, 8) == 8
    assert capacity_from_budget(500, 1_000, 100, 3, 8) == 0
    with pytest.raises(ValueError):
        capacity_from_budget(1, 0, 0, 1, 1)


class PoolMachine(RuleBasedStateMachine):
    """The pool against a dict model: expert -> slot."""

    @initialize(experts=st.integers(1, 12), data=st.data())
    def setup(self, experts, data):
        capacity = data.draw(st.integers(0, experts))
        self.pool = ExpertPool(experts, capacity)
        self.model = {expert: expert for expert in range(capacity)}
        self.capacity = capacity

    @rule(data=st.data())
    def refresh(self, data):
        experts = self.pool.num_experts
        ids = data.draw(st.lists(st.integers(0, experts - 1), max_size=20))
        before = dict(self.model)
        result = self.pool.refresh_from_indices(np.array(ids, dtype=np.int64))
        hits = np.bincount(np.array(ids, dtype=np.int64), minlength=experts)
        ranked = sorted((e for e in range(experts) if hits[e] > 0), key=lambda e: (-hits[e], e))
        assert list(result.target) == ranked[: self.capacity]
        assert set(result.target) <= set(self.pool.resident_experts().tolist())  # target ⊆ resident
        assert set(result.promoted) == set(result.target) - set(before)
        assert len(result.promoted) == len(result.demoted) == len(result.slots)  # promotions == slot writes
        for expert, slot in zip(result.demoted, result.slots, strict=True):
            assert before.pop(expert) == slot
        for expert, slot in zip(result.promoted, result.slots, strict=True):
            before[expert] = slot
        self.model = before

    @invariant()
    def matches_model(self):
        if not hasattr(self, "pool"):
            return
        resident = self.pool.resident_experts()
        assert len(resident) == self.capacity  # never exceeds, never shrinks
        assert len(set(resident.tolist())) == len(resident)  # slots unique
        assert {int(e): slot for slot, e in enumerate(resident)} == self.model
        assert int(self.pool.resident_mask().sum()) == self.capacity


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)

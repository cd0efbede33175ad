"""Residency pools: which experts sit in fast memory, per MoE layer (placement only).

TIDE semantics, made deterministic:

- hits are the ``bincount`` of the step's captured Top-K ids (all tokens);
  an id outside ``[0, num_experts)`` or a non-integer id is an error;
- the target is the top-``capacity`` experts by hits among those with hits,
  ties to the lower expert id;
- a refresh is paired: ``promote = target - resident``; of ``resident -
  target`` only ``len(promote)`` leave, coldest first (fewest hits, then
  lowest id), so the pool never shrinks;
- a promoted expert takes the slot of the expert it displaces (promoted
  experts in id order into freed slots in slot order, which keeps
  neighbours neighbours and lets writes coalesce).

Planning (:meth:`ExpertPool.propose`) never changes the pool; :meth:`commit`
does, and refuses a proposal made against an older state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._errors import CapturedIdsError, OptionError, StaleRefreshError

__all__ = [
    "ExecMode",
    "ExpertPool",
    "PoolStats",
    "RefreshKind",
    "RefreshPolicy",
    "RefreshResult",
    "capacity_from_budget",
    "count_hits",
]


class ExecMode(enum.Enum):
    """``REUSE`` refreshes by policy; ``REFRESH`` forces a refresh this forward."""

    REUSE = "reuse"
    REFRESH = "refresh"


class RefreshKind(enum.Enum):
    EVERY_FORWARD = "every_forward"
    EVERY_N_DECODE_STEPS = "every_n_decode_steps"
    EVERY_N_DENOISE_STEPS = "every_n_denoise_steps"


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    """When a pool refreshes. Decode and denoise policies both refresh when
    ``step % interval == 0``; they differ in what the caller counts as a step
    (generated tokens, or diffusion denoising steps)."""

    kind: RefreshKind = RefreshKind.EVERY_FORWARD
    interval: int = 1

    def __post_init__(self) -> None:
        if type(self.interval) is not int or self.interval < 1:
            raise OptionError(f"refresh interval must be a positive integer, got {self.interval!r}")

    @classmethod
    def every_forward(cls) -> RefreshPolicy:
        return cls(RefreshKind.EVERY_FORWARD, 1)

    @classmethod
    def every_n_decode_steps(cls, interval: int) -> RefreshPolicy:
        return cls(RefreshKind.EVERY_N_DECODE_STEPS, interval)

    @classmethod
    def every_n_denoise_steps(cls, interval: int) -> RefreshPolicy:
        return cls(RefreshKind.EVERY_N_DENOISE_STEPS, interval)

    def due(self, step: int) -> bool:
        return self.kind is RefreshKind.EVERY_FORWARD or step % self.interval == 0


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """One refresh of one pool: the target (hottest first), the experts that
    arrived and left, and ``slots[i]`` taken by ``promoted[i]`` (freed by
    ``demoted[i]``)."""

    target: tuple[int, ...]
    promoted: tuple[int, ...]
    demoted: tuple[int, ...]
    slots: tuple[int, ...]
    generation: int


@dataclass(slots=True)
class PoolStats:
    refreshes: int = 0
    promotions: int = 0
    demotions: int = 0


def count_hits(ids: object, num_experts: int) -> npt.NDArray[np.int64]:
    """``bincount`` of every captured id (any shape), validated.

    Raises
    ------
    CapturedIdsError
        Ids are not integers, are ragged (rows of different lengths), or lie
        outside ``[0, num_experts)``.
    """
    try:
        array = np.asarray(ids)
    except (ValueError, TypeError) as exc:  # ragged nested sequences, unconvertible objects
        raise CapturedIdsError(f"captured expert ids must be a rectangular array of integers: {exc}") from None
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        if array.size == 0 and array.dtype == np.float64:  # [] parses as float64
            return np.zeros(num_experts, dtype=np.int64)
        raise CapturedIdsError(f"captured expert ids must be integers, got dtype {array.dtype}")
    flat = array.reshape(-1)
    if flat.size:
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= num_experts:
            bad = low if low < 0 else high
            raise CapturedIdsError(f"captured expert id {bad} out of range [0, {num_experts})")
    return np.bincount(flat.astype(np.intp, copy=False), minlength=num_experts).astype(np.int64, copy=False)


def capacity_from_budget(
    free_nbytes: int,
    reserve_nbytes: int,
    expert_nbytes: int,
    num_layers: int,
    max_per_layer: int,
) -> int:
    """Experts per layer that fit in ``free_nbytes - reserve_nbytes`` spread
    evenly over ``num_layers``, at most ``max_per_layer``, at least 0."""
    if expert_nbytes <= 0 or num_layers <= 0:
        raise ValueError("expert_nbytes and num_layers must be positive")
    usable = max(0, free_nbytes - reserve_nbytes)
    return max(0, min(max_per_layer, usable // (expert_nbytes * num_layers)))


class ExpertPool:
    """Fixed-capacity residency of one MoE layer: which expert is in which slot.

    Initially experts ``0 .. capacity-1`` sit in slots ``0 .. capacity-1``.
    A capacity at or above ``num_experts`` means everything is resident
    (offload off): the pool never refreshes.
    """

    def __init__(self, num_experts: int, capacity: int, policy: RefreshPolicy | None = None) -> None:
        if type(num_experts) is not int or num_experts < 1:
            raise OptionError(f"num_experts must be a positive integer, got {num_experts!r}")
        if type(capacity) is not int or capacity < 0:
            raise OptionError(f"capacity must be a non-negative integer, got {capacity!r}")
        self.num_experts = num_experts
        self.capacity = min(capacity, num_experts)
        self.offload = capacity < num_experts
        self.policy = policy or RefreshPolicy.every_forward()
        self._slot_expert = np.arange(self.capacity, dtype=np.int64)
        self._expert_slot = np.full(num_experts, -1, dtype=np.int64)
        self._expert_slot[: self.capacity] = np.arange(self.capacity)
        self._generation = 0
        self._step = 0
        self.stats = PoolStats()

    # -- scheduling -----------------------------------------------------
    def should_refresh(self, mode: ExecMode, step: int, is_prefill_block: bool = False) -> bool:
        """Whether a forward at ``step`` refreshes this pool."""
        if not self.offload:
            return False
        if mode is ExecMode.REFRESH or is_prefill_block:
            return True
        return self.policy.due(step)

    def on_forward_step(
        self, mode: ExecMode = ExecMode.REUSE, step: int | None = None, is_prefill_block: bool = False
    ) -> bool:
        """Record a forward (at ``step``, or the internal counter) and say whether it refreshes."""
        current = self._step if step is None else step
        self._step = current + 1
        return self.should_refresh(mode, current, is_prefill_block)

    @property
    def step(self) -> int:
        """The step the next :meth:`on_forward_step` without ``step`` will use."""
        return self._step

    # -- placement ------------------------------------------------------
    def count_hits(self, ids: object) -> npt.NDArray[np.int64]:
        return count_hits(ids, self.num_experts)

    def select_target(self, hits: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Top-``capacity`` experts by hits among those with hits, hottest first,
        lower id first on ties."""
        hot = np.flatnonzero(hits > 0)
        order = np.argsort(-hits[hot], kind="stable")  # stable: ties keep id order
        return hot[order[: self.capacity]].astype(np.int64)

    def propose(self, target: object, hits: npt.NDArray[np.int64] | None = None) -> RefreshResult:
        """The paired promote/demote that brings ``target`` in, without changing the pool.

        ``hits`` rank the demotable experts (coldest leave first); without
        them the lowest ids leave first.

        Raises
        ------
        CapturedIdsError
            ``target`` is not integers, too long, out of range or repeats an
            expert; ``hits`` is not one integer count per expert.
        """
        try:
            wanted = np.asarray(target)
        except (ValueError, TypeError):
            raise CapturedIdsError("target experts must be a flat array of integers") from None
        if wanted.size and (wanted.dtype == np.bool_ or not np.issubdtype(wanted.dtype, np.integer)):
            raise CapturedIdsError(f"target experts must be integers, got dtype {wanted.dtype}")
        wanted = wanted.reshape(-1).astype(np.int64)
        if wanted.size > self.capacity:
            raise CapturedIdsError(f"target has {wanted.size} experts, capacity is {self.capacity}")
        if wanted.size and (wanted.min() < 0 or wanted.max() >= self.num_experts):
            raise CapturedIdsError(f"target expert out of range [0, {self.num_experts}): {wanted.tolist()}")
        if np.unique(wanted).size != wanted.size:
            raise CapturedIdsError(f"target experts repeat: {wanted.tolist()}")
        resident = self._expert_slot >= 0
        in_target = np.zeros(self.num_experts, dtype=bool)
        in_target[wanted] = True
        promoted = np.sort(wanted[~resident[wanted]])
        demotable = np.flatnonzero(resident & ~in_target)
        heat = np.zeros(self.num_experts, dtype=np.int64) if hits is None else self._check_hits(hits)
        coldest_first = demotable[np.lexsort((demotable, heat[demotable]))]
        leaving = coldest_first[: promoted.size]
        # Promoted experts, in id order, take the freed slots in slot order.
        slots_of_leaving = self._expert_slot[leaving]
        slot_order = np.argsort(slots_of_leaving)
        demoted = leaving[slot_order]
        slots = slots_of_leaving[slot_order]
        return RefreshResult(
            tuple(int(e) for e in wanted),
            tuple(int(e) for e in promoted),
            tuple(int(e) for e in demoted),
            tuple(int(s) for s in slots),
            self._generation,
        )

    def _check_hits(self, hits: object) -> npt.NDArray[np.int64]:
        try:
            array = np.asarray(hits)
        except (ValueError, TypeError):
            raise CapturedIdsError("hits must be an array of integer counts, one per expert") from None
        if array.shape != (self.num_experts,) or not np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
            raise CapturedIdsError(
                f"hits must be {self.num_experts} integer counts (one per expert), got shape "
                f"{list(array.shape)} of {array.dtype}"
            )
        return array.astype(np.int64, copy=False)

    def commit(self, result: RefreshResult) -> None:
        """Make a proposal the pool's state; it must be based on the current state."""
        if result.generation != self._generation:
            raise StaleRefreshError(
                f"refresh proposed at pool generation {result.generation}, pool is at {self._generation}"
            )
        for expert in result.demoted:
            self._expert_slot[expert] = -1
        for expert, slot in zip(result.promoted, result.slots, strict=True):
            self._expert_slot[expert] = slot
            self._slot_expert[slot] = expert
        self._generation += 1
        self.stats.refreshes += 1
        self.stats.promotions += len(result.promoted)
        self.stats.demotions += len(result.demoted)

    def refresh_from_indices(self, ids: object) -> RefreshResult:
        """Count hits, select the target and commit the paired update."""
        hits = self.count_hits(ids)
        result = self.propose(self.select_target(hits), hits)
        self.commit(result)
        return result

    def apply_target(self, target: object, hits: npt.NDArray[np.int64] | None = None) -> RefreshResult:
        """Commit the paired update towards an explicit target."""
        result = self.propose(target, hits)
        self.commit(result)
        return result

    # -- queries --------------------------------------------------------
    def resident_mask(self) -> npt.NDArray[np.bool_]:
        return self._expert_slot >= 0

    def resident_experts(self) -> npt.NDArray[np.int64]:
        """Expert in each slot (``slot -> expert``), a copy."""
        result: npt.NDArray[np.int64] = self._slot_expert.copy()
        return result

    def slot_of(self, expert: int) -> int | None:
        if not 0 <= expert < self.num_experts:
            raise CapturedIdsError(f"expert {expert} out of range [0, {self.num_experts})")
        slot = int(self._expert_slot[expert])
        return None if slot < 0 else slot

    def expert_in(self, slot: int) -> int:
        if not 0 <= slot < self.capacity:
            raise IndexError(f"slot {slot} out of range [0, {self.capacity})")
        return int(self._slot_expert[slot])

    @property
    def generation(self) -> int:
        return self._generation

    def reset_stats(self) -> None:
        self.stats = PoolStats()

    def __repr__(self) -> str:
        return f"ExpertPool(experts={self.num_experts}, capacity={self.capacity}, policy={self.policy})"

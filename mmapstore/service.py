"""``SlabService``: the object a runtime holds, one call per forward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy.typing as npt

from .apply import ApplyResult, apply
from .planner import DEFAULT_PARAM_NAME, PoolUpdate, plan_full_push, plan_refresh, plan_resident
from .pool import ExecMode, ExpertPool, RefreshPolicy
from .sinks import ArraySink, Sink
from .store import ExpertStore

__all__ = ["ServiceStats", "SlabService", "StepResult"]


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one forward did: whether it refreshed, which slots changed, bytes and time."""

    step: int
    refreshed: bool
    updates: tuple[PoolUpdate, ...] = ()
    nbytes: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class ServiceStats:
    steps: int = 0
    refreshes: int = 0
    promotions: int = 0
    demotions: int = 0
    nbytes: int = 0
    seconds: float = 0.0


class SlabService:
    """Residency pools over a store, refreshed from captured router ids into a sink.

    Parameters
    ----------
    store
        An open :class:`ExpertStore`.
    capacity
        Resident experts per MoE layer (one int, or one per layer).
    policy
        When pools refresh (every forward by default).
    sink
        Where slabs land; by default an :class:`ArraySink` of ``[capacity, ...]``
        buffers in the store's dtype and native orientation (``dtype`` and
        ``orientation`` choose otherwise).
    load
        Fill every slot with its initial expert now (experts ``0..capacity-1``).
    """

    def __init__(
        self,
        store: ExpertStore,
        capacity: int | Sequence[int],
        policy: RefreshPolicy | None = None,
        sink: Sink | None = None,
        *,
        dtype: npt.DTypeLike | None = None,
        orientation: str = "native",
        names: str = DEFAULT_PARAM_NAME,
        load: bool = True,
    ) -> None:
        self.store = store
        self.names = names
        capacities = [capacity] * store.num_layers if isinstance(capacity, int) else list(capacity)
        if len(capacities) != store.num_layers:
            raise ValueError(f"{len(capacities)} capacities for {store.num_layers} MoE layers")
        self.pools = [
            ExpertPool(layer.num_experts, slots, policy) for layer, slots in zip(store.layers, capacities)
        ]
        self.sink: Sink = sink if sink is not None else ArraySink.for_store(
            store, [pool.capacity for pool in self.pools], dtype=dtype, orientation=orientation, names=names
        )
        self._stats = ServiceStats()
        self._step = 0
        if load:
            apply(plan_resident(store, self.pools, names=names), self.sink)

    def step(
        self,
        captured: Sequence[object],
        step: int | None = None,
        is_prefill_block: bool = False,
        mode: ExecMode = ExecMode.REUSE,
    ) -> StepResult:
        """One forward: plan a refresh if due, copy the promoted slabs, commit the pools.

        ``captured[i]`` holds the Top-K ids of ``store.layers[i]`` for this
        step.  Bad input raises before anything is written.
        """
        current = self._step if step is None else step
        self._step = current + 1
        self._stats.steps += 1
        plan = plan_refresh(self.store, self.pools, captured, current, is_prefill_block, mode, names=self.names)
        if plan is None:
            return StepResult(current, False)
        applied = apply(plan, self.sink)
        plan.commit(self.pools)
        self._stats.refreshes += 1
        self._stats.promotions += len(plan.updates)
        self._stats.demotions += len(plan.updates)
        self._stats.nbytes += applied.nbytes
        self._stats.seconds += applied.seconds
        return StepResult(current, True, plan.updates, applied.nbytes, applied.seconds)

    def push_all(self, sink: Sink) -> ApplyResult:
        """Write every stack into full ``[E, ...]`` parameters of ``sink``."""
        return apply(plan_full_push(self.store, names=self.names), sink)

    @property
    def stats(self) -> ServiceStats:
        return self._stats

    def reset_stats(self) -> None:
        self._stats = ServiceStats()
        for pool in self.pools:
            pool.reset_stats()

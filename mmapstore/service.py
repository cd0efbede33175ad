"""``SlabService``: the object a runtime holds, one call per forward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy.typing as npt

from .apply import ApplyResult, apply
from .errors import CapturedIdsError, SinkError
from .planner import (
    DEFAULT_PARAM_NAME,
    PoolUpdate,
    geometries_of,
    plan_candidates,
    plan_full_push,
    plan_refresh,
    plan_resident,
)
from .pool import ExecMode, ExpertPool, RefreshPolicy
from .sinks import ArraySink, Sink, SinkOrientation
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
        orientation: SinkOrientation = "native",
        names: str = DEFAULT_PARAM_NAME,
        load: bool = True,
    ) -> None:
        self.store = store
        self.names = names
        self.geometry = geometries_of(store)
        self.source = store.byte_source()  # long-lived: page tables filled once serve every refresh
        capacities = [capacity] * store.num_layers if isinstance(capacity, int) else list(capacity)
        if len(capacities) != store.num_layers:
            raise CapturedIdsError(f"{len(capacities)} capacities for {store.num_layers} MoE layers")
        self.pools = [
            ExpertPool(layer.num_experts, slots, policy) for layer, slots in zip(store.layers, capacities, strict=True)
        ]
        self.sink: Sink = (
            sink
            if sink is not None
            else ArraySink.for_geometries(
                self.geometry, [pool.capacity for pool in self.pools], dtype=dtype, orientation=orientation, names=names
            )
        )
        # A sink that allocates its own pools (a device sink) learns their shapes here.
        bind = getattr(self.sink, "bind", None)
        if callable(bind):
            bind(self.geometry, [pool.capacity for pool in self.pools], names=names)
        self._stats = ServiceStats()
        self._step = 0
        if load:
            apply(plan_resident(self.geometry, self.pools, names=names), self.sink, self.source)

    @property
    def buffers(self) -> Mapping[str, object]:
        """The sink's destinations (``param -> [capacity, ...]`` arrays for the
        default :class:`ArraySink`).

        Raises
        ------
        SinkError
            The sink does not expose its destinations.
        """
        buffers = getattr(self.sink, "buffers", None)
        if buffers is None:
            raise SinkError(f"{type(self.sink).__name__} does not expose its buffers")
        return buffers  # type: ignore[no-any-return]

    def step(
        self,
        captured: Sequence[object],
        step: int | None = None,
        is_prefill_block: bool = False,
        mode: ExecMode = ExecMode.REUSE,
    ) -> StepResult:
        """One forward: plan a refresh if due, copy the promoted slabs, wait
        for the sink, then commit the pools.

        ``captured[i]`` holds the Top-K ids of ``store.layers[i]`` for this
        step.  Bad input raises before anything is written.
        """
        current = self._step if step is None else step
        self._step = current + 1
        self._stats.steps += 1
        plan = plan_refresh(self.geometry, self.pools, captured, current, is_prefill_block, mode, names=self.names)
        if plan is None:
            self._register_ahead(captured)
            return StepResult(current, False)
        applied = apply(plan, self.sink, self.source, pools=self.pools)  # commits after the sink's wait()
        self._register_ahead(captured)
        self._stats.refreshes += 1
        self._stats.promotions += len(plan.updates)
        self._stats.demotions += len(plan.updates)
        self._stats.nbytes += applied.nbytes
        self._stats.seconds += applied.seconds
        return StepResult(current, True, plan.updates, applied.nbytes, applied.seconds)

    def _register_ahead(self, captured: Sequence[object]) -> None:
        # Experts routed to now but not resident are the likely promotions of
        # the next refresh: a sink that registers windows (TorchSink on CUDA)
        # gets their ranges while the model computes, instead of paying
        # registration inside that refresh.
        if getattr(self.sink, "registers_ahead", False):
            table = plan_candidates(self.geometry, self.pools, captured, names=self.names)
            self.sink.register_ahead(table, self.source)  # type: ignore[attr-defined]

    def push_all(self, sink: Sink) -> ApplyResult:
        """Write every stack into full ``[E, ...]`` parameters of ``sink``."""
        return apply(plan_full_push(self.geometry, names=self.names), sink, self.source)

    @property
    def stats(self) -> ServiceStats:
        return self._stats

    def reset_stats(self) -> None:
        self._stats = ServiceStats()
        for pool in self.pools:
            pool.reset_stats()

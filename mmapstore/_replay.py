"""Replay a routing trace through residency pools, from geometry alone.

No weight byte is read: replay needs each MoE layer's expert count and the
bytes one expert occupies (:class:`ReplayGeometry`), so a 700 GB model is
simulated from its headers.  Per step: the policy observes the step's hits;
where a refresh is due the pool moves towards the policy's target (TIDE's
paired update); then the step's routed (token, expert) pairs are counted
against the pool: a *hit* is computed where the weights sit, a *miss* on the
CPU from the mapped views (TIDE's non-refresh path).  Modelled time follows
TIDE's Eq. 7: bytes moved over the promotion bandwidth, plus misses times the
CPU cost of one routed token on one expert.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ._errors import CapturedIdsError
from ._policies import Policy, TidePolicy
from ._trace import Phase, Trace

__all__ = ["CostModel", "ReplayGeometry", "ReplayInput", "SimulationReport", "prepare", "refresh_schedule", "replay"]

Clock = Literal["global", "segment"]


@dataclass(frozen=True, slots=True)
class ReplayGeometry:
    """Per MoE layer: experts and the bytes of one expert (all its parts)."""

    num_experts: tuple[int, ...]
    expert_nbytes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.num_experts) != len(self.expert_nbytes):
            raise ValueError(f"{len(self.num_experts)} expert counts for {len(self.expert_nbytes)} expert sizes")
        if any(type(e) is not int or e < 1 for e in self.num_experts):
            raise ValueError(f"expert counts must be positive integers, got {self.num_experts}")
        if any(type(n) is not int or n < 0 for n in self.expert_nbytes):
            raise ValueError(f"expert sizes must be non-negative integers, got {self.expert_nbytes}")

    @classmethod
    def from_store(cls, store: Any) -> ReplayGeometry:
        """From an open store's layers (``num_experts`` and ``expert_nbytes``
        only: headers, never weights)."""
        return cls(
            tuple(int(layer.num_experts) for layer in store.layers),
            tuple(int(layer.expert_nbytes) for layer in store.layers),
        )

    @classmethod
    def uniform(cls, layers: int, experts: int, expert_nbytes: int) -> ReplayGeometry:
        return cls((experts,) * layers, (expert_nbytes,) * layers)

    @property
    def num_layers(self) -> int:
        return len(self.num_experts)


@dataclass(frozen=True, slots=True)
class CostModel:
    """Machine constants of Eq. 7: promotion bandwidth (bytes/s) and CPU
    seconds per routed token per expert; ``source`` says where they came from."""

    io_bytes_per_s: float
    cpu_seconds_per_pair: float
    source: str = "given"

    def __post_init__(self) -> None:
        if not (self.io_bytes_per_s > 0 and self.cpu_seconds_per_pair >= 0):
            raise ValueError(f"cost model needs io_bytes_per_s > 0 and cpu_seconds_per_pair >= 0, got {self}")


@dataclass(frozen=True, slots=True)
class ReplayInput:
    """A trace reduced to what replay needs: ``counts[step, layer, expert]``
    hits, segment starts and prefill marks per step."""

    counts: npt.NDArray[np.int32]
    segment_start: npt.NDArray[np.bool_]
    prefill: npt.NDArray[np.bool_]
    geometry: ReplayGeometry
    source: str

    @property
    def num_steps(self) -> int:
        return int(self.counts.shape[0])

    def routed(self) -> npt.NDArray[np.int64]:
        """Routed (token, expert) pairs per step and layer, ``[steps, layers]``."""
        return np.asarray(self.counts.sum(axis=2, dtype=np.int64))


def prepare(trace: Trace, geometry: ReplayGeometry) -> ReplayInput:
    """Count a trace's hits against ``geometry``.

    Raises
    ------
    CapturedIdsError
        The trace's layer count differs from the geometry's, or an id lies
        beyond its layer's experts (before any replay starts).
    """
    counts = trace.hit_counts(geometry.num_experts)
    return ReplayInput(counts, trace.segment_starts(), trace.phase == Phase.PREFILL, geometry, trace.source)


def refresh_schedule(
    data: ReplayInput, intervals: Sequence[int], capacities: Sequence[int], clock: Clock = "segment"
) -> npt.NDArray[np.bool_]:
    """``[steps, layers]``: where :meth:`ExpertPool.should_refresh` says yes.

    The step number handed to the policy is the trace step (``global``) or
    the step within its segment, a denoising block (``segment``, so every
    block starts with a refresh).  Prefill steps always refresh; layers whose
    capacity holds every expert never do.
    """
    steps = data.num_steps
    if clock == "global":
        clock_steps = np.arange(steps)
    else:
        starts = np.flatnonzero(data.segment_start)
        segment = np.searchsorted(starts, np.arange(steps), side="right") - 1
        clock_steps = np.arange(steps) - starts[np.maximum(segment, 0)] if starts.size else np.arange(steps)
    interval = np.asarray(intervals, dtype=np.int64)
    due = (clock_steps[:, None] % interval[None, :] == 0) | data.prefill[:, None]
    offload = np.asarray(capacities) < np.asarray(data.geometry.num_experts)
    return np.asarray(due & offload[None, :])


@dataclass(frozen=True, slots=True)
class SimulationReport:
    """What a replay did and what it would cost.

    Per layer: ``routed`` and ``hits`` (token, expert) pairs, ``promotions``
    and the modelled seconds.  Per step: ``misses[step, layer]``.  Per
    refresh (a step where any layer refreshed): its step, experts promoted
    and bytes moved.
    """

    policy: str
    capacity: tuple[int, ...]
    interval: tuple[int, ...]
    num_steps: int
    routed: npt.NDArray[np.int64]
    hits: npt.NDArray[np.int64]
    promotions: npt.NDArray[np.int64]
    misses: npt.NDArray[np.int64]
    refresh_steps: npt.NDArray[np.int64]
    refresh_promotions: npt.NDArray[np.int64]
    refresh_nbytes: npt.NDArray[np.int64]
    layer_io_seconds: npt.NDArray[np.float64]
    layer_cpu_seconds: npt.NDArray[np.float64]
    cost: CostModel | None

    @property
    def hit_rate(self) -> float:
        total = int(self.routed.sum())
        return float(self.hits.sum()) / total if total else 1.0

    @property
    def layer_hit_rate(self) -> npt.NDArray[np.float64]:
        return np.where(self.routed > 0, self.hits / np.maximum(self.routed, 1), 1.0)

    @property
    def nbytes_moved(self) -> int:
        return int(self.refresh_nbytes.sum())

    @property
    def io_seconds(self) -> float:
        return float(self.layer_io_seconds.sum())

    @property
    def cpu_seconds(self) -> float:
        return float(self.layer_cpu_seconds.sum())

    @property
    def seconds(self) -> float:
        """Modelled time: promotion I/O plus CPU work for misses (Eq. 7)."""
        return self.io_seconds + self.cpu_seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "capacity": list(self.capacity),
            "interval": list(self.interval),
            "steps": self.num_steps,
            "hit_rate": self.hit_rate,
            "layer_hit_rate": self.layer_hit_rate.tolist(),
            "routed": int(self.routed.sum()),
            "misses": int(self.misses.sum()),
            "promotions": int(self.promotions.sum()),
            "refreshes": int(self.refresh_steps.size),
            "nbytes_moved": self.nbytes_moved,
            "io_seconds": self.io_seconds,
            "cpu_seconds": self.cpu_seconds,
            "seconds": self.seconds,
        }


def replay(
    trace: Trace | ReplayInput,
    geometry: ReplayGeometry | Any,
    policy: Policy | None = None,
    capacity: int | Sequence[int] = 8,
    *,
    cost: CostModel | None = None,
    clock: Clock = "segment",
    on_step: Callable[[int, npt.NDArray[np.bool_]], None] | None = None,
) -> SimulationReport:
    """Replay ``trace`` through one pool per layer of ``capacity`` experts.

    Parameters
    ----------
    trace
        A :class:`Trace`, or a :class:`ReplayInput` from :func:`prepare`
        (count once, replay many times).
    geometry
        A :class:`ReplayGeometry` or an open store (its headers are used).
    policy
        Default :class:`TidePolicy` refreshing every step.
    capacity
        Resident experts per layer, one for all or one per layer; initially
        experts ``0 .. capacity-1`` are resident (and cost nothing).
    cost
        Machine constants; without them modelled seconds are 0.
    clock
        See :func:`refresh_schedule`.
    on_step
        Called after each step's refresh with the step and the
        ``[layers, experts]`` resident mask (read-only; for tests and plots).

    Raises
    ------
    CapturedIdsError
        The trace does not fit the geometry (checked before replay).
    ValueError
        A capacity or interval is not valid for the number of layers.
    """
    shape = geometry if isinstance(geometry, ReplayGeometry) else ReplayGeometry.from_store(geometry)
    data = trace if isinstance(trace, ReplayInput) else prepare(trace, shape)
    if data.geometry != shape:
        raise CapturedIdsError(f"{data.source}: prepared for {data.geometry}, replayed against {shape}")
    policy = policy or TidePolicy()
    layers = shape.num_layers
    capacities = np.asarray([capacity] * layers if isinstance(capacity, int) else list(capacity), dtype=np.int64)
    if capacities.shape != (layers,) or np.any(capacities < 0):
        raise ValueError(f"capacity must be a non-negative int or {layers} of them, got {capacity!r}")
    experts = np.asarray(shape.num_experts, dtype=np.int64)
    capacities = np.minimum(capacities, experts)
    intervals = policy.intervals(layers)
    due = refresh_schedule(data, intervals, capacities.tolist(), clock)
    counts = data.counts
    width = counts.shape[2]
    slots = np.arange(width)
    resident = slots[None, :] < capacities[:, None]
    state = policy.start(counts, due)
    misses = np.zeros((data.num_steps, layers), dtype=np.int64)
    promotions = np.zeros(layers, dtype=np.int64)
    refresh_steps: list[int] = []
    refresh_promoted: list[npt.NDArray[np.int64]] = []
    for step in range(data.num_steps):
        hits = counts[step]
        state.observe(step, hits)
        rows = due[step]
        if rows.any():
            promoted = _refresh(resident, state.scores(step, resident), rows, capacities, experts)
            promotions += promoted
            refresh_steps.append(step)
            refresh_promoted.append(promoted)
        misses[step] = np.where(resident, 0, hits).sum(axis=1)
        if on_step is not None:
            view = resident.view()
            view.flags.writeable = False
            on_step(step, view)
    routed = data.routed().sum(axis=0)
    nbytes = np.asarray(shape.expert_nbytes, dtype=np.int64)
    per_refresh = np.asarray(refresh_promoted, dtype=np.int64).reshape(-1, layers)
    total_misses = misses.sum(axis=0)
    if cost is None:
        io_seconds = cpu_seconds = np.zeros(layers)
    else:
        io_seconds = promotions * nbytes / cost.io_bytes_per_s
        cpu_seconds = total_misses * cost.cpu_seconds_per_pair
    return SimulationReport(
        policy=policy.describe(),
        capacity=tuple(int(c) for c in capacities),
        interval=intervals,
        num_steps=data.num_steps,
        routed=routed,
        hits=routed - total_misses,
        promotions=promotions,
        misses=misses,
        refresh_steps=np.asarray(refresh_steps, dtype=np.int64),
        refresh_promotions=per_refresh.sum(axis=1),
        refresh_nbytes=per_refresh @ nbytes,
        layer_io_seconds=np.asarray(io_seconds, dtype=np.float64),
        layer_cpu_seconds=np.asarray(cpu_seconds, dtype=np.float64),
        cost=cost,
    )


def _refresh(
    resident: npt.NDArray[np.bool_],
    scores: npt.NDArray[np.float64],
    rows: npt.NDArray[np.bool_],
    capacities: npt.NDArray[np.int64],
    experts: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """TIDE's paired update on the ``rows`` layers, in place; experts promoted per layer.

    Target: the top-``capacity`` experts by score among those scoring > 0,
    ties to the lower id.  Promote ``target - resident``; as many of
    ``resident - target`` leave, lowest score first, then lowest id.
    """
    width = resident.shape[1]
    positions = np.arange(width)
    valid = positions[None, :] < experts[rows][:, None]
    score = np.where(valid, scores[rows], 0.0)
    order = np.argsort(-score, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(positions, order.shape), axis=1)
    target = (rank < capacities[rows][:, None]) & (score > 0)
    current = resident[rows]
    promote = target & ~current
    count = promote.sum(axis=1)
    demotable = current & ~target
    coldest_first = np.argsort(np.where(demotable, score, np.inf), axis=1, kind="stable")
    leaving = np.zeros_like(current)
    np.put_along_axis(leaving, coldest_first, positions[None, :] < count[:, None], axis=1)
    resident[rows] = (current & ~leaving) | promote
    promoted = np.zeros(resident.shape[0], dtype=np.int64)
    promoted[rows] = count
    return promoted

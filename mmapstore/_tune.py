"""Choose the policy, refresh interval τ and capacity from a trace and a machine.

TIDE's Eq. 7 models the offload cost of refreshing every τ steps as

    Lat_IO(τ)  ≈ nbytes · c · R(τ) · D(τ) / C_IO,  D(τ) = 1 - (1 - d)^τ
    Lat_CPU(τ) ≈ C_CPU · Σ_steps routed · m(lag)

with ``c`` resident experts, ``R(τ)`` refreshes (``T/τ`` in the paper; here
counted on the real schedule, which also refreshes at every block), ``d``
the drift of the top-``c`` target between adjacent steps (``D(τ)``, the
part of the target replaced after τ steps, is measured rather than
compounded from ``d``: see :class:`TraceFit`), ``m(j)`` the miss
fraction ``j`` steps after a refresh (so ``f(τ)``, the mean of ``m`` over an
interval, is the paper's hit-rate decay), ``C_IO`` the promotion bandwidth
and ``C_CPU`` the CPU seconds per routed token per expert.

:func:`fit` measures ``d`` and ``m`` per layer and capacity from the trace;
:func:`recommend` solves Eq. 7 for τ per layer and capacity, spends a byte
budget across layers greedily, and replays its own recommendation
(:func:`mmapstore.replay`) so the model's error is reported, not
hidden.  :func:`compare_policies` replays every policy over τ and says which
wins.  :func:`measure_cpu_cost` and :func:`probe_io_bandwidth` measure the
machine (small and fast).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._policies import BeladyPolicy, LFUPolicy, LRUPolicy, Policy, StaticPolicy, TidePolicy
from ._replay import Clock, CostModel, ReplayInput, SimulationReport, refresh_schedule, replay

__all__ = [
    "PolicyComparison",
    "Recommendation",
    "TraceFit",
    "compare_policies",
    "fit",
    "measure_cpu_cost",
    "model_seconds",
    "probe_io_bandwidth",
    "recommend",
]


@dataclass(frozen=True, slots=True)
class TraceFit:
    """Eq. 7's trace terms, per capacity in ``capacities`` and per layer.

    ``drift[c, l]`` is ``d``; ``turnover[c, l, τ - 1]`` the fraction of the
    top-``c`` target replaced after ``τ`` steps, measured (``1 - (1 - d)^τ``
    if drift were independent from step to step; it is not: experts at the
    margin of the top-``c`` flicker in and out, so compounding ``d``
    overstates moves several times at τ = 4 on block-diffusion traces);
    ``miss[c, l, j]`` the fraction of routed pairs missing ``j`` steps after
    a refresh to the top-``c`` target (``j`` from 0 to ``max_interval - 1``).
    Lags never cross a segment start.
    """

    capacities: tuple[int, ...]
    max_interval: int
    drift: npt.NDArray[np.float64]
    turnover: npt.NDArray[np.float64]
    miss: npt.NDArray[np.float64]

    def f(self, capacity_index: int, interval: int) -> npt.NDArray[np.float64]:
        """The paper's ``f(τ)`` per layer: mean miss fraction over ``interval`` steps."""
        return np.asarray(self.miss[capacity_index, :, :interval].mean(axis=-1))


def _targets(counts: npt.NDArray[np.int32], capacity: int) -> npt.NDArray[np.bool_]:
    """``[steps, layers, experts]``: the top-``capacity`` experts with hits (TIDE's target)."""
    order = np.argsort(-counts, axis=2, kind="stable")
    rank = np.empty_like(order)
    positions = np.arange(counts.shape[2])
    np.put_along_axis(rank, order, np.broadcast_to(positions, order.shape), axis=2)
    return np.asarray((rank < capacity) & (counts > 0))


def fit(data: ReplayInput, capacities: Sequence[int], max_interval: int = 31) -> TraceFit:
    """Measure ``d``, the turnover at each lag and ``m(j)`` for each capacity.

    Lags never cross a segment start (a new block or a prefill): the
    schedule refreshes there anyway.  Lags the trace is too short to show
    repeat the longest one it shows.
    """
    counts = data.counts
    steps, layers, _ = counts.shape
    segment = np.cumsum(data.segment_start)
    routed = counts.sum(axis=2, dtype=np.int64)
    turnover = np.zeros((len(capacities), layers, max_interval))
    miss = np.zeros((len(capacities), layers, max_interval))
    for index, capacity in enumerate(capacities):
        target = _targets(counts, capacity)
        size = np.maximum(target.sum(axis=2), 1)
        for lag in range(max_interval + 1):
            same = segment[lag:] == segment[: max(0, steps - lag)]
            if not same.any():
                if lag < max_interval:
                    miss[index, :, lag] = miss[index, :, lag - 1] if lag else 0.0
                if lag:
                    turnover[index, :, lag - 1] = turnover[index, :, lag - 2] if lag > 1 else 0.0
                continue
            earlier = target[: steps - lag][same]
            if lag < max_interval:
                hit = (counts[lag:][same] * earlier).sum(axis=(0, 2), dtype=np.int64)
                total = routed[lag:][same].sum(axis=0)
                miss[index, :, lag] = np.where(total > 0, 1.0 - hit / np.maximum(total, 1), 0.0)
            if lag:
                arrived = (target[lag:][same] & ~earlier).sum(axis=2)
                turnover[index, :, lag - 1] = (arrived / size[: steps - lag][same]).mean(axis=0)
    return TraceFit(tuple(int(c) for c in capacities), max_interval, turnover[:, :, 0].copy(), turnover, miss)


def model_seconds(
    data: ReplayInput,
    trace_fit: TraceFit,
    cost: CostModel,
    capacity_index: int,
    interval: int,
    clock: Clock = "segment",
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Eq. 7 per layer for one capacity and τ: ``(io_seconds, cpu_seconds)``."""
    capacity = trace_fit.capacities[capacity_index]
    layers = data.counts.shape[1]
    due = refresh_schedule(data, [interval] * layers, [capacity] * layers, clock)
    refreshes = due.sum(axis=0)
    moved = capacity * trace_fit.turnover[capacity_index, :, min(interval, trace_fit.max_interval) - 1]
    nbytes = np.asarray(data.geometry.expert_nbytes, dtype=np.float64)
    io = refreshes * moved * nbytes / cost.io_bytes_per_s
    # lag of each step since its layer's last refresh (steps before any refresh: lag from step 0)
    steps = data.num_steps
    last = np.maximum.accumulate(np.where(due, np.arange(steps)[:, None], 0), axis=0)
    lag = np.minimum(np.arange(steps)[:, None] - last, trace_fit.max_interval - 1)
    offload = ~(np.asarray(data.geometry.num_experts) <= capacity)
    miss = np.take_along_axis(trace_fit.miss[capacity_index].T, lag, axis=0) * offload[None, :]
    cpu = (data.routed() * miss).sum(axis=0) * cost.cpu_seconds_per_pair
    return np.asarray(io, dtype=np.float64), np.asarray(cpu, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class Recommendation:
    """Capacity and τ per layer (and the best single τ for all layers), the
    model's predicted seconds and the replay of the recommendation."""

    capacity: tuple[int, ...]
    interval: tuple[int, ...]
    common_interval: int
    predicted_seconds: float
    budget_nbytes: int | None
    replayed: SimulationReport
    replayed_common: SimulationReport
    trace_fit: TraceFit

    @property
    def model_error(self) -> float:
        """(predicted - replayed) / replayed, for the per-layer recommendation."""
        actual = self.replayed.seconds
        return (self.predicted_seconds - actual) / actual if actual else 0.0


def recommend(
    data: ReplayInput,
    cost: CostModel,
    *,
    capacities: Sequence[int] | None = None,
    budget_nbytes: int | None = None,
    max_interval: int = 31,
    clock: Clock = "segment",
) -> Recommendation:
    """Solve Eq. 7 for τ and capacity per layer under ``budget_nbytes``
    (resident expert bytes over all layers; ``None``: no limit), then replay.

    Capacities are chosen from ``capacities`` (default: powers of two and
    their halves up to the largest expert count).  The budget is spent
    greedily: start every layer at the smallest capacity, then repeatedly
    take the step up with the largest modelled saving per byte that fits.
    """
    geometry = data.geometry
    layers = geometry.num_layers
    grid = sorted(set(capacities or _capacity_grid(max(geometry.num_experts))))
    trace_fit = fit(data, grid, max_interval)
    # best[c, l]: lowest modelled seconds at capacity grid[c]; tau[c, l]: where.
    table = np.empty((len(grid), max_interval, layers))
    for index in range(len(grid)):
        for interval in range(1, max_interval + 1):
            io, cpu = model_seconds(data, trace_fit, cost, index, interval, clock)
            table[index, interval - 1] = io + cpu
    best_tau = table.argmin(axis=1) + 1
    best = table.min(axis=1)
    nbytes = np.asarray(geometry.expert_nbytes, dtype=np.int64)
    choice = _spend_budget(best, np.asarray(grid), nbytes, budget_nbytes)
    capacity = tuple(int(grid[c]) for c in choice)
    intervals = tuple(int(best_tau[c, layer]) for layer, c in enumerate(choice))
    per_tau = sum(table[c, :, layer] for layer, c in enumerate(choice))
    common = int(np.argmin(per_tau)) + 1
    predicted = float(sum(best[c, layer] for layer, c in enumerate(choice)))
    replayed = replay(data, geometry, TidePolicy(interval=intervals), capacity, cost=cost, clock=clock)
    replayed_common = replay(data, geometry, TidePolicy(interval=common), capacity, cost=cost, clock=clock)
    return Recommendation(capacity, intervals, common, predicted, budget_nbytes, replayed, replayed_common, trace_fit)


def _capacity_grid(experts: int) -> list[int]:
    grid = {experts}
    value = 1
    while value < experts:
        grid.update({value, value + value // 2})
        value *= 2
    return sorted(c for c in grid if 0 < c <= experts)


def _spend_budget(
    best: npt.NDArray[np.float64], grid: npt.NDArray[np.int64], nbytes: npt.NDArray[np.int64], budget: int | None
) -> list[int]:
    """Grid index per layer: the cheapest modelled time within ``budget`` bytes (greedy)."""
    layers = best.shape[1]
    if budget is None:
        return [int(np.argmin(best[:, layer])) for layer in range(layers)]
    choice = [0] * layers
    spent = int(sum(grid[0] * nbytes))
    while True:
        options = []
        for layer in range(layers):
            for higher in range(choice[layer] + 1, len(grid)):
                extra = int((grid[higher] - grid[choice[layer]]) * nbytes[layer])
                saving = best[choice[layer], layer] - best[higher, layer]
                if spent + extra <= budget and saving > 0:
                    options.append((saving / max(extra, 1), layer, higher, extra))
        if not options:
            return choice
        _, layer, higher, extra = max(options)
        choice[layer] = higher
        spent += extra


@dataclass(frozen=True, slots=True)
class PolicyComparison:
    """Every policy replayed over τ at one capacity: ``reports[name][i]`` is
    τ = ``intervals[i]``; ``best[name]`` the τ with the least modelled time.
    ``belady`` (the clairvoyant bound) and ``static`` (no moves) are
    references, never the winner."""

    capacity: tuple[int, ...]
    intervals: tuple[int, ...]
    reports: dict[str, tuple[SimulationReport, ...]]

    def best(self, name: str) -> SimulationReport:
        return min(self.reports[name], key=lambda report: report.seconds)

    @property
    def winner(self) -> str:
        """The online policy (not the clairvoyant bound) with the least modelled time."""
        online = [name for name in self.reports if name not in ("belady", "static")]
        return min(online, key=lambda name: (self.best(name).seconds, -self.best(name).hit_rate))

    def verdict(self) -> str:
        """One sentence: which policy wins and what that says about the trace."""
        winner = self.winner
        best = {name: self.best(name) for name in self.reports}
        ranked = sorted(
            (name for name in best if name not in ("belady", "static")), key=lambda name: best[name].seconds
        )
        runner = ranked[1] if len(ranked) > 1 else winner
        gain = best[runner].seconds / best[winner].seconds if best[winner].seconds else 1.0
        reason = {
            "lru": "recency wins: experts used lately are used again soon (temporal locality)",
            "lfu": "frequency wins: a stable skew that long-run counts capture better than the last steps",
            "tide": "the refresh step's hits predict the next steps best (TIDE's interval refresh)",
        }[winner]
        static = best["static"].seconds if "static" in best else None
        flat = ""
        if static is not None and best[winner].seconds >= static:
            return (
                f"No policy beats leaving the pool alone (static: {static:.4g} s; best policy "
                f"{best[winner].policy}: {best[winner].seconds:.4g} s): routing is near-uniform, or moving an "
                f"expert costs more than its misses on this machine.{bound_text(best)}"
            )
        if static is not None and best[winner].seconds >= 0.9 * static:
            flat = f" Little to gain: never moving an expert costs {static:.4g} s."
        bound = bound_text(best)
        return (
            f"{winner.upper()} wins ({best[winner].policy}: {best[winner].hit_rate:.1%} hits, "
            f"{best[winner].seconds:.4g} s modelled; {gain:.2f}x faster than {best[runner].policy}): {reason}."
            f"{bound}{flat}"
        )


def bound_text(best: dict[str, SimulationReport]) -> str:
    return f" Clairvoyant bound: {best['belady'].hit_rate:.1%} hits." if "belady" in best else ""


LFU_HALF_LIVES = (8.0, 32.0, 128.0)


def compare_policies(
    data: ReplayInput,
    capacity: int | Sequence[int],
    cost: CostModel,
    *,
    intervals: Sequence[int] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 31),
    policies: Sequence[Policy] = (TidePolicy(), LRUPolicy(), LFUPolicy(), BeladyPolicy(), StaticPolicy()),
    clock: Clock = "segment",
) -> PolicyComparison:
    """Replay each policy at each τ in ``intervals``; LFU at each of
    :data:`LFU_HALF_LIVES` too, keeping the fastest half-life per τ."""
    reports: dict[str, tuple[SimulationReport, ...]] = {}
    for policy in policies:
        variants = (
            [dataclasses.replace(policy, half_life=h) for h in LFU_HALF_LIVES]
            if isinstance(policy, LFUPolicy)
            else [policy]
        )
        reports[policy.name] = tuple(
            min(
                (
                    replay(
                        data,
                        data.geometry,
                        dataclasses.replace(variant, interval=interval),
                        capacity,
                        cost=cost,
                        clock=clock,
                    )
                    for variant in variants
                ),
                key=lambda report: report.seconds,
            )
            for interval in intervals
        )
    layers = data.geometry.num_layers
    capacities = (capacity,) * layers if isinstance(capacity, int) else tuple(capacity)
    return PolicyComparison(capacities, tuple(intervals), reports)


# -- machine constants -----------------------------------------------------------
def measure_cpu_cost(
    expert_nbytes: int, *, param_nbytes: int = 2, tokens: int = 1, repeat: int = 5, max_params: int = 1 << 22
) -> float:
    """CPU seconds for one routed token through one expert, measured.

    The expert is taken as three float32 matrices (gate, up ``[h, f]``,
    down ``[f, h]``, ``h = 2f``) holding ``expert_nbytes / param_nbytes``
    parameters; above ``max_params`` the measurement runs on a smaller
    expert and scales linearly (a one-token matmul streams its weights).
    ``tokens`` rows share the weights, as tokens routed to the same expert
    in one step do; the result is per token.
    """
    params = max(3, expert_nbytes // max(1, param_nbytes))
    measured = min(params, max_params)
    ffn = max(1, int(np.sqrt(measured / 6)))
    hidden = 2 * ffn
    rng = np.random.default_rng(0)
    gate = rng.standard_normal((hidden, ffn), dtype=np.float32)
    up = rng.standard_normal((hidden, ffn), dtype=np.float32)
    down = rng.standard_normal((ffn, hidden), dtype=np.float32)
    x = rng.standard_normal((tokens, hidden), dtype=np.float32)
    best = float("inf")
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        h = x @ gate
        h = h * (0.5 + 0.5 * np.tanh(0.5 * h)) * (x @ up)  # SiLU(x @ gate) * (x @ up)
        _ = h @ down
        best = min(best, time.perf_counter() - start)
    return best / tokens * (params / (3 * hidden * ffn))


def probe_io_bandwidth(directory: str | None = None, nbytes: int = 64 << 20) -> float:
    """Bytes/s of copying a just-written, evicted file out of a memory map.

    The file is written, fsynced and dropped from the page cache with
    ``posix_fadvise(DONTNEED)`` (not possible on tmpfs, where the probe
    measures a warm copy), then mapped and copied once.
    """
    from ._mapping import MappedFile

    with tempfile.TemporaryDirectory(prefix="mmapstore-probe-", dir=directory) as scratch:
        path = os.path.join(scratch, "probe.bin")
        with open(path, "wb") as handle:
            handle.write(np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tobytes())
            handle.flush()
            os.fsync(handle.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(handle.fileno(), 0, nbytes, os.POSIX_FADV_DONTNEED)
        buffer = np.empty(nbytes, dtype=np.uint8)
        with MappedFile(path) as mapped:
            view = mapped.view(0, np.dtype(np.uint8), (nbytes,))
            start = time.perf_counter()
            np.copyto(buffer, view)
            seconds = time.perf_counter() - start
            del view
    return nbytes / seconds if seconds > 0 else float(nbytes)

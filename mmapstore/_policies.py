"""Residency policies for replay, behind one interface.

A policy is a frozen value (its parameters); :meth:`Policy.start` makes the
mutable state one replay uses.  Every policy refreshes on the same schedule
(every ``interval`` steps, and at every prefill block, as
:class:`~mmapstore._pool.ExpertPool` does) and moves experts the same way
(TIDE's paired promote/demote, coldest first); they differ only in how they
*score* experts at a refresh:

- :class:`TidePolicy` (the default): routed-token hits of the refresh step,
  exactly :meth:`ExpertPool.select_target` and its demotion order.
- :class:`LRUPolicy`: most recently used first (ties: more hits at that step).
- :class:`LFUPolicy`: hits with exponential decay (``half_life`` steps).
- :class:`StaticPolicy`: never moves (experts ``0 .. capacity-1`` stay): the
  baseline that tells whether any policy helps at all.
- :class:`BeladyPolicy`: clairvoyant; hits between this refresh and the next
  (read from the future of the trace).  For a given schedule and capacity no
  policy can hit more, so it is the bound others are measured against.

Experts scoring 0 are never targeted, so a refresh never brings in an
expert that nobody asked for.  Scores are ``[layers, experts]`` arrays: one
call serves every layer.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "BeladyPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "Policy",
    "PolicyState",
    "StaticPolicy",
    "TidePolicy",
    "policy_from_name",
]

Counts = npt.NDArray[np.int32]
Scores = npt.NDArray[np.float64]


class PolicyState(abc.ABC):
    """What a policy remembers during one replay."""

    @abc.abstractmethod
    def observe(self, step: int, hits: Counts) -> None:
        """Record step ``step``'s ``[layers, experts]`` hits (called every step,
        before any refresh of that step)."""

    @abc.abstractmethod
    def scores(self, step: int, resident: npt.NDArray[np.bool_]) -> Scores:
        """``[layers, experts]`` scores at a refresh of step ``step``: higher is
        hotter; 0 means never target."""


@dataclass(frozen=True, slots=True)
class Policy(abc.ABC):
    """Base of every policy: the refresh interval, one per layer or shared."""

    interval: int | tuple[int, ...] = 1

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short name for tables (``tide``, ``lru``, ``lfu``, ``belady``)."""

    @abc.abstractmethod
    def start(self, counts: Counts, due: npt.NDArray[np.bool_]) -> PolicyState:
        """Fresh state for a replay of ``counts`` ``[steps, layers, experts]``
        refreshing where ``due`` ``[steps, layers]`` is true."""

    def intervals(self, layers: int) -> tuple[int, ...]:
        """The interval of each of ``layers`` layers.

        Raises
        ------
        ValueError
            An interval is not a positive integer, or the count is not ``layers``.
        """
        values = (self.interval,) * layers if isinstance(self.interval, int) else tuple(self.interval)
        if len(values) != layers or any(type(v) is not int or v < 1 for v in values):
            raise ValueError(f"{self.name}: interval must be a positive int or {layers} of them, got {self.interval!r}")
        return values

    def describe(self) -> str:
        interval = self.interval if isinstance(self.interval, int) else "per-layer"
        return f"{self.name}(tau={interval})"


@dataclass(frozen=True, slots=True)
class TidePolicy(Policy):
    """TIDE: rank by the refresh step's routed-token hits."""

    @property
    def name(self) -> str:
        return "tide"

    def start(self, counts: Counts, due: npt.NDArray[np.bool_]) -> PolicyState:
        return _TideState()


class _TideState(PolicyState):
    def __init__(self) -> None:
        self._hits: Counts | None = None

    def observe(self, step: int, hits: Counts) -> None:
        self._hits = hits

    def scores(self, step: int, resident: npt.NDArray[np.bool_]) -> Scores:
        assert self._hits is not None
        return self._hits.astype(np.float64)


@dataclass(frozen=True, slots=True)
class LRUPolicy(Policy):
    """Least recently used leaves first."""

    @property
    def name(self) -> str:
        return "lru"

    def start(self, counts: Counts, due: npt.NDArray[np.bool_]) -> PolicyState:
        return _RecencyState(counts.shape[1:])


class _RecencyState(PolicyState):
    def __init__(self, shape: tuple[int, ...]) -> None:
        self._last = np.full(shape, -1.0)
        self._hits_then = np.zeros(shape)

    def observe(self, step: int, hits: Counts) -> None:
        used = hits > 0
        self._last[used] = step
        self._hits_then[used] = hits[used]

    def scores(self, step: int, resident: npt.NDArray[np.bool_]) -> Scores:
        # Later use first; among experts last used at the same step, more hits first.
        fraction = self._hits_then / (self._hits_then + 1.0)
        return np.where(self._last >= 0, self._last + 1.0 + fraction, 0.0)


@dataclass(frozen=True, slots=True)
class LFUPolicy(Policy):
    """Most frequently used stays, hits decaying by half every ``half_life`` steps."""

    half_life: float = 16.0

    @property
    def name(self) -> str:
        return "lfu"

    def start(self, counts: Counts, due: npt.NDArray[np.bool_]) -> PolicyState:
        if not self.half_life > 0:
            raise ValueError(f"lfu: half_life must be positive, got {self.half_life!r}")
        return _DecayState(counts.shape[1:], 0.5 ** (1.0 / self.half_life))

    def describe(self) -> str:
        return f"{Policy.describe(self)[:-1]}, half_life={self.half_life:g})"


class _DecayState(PolicyState):
    def __init__(self, shape: tuple[int, ...], keep: float) -> None:
        self._heat = np.zeros(shape)
        self._keep = keep

    def observe(self, step: int, hits: Counts) -> None:
        self._heat *= self._keep
        self._heat += hits

    def scores(self, step: int, resident: npt.NDArray[np.bool_]) -> Scores:
        return np.array(self._heat, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class StaticPolicy(Policy):
    """No refresh ever moves an expert: the initial residents stay."""

    @property
    def name(self) -> str:
        return "static"

    def start(self, counts: Counts, due: npt.NDArray[np.bool_]) -> PolicyState:
        return _NothingState(counts.shape[1:])


class _NothingState(PolicyState):
    def __init__(self, shape: tuple[int, ...]) -> None:
        self._zeros = np.zeros(shape)

    def observe(self, step: int, hits: Counts) -> None:
        pass

    def scores(self, step: int, resident: npt.NDArray[np.bool_]) -> Scores:
        return self._zeros


@dataclass(frozen=True, slots=True)
class BeladyPolicy(Policy):
    """Clairvoyant bound: the experts with the most hits until the next refresh."""

    @property
    def name(self) -> str:
        return "belady"

    def start(self, counts: Counts, due: npt.NDArray[np.bool_]) -> PolicyState:
        return _FutureState(counts, due)


class _FutureState(PolicyState):
    def __init__(self, counts: Counts, due: npt.NDArray[np.bool_]) -> None:
        self._counts = counts
        steps, layers = due.shape
        # next_due[t, l]: the first refresh of layer l after step t (or steps).
        self._next_due = np.full((steps + 1, layers), steps, dtype=np.int64)
        for step in range(steps - 1, -1, -1):
            self._next_due[step] = (
                np.where(due[step + 1], step + 1, self._next_due[step + 1]) if step + 1 < steps else steps
            )

    def observe(self, step: int, hits: Counts) -> None:
        pass

    def scores(self, step: int, resident: npt.NDArray[np.bool_]) -> Scores:
        ends = self._next_due[step]
        window = np.empty(self._counts.shape[1:], dtype=np.float64)
        for end in np.unique(ends):
            layers = ends == end
            window[layers] = self._counts[step:end, layers].sum(axis=0)
        # On equal future hits keep what is resident: same hits, fewer moves.
        return np.where(window > 0, window + 0.5 * resident, 0.0)


_POLICIES: dict[str, type[Policy]] = {
    "tide": TidePolicy,
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "belady": BeladyPolicy,
    "static": StaticPolicy,
}


def policy_from_name(name: str, interval: int | tuple[int, ...] = 1) -> Policy:
    """``tide``, ``lru``, ``lfu``, ``belady`` or ``static`` with ``interval``.

    Raises
    ------
    ValueError
        Unknown name.
    """
    try:
        kind = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(_POLICIES)}") from None
    return kind(interval=interval)

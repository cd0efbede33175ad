"""TIDE proposals for many pools at once, as matrix operations.

:meth:`ExpertPool.propose` decides one layer at a time; a step of a
DeepSeek-V3-sized model asks 58 layers the same question, and doing it per
layer costs 25-90 µs of numpy calls each.  Here every pool of one shape
(experts, capacity) is a row of a matrix and each rule of
:mod:`mmapstore._pool` is one array operation over all rows:

- target: the top-``capacity`` experts by (hits descending, id ascending),
  among those with hits, found with one ``partition`` of a unique key;
- promoted: the target minus the resident experts, in id order;
- leaving: as many of the resident experts outside the target, coldest first
  (fewest hits, then lowest id), found with one ``sort`` of a unique key;
- promoted experts take the freed slots in slot order.

The result is, expert for expert and slot for slot, what
``pool.propose(pool.select_target(hits), hits)`` returns (tests check it
against the pool on random states).  Nothing changes until :meth:`commit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._errors import CapturedIdsError
from ._pool import ExpertPool, RefreshResult, count_hits

__all__ = ["Proposals", "count_hits_rows", "counts_rows", "hits_rows", "propose_rows"]

Int64Array = npt.NDArray[np.int64]

# Below this many ids in all, concatenating them and counting once is cheaper
# than one counting call per layer; above it the copy costs more.
_CONCAT_MAX_IDS = 1 << 16


def count_hits_rows(captured: Sequence[object], num_experts: int, labels: Sequence[int]) -> Int64Array:
    """``[len(captured), num_experts]`` hit counts, one row per layer.

    Raises
    ------
    CapturedIdsError
        Some layer's ids are not integers, are ragged or lie outside
        ``[0, num_experts)``; the message names the layer (``labels``).
    """
    flats: list[npt.NDArray[np.integer]] = []
    total = 0
    for position, ids in enumerate(captured):
        array = ids if isinstance(ids, np.ndarray) else None
        if array is None or array.dtype.kind not in "iu":
            array = _checked_array(ids, num_experts, labels[position])
        flat = array.reshape(-1)
        flats.append(flat)
        total += flat.size
    hits = np.zeros((len(flats), num_experts), dtype=np.int64)
    if total <= _CONCAT_MAX_IDS:
        sizes = np.fromiter((flat.size for flat in flats), dtype=np.int64, count=len(flats))
        if total:
            ids64 = np.concatenate(flats, dtype=np.int64, casting="unsafe")
            if int(ids64.view(np.uint64).max()) >= num_experts:  # negative ids wrap to huge
                _raise_first_bad(captured, num_experts, labels)
            rows = np.repeat(np.arange(len(flats), dtype=np.int64) * num_experts, sizes)
            hits.reshape(-1)[:] = np.bincount(ids64 + rows, minlength=hits.size)
        return hits
    for position, flat in enumerate(flats):
        if flat.size:
            unsigned = flat.view(_UNSIGNED[flat.dtype.itemsize]) if flat.dtype.kind == "i" else flat
            if int(unsigned.max()) >= num_experts:
                _raise_first_bad(captured, num_experts, labels)
            np.add.at(hits[position], flat.astype(np.intp, copy=False), 1)
    return hits


def counts_rows(captured: Sequence[object], num_experts: int, labels: Sequence[int]) -> Int64Array:
    """``[len(captured), num_experts]`` hit counts from per-layer routed-token
    counts (``captured[i][e]``: tokens routed to expert ``e`` in layer ``i``,
    what a ``bincount`` on the accelerator gives), validated.

    Raises
    ------
    CapturedIdsError
        Some layer's counts are not integers, not one per expert, or negative;
        the message names the layer (``labels``).
    """
    hits = np.empty((len(captured), num_experts), dtype=np.int64)
    for position, counts in enumerate(captured):
        label = labels[position]
        try:
            array = np.asarray(counts)
        except (TypeError, ValueError, RuntimeError) as exc:  # ragged, or a tensor on an accelerator
            raise CapturedIdsError(f"MoE layer {label}: expert counts must be an integer array: {exc}") from None
        if array.dtype.kind not in "iu":
            raise CapturedIdsError(f"MoE layer {label}: expert counts must be integers, got dtype {array.dtype}")
        if array.shape != (num_experts,):
            raise CapturedIdsError(
                f"MoE layer {label}: expert counts must have shape ({num_experts},), got {array.shape}"
            )
        if (
            array.dtype.kind == "u"
            and array.dtype.itemsize == 8
            and array.size
            and int(array.max()) > np.iinfo(np.int64).max
        ):
            raise CapturedIdsError(f"MoE layer {label}: an expert count does not fit in int64")
        hits[position] = array
    if hits.size and int(hits.min()) < 0:
        position = int(np.flatnonzero(hits.min(axis=1) < 0)[0])
        raise CapturedIdsError(f"MoE layer {labels[position]}: expert counts must not be negative")
    return hits


def hits_rows(
    captured: Sequence[object], num_experts: int, labels: Sequence[int], *, counts: bool = False
) -> Int64Array:
    """:func:`counts_rows` when ``counts``, else :func:`count_hits_rows`."""
    return (counts_rows if counts else count_hits_rows)(captured, num_experts, labels)


_UNSIGNED: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.uint16),
    4: np.dtype(np.uint32),
    8: np.dtype(np.uint64),
}


def _checked_array(ids: object, num_experts: int, label: int) -> npt.NDArray[np.integer]:
    """Ids that are not already an integer array: validated by the pool's own
    rule (so messages match), empty lists allowed."""
    try:
        count_hits(ids, num_experts)
    except CapturedIdsError as exc:
        raise CapturedIdsError(f"MoE layer {label}: {exc}") from None
    except (TypeError, ValueError) as exc:  # ragged nested sequences, unconvertible objects
        raise CapturedIdsError(
            f"MoE layer {label}: captured expert ids must be a rectangular integer array: {exc}"
        ) from None
    array = np.asarray(ids)
    return array.astype(np.int64) if array.dtype.kind not in "iu" else array


def _raise_first_bad(captured: Sequence[object], num_experts: int, labels: Sequence[int]) -> None:
    for ids, label in zip(captured, labels, strict=True):
        try:
            count_hits(ids, num_experts)
        except CapturedIdsError as exc:
            raise CapturedIdsError(f"MoE layer {label}: {exc}") from None
    raise CapturedIdsError(f"captured expert ids out of range [0, {num_experts})")  # pragma: no cover


@dataclass(frozen=True, slots=True, eq=False)
class Proposals:
    """The paired updates of a group of pools, flat, one CSR block per pool.

    ``positions[i]`` is the pool's index in the caller's sequence; its
    updates are ``slots/promoted/demoted[bounds[i]:bounds[i+1]]`` (slot
    order, promoted ascending).  ``hits`` and ``targets`` (bool) are rows per
    pool, kept to build :class:`RefreshResult` values only on commit.
    """

    positions: Int64Array
    generations: Int64Array
    bounds: Int64Array
    slots: Int64Array
    promoted: Int64Array
    demoted: Int64Array
    hits: Int64Array
    targets: npt.NDArray[np.bool_]

    @property
    def row_of_update(self) -> Int64Array:
        """For each update, the index (into ``positions``) of its pool."""
        return np.repeat(np.arange(len(self.positions), dtype=np.int64), np.diff(self.bounds))

    def result(self, index: int) -> RefreshResult:
        """The :class:`RefreshResult` of the ``index``-th pool of the group."""
        low, high = int(self.bounds[index]), int(self.bounds[index + 1])
        hits = self.hits[index]
        target = np.flatnonzero(self.targets[index])
        target = target[np.argsort(-hits[target], kind="stable")]  # hottest first, lower id on ties
        return RefreshResult(
            tuple(target.tolist()),
            tuple(self.promoted[low:high].tolist()),
            tuple(self.demoted[low:high].tolist()),
            tuple(self.slots[low:high].tolist()),
            int(self.generations[index]),
        )


def propose_rows(pools: Sequence[ExpertPool], positions: Sequence[int], hits: Int64Array) -> Proposals:
    """The proposals of ``pools`` (same ``num_experts`` and ``capacity``, all
    offloading) for ``hits`` (one row per pool); changes nothing."""
    count = len(pools)
    experts = pools[0].num_experts
    capacity = pools[0].capacity
    ids = np.arange(experts, dtype=np.int64)
    slot_expert = np.stack([pool.resident_experts() for pool in pools]) if count else np.zeros((0, capacity), np.int64)
    generations = np.fromiter((pool.generation for pool in pools), dtype=np.int64, count=count)
    resident = np.zeros((count, experts), dtype=bool)
    np.put_along_axis(resident, slot_expert, True, axis=1)
    if capacity == 0:
        targets = np.zeros((count, experts), dtype=bool)
    else:
        # unique per row: more hits first, then the lower id
        hot_key = hits * experts + (experts - 1 - ids)
        threshold = np.partition(hot_key, experts - capacity, axis=1)[:, experts - capacity, None]
        targets = (hot_key >= threshold) & (hits > 0)
    promote = targets & ~resident
    leaving = np.zeros((count, experts), dtype=bool)
    moves = promote.sum(axis=1)
    active = np.flatnonzero(moves)
    if active.size:
        demotable = resident[active] & ~targets[active]
        cold_key = np.where(demotable, hits[active] * experts + ids, np.iinfo(np.int64).max)
        cutoff = np.take_along_axis(np.sort(cold_key, axis=1), (moves[active] - 1)[:, None], axis=1)
        leaving[active] = demotable & (cold_key <= cutoff)
    promote_rows, promoted = np.nonzero(promote)
    freed = np.take_along_axis(leaving, slot_expert, axis=1)  # [pools, capacity]: slot's expert leaves
    freed_rows, slots = np.nonzero(freed)
    demoted = slot_expert[freed_rows, slots]
    bounds = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(moves, out=bounds[1:])
    return Proposals(
        np.asarray(positions, dtype=np.int64),
        generations,
        bounds,
        slots.astype(np.int64),
        promoted.astype(np.int64),
        demoted.astype(np.int64),
        hits,
        targets,
    )

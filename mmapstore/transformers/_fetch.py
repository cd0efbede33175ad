"""Fetch on miss at any capacity: the chunks one forward of a layer runs in.

When a forward routes to more distinct experts than the pool holds, the
layer runs in chunks on the device: bring up to ``capacity`` experts in,
compute their (token, expert) pairs, then the next chunk.  Each pair's
output is the one the stock ``grouped_mm`` backend computes (same kernel,
one row per pair), and the weighted sum over the top-k runs once after the
last chunk, so chunking changes no bit of the result.

The plan is pure numpy (no pool, no tensor): which experts each chunk
needs and which resident experts it must not evict.  It copies each missing
expert once and leaves the step's hottest experts resident for the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["FetchChunk", "plan_fetch"]

Int64Array = npt.NDArray[np.int64]

_NONE = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class FetchChunk:
    """One chunk of a forward: ``experts`` must be resident while its pairs run;
    ``protected`` are resident experts a later chunk needs (never evicted for this one)."""

    experts: Int64Array
    protected: Int64Array


def plan_fetch(hits: Int64Array, resident: npt.NDArray[np.bool_], target: Int64Array) -> tuple[FetchChunk, ...]:
    """The chunks of one forward with fetch on miss.

    Parameters
    ----------
    hits
        Pairs routed to each expert in this forward (``[num_experts]``).
    resident
        Which experts sit in the pool before the forward (``[num_experts]``);
        the pool is full: ``resident.sum()`` is its capacity.
    target
        The experts to leave resident (the pool's ``select_target(hits)``:
        the ``capacity`` hottest of the forward).

    Returns
    -------
    tuple of FetchChunk
        One chunk when the routed experts fit the pool.  Otherwise the
        routed experts outside ``target`` first, in chunks that use only the
        slots not holding a resident ``target`` expert (those that are
        already resident first, so none is evicted before its pairs ran),
        then ``target`` itself; every missing expert is copied exactly once.
        When the pool holds exactly ``target`` already, ``target`` runs
        first and the others go through every slot after it.
    """
    used = np.flatnonzero(hits > 0).astype(np.int64)
    capacity = int(np.count_nonzero(resident))
    if used.size <= capacity:
        return (FetchChunk(used, _NONE),)
    target = np.asarray(target, dtype=np.int64)
    others = np.setdiff1d(used, target)  # sorted
    others = np.concatenate((others[resident[others]], others[~resident[others]]))
    kept = np.sort(target[resident[target]])
    free = capacity - kept.size
    if free == 0:
        chunks = [FetchChunk(target, _NONE)]
        chunks += [FetchChunk(others[start : start + capacity], _NONE) for start in range(0, others.size, capacity)]
        return tuple(chunks)
    chunks = [FetchChunk(others[start : start + free], kept) for start in range(0, others.size, free)]
    return (*chunks, FetchChunk(target, _NONE))

"""The refresh planner: captured Top-K ids -> pool updates and parameter writes.

A pure function: no I/O, no copies.  Every ``ParamWrite.source`` is a view of
the mapped store (the same memory as the page cache), so a plan holds a few
hundred bytes per write whatever the slab size.  Pools change only when the
plan is committed (:meth:`RefreshPlan.commit`), after its writes landed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import CapturedIdsError
from .mapping import MappedFile
from .pool import ExecMode, ExpertPool, RefreshResult, count_hits
from .store import ExpertStack, ExpertStore, LayerExperts

__all__ = [
    "DEFAULT_PARAM_NAME",
    "FileRanges",
    "ParamWrite",
    "PoolUpdate",
    "RefreshPlan",
    "check_pools",
    "plan_full_push",
    "plan_refresh",
    "plan_resident",
]

DEFAULT_PARAM_NAME = "blk.{layer}.ffn_{proj}_exps.{part}"


@dataclass(frozen=True, slots=True)
class PoolUpdate:
    """Slot ``slot`` of MoE layer ``layer`` (model index) changes from ``old_expert`` to ``new_expert``."""

    layer: int
    slot: int
    old_expert: int
    new_expert: int


@dataclass(frozen=True, slots=True)
class ParamWrite:
    """Write ``source`` (``[count, *slab]``, native orientation, a view of the
    mapping) into ``param[index : index + count]``."""

    param: str
    index: int
    source: npt.NDArray[np.generic]

    @property
    def count(self) -> int:
        return int(self.source.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.source.nbytes)


@dataclass(frozen=True, slots=True)
class FileRanges:
    """Merged, sorted byte ranges of one mapped file that a plan reads."""

    mapped: MappedFile
    offsets: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum())

    def spans(self) -> list[tuple[int, int]]:
        return list(zip(self.offsets.tolist(), self.lengths.tolist()))


@dataclass(frozen=True, slots=True)
class RefreshPlan:
    """Pool updates and parameter writes of one refresh (or a full push).

    ``reads`` are the merged file byte ranges the writes touch, for prefetch.
    ``results`` hold one proposal per layer (None where the pool is not
    offloading) for :meth:`commit`.
    """

    store: ExpertStore
    step: int
    updates: tuple[PoolUpdate, ...]
    writes: tuple[ParamWrite, ...]
    reads: tuple[FileRanges, ...]
    results: tuple[RefreshResult | None, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes the writes copy."""
        return sum(write.nbytes for write in self.writes)

    @property
    def read_nbytes(self) -> int:
        """File bytes the writes touch (larger than ``nbytes`` for strided sources)."""
        return sum(ranges.nbytes for ranges in self.reads)

    def commit(self, pools: Sequence[ExpertPool]) -> None:
        """Make the planned placement the pools' state (call after the writes landed)."""
        if len(pools) != len(self.results):
            raise CapturedIdsError(f"plan has {len(self.results)} layers, got {len(pools)} pools")
        for pool, result in zip(pools, self.results):
            if result is not None:
                pool.commit(result)


def param_name(template: str, layer: int, proj: str, part: str = "weight") -> str:
    """The destination parameter of one part of one stack.  ``template`` may
    name ``{part}``; without it, parts other than the weight get ``.{part}``
    appended (``blk.0.ffn_gate_exps.weight.scale``)."""
    if "{part}" in template:
        return template.format(layer=layer, proj=proj, part=part)
    name = template.format(layer=layer, proj=proj)
    return name if part == "weight" else f"{name}.{part}"


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Group ``(slot, expert)`` pairs, sorted by slot, into runs where both
    advance by one: ``(first_slot, first_expert, count)``."""
    runs: list[tuple[int, int, int]] = []
    for slot, expert in pairs:
        if runs:
            first_slot, first_expert, count = runs[-1]
            if slot == first_slot + count and expert == first_expert + count:
                runs[-1] = (first_slot, first_expert, count + 1)
                continue
        runs.append((slot, expert, 1))
    return runs


Located = tuple[ParamWrite, MappedFile, int, int]  # write, its mapping, file offset, byte extent


def _stack_writes(stack: ExpertStack, names: str, layer: int, proj: str, pairs: list[tuple[int, int]]) -> list[Located]:
    """Coalesced writes of ``(slot, expert)`` pairs (experts already validated),
    one set per part of the stack: a slot holds its scales and bias too."""
    writes: list[Located] = []
    runs = _runs(sorted(pairs))
    for part in stack.parts:
        param = param_name(names, layer, proj, part)
        for first_slot, first_expert, count in runs:
            located = stack.range_source(first_expert, count, part)
            if located is not None:
                view, mapped, offset, extent = located
                writes.append((ParamWrite(param, first_slot, view), mapped, offset, extent))
                continue
            for position in range(count):  # not evenly spaced in one file: one write each
                single = stack.range_source(first_expert + position, 1, part)
                assert single is not None
                view, mapped, offset, extent = single
                writes.append((ParamWrite(param, first_slot + position, view), mapped, offset, extent))
    return writes


def _plan(store: ExpertStore, step: int, updates: list[PoolUpdate], located: list[Located],
          results: tuple[RefreshResult | None, ...]) -> RefreshPlan:
    """Assemble a plan; merge the byte ranges its writes touch, per file, in file order."""
    by_path: dict[str, tuple[MappedFile, list[int], list[int]]] = {}
    for _, mapped, offset, extent in located:
        entry = by_path.get(mapped.path)
        if entry is None:
            entry = by_path[mapped.path] = (mapped, [], [])
        entry[1].append(offset)
        entry[2].append(offset + extent)
    merged: list[FileRanges] = []
    for mapped, start_list, end_list in by_path.values():
        starts, ends = np.asarray(start_list, dtype=np.int64), np.asarray(end_list, dtype=np.int64)
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], np.maximum.accumulate(ends[order])
        # a new range begins where a start lies past every end before it
        fresh = np.flatnonzero(starts[1:] > ends[:-1]) + 1
        firsts = np.concatenate(([0], fresh))
        lasts = np.concatenate((fresh - 1, [len(starts) - 1]))
        merged.append(FileRanges(mapped, starts[firsts], ends[lasts] - starts[firsts]))
    writes = tuple(write for write, *_ in located)
    return RefreshPlan(store, step, tuple(updates), writes, tuple(merged), results)


def check_pools(layers: Sequence[LayerExperts], pools: Sequence[ExpertPool]) -> None:
    """One pool per MoE layer, each sized for its layer's experts.

    Raises
    ------
    CapturedIdsError
        The counts differ, or a pool was made for a layer with another number
        of experts (it would plan experts the layer does not have).
    """
    if len(pools) != len(layers):
        raise CapturedIdsError(f"{len(pools)} pools for {len(layers)} MoE layers")
    for layer, pool in zip(layers, pools):
        if pool.num_experts != layer.num_experts:
            raise CapturedIdsError(
                f"MoE layer {layer.layer_index} has {layer.num_experts} experts, its pool was made for "
                f"{pool.num_experts}"
            )


def plan_refresh(
    store: ExpertStore,
    pools: Sequence[ExpertPool],
    captured: Sequence[object],
    step: int,
    is_prefill_block: bool = False,
    mode: ExecMode = ExecMode.REUSE,
    *,
    names: str = DEFAULT_PARAM_NAME,
) -> RefreshPlan | None:
    """Plan one refresh of every layer's pool; ``None`` when none is due.

    ``pools[i]`` and ``captured[i]`` belong to ``store.layers[i]``; each
    ``captured[i]`` holds that layer's Top-K ids of the step, any shape.  The
    decision is taken once per step for all layers.  Every layer's ids are
    validated before any proposal is made.

    Raises
    ------
    CapturedIdsError
        Wrong number of layers or pools, a pool sized for another number of
        experts, ids out of range or not integers.
    StoreClosedError
        The store is closed.
    """
    store.check_open()
    layers = store.layers
    check_pools(layers, pools)
    if not any(pool.should_refresh(mode, step, is_prefill_block) for pool in pools):
        return None
    if len(captured) != len(layers):
        raise CapturedIdsError(f"captured ids for {len(captured)} layers, the store has {len(layers)} MoE layers")
    hits = []
    for layer, pool, ids in zip(layers, pools, captured):
        try:
            hits.append(count_hits(ids, pool.num_experts) if pool.offload else None)
        except CapturedIdsError as exc:
            raise CapturedIdsError(f"MoE layer {layer.layer_index}: {exc}") from None
    updates: list[PoolUpdate] = []
    writes: list[Located] = []
    results: list[RefreshResult | None] = []
    for layer, pool, layer_hits in zip(layers, pools, hits):
        if layer_hits is None:
            results.append(None)
            continue
        result = pool.propose(pool.select_target(layer_hits), layer_hits)
        results.append(result)
        pairs = list(zip(result.slots, result.promoted))
        updates += [
            PoolUpdate(layer.layer_index, slot, old, new)
            for slot, old, new in zip(result.slots, result.demoted, result.promoted)
        ]
        for proj, stack in layer.stacks:
            writes += _stack_writes(stack, names, layer.layer_index, proj, pairs)
    return _plan(store, step, updates, writes, tuple(results))


def plan_resident(
    store: ExpertStore, pools: Sequence[ExpertPool], *, names: str = DEFAULT_PARAM_NAME
) -> RefreshPlan:
    """Writes that fill every pool slot with its current expert (the initial load)."""
    store.check_open()
    check_pools(store.layers, pools)
    writes: list[Located] = []
    for layer, pool in zip(store.layers, pools):
        pairs = list(enumerate(int(expert) for expert in pool.resident_experts()))
        for proj, stack in layer.stacks:
            writes += _stack_writes(stack, names, layer.layer_index, proj, pairs)
    return _plan(store, -1, [], writes, tuple(None for _ in pools))


def plan_full_push(store: ExpertStore, *, names: str = DEFAULT_PARAM_NAME) -> RefreshPlan:
    """Writes of every stack into full ``[E, ...]`` parameters named by ``names``
    (``blk.{layer}.ffn_{proj}_exps.weight`` by default)."""
    store.check_open()
    writes: list[Located] = []
    for layer in store.layers:
        for proj, stack in layer.stacks:
            pairs = [(expert, expert) for expert in range(stack.num_experts)]
            writes += _stack_writes(stack, names, layer.layer_index, proj, pairs)
    return _plan(store, -1, [], writes, ())

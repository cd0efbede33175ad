"""The refresh planner: captured Top-K ids -> pool updates and a write table.

Pure numpy over geometries: the planner takes a :class:`StoreGeometry`
(frozen, file-free: :func:`geometries_of` makes one from an open store, tests
build them by hand), the pools and the ids, and returns a
:class:`RefreshPlan` whose writes are a :class:`~mmapstore._writes.WriteTable`
of parallel arrays.  No view, no I/O, no Python object per write: runs of
adjacent (slot, expert) pairs coalesce with array operations wherever a
part's experts are evenly spaced in one file.  Pools change only when the
plan is committed (:meth:`RefreshPlan.commit`), after the sink's copies
finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ._errors import CapturedIdsError, FormatError
from ._geometry import Encoding, PartGeometry
from ._pool import ExecMode, ExpertPool, RefreshResult
from ._proposals import Proposals, hits_rows, propose_rows
from ._writes import WriteTable

if TYPE_CHECKING:
    from ._store import ExpertStore

__all__ = [
    "DEFAULT_PARAM_NAME",
    "LayerGeometry",
    "PoolUpdate",
    "RefreshPlan",
    "StackGeometry",
    "StoreGeometry",
    "check_pools",
    "geometries_of",
    "param_name",
    "plan_candidates",
    "plan_full_push",
    "plan_refresh",
    "plan_resident",
]

DEFAULT_PARAM_NAME = "blk.{layer}.ffn_{proj}_exps.{part}"

Int64Array = npt.NDArray[np.int64]


def param_name(template: str, layer: int, proj: str, part: str = "weight") -> str:
    """The destination parameter of one part of one stack.  ``template`` may
    name ``{part}``; without it, parts other than the weight get ``.{part}``
    appended (``blk.0.ffn_gate_exps.weight.scale``)."""
    if "{part}" in template:
        return template.format(layer=layer, proj=proj, part=part)
    name = template.format(layer=layer, proj=proj)
    return name if part == "weight" else f"{name}.{part}"


@dataclass(frozen=True, slots=True)
class PoolUpdate:
    """Slot ``slot`` of MoE layer ``layer`` (model index) changes from ``old_expert`` to ``new_expert``."""

    layer: int
    slot: int
    old_expert: int
    new_expert: int


# -- geometries --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class StackGeometry:
    """One projection (``gate``, ``up``, ``down``) of a layer: its parts, which
    move together (a slot holds every part of its expert)."""

    proj: str
    encoding: Encoding
    parts: tuple[PartGeometry, ...]

    def __post_init__(self) -> None:
        names = [geometry.part for geometry in self.parts]
        if not names or len(set(names)) != len(names):
            raise FormatError(f"stack {self.proj!r}: parts must be distinct and at least one, got {names}")


@dataclass(frozen=True, slots=True, eq=False)
class LayerGeometry:
    """The stacks of one MoE layer; ``layer`` is the model's layer index."""

    layer: int
    stacks: tuple[StackGeometry, ...]
    num_experts: int = field(init=False)

    def __post_init__(self) -> None:
        counts = {geometry.num_experts for stack in self.stacks for geometry in stack.parts}
        if len(counts) != 1:
            raise FormatError(f"MoE layer {self.layer}: parts disagree on the number of experts: {sorted(counts)}")
        object.__setattr__(self, "num_experts", counts.pop())


@dataclass(frozen=True, slots=True, eq=False)
class StoreGeometry:
    """Every MoE layer's geometries plus the files they index: all a planner
    needs, made once (per store) and reused for every step.

    At construction the per-part arrays are flattened into one index (expert
    offsets and files of every part end to end), so a plan of all layers is a
    handful of array operations.
    """

    layers: tuple[LayerGeometry, ...]
    files: tuple[str, ...]
    parts: tuple[PartGeometry, ...] = field(init=False)
    encodings: tuple[Encoding, ...] = field(init=False)
    _index: _Index = field(init=False, repr=False)
    _names: dict[str, tuple[str, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        parts: list[PartGeometry] = []
        encodings: list[Encoding] = []
        keys: list[tuple[int, str, str]] = []
        coalesce: list[list[int]] = []
        single: list[list[int]] = []
        for layer in self.layers:
            coalesce.append([])
            single.append([])
            for stack in layer.stacks:
                for geometry in stack.parts:
                    (coalesce if geometry.stride is not None else single)[-1].append(len(parts))
                    parts.append(geometry)
                    encodings.append(stack.encoding)
                    keys.append((layer.layer, stack.proj, geometry.part))
        object.__setattr__(self, "parts", tuple(parts))
        object.__setattr__(self, "encodings", tuple(encodings))
        object.__setattr__(self, "_index", _Index.build(parts, keys, coalesce, single, len(self.files)))
        object.__setattr__(self, "_names", {})

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_indices(self) -> list[int]:
        return [layer.layer for layer in self.layers]

    def names(self, template: str) -> tuple[str, ...]:
        """Parameter names of every part (aligned with ``parts``), memoised."""
        names = self._names.get(template)
        if names is None:
            names = tuple(param_name(template, layer, proj, part) for layer, proj, part in self._index.keys)
            if len(set(names)) != len(names):
                raise FormatError(f"parameter name template {template!r} gives two parts the same name")
            self._names[template] = names
        return names


@dataclass(frozen=True, slots=True, eq=False)
class _Index:
    """Flattened per-part arrays of a :class:`StoreGeometry`."""

    keys: tuple[tuple[int, str, str], ...]
    first: Int64Array  # per part: start of its experts in flat_file/flat_offset
    flat_file: Int64Array
    flat_offset: Int64Array
    stride: Int64Array
    extent: Int64Array
    coalesce_start: Int64Array  # CSR per layer: parts whose experts are evenly spaced
    coalesce_parts: Int64Array
    single_start: Int64Array  # CSR per layer: parts served one expert per row
    single_parts: Int64Array

    @classmethod
    def build(
        cls,
        parts: list[PartGeometry],
        keys: list[tuple[int, str, str]],
        coalesce: list[list[int]],
        single: list[list[int]],
        num_files: int,
    ) -> _Index:
        sizes = np.array([geometry.num_experts for geometry in parts], dtype=np.int64)
        first = np.zeros(len(parts), dtype=np.int64)
        if len(parts):
            np.cumsum(sizes[:-1], out=first[1:])
        flat_file = np.concatenate([geometry.files for geometry in parts]).astype(np.int64) if parts else sizes
        flat_offset = np.concatenate([geometry.offsets for geometry in parts]).astype(np.int64) if parts else sizes
        if flat_file.size and (int(flat_file.min()) < 0 or int(flat_file.max()) >= num_files):
            bad = next(g for g in parts if len(g.files) and (g.files.min() < 0 or g.files.max() >= num_files))
            raise FormatError(
                f"{bad.stack}.{bad.part}: file ids {sorted(set(bad.files.tolist()))[:4]} "
                f"outside the geometry's {num_files} files"
            )
        stride = np.array([geometry.stride or 0 for geometry in parts], dtype=np.int64)
        extent = np.array([geometry.extent for geometry in parts], dtype=np.int64)
        return cls(tuple(keys), first, flat_file, flat_offset, stride, extent, *_csr(coalesce), *_csr(single))


def _csr(groups: list[list[int]]) -> tuple[Int64Array, Int64Array]:
    start = np.zeros(len(groups) + 1, dtype=np.int64)
    np.cumsum([len(group) for group in groups], out=start[1:])
    flat = np.array([item for group in groups for item in group], dtype=np.int64)
    return start, flat


def geometries_of(store: ExpertStore) -> StoreGeometry:
    """The :class:`StoreGeometry` of an open store (its MoE layers in store order).

    Raises
    ------
    StoreClosedError
        The store is closed.
    """
    store.check_open()
    layers = tuple(
        LayerGeometry(
            layer.layer_index,
            tuple(StackGeometry(proj, stack.encoding, tuple(stack.parts.values())) for proj, stack in layer.stacks),
        )
        for layer in store.layers
    )
    return StoreGeometry(layers, store.files)


def check_pools(geometry: StoreGeometry, pools: Sequence[ExpertPool]) -> None:
    """One pool per MoE layer, each made for its layer's number of experts.

    Raises
    ------
    CapturedIdsError
        The counts differ, or a pool was made for another number of experts
        (it would plan experts the layer does not have).
    """
    if len(pools) != len(geometry.layers):
        raise CapturedIdsError(f"{len(pools)} pools for {len(geometry.layers)} MoE layers")
    for layer, pool in zip(geometry.layers, pools, strict=True):
        if pool.num_experts != layer.num_experts or not 0 <= pool.capacity <= layer.num_experts:
            raise CapturedIdsError(
                f"MoE layer {layer.layer} has {layer.num_experts} experts, its pool was made for "
                f"{pool.num_experts} (capacity {pool.capacity})"
            )


# -- plans -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class RefreshPlan:
    """Pool updates and the write table of one refresh (or a full push).

    ``update_layer/slot/old/new`` are the updates as arrays (model layer
    index, slot, leaving expert, arriving expert); :attr:`updates` gives them
    as :class:`PoolUpdate` values.  ``proposals`` are the pools' paired
    updates for :meth:`commit`.
    """

    step: int
    table: WriteTable
    layers: tuple[int, ...]
    update_layer: Int64Array
    update_slot: Int64Array
    update_old: Int64Array
    update_new: Int64Array
    proposals: tuple[Proposals, ...] = ()

    @property
    def updates(self) -> tuple[PoolUpdate, ...]:
        return tuple(
            PoolUpdate(layer, slot, old, new)
            for layer, slot, old, new in zip(
                self.update_layer.tolist(),
                self.update_slot.tolist(),
                self.update_old.tolist(),
                self.update_new.tolist(),
                strict=True,
            )
        )

    @property
    def nbytes(self) -> int:
        """Bytes the writes deliver."""
        return self.table.nbytes

    @property
    def read_nbytes(self) -> int:
        """File bytes the writes touch (larger than ``nbytes`` for strided sources)."""
        return self.table.reads.total_nbytes

    @property
    def results(self) -> tuple[RefreshResult | None, ...]:
        """Each layer's proposal (None where the plan changes nothing in it)."""
        results: list[RefreshResult | None] = [None] * len(self.layers)
        for group in self.proposals:
            for index, position in enumerate(group.positions.tolist()):
                results[position] = group.result(index)
        return tuple(results)

    def commit(self, pools: Sequence[ExpertPool]) -> None:
        """Make the planned placement the pools' state (call after the writes landed).

        Raises
        ------
        CapturedIdsError
            ``pools`` are not one per layer of the plan.
        StaleRefreshError
            A pool changed since the plan was made.
        """
        if len(pools) != len(self.layers):
            raise CapturedIdsError(f"plan has {len(self.layers)} layers, got {len(pools)} pools")
        for group in self.proposals:
            for index, position in enumerate(group.positions.tolist()):
                pools[position].commit(group.result(index))


def plan_refresh(
    geometry: StoreGeometry,
    pools: Sequence[ExpertPool],
    captured: Sequence[object] | npt.NDArray[np.integer],
    step: int,
    is_prefill_block: bool = False,
    mode: ExecMode = ExecMode.REUSE,
    *,
    names: str = DEFAULT_PARAM_NAME,
    counts: bool = False,
) -> RefreshPlan | None:
    """Plan one refresh of every layer's pool; ``None`` when none is due.

    ``pools[i]`` and ``captured[i]`` belong to ``geometry.layers[i]``; each
    ``captured[i]`` holds that layer's Top-K ids of the step, any shape, or
    with ``counts=True`` its routed-token count per expert (shape
    ``[num_experts]``; a ``[layers, num_experts]`` array does too).  Counts
    are what a ``bincount`` of the router's ids on the accelerator gives:
    the planner then reads ``layers x experts`` numbers instead of every id,
    which is what keeps a long prefill's plan as cheap as a decode step's.
    The decision is taken once per step for all layers.  Every layer's input
    is validated before any proposal is made.

    Raises
    ------
    CapturedIdsError
        Wrong number of layers or pools, a pool made for another number of
        experts, ids out of range or not integers, counts of the wrong
        shape or negative.
    """
    check_pools(geometry, pools)
    if not any(pool.should_refresh(mode, step, is_prefill_block) for pool in pools):
        return None
    if len(captured) != len(geometry.layers):
        raise CapturedIdsError(
            f"captured ids for {len(captured)} layers, the store has {len(geometry.layers)} MoE layers"
        )
    groups: dict[tuple[int, int], list[int]] = {}
    for position, pool in enumerate(pools):
        if pool.offload:
            groups.setdefault((pool.num_experts, pool.capacity), []).append(position)
    labels = geometry.layer_indices
    hits = {
        key: hits_rows([captured[p] for p in positions], key[0], [labels[p] for p in positions], counts=counts)
        for key, positions in groups.items()
    }
    proposals = tuple(
        propose_rows([pools[p] for p in positions], positions, hits[key]) for key, positions in groups.items()
    )
    if proposals:
        layer_pos = np.concatenate([group.positions[group.row_of_update] for group in proposals])
        slot = np.concatenate([group.slots for group in proposals])
        new = np.concatenate([group.promoted for group in proposals])
        old = np.concatenate([group.demoted for group in proposals])
        if len(proposals) > 1:  # groups interleave layers: back to layer order
            order = np.lexsort((slot, layer_pos))
            layer_pos, slot, new, old = layer_pos[order], slot[order], new[order], old[order]
    else:
        layer_pos = slot = new = old = np.zeros(0, dtype=np.int64)
    table = _table(geometry, names, layer_pos, slot, new)
    model_layers = np.asarray(labels, dtype=np.int64)[layer_pos]
    return RefreshPlan(step, table, tuple(labels), model_layers, slot, old, new, proposals)


def plan_resident(
    geometry: StoreGeometry, pools: Sequence[ExpertPool], *, names: str = DEFAULT_PARAM_NAME
) -> RefreshPlan:
    """Writes that fill every pool slot with its current expert (the initial load).

    Raises
    ------
    CapturedIdsError
        Not one pool per layer, or a pool made for another number of experts.
    """
    check_pools(geometry, pools)
    residents = [pool.resident_experts() for pool in pools]
    return _static_plan(geometry, names, residents)


def plan_candidates(
    geometry: StoreGeometry,
    pools: Sequence[ExpertPool],
    captured: Sequence[object] | npt.NDArray[np.integer],
    *,
    names: str = DEFAULT_PARAM_NAME,
    counts: bool = False,
) -> WriteTable:
    """The rows of the experts routed to in ``captured`` (ids, or with
    ``counts`` per-expert counts, as :func:`plan_refresh`) that their pools do
    not hold: what the next refresh is likely to bring in.

    A table to read ranges from (to register or prefetch them ahead), not
    to write: ``slot`` numbers each layer's candidates from 0 in expert
    order, not pool slots.  Pools that hold every expert have none.

    Raises
    ------
    CapturedIdsError
        Wrong number of layers or pools, or ids that are not integers in range
        (as :func:`plan_refresh`).
    """
    check_pools(geometry, pools)
    if len(captured) != len(geometry.layers):
        raise CapturedIdsError(
            f"captured ids for {len(captured)} layers, the store has {len(geometry.layers)} MoE layers"
        )
    labels = geometry.layer_indices
    layer_pos, slot, expert = [], [], []
    for position, pool in enumerate(pools):
        if not pool.offload:
            continue
        hits = hits_rows([captured[position]], pool.num_experts, [labels[position]], counts=counts)[0]
        wanted = np.flatnonzero((hits > 0) & ~pool.resident_mask()).astype(np.int64)
        layer_pos.append(np.full(len(wanted), position, dtype=np.int64))
        slot.append(np.arange(len(wanted), dtype=np.int64))
        expert.append(wanted)
    empty = [np.zeros(0, dtype=np.int64)]
    return _table(
        geometry,
        names,
        np.concatenate(layer_pos or empty),
        np.concatenate(slot or empty),
        np.concatenate(expert or empty),
    )


def plan_full_push(geometry: StoreGeometry, *, names: str = DEFAULT_PARAM_NAME) -> RefreshPlan:
    """Writes of every stack into full ``[E, ...]`` parameters named by ``names``
    (``blk.{layer}.ffn_{proj}_exps.weight`` by default)."""
    residents = [np.arange(layer.num_experts, dtype=np.int64) for layer in geometry.layers]
    return _static_plan(geometry, names, residents)


def _static_plan(geometry: StoreGeometry, names: str, residents: list[Int64Array]) -> RefreshPlan:
    sizes = [len(experts) for experts in residents]
    layer_pos = np.repeat(np.arange(len(residents), dtype=np.int64), sizes)
    slot = np.concatenate([np.arange(size, dtype=np.int64) for size in sizes]) if sizes else layer_pos
    expert = np.concatenate(residents).astype(np.int64) if residents else layer_pos
    empty = np.zeros(0, dtype=np.int64)
    table = _table(geometry, names, layer_pos, slot, expert)
    return RefreshPlan(-1, table, tuple(geometry.layer_indices), empty, empty, empty, empty)


def _table(
    geometry: StoreGeometry, names: str, layer_pos: Int64Array, slot: Int64Array, expert: Int64Array
) -> WriteTable:
    """The write table of ``(layer position, slot, expert)`` triples (grouped by
    layer, slots ascending within a layer): one row per run of slots and
    experts that both advance by one, per part whose experts are evenly
    spaced; one row per triple for the other parts.  Rows come run by run
    (each run's parts together); their order carries no meaning."""
    index = geometry._index
    count = len(slot)
    if count:
        breaks = np.flatnonzero((np.diff(layer_pos) != 0) | (np.diff(slot) != 1) | (np.diff(expert) != 1)) + 1
        starts = np.concatenate(([0], breaks))
        run_count = np.diff(np.append(starts, count))
        run_layer, run_slot, run_expert = layer_pos[starts], slot[starts], expert[starts]
    else:
        run_layer = run_slot = run_expert = run_count = slot
    ones = np.ones(count, dtype=np.int64)
    pieces = [
        _expand(index.coalesce_start, index.coalesce_parts, run_layer, run_slot, run_expert, run_count),
        _expand(index.single_start, index.single_parts, layer_pos, slot, expert, ones),
    ]
    param = np.concatenate([piece[0] for piece in pieces])
    rows_slot = np.concatenate([piece[1] for piece in pieces])
    rows_expert = np.concatenate([piece[2] for piece in pieces])
    rows_count = np.concatenate([piece[3] for piece in pieces])
    where = index.first[param] + rows_expert
    extent = (rows_count - 1) * index.stride[param] + index.extent[param]
    return WriteTable(
        geometry.names(names),
        geometry.parts,
        geometry.encodings,
        geometry.files,
        param.astype(np.int32),
        rows_slot,
        rows_expert,
        rows_count,
        index.flat_file[where],
        index.flat_offset[where],
        extent,
    )


def _expand(
    start: Int64Array,
    parts: Int64Array,
    unit_layer: Int64Array,
    unit_slot: Int64Array,
    unit_expert: Int64Array,
    unit_count: Int64Array,
) -> tuple[Int64Array, ...]:
    """One row per (unit, part of the unit's layer in this CSR group)."""
    first = start[unit_layer]
    repeats = start[unit_layer + 1] - first
    total = int(repeats.sum())
    if total == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    unit = np.repeat(np.arange(len(unit_layer), dtype=np.int64), repeats)
    offsets = np.cumsum(repeats) - repeats
    within = np.arange(total, dtype=np.int64) - offsets[unit]
    return parts[first[unit] + within], unit_slot[unit], unit_expert[unit], unit_count[unit]

"""``SlabService``: the object a runtime holds, one call per forward.

Beyond one call per step, the service owns the cold-read machinery of a
store larger than memory (see ``docs/cold-reads.md``):

- ``read`` (default ``"auto"``): the default sink copies resident rows from
  the mapping and reads cold ones with the service's
  :class:`~mmapstore.io.ColdReader` (``reader`` config);
- ``prefetch(layer, experts)``: start reading likely-next experts into
  bounded staging (``prefetch_nbytes``) without blocking; a refresh that
  finds its bytes staged or in flight waits for them instead of reading twice;
- ``cache="drop"``: once slabs have landed in a pool, their pages leave the
  page cache (the pool is now the cache);
- ``budget_nbytes``: the pool buffers, bounce buffers, the reader's buffers
  and the prefetch staging are counted against it before anything is
  allocated; :meth:`SlabService.from_budget` picks the capacity that fits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ._apply import ApplyResult, apply
from ._coldrows import BOUNCE_NBYTES, READ_MODES, ReadMode, lays_out
from ._errors import CapturedIdsError, ExpertIndexError, LayerNotFoundError, OptionError, SinkError
from ._planner import (
    DEFAULT_PARAM_NAME,
    PoolUpdate,
    StoreGeometry,
    geometries_of,
    param_name,
    plan_candidates,
    plan_full_push,
    plan_refresh,
    plan_resident,
)
from ._pool import ExecMode, ExpertPool, RefreshPolicy, capacity_from_budget
from ._sinks import ArraySink, DictSink, Sink, SinkOrientation, pool_nbytes, pool_shapes
from ._store import ExpertStore
from ._writes import WriteTable, merge_ranges
from .io import (
    ALIGN_NBYTES,
    CachePolicy,
    ColdReader,
    FileRange,
    Prefetcher,
    PrefetchTicket,
    ReaderConfig,
    probe_files,
    read_ahead,
    release_landed,
)

__all__ = ["CACHE_POLICIES", "ServiceStats", "SlabService", "StepResult"]

CACHE_POLICIES: tuple[CachePolicy, ...] = ("keep", "drop")


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one forward did: whether it refreshed, which slots changed, bytes
    and time, and the delivered bytes per source (``"resident"``, ``"direct"``...)."""

    step: int
    refreshed: bool
    updates: tuple[PoolUpdate, ...] = ()
    nbytes: int = 0
    seconds: float = 0.0
    source_nbytes: tuple[tuple[str, int], ...] = ()


@dataclass(slots=True)
class ServiceStats:
    steps: int = 0
    refreshes: int = 0
    promotions: int = 0
    demotions: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    source_nbytes: dict[str, int] = field(default_factory=dict)
    device_nbytes: int = 0


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
        ``orientation`` choose otherwise).  A sink given here keeps its own
        read mode; its reader (if it has one) serves prefetches.
    load
        Fill every slot with its initial expert now (experts ``0..capacity-1``).
    read
        The default sink's read mode: ``"auto"``, ``"map"`` or ``"reader"``
        (see :mod:`mmapstore._coldrows`).
    reader
        Queue depth and read size of the service's reader.  ``"probe"`` (the
        default): measured on the store's disk before the first read
        (:func:`~mmapstore.io.probe_files`: a few hundred MiB read with
        ``O_DIRECT``, once per disk per process, the page cache left alone;
        ``ReaderConfig()``, 16 reads of up to 4 MiB in flight, is kept unless
        another depth or size reads 5% faster, and a store too small to
        measure gets it unmeasured).  A :class:`~mmapstore.io.ReaderConfig`
        (or None for ``ReaderConfig()``) skips the probe.
    cache
        ``"keep"`` (default) leaves the page cache alone; ``"drop"`` drops the
        ranges of every refresh from it once they landed (``MADV_DONTNEED`` on
        the mapping, then ``POSIX_FADV_DONTNEED``): for stores larger than
        memory, where the pools are the cache.
    prefetch_nbytes
        Staging memory for :meth:`prefetch` (0: prefetches only hint the page
        cache, ``POSIX_FADV_WILLNEED``).
    budget_nbytes
        If given, the memory the service's buffers may take: the default
        sink's pools, its bounce buffers, the reader's per-thread buffers and
        the prefetch staging.  More is refused with
        :class:`~mmapstore._errors.OptionError` before anything is allocated.
        The process's own memory (interpreter, libraries, the page cache) is
        not in it: leave room for that.

    The service owns threads and descriptors once cold rows are read:
    :meth:`close` it (or use it as a context manager).

    Raises
    ------
    OptionError
        A bad option, or buffers over ``budget_nbytes``.
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
        read: ReadMode = "auto",
        reader: ReaderConfig | Literal["probe"] | None = "probe",
        cache: CachePolicy = "keep",
        prefetch_nbytes: int = 0,
        budget_nbytes: int | None = None,
    ) -> None:
        if read not in READ_MODES:
            raise OptionError(f"read must be one of {READ_MODES}, got {read!r}")
        if cache not in CACHE_POLICIES:
            raise OptionError(f"cache must be one of {CACHE_POLICIES}, got {cache!r}")
        if prefetch_nbytes < 0:
            raise OptionError(f"prefetch_nbytes must be >= 0, got {prefetch_nbytes}")
        self.store = store
        self.names = names
        self.cache: CachePolicy = cache
        self.geometry = geometries_of(store)
        self.source = store.byte_source()  # long-lived: page tables filled once serve every refresh
        capacities = [capacity] * store.num_layers if isinstance(capacity, int) else list(capacity)
        if len(capacities) != store.num_layers:
            raise CapturedIdsError(f"{len(capacities)} capacities for {store.num_layers} MoE layers")
        self.pools = [
            ExpertPool(layer.num_experts, slots, policy) for layer, slots in zip(store.layers, capacities, strict=True)
        ]
        serves = sink is None and read != "map"  # the service reads cold rows with a reader of its own
        config = _reader_config(store, reader)  # measured ("probe") where first used: not where none is built
        if budget_nbytes is not None:
            pools = [pool.capacity for pool in self.pools]
            need = _buffers_nbytes(
                self._pool_nbytes(pools, dtype, orientation) if sink is None else 0,
                config() if serves else None,
                prefetch_nbytes,
                _lays_out(self.geometry, dtype, orientation, names),
            )
            if need.total > budget_nbytes:
                raise OptionError(
                    f"{store.path}: {need.describe()} need {need.total} bytes, over the budget of {budget_nbytes}"
                )
        self._reader: ColdReader | None = None
        self._owned_sink: DictSink | None = None
        if sink is None:
            self._reader = ColdReader(config()) if serves else None
            self._owned_sink = ArraySink.for_geometries(
                self.geometry, [pool.capacity for pool in self.pools], dtype=dtype, orientation=orientation,
                names=names, read=read, reader=self._reader,
            )  # fmt: skip
            sink = self._owned_sink
        self.sink: Sink = sink
        self.prefetcher: Prefetcher | None = None
        serving = self._serving_reader()
        if prefetch_nbytes > 0 and serving is not None:
            self.prefetcher = Prefetcher(prefetch_nbytes, config())
            self.prefetcher.attach(serving)
        # A sink that allocates its own pools (a device sink) learns their shapes here.
        bind = getattr(self.sink, "bind", None)
        if callable(bind):
            bind(self.geometry, [pool.capacity for pool in self.pools], names=names)
        self._stats = ServiceStats()
        self._step = 0
        if load:
            plan = plan_resident(self.geometry, self.pools, names=names)
            apply(plan, self.sink, self.source)
            self._release(plan.table)

    @classmethod
    def from_budget(
        cls,
        store: ExpertStore,
        budget_nbytes: int,
        policy: RefreshPolicy | None = None,
        **options: Any,
    ) -> SlabService:
        """The service with :meth:`capacity_for_budget` slots per layer, its
        buffers checked against ``budget_nbytes`` (``options`` are the
        constructor's keyword options).

        Raises
        ------
        OptionError
            Not even one slot per layer fits.
        """
        capacity = cls.capacity_for_budget(store, budget_nbytes, **options)
        return cls(store, capacity, policy, budget_nbytes=budget_nbytes, **options)

    @staticmethod
    def capacity_for_budget(store: ExpertStore, budget_nbytes: int, **options: Any) -> int:
        """The largest capacity (the same in every layer) whose buffers fit
        ``budget_nbytes``, counted as for the constructor's ``budget_nbytes``
        with the same keyword ``options`` (``dtype``, ``orientation``,
        ``read``, ``reader``, ``prefetch_nbytes``...).  Nothing is allocated
        but the probe's transient read buffers (with ``reader="probe"``).

        Raises
        ------
        OptionError
            Not even one slot per layer fits.
        """
        geometry = geometries_of(store)
        dtype = options.get("dtype")
        orientation = options.get("orientation", "native")
        names = options.get("names", DEFAULT_PARAM_NAME)
        per_slot = pool_nbytes(pool_shapes(geometry, 1, dtype=dtype, orientation=orientation, names=names)[0])
        serves = options.get("sink") is None and options.get("read", "auto") != "map"  # as the constructor counts
        config = _reader_config(store, options.get("reader", "probe"))
        bounce = _lays_out(geometry, dtype, orientation, names)
        overhead = _buffers_nbytes(0, config() if serves else None, options.get("prefetch_nbytes", 0), bounce)
        most = max(layer.num_experts for layer in geometry.layers)
        capacity = capacity_from_budget(budget_nbytes, overhead.total, per_slot, 1, most)
        if capacity < 1:
            raise OptionError(
                f"{store.path}: a budget of {budget_nbytes} bytes leaves no pool slot "
                f"({overhead.describe()} take {overhead.total}, one slot per layer {per_slot})"
            )
        return capacity

    def _pool_nbytes(self, capacities: Sequence[int], dtype: npt.DTypeLike | None, orientation: SinkOrientation) -> int:
        """Bytes of the default sink's pool buffers for ``capacities``."""
        return pool_nbytes(pool_shapes(self.geometry, list(capacities), dtype=dtype, orientation=orientation,
                                       names=self.names)[0])  # fmt: skip

    def _serving_reader(self) -> ColdReader | None:
        if self._reader is not None:
            return self._reader
        if isinstance(self.sink, DictSink) and self.sink.reads_cold:
            return self.sink.cold_reader
        return None

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
        captured: Sequence[object] | npt.NDArray[np.integer],
        step: int | None = None,
        is_prefill_block: bool = False,
        mode: ExecMode = ExecMode.REUSE,
        *,
        counts: bool = False,
    ) -> StepResult:
        """One forward: plan a refresh if due, copy the promoted slabs, wait
        for the sink, then commit the pools.

        ``captured[i]`` holds the Top-K ids of ``store.layers[i]`` for this
        step, or with ``counts=True`` its routed-token count per expert (see
        :func:`~mmapstore.plan_refresh`).  Bad input raises before anything
        is written; a file that shrank raises
        :class:`~mmapstore._errors.FormatError` and commits nothing.
        """
        current = self._step if step is None else step
        self._step = current + 1
        self._stats.steps += 1
        plan = plan_refresh(
            self.geometry, self.pools, captured, current, is_prefill_block, mode, names=self.names, counts=counts
        )
        if plan is None:
            self._register_ahead(captured, counts)
            return StepResult(current, False)
        applied = apply(plan, self.sink, self.source, pools=self.pools)  # commits after the sink's wait()
        self._release(plan.table)
        self._register_ahead(captured, counts)
        stats = self._stats
        stats.refreshes += 1
        stats.promotions += len(plan.updates)
        stats.demotions += len(plan.updates)
        stats.nbytes += applied.nbytes
        stats.seconds += applied.seconds
        stats.device_nbytes += applied.device_nbytes
        for source, nbytes in applied.source_nbytes:
            stats.source_nbytes[source] = stats.source_nbytes.get(source, 0) + nbytes
        return StepResult(current, True, plan.updates, applied.nbytes, applied.seconds, applied.source_nbytes)

    def prefetch(self, layer: int, experts: Iterable[int]) -> PrefetchTicket | None:
        """Start reading the slabs of ``experts`` of model layer ``layer`` (every
        part); returns at once.

        Experts already in the layer's pool, and ranges wholly in the page
        cache, are skipped.  With staging (``prefetch_nbytes``) the bytes are
        read into bounded staging buffers and the ticket says what was
        accepted and what did not fit; the next refresh that promotes them
        copies from staging, or waits for a read still in flight.  Without
        staging the ranges are hinted to the page cache (``POSIX_FADV_WILLNEED``)
        and None is returned.

        Raises
        ------
        LayerNotFoundError, ExpertIndexError
            No such MoE layer, or an expert out of range.
        """
        position = self._layer_position(layer)
        geometry = self.geometry.layers[position]
        wanted = np.unique(np.fromiter((int(expert) for expert in experts), dtype=np.int64))
        if len(wanted) and (wanted[0] < 0 or wanted[-1] >= geometry.num_experts):
            bad = int(wanted[0] if wanted[0] < 0 else wanted[-1])
            raise ExpertIndexError(f"MoE layer {layer}: expert {bad} out of range [0, {geometry.num_experts})")
        wanted = wanted[~self.pools[position].resident_mask()[wanted]]
        parts = [part for stack in geometry.stacks for part in stack.parts]
        if not len(wanted) or not parts:
            return None
        file = np.concatenate([part.files[wanted].astype(np.int64) for part in parts])
        offset = np.concatenate([part.offsets[wanted] for part in parts])
        extent = np.concatenate([np.full(len(wanted), part.extent, dtype=np.int64) for part in parts])
        reads = merge_ranges(file, offset, extent)
        ranges: list[FileRange] = []
        for index, start, nbytes in zip(reads.file.tolist(), reads.offset.tolist(), reads.nbytes.tolist(), strict=True):
            mapped = self.source.mapping(index)
            if mapped.resident_nbytes(start, nbytes) >= nbytes:
                continue  # warm already: a refresh copies it from the mapping
            ranges.append(FileRange(self.source.path(index), start, nbytes, mapped, mapped.identity))
        if self.prefetcher is not None:
            return self.prefetcher.prefetch(ranges)
        for item in ranges:
            read_ahead(item.path, [(item.offset, item.nbytes)])
        return None

    def cancel_prefetch(self, ticket: PrefetchTicket | None = None) -> None:
        """Cancel one prefetch (or all) and free its staging; a refresh waiting on it reads the disk instead."""
        if self.prefetcher is not None:
            self.prefetcher.cancel(ticket)

    def _register_ahead(self, captured: Sequence[object] | npt.NDArray[np.integer], counts: bool) -> None:
        # Experts routed to now but not resident are the likely promotions of
        # the next refresh: a sink that registers windows (TorchSink on CUDA)
        # gets their ranges while the model computes, instead of paying
        # registration inside that refresh.
        if getattr(self.sink, "registers_ahead", False):
            table = plan_candidates(self.geometry, self.pools, captured, names=self.names, counts=counts)
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

    def close(self) -> None:
        """Cancel prefetches, stop the reader threads, free bounce buffers (the pools stay readable)."""
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        if self._owned_sink is not None:
            self._owned_sink.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> SlabService:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------

    def _layer_position(self, layer: int) -> int:
        for position, geometry in enumerate(self.geometry.layers):
            if geometry.layer == layer:
                return position
        known = [geometry.layer for geometry in self.geometry.layers]
        raise LayerNotFoundError(f"{self.store.path}: no MoE layer {layer} (MoE layers: {known})")

    def _release(self, table: WriteTable) -> None:
        """The ``"drop"`` policy: the table's ranges leave the page cache once landed."""
        if self.cache != "drop" or not len(table.reads):
            return
        reads = table.reads
        for file in np.unique(reads.file).tolist():
            chosen = reads.file == file
            spans = list(zip(reads.offset[chosen].tolist(), reads.nbytes[chosen].tolist(), strict=True))
            release_landed(self.source.path(file), spans, self.source.mapping(file))


@dataclass(frozen=True, slots=True)
class _Need:
    """What a service's buffers take, by kind."""

    pools_nbytes: int
    bounce_nbytes: int
    reader_nbytes: int
    staging_nbytes: int

    @property
    def total(self) -> int:
        return self.pools_nbytes + self.bounce_nbytes + self.reader_nbytes + self.staging_nbytes

    def describe(self) -> str:
        return (
            f"pools {self.pools_nbytes}, bounce buffers {self.bounce_nbytes}, "
            f"reader buffers {self.reader_nbytes}, prefetch staging {self.staging_nbytes}"
        )


def _reader_config(store: ExpertStore, reader: object) -> Callable[[], ReaderConfig]:
    """The reader config a service's ``reader`` option asks for, checked now and made where first
    asked for: ``"probe"`` measures the store's disk then (once per disk), so a service that builds
    no reader never probes.

    Raises
    ------
    OptionError
        ``reader`` is not a ``ReaderConfig``, ``"probe"`` or None.
    """
    if reader == "probe":
        source = store.byte_source()
        paths = [source.path(file) for file in range(len(source.files))]
        return functools.cache(lambda: probe_files(paths))
    if reader is not None and not isinstance(reader, ReaderConfig):
        raise OptionError(f"reader must be a ReaderConfig, 'probe' or None, got {reader!r}")
    config = reader if reader is not None else ReaderConfig()
    return lambda: config


def _buffers_nbytes(pools_nbytes: int, config: ReaderConfig | None, staging_nbytes: int, bounce: bool) -> _Need:
    """The service's buffers: pools, the default sink's two bounce buffers
    (where some part ``bounce``s: :func:`_lays_out`), the per-thread bounce
    buffers of its reader and of the prefetcher's (only where cold rows are
    read), and the prefetch staging."""
    if config is None:
        return _Need(pools_nbytes, 0, 0, staging_nbytes)
    sink_bounce = 2 * (BOUNCE_NBYTES + ALIGN_NBYTES) if bounce else 0
    readers = 2 if staging_nbytes > 0 else 1  # a prefetcher reads with threads of its own
    return _Need(pools_nbytes, sink_bounce, readers * config.queue_depth * config.bounce_nbytes, staging_nbytes)


def _lays_out(geometry: StoreGeometry, dtype: npt.DTypeLike | None, orientation: SinkOrientation, names: str) -> bool:
    """Whether the default sink's cold rows may need its bounce buffers (a
    cast, a transpose, fused halves, a strided part): see :func:`lays_out`."""
    shapes, transposed = pool_shapes(geometry, 1, dtype=dtype, orientation=orientation, names=names)
    flipped = set(transposed)
    for layer in geometry.layers:
        for stack in layer.stacks:
            for part in stack.parts:
                name = param_name(names, layer.layer, stack.proj, part.part)
                if lays_out(part, np.dtype(shapes[name][1]), name in flipped):
                    return True
    return False

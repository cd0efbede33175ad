"""Sinks: what receives a write table.

The protocol
------------
A sink has two methods, and what ``submit`` returns has two more:

``check(table)``
    Validate every destination the table names, before anything is written:
    the parameter exists, its slab shape matches the source part's (after
    the transpose the sink was told to do), the source dtype can be cast to
    the destination's, encoded bytes (FP8 codes, MXFP4 nibbles, GGUF
    blocks) are neither cast nor transposed, every slot range lies inside
    the destination, the destination is writable.  Raises
    :class:`~mmapstore._errors.SinkError` naming the parameter, the source
    part and what was expected versus found.
``submit(table, source) -> Completion``
    Start the copies of every row (``check`` first if this table was not
    checked).  ``source`` gives the bytes: ``source.view(table, row)`` is
    the row's zero-copy ``[count, *slab_shape]`` view in the file's layout;
    ``source.mapping(file)`` / ``source.path(file)`` serve sinks that read
    or register file ranges themselves.  A sink may return before the
    copies finish (a GPU sink enqueues them on a stream).
``Completion.done() -> bool``
    Whether the copies finished (never blocks).
``Completion.wait() -> WriteResult``
    Block until every copy landed; report bytes, seconds and rows.  Calling
    it again returns the same result.  Nothing may read the destinations,
    and no pool may be committed, before ``wait`` returns:
    :func:`mmapstore.apply` and :class:`~mmapstore._service.SlabService`
    commit pools only after it.

Sinks that hold their destinations expose them as ``buffers`` (name ->
array or tensor).  A sink that reads non-resident ranges itself sets
``reads_cold`` True: :func:`~mmapstore._apply.start` then gives the kernel no
``MADV_WILLNEED`` hint, which would read those ranges a second time.

The numpy sinks here complete synchronously: ``submit`` makes one source
choice per row (``read="auto"``: resident rows copied from the mapping, on
two threads when they are many; cold rows read by a
:class:`~mmapstore.io.ColdReader` straight into the destination or through a
bounce buffer; see :mod:`mmapstore._coldrows`), and returns a finished
completion whose result counts the bytes each source delivered.  Every sink
passes :class:`mmapstore.testing.SinkTests`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import numpy.typing as npt

from ._coldrows import BOUNCE_NBYTES, READ_MODES, ROW_SOURCES, ColdRows, ReadMode, copy_view, split_rows
from ._dtypes import can_cast
from ._errors import SinkError
from ._planner import DEFAULT_PARAM_NAME, StoreGeometry, geometries_of, param_name
from ._source import ByteSource
from ._writes import WriteTable
from .io import ALIGN_NBYTES, ColdReader, aligned_empty

if TYPE_CHECKING:
    from ._store import ExpertStore

__all__ = [
    "PARALLEL_MIN_NBYTES",
    "ArraySink",
    "Completed",
    "Completion",
    "DictSink",
    "Sink",
    "SinkOrientation",
    "WriteResult",
    "check_slots",
    "pool_nbytes",
    "pool_shapes",
]

SinkOrientation = Literal["native", "kn"]

PARALLEL_MIN_NBYTES = 32 << 20
"""Tables at least this large are copied on two threads (one memcpy thread
does not saturate memory bandwidth out of the page cache)."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a completed submission moved: bytes delivered, wall seconds from
    submit to completion, rows and copy threads used.

    ``source_nbytes`` counts the delivered bytes by where they came from
    (:data:`~mmapstore._coldrows.RowSource` names; empty when a sink does not
    say); ``device_nbytes`` the bytes explicit reads asked of the device.
    """

    nbytes: int
    seconds: float
    rows: int
    threads: int = 1
    source_nbytes: tuple[tuple[str, int], ...] = ()
    device_nbytes: int = 0

    def nbytes_from(self, source: str) -> int:
        """Delivered bytes that came from ``source``."""
        return dict(self.source_nbytes).get(source, 0)


class Completion(Protocol):
    def done(self) -> bool: ...

    def wait(self) -> WriteResult: ...


class Sink(Protocol):
    def check(self, table: WriteTable) -> None: ...

    def submit(self, table: WriteTable, source: ByteSource) -> Completion: ...


def check_slots(table: WriteTable, check_param: Callable[[WriteTable, int], int]) -> None:
    """Check every destination a table writes (``check_param(table, param)``
    validates one and returns its slot count), then every row's slot range,
    all before any copy.  Raises :class:`SinkError` naming the parameter."""
    capacity = np.zeros(len(table.params), dtype=np.int64)
    for param in table.used_params().tolist():
        capacity[param] = check_param(table, param)
    if table.rows:
        ends = table.slot + table.count
        bad = (table.slot < 0) | (table.count < 1) | (ends > capacity[table.param])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            param = int(table.param[row])
            raise SinkError(
                f"parameter {table.params[param]!r}: slots [{int(table.slot[row])}, {int(ends[row])}) "
                f"outside [0, {int(capacity[param])})"
            )


class Completed:
    """A completion that finished before it was returned (synchronous sinks)."""

    __slots__ = ("_result",)

    def __init__(self, result: WriteResult) -> None:
        self._result = result

    def done(self) -> bool:
        return True

    def wait(self) -> WriteResult:
        return self._result


Work = tuple[int, int, int]  # row, first and last+1 slab of that row


class DictSink:
    """Writes into caller-owned numpy arrays, e.g. a model's state dict.

    Parameters
    ----------
    arrays
        ``param -> array`` with a leading slot (or expert) axis.
    transpose
        Params whose slabs are stored transposed relative to the source
        (``[k, n]`` destinations of ``[n, k]`` sources, or the reverse).
    threads
        Copy threads for large tables of resident rows (1 or 2).
    read
        ``"auto"`` (resident rows copied from the mapping, cold rows read),
        ``"map"`` (every row copied from the mapping) or ``"reader"`` (every
        row read; the mapping is never touched): see :mod:`mmapstore._coldrows`.
    reader
        The :class:`~mmapstore.io.ColdReader` for cold rows (shared with a
        prefetcher, say); by default the sink makes one with the default
        config when it first meets a cold row, and :meth:`close` closes it.
    bounce_nbytes
        Size of each of the two bounce buffers for cold rows that are cast,
        transposed or strided (allocated when first needed).
    """

    def __init__(
        self,
        arrays: MutableMapping[str, npt.NDArray[np.generic]],
        transpose: Collection[str] = (),
        *,
        threads: int = 2,
        read: ReadMode = "auto",
        reader: ColdReader | None = None,
        bounce_nbytes: int = BOUNCE_NBYTES,
    ) -> None:
        if threads not in (1, 2):
            raise SinkError(f"threads must be 1 or 2, got {threads!r}")
        if read not in READ_MODES:
            raise SinkError(f"read must be one of {READ_MODES}, got {read!r}")
        if bounce_nbytes < 1:
            raise SinkError(f"bounce_nbytes must be positive, got {bounce_nbytes}")
        self.arrays = arrays
        self.transpose = frozenset(transpose)
        self.threads = threads
        self.read: ReadMode = read
        self.bounce_nbytes = bounce_nbytes
        self._reader = reader
        self._owns_reader = False
        self._bounces: list[npt.NDArray[np.uint8]] = []
        self._checked: WriteTable | None = None

    @property
    def buffers(self) -> Mapping[str, npt.NDArray[np.generic]]:
        return self.arrays

    @property
    def reads_cold(self) -> bool:
        """True unless ``read="map"``: cold ranges are read here, so apply must not hint them."""
        return self.read != "map"

    @property
    def cold_reader(self) -> ColdReader:
        """The reader of cold rows (made on first use when none was given)."""
        if self._reader is None:
            self._reader = ColdReader()
            self._owns_reader = True
        return self._reader

    @property
    def bounce_buffers_nbytes(self) -> int:
        """Bytes of the two bounce buffers at most (for memory budgets)."""
        return 2 * (self.bounce_nbytes + ALIGN_NBYTES)

    def close(self) -> None:
        """Close the reader this sink made (not one it was given) and free the bounce buffers."""
        if self._owns_reader and self._reader is not None:
            self._reader.close()
            self._reader = None
            self._owns_reader = False
        self._bounces.clear()

    def __enter__(self) -> DictSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, table: WriteTable) -> None:
        """See the module docstring.  Raises :class:`SinkError`."""
        check_slots(table, self._check_param)
        self._checked = table

    def _check_param(self, table: WriteTable, param: int) -> int:
        name, geometry, encoding = table.params[param], table.geometries[param], table.encodings[param]
        where = f"parameter {name!r} (from {geometry.stack}.{geometry.part})"
        destination = self.arrays.get(name)
        if destination is None:
            raise SinkError(f"sink has no {where}")
        source_dtype = geometry.dtype.numpy
        shape = geometry.slab_shape
        flip = name in self.transpose
        if flip:
            if len(shape) != 2:
                raise SinkError(f"{where}: cannot transpose a {len(shape)}-D slab {list(shape)}")
            shape = shape[::-1]
        if destination.ndim < 1 or tuple(destination.shape[1:]) != shape:
            raise SinkError(
                f"{where}: slab shape {list(destination.shape[1:])} cannot take {list(shape)}"
                + (" (transposed)" if flip else "")
            )
        if encoding.encoded and geometry.part == "weight" and (flip or destination.dtype != source_dtype):
            raise SinkError(
                f"{where}: {encoding.describe()} slabs are encoded; a cast or transposed copy of them would not "
                f"be their values (destination {destination.dtype}{', transposed' if flip else ''})"
            )
        if not can_cast(source_dtype, destination.dtype):
            raise SinkError(f"{where}: cannot cast {source_dtype} to {destination.dtype}")
        if not destination.flags.writeable:
            raise SinkError(f"{where}: destination array is read-only")
        return int(destination.shape[0])

    def submit(self, table: WriteTable, source: ByteSource) -> Completion:
        """Copy or read every row now (see the module docstring); returns a finished completion.

        Raises
        ------
        SinkError
            A destination cannot take its rows (nothing written).
        FormatError
            A file ended before a planned byte of a cold row; the slots the
            table names may then hold partial bytes and must not be committed.
        """
        if self._checked is not table:
            self.check(table)
        start = time.perf_counter()
        split = split_rows(table, source, self.read)
        cold: ColdRows | None = None
        if len(split.cold):
            cold = ColdRows(
                table, source, self.arrays, self.transpose, self.cold_reader,
                residency=self.read == "auto", bounces=self._bounces, bounce_nbytes=self.bounce_nbytes,
            )  # fmt: skip
        try:
            if cold is not None:
                cold.start(split.cold.tolist(), split.partial.tolist())  # reads run while resident rows copy
            warm = np.concatenate((split.resident, split.mapped)) if len(split.resident) else split.mapped
            if len(split.resident):
                _check_sizes(table, source, split.resident)
            threads = self._copy_rows(table, source, warm.tolist())
            if cold is not None:
                cold.finish()
        except BaseException:
            if cold is not None:
                cold.abort()
            raise
        tally: dict[str, int] = {}
        row_nbytes = table.row_nbytes()
        for label, rows in (("resident", split.resident), ("mapped", split.mapped)):
            if len(rows):
                tally[label] = int(row_nbytes[rows].sum())
        device = 0
        if cold is not None:
            for label, nbytes in cold.source_nbytes.items():
                tally[label] = tally.get(label, 0) + nbytes
            device = cold.device_nbytes
        sources = tuple((label, tally[label]) for label in ROW_SOURCES if tally.get(label))
        seconds = time.perf_counter() - start
        return Completed(WriteResult(table.nbytes, seconds, table.rows, threads, sources, device))

    def _copy_rows(self, table: WriteTable, source: ByteSource, rows: Sequence[int]) -> int:
        """Copy ``rows`` from the source's views, on two threads when they are large; returns threads used."""
        if not rows:
            return 1
        halves = _split(table, rows) if self.threads > 1 and table.nbytes >= PARALLEL_MIN_NBYTES else None
        if halves is None:
            self._copy(table, source, [(row, 0, int(table.count[row])) for row in rows])
            return 1
        helper = _copy_pool().submit(self._copy, table, source, halves[1])
        try:
            self._copy(table, source, halves[0])
        finally:
            helper.result()
        return 2

    def _copy(self, table: WriteTable, source: ByteSource, work: Sequence[Work]) -> None:
        for row, first, last in work:
            name = table.params[int(table.param[row])]
            view = source.view(table, row)[first:last]
            slot = int(table.slot[row]) + first
            copy_view(self.arrays[name][slot : slot + last - first], view, name in self.transpose)


def _check_sizes(table: WriteTable, source: ByteSource, rows: npt.NDArray[np.int64]) -> None:
    """Refuse before copying resident rows from a file that shrank since it was mapped
    (touching a mapped page past the end is SIGBUS)."""
    for file in np.unique(table.file[rows]).tolist():
        mapped = source.mapping(file)
        if mapped is not None:
            mapped.check_size()


def _split(table: WriteTable, rows: Sequence[int]) -> tuple[list[Work], list[Work]] | None:
    """``rows`` cut into two halves of about equal bytes (a row may be cut
    between slabs); None when there is nothing to share."""
    row_nbytes = table.row_nbytes()[np.asarray(rows, dtype=np.int64)]
    total = int(row_nbytes.sum())
    if total < PARALLEL_MIN_NBYTES:
        return None
    first_half: list[Work] = []
    second_half: list[Work] = []
    target = total / 2
    done = 0
    for row, nbytes in zip(rows, row_nbytes.tolist(), strict=True):
        count = int(table.count[row])
        if done >= target:
            second_half.append((row, 0, count))
        elif done + nbytes <= target:
            first_half.append((row, 0, count))
        else:
            cut = min(count, max(0, round((target - done) / (nbytes / count))))
            if cut:
                first_half.append((row, 0, cut))
            if cut < count:
                second_half.append((row, cut, count))
        done += nbytes
    if not first_half or not second_half:
        return None
    return first_half, second_half


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _copy_pool() -> ThreadPoolExecutor:
    """One helper copy thread for the process (the caller's thread is the other)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmapstore-copy")
        return _POOL


class ArraySink(DictSink):
    """Owns one preallocated, prefaulted ``[slots, ...]`` buffer per parameter.

    ``read``, ``reader`` and ``bounce_nbytes`` as in :class:`DictSink`.
    """

    @classmethod
    def allocate(
        cls,
        shapes: Mapping[str, tuple[tuple[int, ...], npt.DTypeLike]],
        transpose: Collection[str] = (),
        *,
        threads: int = 2,
        read: ReadMode = "auto",
        reader: ColdReader | None = None,
        bounce_nbytes: int = BOUNCE_NBYTES,
    ) -> ArraySink:
        """Zeroed buffers of the given ``(shape, dtype)`` per parameter, aligned
        so that ``O_DIRECT`` reads land in their slots without a bounce (on a
        huge page from 2 MiB up: see :func:`~mmapstore.io.aligned_empty`)."""
        arrays: dict[str, npt.NDArray[np.generic]] = {}
        for name, (shape, dtype) in shapes.items():
            count = 1
            for dim in shape:
                count *= dim
            raw = aligned_empty(count * np.dtype(dtype).itemsize)
            # Fresh anonymous memory is slow to first touch: fault it in now,
            # outside any refresh.
            raw[:] = 0
            arrays[name] = raw.view(dtype).reshape(shape)
        return cls(arrays, transpose, threads=threads, read=read, reader=reader, bounce_nbytes=bounce_nbytes)

    @classmethod
    def for_geometries(
        cls,
        geometry: StoreGeometry,
        capacity: int | Sequence[int] | None = None,
        *,
        dtype: npt.DTypeLike | None = None,
        orientation: SinkOrientation = "native",
        names: str = DEFAULT_PARAM_NAME,
        read: ReadMode = "auto",
        reader: ColdReader | None = None,
        bounce_nbytes: int = BOUNCE_NBYTES,
    ) -> ArraySink:
        """Buffers for every part of every stack.

        Parameters
        ----------
        capacity
            Slots per layer (one int for all, or one per MoE layer); None
            gives every expert a slot (a full-push destination).
        dtype
            Weight buffer dtype; None keeps the store's.  Casting happens in
            the copy.  Scales and biases keep their own dtype.
        orientation
            ``"native"``: slabs as the file stores them, so a refresh is a
            plain memcpy (and a cold row is read straight into its slot).
            ``"kn"``: GroupedMatMul ``[k, n]``.

        Raises
        ------
        SinkError
            An unknown orientation, a capacity per layer of the wrong length,
            or a cast or transpose asked of an encoded stack.
        """
        shapes, transpose = pool_shapes(geometry, capacity, dtype=dtype, orientation=orientation, names=names)
        return cls.allocate(shapes, transpose, read=read, reader=reader, bounce_nbytes=bounce_nbytes)

    @classmethod
    def for_store(
        cls,
        store: ExpertStore,
        capacity: int | Sequence[int] | None = None,
        *,
        dtype: npt.DTypeLike | None = None,
        orientation: SinkOrientation = "native",
        names: str = DEFAULT_PARAM_NAME,
        read: ReadMode = "auto",
        reader: ColdReader | None = None,
    ) -> ArraySink:
        """:meth:`for_geometries` of an open store."""
        return cls.for_geometries(
            geometries_of(store), capacity, dtype=dtype, orientation=orientation, names=names, read=read, reader=reader
        )


def pool_shapes(
    geometry: StoreGeometry,
    capacity: int | Sequence[int] | None = None,
    *,
    dtype: npt.DTypeLike | None = None,
    orientation: SinkOrientation = "native",
    names: str = DEFAULT_PARAM_NAME,
) -> tuple[dict[str, tuple[tuple[int, ...], npt.DTypeLike]], list[str]]:
    """``(param -> (shape, dtype), transposed params)`` of the buffers
    :meth:`ArraySink.for_geometries` allocates (same arguments, same errors)."""
    if orientation not in ("native", "kn"):
        raise SinkError(f"orientation must be 'native' or 'kn', got {orientation!r}")
    layers = geometry.layers
    if capacity is None:
        capacities = [layer.num_experts for layer in layers]
    elif isinstance(capacity, int):
        capacities = [min(capacity, layer.num_experts) for layer in layers]
    else:
        if len(capacity) != len(layers):
            raise SinkError(f"{len(capacity)} capacities for {len(layers)} MoE layers")
        capacities = [min(int(c), layer.num_experts) for c, layer in zip(capacity, layers, strict=True)]
    shapes: dict[str, tuple[tuple[int, ...], npt.DTypeLike]] = {}
    transpose = []
    for layer, slots in zip(layers, capacities, strict=True):
        for stack in layer.stacks:
            for part in stack.parts:
                name = param_name(names, layer.layer, stack.proj, part.part)
                flip = False
                buffer_dtype: npt.DTypeLike = part.dtype.numpy
                if part.part == "weight":
                    if stack.encoding.encoded and (
                        orientation != "native" or (dtype is not None and np.dtype(dtype) != part.dtype.numpy)
                    ):
                        raise SinkError(
                            f"{part.stack}: {stack.encoding.describe()} slabs are encoded; a cast or transposed "
                            "copy of them would not be their values (keep the store's dtype and native "
                            "orientation)"
                        )
                    flip = orientation == "kn" and part.orientation == "nk"
                    buffer_dtype = part.dtype.numpy if dtype is None else dtype
                shape = part.slab_shape[::-1] if flip else part.slab_shape
                shapes[name] = ((slots, *shape), buffer_dtype)
                if flip:
                    transpose.append(name)
    return shapes, transpose


def pool_nbytes(shapes: Mapping[str, tuple[tuple[int, ...], npt.DTypeLike]]) -> int:
    """Bytes of buffers of the given ``(shape, dtype)`` (see :func:`pool_shapes`)."""
    total = 0
    for shape, dtype in shapes.values():
        count = 1
        for dim in shape:
            count *= dim
        total += count * np.dtype(dtype).itemsize
    return total

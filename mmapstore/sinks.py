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
    :class:`~mmapstore.errors.SinkError` naming the parameter, the source
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
    :func:`mmapstore.apply.apply` and :class:`~mmapstore.service.SlabService`
    commit pools only after it.

Sinks that hold their destinations expose them as ``buffers`` (name ->
array or tensor).  The numpy sinks here complete synchronously: ``submit``
copies, on two threads when the table is large, and returns a finished
completion.  Every sink passes :class:`mmapstore.testing.SinkTests`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import numpy.typing as npt

from .dtypes import can_cast
from .errors import SinkError
from .kernels import copy_slab
from .planner import DEFAULT_PARAM_NAME, StoreGeometry, geometries_of, param_name
from .source import ByteSource
from .writes import WriteTable

if TYPE_CHECKING:
    from .store import ExpertStore

__all__ = [
    "PARALLEL_MIN_NBYTES",
    "ArraySink",
    "Completed",
    "Completion",
    "DictSink",
    "Sink",
    "SinkOrientation",
    "WriteResult",
]

SinkOrientation = Literal["native", "kn"]

PARALLEL_MIN_NBYTES = 32 << 20
"""Tables at least this large are copied on two threads (one memcpy thread
does not saturate memory bandwidth out of the page cache)."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a completed submission moved: bytes delivered, wall seconds from
    submit to completion, rows and copy threads used."""

    nbytes: int
    seconds: float
    rows: int
    threads: int = 1


class Completion(Protocol):
    def done(self) -> bool: ...

    def wait(self) -> WriteResult: ...


class Sink(Protocol):
    def check(self, table: WriteTable) -> None: ...

    def submit(self, table: WriteTable, source: ByteSource) -> Completion: ...


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
        Copy threads for large tables (1 or 2).
    """

    def __init__(
        self,
        arrays: MutableMapping[str, npt.NDArray[np.generic]],
        transpose: Collection[str] = (),
        *,
        threads: int = 2,
    ) -> None:
        if threads not in (1, 2):
            raise SinkError(f"threads must be 1 or 2, got {threads!r}")
        self.arrays = arrays
        self.transpose = frozenset(transpose)
        self.threads = threads
        self._checked: WriteTable | None = None

    @property
    def buffers(self) -> Mapping[str, npt.NDArray[np.generic]]:
        return self.arrays

    def check(self, table: WriteTable) -> None:
        """See the module docstring.  Raises :class:`SinkError`."""
        capacity = np.zeros(len(table.params), dtype=np.int64)
        for param in table.used_params().tolist():
            capacity[param] = self._check_param(table, param)
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
        """Copy every row now (see the module docstring); returns a finished completion."""
        if self._checked is not table:
            self.check(table)
        start = time.perf_counter()
        halves = _split(table) if self.threads > 1 and table.nbytes >= PARALLEL_MIN_NBYTES else None
        if halves is None:
            self._copy(table, source, [(row, 0, int(table.count[row])) for row in range(table.rows)])
            threads = 1
        else:
            helper = _copy_pool().submit(self._copy, table, source, halves[1])
            try:
                self._copy(table, source, halves[0])
            finally:
                helper.result()
            threads = 2
        return Completed(WriteResult(table.nbytes, time.perf_counter() - start, table.rows, threads))

    def _copy(self, table: WriteTable, source: ByteSource, work: Sequence[Work]) -> None:
        for row, first, last in work:
            name = table.params[int(table.param[row])]
            view = source.view(table, row)[first:last]
            slot = int(table.slot[row]) + first
            destination = self.arrays[name][slot : slot + last - first]
            if name in self.transpose:
                copy_slab(destination, view.swapaxes(-1, -2))
            else:
                # check() allowed the cast; "unsafe" lets numpy do float-to-float
                # casts between ml_dtypes types that its same_kind rule does not know.
                np.copyto(destination, view, casting="unsafe")


def _split(table: WriteTable) -> tuple[list[Work], list[Work]] | None:
    """The rows cut into two halves of about equal bytes (a row may be cut
    between slabs); None when there is nothing to share."""
    row_nbytes = table.row_nbytes()
    total = int(row_nbytes.sum())
    if total == 0:
        return None
    first_half: list[Work] = []
    second_half: list[Work] = []
    target = total / 2
    done = 0
    for row, nbytes in enumerate(row_nbytes.tolist()):
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
    """Owns one preallocated, prefaulted ``[slots, ...]`` buffer per parameter."""

    @classmethod
    def allocate(
        cls,
        shapes: Mapping[str, tuple[tuple[int, ...], npt.DTypeLike]],
        transpose: Collection[str] = (),
        *,
        threads: int = 2,
    ) -> ArraySink:
        """Zeroed buffers of the given ``(shape, dtype)`` per parameter."""
        arrays: dict[str, npt.NDArray[np.generic]] = {}
        for name, (shape, dtype) in shapes.items():
            buffer = np.empty(shape, dtype=dtype)
            # Fresh anonymous memory is slow to first touch: fault it in now,
            # outside any refresh.
            buffer.view(np.uint8).reshape(-1)[:] = 0
            arrays[name] = buffer
        return cls(arrays, transpose, threads=threads)

    @classmethod
    def for_geometries(
        cls,
        geometry: StoreGeometry,
        capacity: int | Sequence[int] | None = None,
        *,
        dtype: npt.DTypeLike | None = None,
        orientation: SinkOrientation = "native",
        names: str = DEFAULT_PARAM_NAME,
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
            plain memcpy.  ``"kn"``: GroupedMatMul ``[k, n]``.

        Raises
        ------
        SinkError
            An unknown orientation, a capacity per layer of the wrong length,
            or a cast or transpose asked of an encoded stack.
        """
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
        return cls.allocate(shapes, transpose)

    @classmethod
    def for_store(
        cls,
        store: ExpertStore,
        capacity: int | Sequence[int] | None = None,
        *,
        dtype: npt.DTypeLike | None = None,
        orientation: SinkOrientation = "native",
        names: str = DEFAULT_PARAM_NAME,
    ) -> ArraySink:
        """:meth:`for_geometries` of an open store."""
        return cls.for_geometries(geometries_of(store), capacity, dtype=dtype, orientation=orientation, names=names)

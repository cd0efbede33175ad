"""Write tables: what a plan asks a sink to copy, as parallel arrays.

A :class:`WriteTable` never holds bytes or views.  Row ``r`` says: experts
``expert[r] .. expert[r] + count[r] - 1`` of part ``geometries[param[r]]``
go to slots ``slot[r] .. slot[r] + count[r] - 1`` of parameter
``params[param[r]]``; their bytes are the contiguous file range
``[offset[r], offset[r] + extent[r])`` of ``files[file[r]]``.  A sink turns
a row into bytes through a source (a view of a mapping, a ``pread``, a DMA
from registered pages) only when it copies.

``reads`` are the same ranges merged per file, sorted, for prefetching.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from ._errors import SinkError
from ._geometry import Encoding, PartGeometry

__all__ = ["ReadRanges", "WriteTable", "merge_ranges"]

Int64Array = npt.NDArray[np.int64]
_T = TypeVar("_T", bound=np.generic)


@dataclass(frozen=True, slots=True, eq=False)
class ReadRanges:
    """Merged, sorted byte ranges that a table reads: ``file`` (index into the
    table's ``files``), absolute ``offset`` and ``nbytes`` per range."""

    file: Int64Array
    offset: Int64Array
    nbytes: Int64Array

    @property
    def total_nbytes(self) -> int:
        return int(self.nbytes.sum())

    def __len__(self) -> int:
        return len(self.file)


@dataclass(frozen=True, slots=True, eq=False)
class WriteTable:
    """Parallel read-only arrays, one row per contiguous run of slabs of one part.

    Attributes
    ----------
    params
        Destination parameter names; ``param`` indexes them.
    geometries
        The source part of each parameter (aligned with ``params``).
    encodings
        The encoding of each parameter's stack (aligned with ``params``); a
        sink refuses to cast or transpose encoded weight bytes.
    files
        Source file paths; ``file`` indexes them.
    param, slot, expert, count, file, offset, extent
        The rows (``param`` int32, the rest int64).
    nbytes
        Bytes the rows deliver: ``sum(count * slab_nbytes)`` (``extent`` may
        be larger for a strided half of a fused slab).
    reads
        The rows' byte ranges merged per file.
    """

    params: tuple[str, ...]
    geometries: tuple[PartGeometry, ...]
    encodings: tuple[Encoding, ...]
    files: tuple[str, ...]
    param: npt.NDArray[np.int32]
    slot: Int64Array
    expert: Int64Array
    count: Int64Array
    file: Int64Array
    offset: Int64Array
    extent: Int64Array
    nbytes: int = field(init=False)
    reads: ReadRanges = field(init=False)

    def __post_init__(self) -> None:
        if not len(self.params) == len(self.geometries) == len(self.encodings):
            raise SinkError(
                f"write table: {len(self.params)} params, {len(self.geometries)} geometries and "
                f"{len(self.encodings)} encodings must align"
            )
        rows = len(self.param)
        for name in ("param", "slot", "expert", "count", "file", "offset", "extent"):
            array = getattr(self, name)
            wanted = np.int32 if name == "param" else np.int64
            if not isinstance(array, np.ndarray) or array.dtype != wanted or array.shape != (rows,):
                found = f"{array.dtype} {list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
                raise SinkError(f"write table: column {name!r} must be {np.dtype(wanted)} [{rows}], got {found}")
            object.__setattr__(self, name, _read_only(array))
        if rows and (int(self.param.min()) < 0 or int(self.param.max()) >= len(self.params)):
            raise SinkError(f"write table: param ids outside [0, {len(self.params)})")
        if rows and (int(self.file.min()) < 0 or int(self.file.max()) >= len(self.files)):
            raise SinkError(f"write table: file ids outside [0, {len(self.files)})")
        slab_nbytes = _slab_nbytes(self.geometries)
        object.__setattr__(self, "nbytes", int((self.count * slab_nbytes[self.param]).sum()) if rows else 0)
        object.__setattr__(self, "reads", merge_ranges(self.file, self.offset, self.extent))

    @property
    def rows(self) -> int:
        return len(self.param)

    def __len__(self) -> int:
        return len(self.param)

    def param_name(self, row: int) -> str:
        return self.params[int(self.param[row])]

    def geometry(self, row: int) -> PartGeometry:
        return self.geometries[int(self.param[row])]

    def used_params(self) -> npt.NDArray[np.intp]:
        """Ids of the parameters some row writes, ascending."""
        if not len(self.param):
            return np.zeros(0, dtype=np.intp)
        return np.flatnonzero(np.bincount(self.param, minlength=len(self.params)))

    def row_nbytes(self) -> Int64Array:
        """Bytes each row delivers."""
        return self.count * _slab_nbytes(self.geometries)[self.param]

    def __repr__(self) -> str:
        return (
            f"WriteTable(rows={len(self.param)}, params={len(self.params)}, files={len(self.files)}, "
            f"nbytes={self.nbytes}, reads={self.reads.total_nbytes})"
        )

    @classmethod
    def empty(cls) -> WriteTable:
        int64 = np.zeros(0, dtype=np.int64)
        return cls((), (), (), (), np.zeros(0, dtype=np.int32), int64, int64, int64, int64, int64, int64)


def merge_ranges(file: Int64Array, offset: Int64Array, nbytes: Int64Array) -> ReadRanges:
    """Ranges ``[offset, offset + nbytes)`` of each file, sorted, with
    overlapping and touching ranges merged (array operations only)."""
    if not len(file):
        empty = np.zeros(0, dtype=np.int64)
        return ReadRanges(empty, empty, empty)
    single_file = bool((file == file[0]).all())
    order = np.argsort(offset, kind="stable") if single_file else np.lexsort((offset, file))
    files, starts = file[order], offset[order]
    ends = starts + nbytes[order]
    # The running maximum of ends must restart at each file: lift every file's
    # ends above all earlier files' by a per-file base (no overflow: ends are
    # file offsets and files number at most a few thousand).
    top = int(ends.max()) + 1
    if top * (int(files[-1]) + 1) < 2**62:
        lifted = np.maximum.accumulate(ends + files * top) - files * top
    else:
        lifted = _per_file_running_max(files, ends)
    fresh = np.flatnonzero((starts[1:] > lifted[:-1]) | (files[1:] != files[:-1])) + 1
    firsts = np.concatenate(([0], fresh))
    lasts = np.concatenate((fresh - 1, [len(starts) - 1]))
    return ReadRanges(_read_only(files[firsts]), _read_only(starts[firsts]), _read_only(lifted[lasts] - starts[firsts]))


def _per_file_running_max(files: Int64Array, ends: Int64Array) -> Int64Array:
    result: Int64Array = ends.copy()
    bounds = np.flatnonzero(np.diff(files)) + 1
    for piece in np.split(np.arange(len(files)), bounds):
        result[piece] = np.maximum.accumulate(ends[piece])
    return result


_SLAB_NBYTES: dict[int, tuple[tuple[PartGeometry, ...], Int64Array]] = {}


def _slab_nbytes(geometries: tuple[PartGeometry, ...]) -> Int64Array:
    """``slab_nbytes`` of each geometry as an array, memoised per tuple (a
    planner hands every table of a store the same tuple)."""
    cached = _SLAB_NBYTES.get(id(geometries))
    if cached is not None and cached[0] is geometries:
        return cached[1]
    values = np.array([geometry.slab_nbytes for geometry in geometries], dtype=np.int64)
    if len(_SLAB_NBYTES) >= 64:
        _SLAB_NBYTES.clear()
    _SLAB_NBYTES[id(geometries)] = (geometries, values)
    return values


def _read_only(array: npt.NDArray[_T]) -> npt.NDArray[_T]:
    if not array.flags.writeable:
        return array
    frozen: npt.NDArray[_T] = array.view()
    frozen.flags.writeable = False
    return frozen

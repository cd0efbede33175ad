"""Sources: how a sink obtains the bytes a write table names.

:class:`MappedSource` serves rows as zero-copy views of a store's long-lived
read-only mappings (the page cache is the only copy).  Any object with the
same methods is a source (see :class:`ByteSource`); ``mmapstore.testing``
has one over in-memory buffers.

Prefetch hints the kernel only about pages that are not resident
(``mincore``): ``MADV_WILLNEED`` on pages already in memory costs ~20% of a
warm refresh and doubles the latency of one warm slab.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import numpy.typing as npt

from ._errors import FormatError, SinkError, StoreClosedError
from ._mapping import MADV_POPULATE_READ, MADV_WILLNEED, PAGE_NBYTES, FileMaps, MappedFile

if TYPE_CHECKING:  # a value of the plan layer, read here only through its fields
    from ._writes import ReadRanges, WriteTable

__all__ = [
    "PREFETCH_MODES",
    "WILLNEED_CHUNK_NBYTES",
    "ByteSource",
    "MappedSource",
    "Prefetch",
    "nonresident_spans",
]

Prefetch = Literal["willneed", "willneed+populate", "none"]
PREFETCH_MODES: tuple[Prefetch, ...] = ("willneed", "willneed+populate", "none")

# The kernel caps one MADV_WILLNEED at max(read-ahead, device I/O size)
# (8 MiB here) and silently ignores the rest; the tail is then faulted in by
# ordinary read-ahead, which over-reads past the range (1.35x measured).
# Hinting in 4 MiB pieces schedules every byte and nothing else.
WILLNEED_CHUNK_NBYTES = 4 << 20


class ByteSource(Protocol):
    """What a sink reads bytes through.

    ``files`` are the paths a table's ``file`` ids index (a table must have
    the same ``files``).  ``view(table, row)`` is the zero-copy
    ``[count, *slab_shape]`` array of a row (the geometry's dtype and
    strides); ``mapping(file)`` the mapped file (None when the bytes are not
    a file mapping), ``path(file)`` its path.  ``check(table)`` raises before
    anything is written if some row cannot be served; ``prefetch`` hints.
    """

    @property
    def files(self) -> tuple[str, ...]: ...

    def check(self, table: WriteTable) -> None: ...

    def view(self, table: WriteTable, row: int) -> npt.NDArray[np.generic]: ...

    def mapping(self, file: int) -> MappedFile | None: ...

    def path(self, file: int) -> str: ...

    def prefetch(self, table: WriteTable, mode: Prefetch = "willneed") -> None: ...


class MappedSource:
    """Rows of write tables as views of a store's mappings.

    Made by :meth:`ExpertStore.byte_source`; the mappings live as long as the
    store is open, so page tables filled by one refresh serve the next.

    Parameters
    ----------
    maps
        The store's mappings (each file mapped once).
    files
        The store's files; a table may only name these.
    where
        The store's path, for messages.
    paths
        The path of each of ``files`` when the names a table uses are not
        paths (test sources over named buffers written to files); default
        ``files``.
    """

    def __init__(
        self, maps: FileMaps, files: tuple[str, ...], *, where: str, paths: tuple[str, ...] | None = None
    ) -> None:
        self._maps = maps
        self._files = files
        self._where = where
        self._paths = files if paths is None else paths
        if len(self._paths) != len(files):
            raise SinkError(f"{where}: {len(self._paths)} paths for {len(files)} files")

    @property
    def files(self) -> tuple[str, ...]:
        return self._files

    def check(self, table: WriteTable) -> None:
        """Every row can be served: the store is open, every file belongs to
        it, no file shrank since it was mapped, every range lies inside its file.

        Raises
        ------
        StoreClosedError, SinkError, FormatError
        """
        if self._maps.closed:
            raise StoreClosedError(f"{self._where}: the store is closed")
        if table.files is not self._files and table.files != self._files:
            raise SinkError(
                f"{self._where}: the write table was planned over other files ({len(table.files)}, "
                f"first {list(table.files[:1])}) than this store's ({len(self._files)})"
            )
        reads = table.reads
        if not len(reads):
            return
        ends = reads.offset + reads.nbytes
        for file in np.unique(reads.file).tolist():
            mapped = self._maps.get(self._paths[file])
            mapped.check_size()
            last = int(ends[reads.file == file].max())
            if last > mapped.nbytes:
                raise FormatError(f"{mapped.path}: write table reads up to byte {last}, the file has {mapped.nbytes}")

    def view(self, table: WriteTable, row: int) -> npt.NDArray[np.generic]:
        geometry = table.geometries[int(table.param[row])]
        count = int(table.count[row])
        stride = geometry.stride if geometry.stride is not None else geometry.extent
        mapped = self._maps.get(self._paths[int(table.file[row])])
        return mapped.view(
            int(table.offset[row]) + geometry.view_delta,
            geometry.dtype.numpy,
            (count, *geometry.slab_shape),
            (stride, *geometry.slab_strides),
        )

    def mapping(self, file: int) -> MappedFile:
        return self._maps.get(self._paths[file])

    def path(self, file: int) -> str:
        return self._paths[file]

    def prefetch(self, table: WriteTable, mode: Prefetch = "willneed") -> None:
        """Hint the kernel about exactly the table's ranges: ``MADV_WILLNEED``
        on their pages that are not resident (their I/O in flight at once,
        nothing read past them, nothing spent on cached pages); with
        ``"willneed+populate"`` also ``MADV_POPULATE_READ`` on each range
        (maps it in one call instead of a minor fault per page; it waits for
        the I/O, so on a cold cache it serialises what the copy would overlap).
        """
        if mode == "none" or not len(table.reads):
            return
        prefetch_reads(self._maps, self._paths, table.reads, mode)


def prefetch_reads(maps: FileMaps, files: tuple[str, ...], reads: ReadRanges, mode: Prefetch) -> None:
    """:meth:`MappedSource.prefetch` over explicit merged ranges."""
    ranges = list(zip(reads.file.tolist(), reads.offset.tolist(), reads.nbytes.tolist(), strict=True))
    for file, offset, nbytes in ranges:
        mapped = maps.get(files[file])
        for start, length in nonresident_spans(mapped, offset, nbytes):
            for piece in range(start, start + length, WILLNEED_CHUNK_NBYTES):
                mapped.advise(piece, min(WILLNEED_CHUNK_NBYTES, start + length - piece), MADV_WILLNEED)
    if mode != "willneed+populate":
        return
    for file, offset, nbytes in ranges:
        try:
            maps.get(files[file]).advise(offset, nbytes, MADV_POPULATE_READ)
        except OSError:  # kernel before 5.14: the copy faults the pages in instead
            return


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int


def nonresident_spans(mapped: MappedFile, offset: int, nbytes: int) -> list[tuple[int, int]]:
    """``(offset, nbytes)`` of the page-aligned runs of file bytes
    ``[offset, offset + nbytes)`` that are not in memory now (``mincore``)."""
    end = min(offset + nbytes, mapped.nbytes)
    if end <= offset or mapped.closed:
        return []
    start = offset - offset % PAGE_NBYTES
    pages = (end - start + PAGE_NBYTES - 1) // PAGE_NBYTES
    vector = np.zeros(pages, dtype=np.uint8)
    if (
        _libc.mincore(
            ctypes.c_void_p(mapped.address + start),
            ctypes.c_size_t(end - start),
            vector.ctypes.data_as(ctypes.c_void_p),
        )
        != 0
    ):
        error = ctypes.get_errno()
        raise OSError(error, f"mincore failed on {mapped.path}: {os.strerror(error)}")
    missing = (vector & 1) == 0
    if not missing.any():
        return []
    if missing.all():
        return [(start, end - start)]
    edges = np.diff(missing.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    firsts = np.flatnonzero(edges == 1)
    lasts = np.flatnonzero(edges == -1)
    return [
        (start + first * PAGE_NBYTES, min(last * PAGE_NBYTES, end - start) - first * PAGE_NBYTES)
        for first, last in zip(firsts.tolist(), lasts.tolist(), strict=True)
    ]

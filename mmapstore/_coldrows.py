"""One source choice per row: copy what is resident, read what is cold.

A numpy sink (:class:`~mmapstore._sinks.DictSink`, :class:`~mmapstore._sinks.ArraySink`)
sorts the rows of a write table before copying, according to its read mode:

``"auto"`` (the default)
    A row whose every page ``mincore`` reports resident is copied from the
    mapping (memcpy speed, no I/O).  Any other row is read by a
    :class:`~mmapstore.io.ColdReader`: many ``preadv`` in flight, ``O_DIRECT``
    where the file system accepts it, exact bytes; resident pieces of a
    partly resident row are still copied from the mapping by the reader.
``"map"``
    Every row is copied from the mapping; pages that are not resident are
    faulted in by the copy after a ``MADV_WILLNEED`` hint (the path before
    the reader existed: fine when the store fits in RAM and is warm).
``"reader"``
    Every row is read explicitly; the mapping is never touched, so no
    truncation of the file can end in SIGBUS, whatever is resident.

A cold row is read straight into the destination slot slice when its slabs
are contiguous and stored as the destination holds them (same dtype, native
orientation, not a strided half of a fused slab, a C-contiguous slice).
Slabs of an expert-major store (each part's slab dense, experts a record
apart) that qualify likewise are gathered by file offset: the parts of one
record, and of adjacent records, land in their slots with one scatter
``preadv`` (:meth:`~mmapstore.io.ColdReader.submit_scatter`).
Otherwise its byte range is read into a bounded bounce buffer (two, so that
the next batch is read while the last one is laid out) and the shared copy
kernel :func:`~mmapstore._kernels.copy_slab` casts or transposes it from
there.  Bounced ranges that overlap or lie less than a block apart are
read as one: the gate and up halves of one fused slab, and every part of
an expert in an expert-major store (one read per expert, or per run of
adjacent experts, up to the bounce size).

A file that ends before a planned byte raises
:class:`~mmapstore._errors.FormatError` naming it; a short read is never
served as data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from ._errors import MmapStoreError, SinkError
from ._geometry import PartGeometry, c_strides
from ._kernels import copy_slab
from ._mapping import MappedFile
from .io import ALIGN_NBYTES, ColdReader, ReadHandle, ReadRequest, ReadResult, ScatterRequest, aligned_empty

if TYPE_CHECKING:
    from ._source import ByteSource
    from ._writes import WriteTable

__all__ = [
    "BOUNCE_NBYTES",
    "READ_MODES",
    "ROW_SOURCES",
    "ColdRows",
    "ReadMode",
    "RowSource",
    "RowSplit",
    "copy_view",
    "lays_out",
    "split_rows",
]

ReadMode = Literal["auto", "map", "reader"]
READ_MODES: tuple[ReadMode, ...] = ("auto", "map", "reader")

RowSource = Literal["resident", "mapped", "direct", "bounced", "buffered", "prefetched"]
"""Where delivered bytes came from.

``resident``: copied from the mapping, every page resident when checked.
``mapped``: copied from the source's view without a residency check (read
mode ``"map"``, or a source with no file mapping); missing pages were
faulted in by the copy.  ``direct``, ``bounced``, ``buffered``,
``prefetched``: read by the :class:`~mmapstore.io.ColdReader` (see
:data:`mmapstore.io.Source`).
"""

ROW_SOURCES: tuple[RowSource, ...] = ("resident", "mapped", "direct", "bounced", "buffered", "prefetched")

BOUNCE_NBYTES = 32 << 20
"""Default size of each of a sink's two bounce buffers (rows that are cast,
transposed or strided halves); a single slab larger than this gets a
buffer of its own for that refresh."""


@dataclass(frozen=True, slots=True, eq=False)
class RowSplit:
    """Row ids of a table by source choice: ``resident`` and ``mapped`` rows
    are copied from the source's views, ``cold`` rows are read; ``partial``
    (a subset of ``cold``) had some pages resident, which the reader then
    copies from the mapping instead of reading."""

    resident: npt.NDArray[np.int64]
    mapped: npt.NDArray[np.int64]
    cold: npt.NDArray[np.int64]
    partial: npt.NDArray[np.int64]  # cold rows with some pages resident (read piece by piece)


def split_rows(table: WriteTable, source: ByteSource, mode: ReadMode) -> RowSplit:
    """Choose each row's source (see the module docstring).

    Rows of files the source has no mapping for (in-memory sources) are
    always copied from its views.  A row whose first page is not resident
    is cold without looking further (``mincore`` over a cold range costs
    tens of nanoseconds a page: 8 ms for 500 MiB); the others are checked
    page by page.
    """
    rows = np.arange(table.rows, dtype=np.int64)
    none = np.zeros(0, dtype=np.int64)
    if mode == "map" or not table.rows:
        return RowSplit(none, rows, none, none)
    mappings = {file: source.mapping(file) for file in np.unique(table.file).tolist()}
    choice = np.full(table.rows, _COLD, dtype=np.int8)
    files, offsets, extents = table.file.tolist(), table.offset.tolist(), table.extent.tolist()
    for row, (file, offset, extent) in enumerate(zip(files, offsets, extents, strict=True)):
        mapped = mappings[file]
        if mapped is None:
            choice[row] = _MAPPED
        elif mode == "auto" and mapped.page_resident(offset):
            pages = mapped.resident_pages(offset, extent)
            choice[row] = _RESIDENT if pages.all() else _PARTIAL
    return RowSplit(rows[choice == _RESIDENT], rows[choice == _MAPPED], rows[choice >= _COLD], rows[choice == _PARTIAL])


_RESIDENT, _MAPPED, _COLD, _PARTIAL = 0, 1, 2, 3


def copy_view(destination: npt.NDArray[np.generic], view: npt.NDArray[np.generic], transposed: bool) -> None:
    """Lay ``view`` (``[count, *native slab]``) into ``destination`` (cast; transposed if asked)."""
    if transposed:
        copy_slab(destination, view.swapaxes(-1, -2))
    else:
        # check() allowed the cast; "unsafe" lets numpy do float-to-float
        # casts between ml_dtypes types that its same_kind rule does not know.
        np.copyto(destination, view, casting="unsafe")


def _contiguous(geometry: PartGeometry) -> bool:
    """Whether a run of this part's slabs is one dense range of the slabs' own bytes."""
    return (
        geometry.view_delta == 0
        and geometry.extent == geometry.slab_nbytes
        and tuple(geometry.slab_strides) == c_strides(geometry.slab_shape, geometry.dtype.itemsize)
        and (geometry.stride is None or geometry.stride == geometry.extent)
    )


def lays_out(geometry: PartGeometry, destination_dtype: np.dtype[np.generic], transposed: bool) -> bool:
    """Whether cold rows of this part into a C-contiguous pool of
    ``destination_dtype`` (``transposed`` or not) may go through a sink's
    bounce buffers: a cast, a transpose, a strided or partial slab, or a
    partly resident expert-major record.  False: every cold row of it is read
    straight into its slots (the bounce buffers are never made for it)."""
    return transposed or destination_dtype != geometry.dtype.numpy or not _contiguous(geometry)


def _in_records(geometry: PartGeometry) -> bool:
    """Whether each slab of this part is dense, experts further apart than a
    slab (a part of an expert-major record)."""
    return (
        geometry.view_delta == 0
        and geometry.extent == geometry.slab_nbytes
        and tuple(geometry.slab_strides) == c_strides(geometry.slab_shape, geometry.dtype.itemsize)
        and geometry.stride is not None
        and geometry.stride > geometry.extent
    )


@dataclass(frozen=True, slots=True)
class _Item:
    """Slabs ``first .. last-1`` of a row, laid out from a bounce range."""

    row: int
    first: int
    last: int
    key: tuple[int, int, int]  # file, offset, nbytes of the range read


@dataclass(frozen=True, slots=True)
class _Batch:
    """Merged ranges read into one bounce buffer (``reads[range]`` is its
    position) and the items laid out from them (``positions[item.key]``)."""

    reads: dict[tuple[int, int, int], int]
    positions: dict[tuple[int, int, int], int]
    items: tuple[_Item, ...]
    nbytes: int  # bounce bytes the batch needs


class ColdRows:
    """Cold rows of one submission in flight (see the module docstring).

    :meth:`start` queues every read and returns; :meth:`finish` lays out the
    bounced rows and waits for the direct ones; :meth:`abort` cancels and
    waits, so that no reader thread writes a destination after it returns.

    Parameters
    ----------
    table, source
        The submission.
    arrays, transpose
        The sink's destinations and the params stored transposed.
    reader
        The reader.
    residency
        Copy resident pieces of cold rows from the mapping (read mode
        ``"auto"``); False reads every byte (``"reader"``).
    bounces
        The sink's reusable bounce buffers (grown here when too small).
    bounce_nbytes
        Bytes of bounce ranges per batch.
    """

    def __init__(
        self,
        table: WriteTable,
        source: ByteSource,
        arrays: Mapping[str, npt.NDArray[np.generic]],
        transpose: Collection[str],
        reader: ColdReader,
        *,
        residency: bool,
        bounces: list[npt.NDArray[np.uint8]],
        bounce_nbytes: int = BOUNCE_NBYTES,
    ) -> None:
        self._table = table
        self._source = source
        self._arrays = arrays
        self._transpose = transpose
        self._reader = reader
        self._residency = residency
        self._bounces = bounces
        self._bounce_nbytes = bounce_nbytes
        # Room for one alignment block more than the ranges: each range starts
        # at a position congruent to its file offset.
        self._capacity = bounce_nbytes + ALIGN_NBYTES
        self._mappings: dict[int, MappedFile | None] = {}
        self._gap = np.empty(ALIGN_NBYTES, dtype=np.uint8)  # padding read between scattered parts
        self._direct: list[tuple[ReadHandle, int]] = []  # handle, bytes it delivers
        self._partial: frozenset[int] = frozenset()
        self._batches: list[_Batch] = []
        self._pending: list[ReadHandle] = []
        self._next = 0
        self.source_nbytes: Counter[str] = Counter()
        self.device_nbytes = 0

    # -- public ----------------------------------------------------------------

    def start(self, rows: Iterable[int], partial: Iterable[int] = ()) -> None:
        """Queue the reads of ``rows``; returns without waiting.

        With ``residency``, the rows in ``partial`` (some pages resident) are
        read piece by piece, copying resident pieces from the mapping; the
        others are read whole.  Whole rows read straight into their slots go
        to the reader as they are made (table order), so the disk is busy
        while the other rows are still being sorted out.
        """
        self._partial = frozenset(partial) if self._residency else frozenset()
        pieces: list[ReadRequest] = []  # partly resident rows
        items: list[_Item] = []
        scattered: list[tuple[int, int, npt.NDArray[np.uint8]]] = []  # file, offset, destination
        whole_nbytes = 0

        def whole() -> Iterator[ReadRequest]:
            """Rows read whole, straight into their slots; collects the others on the way."""
            nonlocal whole_nbytes
            table = self._table
            for row in rows:
                param = int(table.param[row])
                geometry = table.geometries[param]
                name = table.params[param]
                count, slot = int(table.count[row]), int(table.slot[row])
                destination = self._arrays[name][slot : slot + count]
                same = (
                    name not in self._transpose
                    and destination.dtype == geometry.dtype.numpy
                    and destination.flags.c_contiguous
                )
                if same and _contiguous(geometry):
                    request = self._request(int(table.file[row]), int(table.offset[row]), _bytes_of(destination))
                    if row in self._partial:
                        pieces.append(request)
                    else:
                        whole_nbytes += request.nbytes
                        yield request
                elif same and _in_records(geometry) and row not in self._partial:
                    assert geometry.stride is not None
                    file, offset = int(table.file[row]), int(table.offset[row])
                    scattered.extend(
                        (file, offset + index * geometry.stride, _bytes_of(destination[index]))
                        for index in range(count)
                    )
                else:
                    items.extend(self._items(row, geometry, count))

        handle = self._reader.submit(whole(), residency=False)
        if whole_nbytes:
            self._direct.append((handle, whole_nbytes))
        if scattered:
            nbytes = sum(destination.nbytes for _, _, destination in scattered)
            self._direct.append((self._reader.submit_scatter(self._scatter_requests(scattered)), nbytes))
        if pieces:
            pieces.sort(key=lambda request: (request.path, request.offset))  # the disk in file order
            nbytes = sum(request.nbytes for request in pieces)
            self._direct.append((self._reader.submit(pieces, residency=True), nbytes))
        self._batches = self._plan_batches(items)
        self._submit_next()

    def finish(self) -> None:
        """Lay out every bounced row, wait for the direct ones; tallies bytes per source.

        Raises
        ------
        FormatError
            A file ended before a planned byte (it shrank since it was planned).
        ReadCancelledError
            The reads were cancelled.
        """
        for index, batch in enumerate(self._batches):
            self._submit_next()  # the next batch reads while this one is laid out
            handle = self._pending.pop(0)
            result = handle.wait()
            self._lay_out(batch, self._bounces[index % 2])
            delivered = sum(self._slabs_nbytes(item) for item in batch.items)
            self._tally(result, delivered)
        for handle, nbytes in self._direct:
            self._tally(handle.wait(), nbytes)

    def abort(self) -> None:
        """Cancel every read in flight and wait for the threads to let go of the destinations."""
        handles = [*self._pending, *(handle for handle, _ in self._direct)]
        for handle in handles:
            handle.cancel()
        for handle in handles:
            try:
                handle.wait()
            except MmapStoreError:
                pass  # cancelled or failed: what matters is that nothing runs any more

    # -- planning ----------------------------------------------------------------

    def _mapping(self, file: int) -> MappedFile | None:
        if file not in self._mappings:
            self._mappings[file] = self._source.mapping(file)
        return self._mappings[file]

    def _request(self, file: int, offset: int, destination: npt.NDArray[np.uint8]) -> ReadRequest:
        mapped = self._mapping(file)
        identity = mapped.identity if mapped is not None else None
        return ReadRequest(self._source.path(file), offset, destination, mapped, identity)

    def _scatter_requests(self, pieces: list[tuple[int, int, npt.NDArray[np.uint8]]]) -> list[ScatterRequest]:
        """Pieces of one file less than a block apart joined into scatter
        requests of at most ``bounce_nbytes`` (the padding between two parts of
        a record lands in a scratch buffer no one reads)."""
        pieces.sort(key=lambda piece: (piece[0], piece[1]))
        groups: list[list[tuple[int, int, npt.NDArray[np.uint8]]]] = []
        size = 0
        for piece in pieces:
            if groups:
                file, offset, last = groups[-1][-1]
                gap = piece[1] - offset - last.nbytes
                if piece[0] == file and 0 <= gap < ALIGN_NBYTES and size + gap + piece[2].nbytes <= self._bounce_nbytes:
                    if gap:
                        groups[-1].append((file, offset + last.nbytes, self._gap[:gap]))
                    groups[-1].append(piece)
                    size += gap + piece[2].nbytes
                    continue
            groups.append([piece])
            size = piece[2].nbytes
        requests = []
        for group in groups:
            file, offset, _ = group[0]
            mapped = self._mapping(file)
            identity = mapped.identity if mapped is not None else None
            destinations = tuple(destination for _, _, destination in group)
            requests.append(ScatterRequest(self._source.path(file), offset, destinations, mapped, identity))
        return requests

    def _items(self, row: int, geometry: PartGeometry, count: int) -> list[_Item]:
        """The row cut into runs of slabs whose ranges each fit a bounce batch (one slab at least)."""
        table = self._table
        step = geometry.stride if geometry.stride is not None else geometry.extent
        if step > geometry.extent:
            # Records of several parts (expert-major): every part of a row cut
            # at the same experts, so their ranges merge into whole records.
            per_run = max(1, self._bounce_nbytes // step)
        else:
            per_run = max(1, (self._bounce_nbytes - geometry.extent) // step + 1) if step else count
        file, offset = int(table.file[row]), int(table.offset[row])
        items = []
        for first in range(0, count, per_run):
            last = min(count, first + per_run)
            nbytes = (last - first - 1) * step + geometry.extent
            items.append(_Item(row, first, last, (file, offset + first * step, nbytes)))
        return items

    def _plan_batches(self, items: Sequence[_Item]) -> list[_Batch]:
        """Items' ranges merged (:func:`_merge`), packed in file order into
        batches of at most ``bounce_nbytes`` (a range larger than that is a
        batch of its own); each range starts at a bounce position congruent to
        its file offset, so ``O_DIRECT`` reads its body in place."""
        spans, span_of = _merge(sorted({item.key for item in items}), self._bounce_nbytes)
        by_span: list[list[_Item]] = [[] for _ in spans]
        for item in items:
            by_span[span_of[item.key]].append(item)
        batches: list[_Batch] = []
        reads: dict[tuple[int, int, int], int] = {}
        positions: dict[tuple[int, int, int], int] = {}
        batch_items: list[_Item] = []
        cursor = 0
        for span, span_items in zip(spans, by_span, strict=True):
            position = _align_up(cursor) + span[1] % ALIGN_NBYTES
            if batch_items and position + span[2] > self._capacity:
                batches.append(_Batch(reads, positions, tuple(batch_items), cursor))
                reads, positions, batch_items, cursor = {}, {}, [], 0
                position = span[1] % ALIGN_NBYTES
            reads[span] = position
            for item in span_items:
                positions[item.key] = position + item.key[1] - span[1]
            batch_items.extend(span_items)
            cursor = position + span[2]
        if batch_items:
            batches.append(_Batch(reads, positions, tuple(batch_items), cursor))
        return batches

    def _submit_next(self) -> None:
        """Start reading the next batch into the bounce buffer the batch before last used."""
        if self._next >= len(self._batches):
            return
        index = self._next
        self._next += 1
        batch = self._batches[index]
        while len(self._bounces) < 2:
            self._bounces.append(aligned_empty(0))
        if self._bounces[index % 2].nbytes < batch.nbytes:
            self._bounces[index % 2] = aligned_empty(max(batch.nbytes, self._capacity))
        bounce = self._bounces[index % 2]
        requests = [
            self._request(file, offset, bounce[position : position + nbytes])
            for (file, offset, nbytes), position in batch.reads.items()
        ]
        residency = any(item.row in self._partial for item in batch.items)
        self._pending.append(self._reader.submit(requests, residency=residency))

    # -- laying out ----------------------------------------------------------------

    def _slabs_nbytes(self, item: _Item) -> int:
        return (item.last - item.first) * self._table.geometries[int(self._table.param[item.row])].slab_nbytes

    def _lay_out(self, batch: _Batch, bounce: npt.NDArray[np.uint8]) -> None:
        table = self._table
        for item in batch.items:
            param = int(table.param[item.row])
            geometry = table.geometries[param]
            name = table.params[param]
            step = geometry.stride if geometry.stride is not None else geometry.extent
            view: npt.NDArray[np.generic] = np.ndarray(
                (item.last - item.first, *geometry.slab_shape),
                dtype=geometry.dtype.numpy,
                buffer=bounce,
                offset=batch.positions[item.key] + geometry.view_delta,
                strides=(step, *geometry.slab_strides),
            )
            slot = int(table.slot[item.row]) + item.first
            destination = self._arrays[name][slot : slot + item.last - item.first]
            copy_view(destination, view, name in self._transpose)

    def _tally(self, result: ReadResult, delivered: int) -> None:
        """Add ``delivered`` bytes, shared among the read's sources in proportion
        (a bounced range may be read once for two rows, or hold bytes no row takes)."""
        self.device_nbytes += result.device_nbytes
        read = sum(nbytes for _, nbytes in result.source_nbytes)
        if not read:
            return
        shares = [(source, delivered * nbytes // read) for source, nbytes in result.source_nbytes]
        rest = delivered - sum(share for _, share in shares)
        largest = max(range(len(shares)), key=lambda index: shares[index][1])
        for index, (source, share) in enumerate(shares):
            self.source_nbytes[source] += share + (rest if index == largest else 0)


def _merge(
    keys: Sequence[tuple[int, int, int]], limit_nbytes: int
) -> tuple[list[tuple[int, int, int]], dict[tuple[int, int, int], int]]:
    """Sorted ``(file, offset, nbytes)`` ranges merged into the reads that
    serve them, and the read of each range.  Overlapping ranges always merge
    (they share bytes); ranges that touch or lie less than a block apart
    merge while the read stays within ``limit_nbytes`` (one request instead
    of several, for the price of at most a block of gap each)."""
    spans: list[tuple[int, int, int]] = []
    span_of: dict[tuple[int, int, int], int] = {}
    for key in keys:
        file, offset, nbytes = key
        if spans:
            last_file, last_offset, last_nbytes = spans[-1]
            end = last_offset + last_nbytes
            merged = max(end, offset + nbytes) - last_offset
            if last_file == file and (offset < end or (offset - end < ALIGN_NBYTES and merged <= limit_nbytes)):
                spans[-1] = (file, last_offset, merged)
                span_of[key] = len(spans) - 1
                continue
        spans.append(key)
        span_of[key] = len(spans) - 1
    return spans, span_of


def _align_up(position: int) -> int:
    return -(-position // ALIGN_NBYTES) * ALIGN_NBYTES


def _bytes_of(array: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """The bytes of a C-contiguous array, as a flat ``uint8`` view (any dtype, bf16 and fp8 included)."""
    if not array.flags.c_contiguous:  # pragma: no cover - callers check
        raise SinkError("a direct read needs a C-contiguous destination")
    return array.reshape(-1).view(np.uint8)

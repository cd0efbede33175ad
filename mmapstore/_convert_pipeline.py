"""The streaming engine of ``convert``: read, transform, hash and write, overlapped.

A conversion is a list of :class:`Job` values, one per expert slab of each
output tensor, in output order.  Two threads run them:

- the *reader* (a helper thread) walks the jobs in order.  A slab whose
  bytes pass through unchanged is copied file to file by the kernel
  (``copy_file_range``: no byte crosses into Python); any other slab is read
  with ``pread`` into one of two reusable :class:`SlabReader` buffers (and
  dequantized there when asked).
- the *writer* (the calling thread) takes the jobs in the same order: it
  hashes a copied slab by reading it back from the destination (from the
  page cache), and transposes or casts a read slab chunk by chunk into a
  small buffer, hashing and writing each chunk.  Hash updates stay in order.

Both sides release the GIL in their heavy calls (``copy_file_range``,
``pread``, ``pwrite``, xxh3, numpy copies), so the two cores work at once.
At most two read slabs and :data:`AHEAD` copied ones are in flight: peak
memory is two slabs plus a few MiB, whatever the checkpoint.  Sources are
never read through a mapping: a source that shrinks is a short
``copy_file_range`` or ``pread`` and a :class:`~mmapstore._errors.FormatError`.

Writeback starts as soon as a slab is written (``sync_file_range``), and the
writer waits for it once the slab is :data:`WRITE_BEHIND_NBYTES` behind, so
reads and writes share the disk instead of taking turns, dirty memory stays
bounded, and progress counts bytes the disk has taken.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._checksum import Hasher, new_hasher
from ._preadcopy import pread_into
from ._store import ExpertStack
from ._transpose import transpose_into
from .dequant import dequantize_slab
from .formats._slabfile import SlabFileWriter

__all__ = [
    "AHEAD",
    "CHUNK_NBYTES",
    "READ_AHEAD_NBYTES",
    "WRITE_BEHIND_NBYTES",
    "CopyFrom",
    "Job",
    "SlabReader",
    "run_jobs",
]

log = logging.getLogger(__name__)

AHEAD = 8
"""Slabs the reader may run ahead of the writer."""
CHUNK_NBYTES = 2 << 20
"""Bytes the writer transposes, hashes and writes at a time."""
WRITE_BEHIND_NBYTES = 64 << 20
"""Written bytes whose writeback may be outstanding (0: leave it to the kernel)."""
READ_AHEAD_NBYTES = 64 << 20
"""Source bytes the reader asks the kernel to fetch ahead of what it reads
(``POSIX_FADV_WILLNEED``: into the page cache, not into this process)."""


@dataclass(frozen=True, slots=True)
class CopyFrom:
    """Source bytes that are the output slab exactly: an open descriptor,
    the absolute offset of the slab, the file's name for messages."""

    fd: int
    offset: int
    path: str


@dataclass(frozen=True, slots=True)
class Job:
    """One expert's slab of one output tensor.

    ``copy`` is set when the source bytes pass through unchanged; otherwise
    ``make(reader)`` reads the slab's parts through ``reader`` and returns
    the slab to write (a view of the reader's buffers, valid until that
    reader reads again, or a new array), of ``shape`` and castable to ``dtype``.
    """

    writer: SlabFileWriter
    tensor: str
    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]
    copy: CopyFrom | None = None
    make: Callable[[SlabReader], npt.NDArray[np.generic]] | None = None
    reads: tuple[tuple[int, int, int], ...] = ()
    """``(fd, offset, nbytes)`` of the source ranges ``make`` reads (hints for read-ahead)."""
    at: int = -1
    """Byte of ``tensor`` where the slab goes, or -1 for the tensor's cursor.
    Set when one tensor gets both copied and written slabs (an expert-major
    record): copies claim their bytes on the reader thread, writes on the
    writer thread, so a cursor would not keep their order."""

    def source_ranges(self) -> tuple[tuple[int, int, int], ...]:
        if self.copy is not None:
            return ((self.copy.fd, self.copy.offset, self.nbytes),)
        return self.reads

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class SlabReader:
    """Reads expert slabs with ``pread`` into buffers reused from slab to slab
    (one per part): a source that shrinks is a short read and a
    :class:`~mmapstore._errors.FormatError`, never a fault on a mapped page.
    A returned array is valid until this reader reads the same part again."""

    def __init__(self) -> None:
        self._buffers: dict[str, npt.NDArray[np.uint8]] = {}

    def part(self, stack: ExpertStack, part: str, expert: int) -> npt.NDArray[np.generic]:
        span = stack.part_span(part, expert)
        layout = stack.part(part, expert)  # a view of the mapping: only its layout is used, never its bytes
        buffer = self._buffers.get(part)
        if buffer is None or buffer.nbytes < span.nbytes:
            buffer = self._buffers[part] = np.empty(span.nbytes, dtype=np.uint8)
        pread_into(span.mapped, span.offset, buffer[: span.nbytes])
        delta = span.mapped.offset_of(layout) - span.offset
        slab: npt.NDArray[np.generic] = np.ndarray(
            layout.shape, dtype=layout.dtype, buffer=buffer, offset=delta, strides=layout.strides
        )
        return slab

    def dequantize(self, stack: ExpertStack, expert: int) -> npt.NDArray[np.float32]:
        """:meth:`ExpertStack.dequantize` over the bytes read (``[k, n]`` float32)."""
        views = {name: self.part(stack, name, expert) for name in stack.parts if name != "bias"}
        values = dequantize_slab(stack.encoding, views, stack.native_orientation, stack.k, stack.n, where=stack.name)
        return np.asarray(values if stack.native_orientation == "kn" else values.T).astype(np.float32)


_Entry = tuple[Job, int, "npt.NDArray[np.generic] | None", "SlabReader | None"]


def run_jobs(
    jobs: Sequence[Job],
    *,
    algorithm: str,
    progress: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Run ``jobs`` (in output order) and close each writer after its last job.

    Returns each output tensor's digest (``algorithm``, lowercase hex).
    Writers are left open when this raises: the caller aborts them.

    Raises
    ------
    FormatError
        A source shrank or could not be read.
    OSError
        The destination could not be written.
    """
    work: queue.Queue[_Entry | BaseException | None] = queue.Queue(maxsize=AHEAD)
    free: queue.Queue[SlabReader] = queue.Queue()
    for _ in range(2):
        free.put(SlabReader())
    stop = threading.Event()

    def put(entry: _Entry | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                work.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def read_all() -> None:
        ahead = _ReadAhead(jobs, READ_AHEAD_NBYTES)
        try:
            for index, job in enumerate(jobs):
                ahead.advise(index)
                if job.copy is not None:
                    source = job.copy
                    offset = job.writer.copy(
                        job.tensor, source.fd, source.offset, job.nbytes, source_path=source.path, at=job.at
                    )
                    entry: _Entry = (job, offset, None, None)
                else:
                    assert job.make is not None
                    reader = None
                    while reader is None and not stop.is_set():
                        try:
                            reader = free.get(timeout=0.05)
                        except queue.Empty:
                            continue
                    if reader is None:
                        return
                    entry = (job, -1, job.make(reader), reader)
                if not put(entry):
                    return
            put(None)
        except BaseException as exc:  # handed to the writer thread, which raises it
            put(exc)

    remaining = collections.Counter(id(job.writer) for job in jobs)
    hashers: dict[str, Hasher] = {}
    behind = _WriteBehind(WRITE_BEHIND_NBYTES, progress)
    out = _Chunks()
    thread = threading.Thread(target=read_all, name="mmapstore-convert-read", daemon=True)
    thread.start()
    try:
        while True:
            entry = work.get()
            if entry is None:
                break
            if isinstance(entry, BaseException):
                raise entry
            job, offset, slab, reader = entry
            hasher = hashers.get(job.tensor)
            if hasher is None:
                hasher = hashers[job.tensor] = new_hasher(algorithm)
            if slab is None:
                out.read_back(job, offset, hasher)
            else:
                offset = out.emit(job, slab, hasher)
                assert reader is not None
                free.put(reader)
            behind.written(job.writer.fd, offset, job.nbytes)
            remaining[id(job.writer)] -= 1
            if not remaining[id(job.writer)]:
                unreported = behind.finish(job.writer.fd)
                job.writer.close()  # fsync: every byte of the file is on disk now
                behind.report(unreported)
    finally:
        stop.set()
        thread.join()
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


class _ReadAhead:
    """Keeps ``POSIX_FADV_WILLNEED`` hints about ``window`` bytes ahead of the
    job being read, so the disk has reads queued while this process copies,
    transposes or waits (the pages land in the page cache, not in RSS)."""

    def __init__(self, jobs: Sequence[Job], window: int) -> None:
        self._jobs = jobs
        self._window = window
        self._first = 0  # jobs [first, next) are advised and not yet read past
        self._next = 0
        self._advised = 0  # their source bytes
        self._sizes = [sum(nbytes for _, _, nbytes in job.source_ranges()) for job in jobs] if window else []

    def advise(self, current: int) -> None:
        """Job ``current`` is about to be read: top the hints up."""
        if not self._window:
            return
        while self._first < min(current, self._next):
            self._advised -= self._sizes[self._first]
            self._first += 1
        if self._next < current:
            self._first = self._next = current
            self._advised = 0
        while self._next < len(self._jobs) and self._advised < self._window:
            for fd, offset, nbytes in self._jobs[self._next].source_ranges():
                try:
                    os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
                except OSError:
                    self._window = 0  # a hint: never worth failing for
                    return
            self._advised += self._sizes[self._next]
            self._next += 1


class _Chunks:
    """The writer side's reusable buffers: output chunks and read-back."""

    def __init__(self) -> None:
        self._out = np.empty(CHUNK_NBYTES, dtype=np.uint8)
        self._cast = np.empty(0, dtype=np.uint8)

    def _buffer(self, which: str, nbytes: int) -> npt.NDArray[np.uint8]:
        buffer = self._out if which == "out" else self._cast
        if buffer.nbytes < nbytes:
            buffer = np.empty(nbytes, dtype=np.uint8)
            if which == "out":
                self._out = buffer
            else:
                self._cast = buffer
        return buffer[:nbytes]

    def read_back(self, job: Job, offset: int, hasher: Hasher) -> None:
        """Hash a copied slab from the destination (hot in the page cache)."""
        for start in range(0, job.nbytes, CHUNK_NBYTES):
            chunk = self._buffer("out", min(CHUNK_NBYTES, job.nbytes - start))
            pread_into(job.writer.fd, offset + start, chunk, path=job.writer.path)
            hasher.update(chunk.data)

    def emit(self, job: Job, slab: npt.NDArray[np.generic], hasher: Hasher) -> int:
        """Write ``slab`` as ``job.dtype`` in C order, hashing as it goes;
        return the file offset of its first byte."""
        if slab.shape != job.shape:
            raise ValueError(
                f"{job.writer.path}: tensor {job.tensor!r}: slab {list(slab.shape)}, expected {list(job.shape)}"
            )
        dtype = job.dtype
        if slab.dtype == dtype and slab.flags.c_contiguous:
            hasher.update(slab.reshape(-1).view(np.uint8).data)
            return job.writer.write(job.tensor, slab, at=job.at)
        rows = slab.shape[0] if slab.ndim else 1
        row_nbytes = job.nbytes // rows if rows else 0
        band = max(1, CHUNK_NBYTES // row_nbytes) if row_nbytes else rows
        transposed = slab.ndim == 2 and slab.T.flags.c_contiguous
        first = -1
        for start in range(0, rows, band):
            stop = min(rows, start + band)
            chunk = self._buffer("out", (stop - start) * row_nbytes).view(dtype).reshape((stop - start, *job.shape[1:]))
            if transposed:
                # Output rows [start, stop) are columns of the slab's C-ordered base.
                columns = slab.T[:, start:stop]
                if columns.dtype != dtype:
                    cast = self._buffer("cast", columns.size * dtype.itemsize).view(dtype).reshape(columns.shape)
                    np.copyto(cast, columns, casting="unsafe")
                    columns = cast
                transpose_into(chunk, columns)
            else:
                np.copyto(chunk, slab[start:stop], casting="unsafe")
            hasher.update(chunk.reshape(-1).view(np.uint8).data)
            offset = job.writer.write(job.tensor, chunk, at=job.at + start * row_nbytes if job.at >= 0 else -1)
            first = offset if first < 0 else first
        return first


_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the symbols already loaded: libc's among them
    except OSError:
        return None
    function = getattr(libc, "sync_file_range", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    call: Callable[[int, int, int, int], int] = function
    return call


_SYNC_FILE_RANGE = _sync_file_range()


class _WriteBehind:
    """Start writeback of each written range at once; wait for ranges once
    they are ``window`` bytes behind; report bytes to ``progress`` as the
    disk takes them (or as written, where ``sync_file_range`` is missing)."""

    def __init__(self, window: int, progress: Callable[[int], None] | None) -> None:
        self._window = window if _SYNC_FILE_RANGE is not None else 0
        self._progress = progress
        self._pending: collections.deque[tuple[int, int, int]] = collections.deque()
        self._pending_nbytes = 0

    def _call(self, fd: int, offset: int, nbytes: int, flags: int) -> bool:
        assert _SYNC_FILE_RANGE is not None
        if _SYNC_FILE_RANGE(fd, offset, nbytes, flags) == 0:
            return True
        error = ctypes.get_errno()
        if error in (errno.ENOSYS, errno.ESPIPE, errno.EINVAL, errno.EOPNOTSUPP):
            log.debug("sync_file_range unavailable (%s): writeback left to the kernel", errno.errorcode.get(error))
            self._window = 0
            return False
        raise OSError(error, f"writeback failed: {errno.errorcode.get(error, error)}")

    def written(self, fd: int, offset: int, nbytes: int) -> None:
        if not self._window or not nbytes or not self._call(fd, offset, nbytes, _WRITE):
            self._report(nbytes)
            return
        self._pending.append((fd, offset, nbytes))
        self._pending_nbytes += nbytes
        while self._pending_nbytes > self._window:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        fd, offset, nbytes = self._pending.popleft()
        self._pending_nbytes -= nbytes
        if self._window:
            self._call(fd, offset, nbytes, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
        self._report(nbytes)

    def finish(self, fd: int) -> int:
        """Forget the ranges of ``fd`` (the caller fsyncs it next) and return
        their bytes, for :meth:`report` once the fsync is done."""
        kept: collections.deque[tuple[int, int, int]] = collections.deque()
        forgotten = 0
        for entry in self._pending:
            if entry[0] == fd:
                forgotten += entry[2]
            else:
                kept.append(entry)
        self._pending = kept
        self._pending_nbytes -= forgotten
        return forgotten

    def report(self, nbytes: int) -> None:
        self._report(nbytes)

    def _report(self, nbytes: int) -> None:
        if self._progress is not None and nbytes:
            self._progress(nbytes)

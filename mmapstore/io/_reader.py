"""``ColdReader``: exact byte ranges into caller buffers, many reads in flight.

Each range is split by residency (:mod:`mmapstore.io._residency`): resident
pieces are copied from the mapping, the rest are read with ``os.preadv``
(which releases the GIL) on a pool of ``queue_depth`` threads, ``O_DIRECT``
where the file system accepts it, straight into the destination.  Only the
unaligned head and tail of a range (or a destination whose alignment differs
from the file offset's) go through a small aligned bounce buffer.

Guarantees:

- A read that reaches the end of the file before the end of its range raises
  :class:`~mmapstore._errors.FormatError` naming the file; a short read is
  never served as data.  (Pieces copied from the mapping check the file size
  first; a file truncated during that copy is still SIGBUS, as for any
  mapping, which is why cold pieces are read, not faulted.)
- After :meth:`ReadHandle.wait` returns or raises, no thread writes to any
  destination of that read again.  A cancelled or failed read raises, so a
  caller that commits only after a successful ``wait`` never commits a slot
  that holds half old, half new bytes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import functools
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .._errors import FormatError, OptionError, ReadCancelledError
from .._mapping import MappedFile
from ._files import (
    DIRECT_REFUSED_ERRNOS,
    FileHandles,
    Handles,
    address_of,
    aligned_empty,
    pread_exact,
    preadv_exact,
)
from ._requests import ALIGN_NBYTES, SOURCES, ReaderConfig, ReadRequest, ReadResult, ScatterRequest, Source
from ._residency import split_by_residency

__all__ = ["ColdReader", "ReadHandle", "StagedClaim", "StagingLookup"]

_Tally = tuple[tuple[tuple[Source, int], ...], int]  # (bytes per source, device bytes)


class StagedClaim(Protocol):
    """Bytes a prefetch has (or will have) in a staging buffer."""

    def copy_into(self, destination: memoryview, offset: int) -> bool:
        """Wait for the prefetch; copy file bytes ``[offset, offset + len)`` into
        ``destination`` and return True, or return False if it failed or was cancelled."""
        ...


class StagingLookup(Protocol):
    def claim_spans(self, path: str, offset: int, nbytes: int) -> list[tuple[int, int, StagedClaim]]:
        """Staged (or in-flight) pieces of file bytes ``[offset, offset + nbytes)``:
        ``(file offset, nbytes, claim)``, sorted and disjoint; the caller reads the gaps."""
        ...


def _as_bytes(destination: memoryview | npt.NDArray[Any], path: str) -> memoryview:
    view = memoryview(destination)  # type: ignore[arg-type]
    if view.readonly:
        raise OptionError(f"{path}: the destination of a read is read-only")
    if not view.c_contiguous:
        raise OptionError(f"{path}: the destination of a read must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class ReadHandle:
    """A read in progress: :meth:`wait` for its :class:`ReadResult`, or :meth:`cancel` it.

    Its pieces wait in one queue that at most ``queue_depth`` pool threads
    drain, a piece at a time: one future per running thread, not per piece,
    so a 4 MiB piece costs a ``popleft`` and a call on top of its ``preadv``.
    A thread starts with the first piece, so the disk is busy while the rest
    of a submission is still being cut into pieces; a thread that finds the
    queue empty ends (it never waits for more), and the next piece starts
    another, so a slow submission holds no pool thread idle.
    """

    def __init__(
        self,
        nbytes: int,
        requests: int,
        cancelled: threading.Event,
        executor: concurrent.futures.Executor,
        threads: int,
    ) -> None:
        self._nbytes = nbytes
        self._requests = requests
        self._cancelled = cancelled
        self._executor = executor
        self._threads = threads
        self._halt = False  # a piece failed: the others stop
        self._lock = threading.Lock()
        self._pieces: collections.deque[Callable[[], _Tally]] = collections.deque()
        self._running = 0  # threads draining the queue now
        self._count = 0
        self._futures: list[concurrent.futures.Future[_Tally]] = []
        self._start = time.perf_counter()
        self._result: ReadResult | None = None

    def _add(self, task: Callable[..., _Tally], *args: Any) -> None:
        """Queue a piece, starting a thread for it if fewer than ``threads`` run
        (only the submitting thread calls this)."""
        with self._lock:
            self._pieces.append(functools.partial(task, *args))
            self._count += 1
            start = self._running < self._threads
            if start:
                self._running += 1
        if start:
            self._futures.append(self._executor.submit(self._drain))

    def _next(self) -> Callable[[], _Tally] | None:
        with self._lock:
            if self._pieces and not self._halt and not self._cancelled.is_set():
                return self._pieces.popleft()
            self._running -= 1
            return None

    def _drain(self) -> _Tally:
        tally: Counter[Source] = Counter()
        device = 0
        try:
            while (piece := self._next()) is not None:
                sources, read = piece()
                for source, nbytes in sources:
                    tally[source] += nbytes
                device += read
        except BaseException:
            with self._lock:
                self._halt = True
                self._running -= 1
            raise
        return tuple(tally.items()), device

    def done(self) -> bool:
        """Whether every piece has finished (successfully or not)."""
        return all(future.done() for future in self._futures)

    def cancel(self) -> None:
        """Stop: pieces not started are dropped, pieces in flight finish; :meth:`wait` then raises."""
        self._cancelled.set()
        for future in self._futures:
            future.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def wait(self) -> ReadResult:
        """Block until every piece has landed (or stopped).

        Raises
        ------
        ReadCancelledError
            :meth:`cancel` was called before every piece landed.
        FormatError
            A file ended before a planned range (or could not be read).
        """
        if self._result is not None:
            return self._result
        tally: Counter[str] = Counter()
        device_nbytes = 0
        failure: BaseException | None = None
        for future in self._futures:
            # Each future, one by one: concurrent.futures.wait() never returns
            # for a future that an executor's shutdown cancelled.
            try:
                error = future.exception()
            except concurrent.futures.CancelledError:
                continue
            if error is not None:
                if failure is None and not isinstance(error, ReadCancelledError):
                    failure = error
                continue
            sources, device = future.result()
            for source, nbytes in sources:
                tally[source] += nbytes
            device_nbytes += device
        if failure is not None:
            raise failure
        if self._pieces or sum(tally.values()) < self._nbytes:
            why = "cancelled" if self._cancelled.is_set() else "stopped by the reader's close()"
            raise ReadCancelledError(
                f"read of {self._nbytes} bytes {why} after {sum(tally.values())} landed; "
                "its destinations must not be committed"
            )
        seconds = time.perf_counter() - self._start
        by_source = tuple((source, tally[source]) for source in SOURCES if tally[source])
        self._result = ReadResult(self._nbytes, seconds, by_source, device_nbytes, self._requests, self._count)
        return self._result


def _release(executor: concurrent.futures.ThreadPoolExecutor, files: FileHandles) -> None:
    executor.shutdown(wait=False, cancel_futures=True)
    files.close()


class ColdReader:
    """Reads byte ranges of files into caller buffers by the fastest exact path.

    Parameters
    ----------
    config
        Queue depth, chunk size, direct I/O, residency granularity (see
        :class:`ReaderConfig`; :func:`~mmapstore.io._probe.probe_reader_config`
        picks them from a short measurement).
    staging
        Where prefetched bytes wait (set by :class:`~mmapstore.io._prefetch.Prefetcher`).

    The reader owns threads and descriptors: :meth:`close` it (or use it as a
    context manager).
    """

    def __init__(self, config: ReaderConfig | None = None) -> None:
        self.config = config if config is not None else ReaderConfig()
        self._files = FileHandles(direct=self.config.direct == "auto")
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.config.queue_depth, thread_name_prefix="mmapstore-read"
        )
        self._local = threading.local()
        self.staging: StagingLookup | None = None
        # A reader dropped without close() still lets go of its threads and descriptors.
        self._finalizer = weakref.finalize(self, _release, self._executor, self._files)

    # -- public ---------------------------------------------------------------

    def submit(self, requests: Iterable[ReadRequest], *, residency: bool = True) -> ReadHandle:
        """Start reading every request; returns once each is queued.

        ``requests`` may be a generator: the first reads start as soon as it
        yields, while the rest are still being made.  ``residency=False``
        reads every byte explicitly even where a mapping has it resident
        (what a benchmark of the disk wants).

        Raises
        ------
        OptionError
            A destination is read-only or not contiguous, or an offset is
            negative; reads of the requests before it are cancelled and
            waited for first.
        """
        handle = self._handle(0, 0)
        cancelled = handle._cancelled
        with self._queueing(handle):
            for index, request in enumerate(requests):
                view = _as_bytes(request.destination, request.path)
                if request.offset < 0:
                    raise OptionError(f"{request.path}: negative offset {request.offset}")
                handle._nbytes += view.nbytes
                handle._requests += 1
                staged = self.staging.claim_spans(request.path, request.offset, view.nbytes) if self.staging else []
                position = request.offset
                for offset, nbytes, claim in staged:
                    self._submit_span(handle, cancelled, index, request, view, position, offset, residency)
                    part = view[offset - request.offset : offset + nbytes - request.offset]
                    handle._add(self._staged, cancelled, request, offset, part, claim)
                    position = offset + nbytes
                end = request.offset + view.nbytes
                self._submit_span(handle, cancelled, index, request, view, position, end, residency)
        return handle

    def _handle(self, nbytes: int, requests: int) -> ReadHandle:
        return ReadHandle(nbytes, requests, threading.Event(), self._executor, self.config.queue_depth)

    @contextlib.contextmanager
    def _queueing(self, handle: ReadHandle) -> Iterator[None]:
        """If queueing ``handle``'s pieces fails, cancel what started (and wait
        for it) before the error propagates."""
        try:
            yield
        except BaseException:
            handle.cancel()
            with contextlib.suppress(Exception):  # the error that stopped queueing is the one to raise
                handle.wait()
            raise

    def _submit_span(
        self,
        handle: ReadHandle,
        cancelled: threading.Event,
        index: int,
        request: ReadRequest,
        view: memoryview,
        start: int,
        end: int,
        residency: bool,
    ) -> None:
        """Queue file bytes ``[start, end)`` of ``request``: resident pieces copied, the rest read, a chunk each."""
        if end <= start:
            return
        chunk = self.config.chunk_nbytes
        mapped = request.mapped if residency else None
        for piece in split_by_residency(index, mapped, start, end - start, self.config.piece_nbytes):
            position = start + piece.start
            stop = position + piece.nbytes
            while position < stop:
                # A chunk from where the piece starts (slabs of a store need not
                # start on a chunk multiple), ending on a block boundary.
                boundary = min(stop, max(position + ALIGN_NBYTES, (position + chunk) // ALIGN_NBYTES * ALIGN_NBYTES))
                part = view[position - request.offset : boundary - request.offset]
                handle._add(self._copy if piece.warm else self._read, cancelled, request, position, part)
                position = boundary

    def submit_scatter(self, requests: Sequence[ScatterRequest]) -> ReadHandle:
        """Start reading every scatter request, each with one ``preadv`` into
        all its destinations (``O_DIRECT`` when the range and every destination
        are block-aligned, else buffered); returns at once.  Every byte is
        read (resident pages too); a request that overlaps a prefetch's staged
        bytes is served per destination, as :meth:`submit` would.

        Raises
        ------
        OptionError
            A destination is read-only or not contiguous (before anything starts).
        """
        views = [[_as_bytes(destination, request.path) for destination in request.destinations] for request in requests]
        for request in requests:
            if request.offset < 0:
                raise OptionError(f"{request.path}: negative offset {request.offset}")
        handle = self._handle(sum(view.nbytes for group in views for view in group), len(requests))
        cancelled = handle._cancelled
        with self._queueing(handle):
            for request, group in zip(requests, views, strict=True):
                nbytes = sum(view.nbytes for view in group)
                if self.staging is not None and self.staging.claim_spans(request.path, request.offset, nbytes):
                    position = request.offset
                    for view in group:
                        single = ReadRequest(request.path, position, view, request.mapped, request.identity)
                        end = position + view.nbytes
                        self._submit_span(handle, cancelled, 0, single, view, position, end, False)
                        position = end
                    continue
                handle._add(self._scatter, cancelled, request, group)
        return handle

    def start(self, path: str | None = None) -> None:
        """Start every reading thread now (and open ``path``'s descriptors), so that a timed read
        that follows measures reads, not thread start-up."""
        barrier = threading.Barrier(self.config.queue_depth)
        waits = [self._executor.submit(barrier.wait, 10.0) for _ in range(self.config.queue_depth)]
        concurrent.futures.wait(waits)  # each waits for all: one thread each
        if path is not None:
            self._files.get(path)

    def read_here(self, request: ReadRequest) -> ReadResult:
        """Read one request on the calling thread, a chunk at a time, every
        byte explicitly: for callers that fill buffers from threads of their
        own (the GPU sink's staging ring).  The same rules as :meth:`read`:
        ``O_DIRECT`` where accepted (unaligned edges bounced), the mapped
        file even if its path was renamed over, never a short read served.

        Raises
        ------
        OptionError
            The destination is read-only or not contiguous, or the offset negative.
        FormatError
            The file ends before the range (or cannot be read).
        """
        view = _as_bytes(request.destination, request.path)
        if request.offset < 0:
            raise OptionError(f"{request.path}: negative offset {request.offset}")
        start = time.perf_counter()
        sources, device = self._read_chunks(threading.Event(), request, request.offset, view)
        tally = dict(sources)
        by_source = tuple((source, tally[source]) for source in SOURCES if tally.get(source))
        pieces = -(-view.nbytes // self.config.chunk_nbytes)
        return ReadResult(view.nbytes, time.perf_counter() - start, by_source, device, 1, pieces)

    def read(self, requests: Iterable[ReadRequest], *, residency: bool = True) -> ReadResult:
        """:meth:`submit` and :meth:`ReadHandle.wait`; a failure cancels what is left."""
        handle = self.submit(requests, residency=residency)
        try:
            return handle.wait()
        except BaseException:
            handle.cancel()
            raise

    def close(self) -> None:
        """Wait for reads in flight, stop the threads, close the descriptors."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._finalizer()

    def __enter__(self) -> ColdReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- tasks (run on the pool) ----------------------------------------------

    @staticmethod
    def _check(cancelled: threading.Event) -> None:
        if cancelled.is_set():
            raise ReadCancelledError("read cancelled")

    def _staged(
        self, cancelled: threading.Event, request: ReadRequest, offset: int, view: memoryview, claim: StagedClaim
    ) -> _Tally:
        self._check(cancelled)
        if claim.copy_into(view, offset):
            return ((("prefetched", view.nbytes),), 0)
        return self._read_chunks(cancelled, request, offset, view)

    def _read_chunks(self, cancelled: threading.Event, request: ReadRequest, offset: int, view: memoryview) -> _Tally:
        """:meth:`_read` of ``view`` a chunk at a time, on this thread."""
        tally: Counter[Source] = Counter()
        device = 0
        step = self.config.chunk_nbytes
        for start in range(0, view.nbytes, step):
            sources, nbytes = self._read(cancelled, request, offset + start, view[start : start + step])
            tally.update(dict(sources))
            device += nbytes
        return tuple(tally.items()), device

    def _copy(self, cancelled: threading.Event, request: ReadRequest, offset: int, view: memoryview) -> _Tally:
        self._check(cancelled)
        mapped: MappedFile | None = request.mapped
        assert mapped is not None  # warm pieces exist only with a mapping
        if offset + view.nbytes > mapped.nbytes:
            raise FormatError(f"{request.path}: bytes [{offset}, {offset + view.nbytes}) lie past its mapping")
        mapped.check_size()  # a truncated mapping is SIGBUS: refuse first
        np.copyto(np.frombuffer(view, dtype=np.uint8), mapped.view(offset, np.dtype(np.uint8), (view.nbytes,)))
        return ((("resident", view.nbytes),), 0)

    def _scatter(self, cancelled: threading.Event, request: ScatterRequest, views: list[memoryview]) -> _Tally:
        self._check(cancelled)
        mapped = request.mapped
        identity = request.identity if request.identity is not None or mapped is None else mapped.identity
        handles = self._files.get(request.path, identity, mapped.fd if mapped is not None else -1)
        nbytes = sum(view.nbytes for view in views)
        aligned = request.offset % ALIGN_NBYTES == 0 and all(
            view.nbytes % ALIGN_NBYTES == 0 and address_of(view) % ALIGN_NBYTES == 0 for view in views
        )
        if handles.direct_fd >= 0 and aligned:
            try:
                preadv_exact(handles.direct_fd, views, request.offset, request.path, direct=True)
                return ((("direct", nbytes),), nbytes)
            except OSError as exc:
                if exc.errno not in DIRECT_REFUSED_ERRNOS:
                    raise FormatError(
                        f"{request.path}: direct read at {request.offset} failed: {exc.strerror}"
                    ) from None
                reason = exc.strerror or errno.errorcode[exc.errno]
                handles = self._files.refuse_direct(request.path, reason, identity)
        if handles.direct_fd >= 0:
            # Misaligned pieces: each destination by the single-range path (head and tail bounced).
            tally: Counter[Source] = Counter()
            device = 0
            position = request.offset
            for view in views:
                single = ReadRequest(request.path, position, view, mapped, request.identity)
                sources, read = self._read(cancelled, single, position, view)
                tally.update(dict(sources))
                device += read
                position += view.nbytes
            return tuple(tally.items()), device
        try:
            preadv_exact(handles.buffered_fd, views, request.offset, request.path)
        except OSError as exc:
            raise FormatError(f"{request.path}: read at {request.offset} failed: {exc.strerror}") from None
        return ((("buffered", nbytes),), nbytes)

    def _read(self, cancelled: threading.Event, request: ReadRequest, offset: int, view: memoryview) -> _Tally:
        self._check(cancelled)
        mapped = request.mapped
        identity = request.identity if request.identity is not None or mapped is None else mapped.identity
        handles = self._files.get(request.path, identity, mapped.fd if mapped is not None else -1)
        if handles.direct_fd >= 0:
            try:
                return self._read_direct(handles, offset, view)
            except OSError as exc:
                if exc.errno not in DIRECT_REFUSED_ERRNOS:
                    raise FormatError(f"{request.path}: direct read at {offset} failed: {exc.strerror}") from None
                reason = exc.strerror or errno.errorcode[exc.errno]
                handles = self._files.refuse_direct(request.path, reason, identity)
        try:
            pread_exact(handles.buffered_fd, view, offset, request.path)
        except OSError as exc:
            raise FormatError(f"{request.path}: read at {offset} failed: {exc.strerror}") from None
        return ((("buffered", view.nbytes),), view.nbytes)

    def _bounce(self) -> npt.NDArray[np.uint8]:
        """This thread's aligned bounce buffer, made on first use: by a read
        with an unaligned head or tail, or a destination aligned differently
        from its file offset."""
        buffer: npt.NDArray[np.uint8] | None = getattr(self._local, "bounce", None)
        if buffer is None:
            buffer = aligned_empty(self.config.bounce_nbytes)
            self._local.bounce = buffer
        return buffer

    def _read_direct(self, handles: Handles, offset: int, view: memoryview) -> _Tally:
        align = ALIGN_NBYTES
        nbytes = view.nbytes
        head = min((-offset) % align, nbytes)
        if (address_of(view) + head) % align:
            # The destination is misaligned against the file: bounce all of it,
            # a bounce buffer at a time.
            device = 0
            step = self.config.bounce_step
            for start in range(0, nbytes, step):
                device += self._bounce_span(handles, offset + start, view[start : start + step])
            return ((("bounced", nbytes),), device)
        device = 0
        bounced = 0
        if head:
            device += self._direct_edge(handles, offset, view[:head])
            bounced += head
        body = (nbytes - head) // align * align
        if body:
            pread_exact(handles.direct_fd, view[head : head + body], offset + head, handles.path, direct=True)
            device += body
        if head + body < nbytes:
            device += self._direct_edge(handles, offset + head + body, view[head + body :])
            bounced += nbytes - head - body
        sources: list[tuple[Source, int]] = []
        if body:
            sources.append(("direct", body))
        if bounced:
            sources.append(("bounced", bounced))
        return tuple(sources), device

    def _bounce_span(self, handles: Handles, offset: int, view: memoryview) -> int:
        """Read ``view`` (at most a bounce step) through the aligned bounce buffer; returns device bytes."""
        low = offset - offset % ALIGN_NBYTES
        high = -(-(offset + view.nbytes) // ALIGN_NBYTES) * ALIGN_NBYTES
        bounce = self._bounce().data
        need = offset + view.nbytes - low
        pread_exact(handles.direct_fd, bounce[: high - low], low, handles.path, need=need, direct=True)
        view[:] = bounce[offset - low : need]
        return high - low

    def _direct_edge(self, handles: Handles, offset: int, view: memoryview) -> int:
        """Read the less-than-a-block ``view`` at ``offset`` through one aligned block."""
        low = offset - offset % ALIGN_NBYTES
        bounce = self._bounce().data[:ALIGN_NBYTES]
        skip = offset - low
        pread_exact(handles.direct_fd, bounce, low, handles.path, need=skip + view.nbytes, direct=True)
        view[:] = bounce[skip : skip + view.nbytes]
        return ALIGN_NBYTES

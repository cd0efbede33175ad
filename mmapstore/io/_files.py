"""Descriptors for explicit reads, aligned buffers, and the exact-read loop.

Each path gets a buffered descriptor and, where the file system accepts it,
an ``O_DIRECT`` one.  A file system that refuses ``O_DIRECT`` (at open, or
with ``EINVAL`` on the first read, as some FUSE and network file systems
do) is remembered per path and read buffered from then on; the refusal is
logged once.  tmpfs accepts ``O_DIRECT`` since Linux 6.6 (its "direct"
reads are copies from its pages, which is what they are anyway).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .._errors import FormatError, OptionError, StoreClosedError
from ._requests import ALIGN_NBYTES

__all__ = [
    "DIRECT_REFUSED_ERRNOS",
    "HUGE_NBYTES",
    "FileHandles",
    "Handles",
    "address_of",
    "aligned_empty",
    "pread_exact",
]

_log = logging.getLogger(__name__)

_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
# What a file system that does not do direct I/O answers, at open or at read.
DIRECT_REFUSED_ERRNOS = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})


HUGE_NBYTES = 2 << 20
"""Size of a transparent huge page on x86-64 and arm64 (4 KiB base pages)."""


def aligned_empty(nbytes: int, align: int | None = None) -> npt.NDArray[np.uint8]:
    """An uninitialised ``uint8`` array of ``nbytes`` whose address is a multiple of ``align``
    (a valid ``O_DIRECT`` destination).

    The default alignment is a block (:data:`ALIGN_NBYTES`) for small
    buffers and a huge page (:data:`HUGE_NBYTES`) from a huge page up:
    numpy asks for transparent huge pages for large arrays, and slots that
    start on a huge page boundary take ``O_DIRECT`` reads measurably faster
    (6% on a 4 MiB-slab refresh) than slots that straddle one more huge page.
    """
    if align is None:
        align = HUGE_NBYTES if nbytes >= HUGE_NBYTES else ALIGN_NBYTES
    if align <= 0 or align & (align - 1):
        raise OptionError(f"alignment must be a power of two, got {align}")
    base = np.empty(nbytes + align, dtype=np.uint8)
    skip = (-int(base.__array_interface__["data"][0])) % align
    return base[skip : skip + nbytes]


def address_of(buffer: memoryview) -> int:
    """Address of the first byte of a contiguous buffer."""
    array = np.frombuffer(buffer, dtype=np.uint8)
    return int(array.__array_interface__["data"][0])


@dataclass(frozen=True, slots=True)
class Handles:
    """The descriptors of one file: ``direct_fd`` is -1 where direct I/O is refused."""

    path: str
    buffered_fd: int
    direct_fd: int


def pread_exact(
    fd: int, view: memoryview, offset: int, path: str, *, need: int | None = None, direct: bool = False
) -> int:
    """Read ``len(view)`` bytes at ``offset`` into ``view``, looping over partial reads.

    ``need`` (default: all of ``view``) is how many bytes must exist: an
    ``O_DIRECT`` read of the last block of a file asks for a whole block and
    gets the file's tail (``direct``: a read that ends off a block boundary
    is the end of the file).  Returns the bytes read.

    Raises
    ------
    FormatError
        The file ends before ``offset + need``: it shrank after it was planned,
        or it was shorter than its header said.  Never a short read served as data.
    """
    want = len(view)
    need = want if need is None else need
    done = 0
    while done < want:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0 or (direct and got % ALIGN_NBYTES and done + got < want):
            done += got
            if done >= need:
                return done
            raise FormatError(
                f"{path}: file ends at byte {offset + done}, but bytes [{offset}, {offset + need}) were planned: "
                "it shrank or was replaced since; refusing to serve a short read"
            )
        done += got
    return done


def preadv_exact(fd: int, views: list[memoryview], offset: int, path: str, *, direct: bool = False) -> int:
    """Fill ``views`` (in order) with the file bytes from ``offset`` on, one
    ``preadv`` per call until all landed (a short read resumes where it stopped).

    Raises
    ------
    FormatError
        The file ends before the last byte (never a short read served as data).
    OSError
        The read failed (``EINVAL`` and the like where ``O_DIRECT`` is refused).
    """
    want = sum(view.nbytes for view in views)
    done = 0
    pending = [view for view in views if view.nbytes]
    while pending:
        got = os.preadv(fd, pending, offset + done)
        if got == 0 or (direct and got % ALIGN_NBYTES and done + got < want):
            raise FormatError(
                f"{path}: file ends at byte {offset + done + got}, but bytes [{offset}, {offset + want}) were "
                "planned: it shrank or was replaced since; refusing to serve a short read"
            )
        done += got
        while pending and got >= pending[0].nbytes:
            got -= pending[0].nbytes
            pending.pop(0)
        if got:
            pending[0] = pending[0][got:]
    return done


class FileHandles:
    """Opens each file once per mode and closes them all together.

    Parameters
    ----------
    direct
        Whether to try ``O_DIRECT`` at all.
    """

    def __init__(self, *, direct: bool) -> None:
        self._direct = direct and bool(_O_DIRECT)
        # Keyed by path and identity: a path re-converted under a long-lived
        # reader names a new file, which gets descriptors of its own.
        self._handles: dict[tuple[str, tuple[int, int] | None], Handles] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._retired: list[int] = []

    def get(self, path: str, identity: tuple[int, int] | None = None, via_fd: int = -1) -> Handles:
        """The descriptors of ``path``, opened on first use.

        ``via_fd``, a descriptor already open on the file (a mapping's), is
        reopened instead of the path (through ``/proc/self/fd``), so the file
        read is the one that was validated and mapped even if the path has
        since been renamed over.

        Raises
        ------
        FormatError
            The file cannot be opened or is not a regular file.
            Also when ``identity`` is given and the file opened is another one.
        """
        key = (path, identity)
        handles = self._handles.get(key)
        if handles is not None:
            return handles
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"{path}: the reader is closed")
            handles = self._handles.get(key)
            if handles is None:
                handles = self._open(path, identity, via_fd)
                self._handles[key] = handles
            return handles

    def _open(self, path: str, identity: tuple[int, int] | None, via_fd: int) -> Handles:
        fd = -1
        if via_fd >= 0:
            try:
                fd = os.open(f"/proc/self/fd/{via_fd}", os.O_RDONLY | _O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                fd = -1  # no /proc: open the path, the identity check below still holds
        try:
            if fd < 0:
                fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise FormatError(f"{path}: cannot open for reading: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise FormatError(f"{path}: not a regular file; refusing to read it")
        # O_NONBLOCK only kept a FIFO from blocking the open; reads of a regular file ignore it.
        os.set_blocking(fd, True)
        if identity is not None and (info.st_dev, info.st_ino) != tuple(identity):
            os.close(fd)
            raise FormatError(f"{path}: the path names another file than the one planned; not reading it")
        direct_fd = -1
        if self._direct:
            try:
                direct_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | _O_CLOEXEC | _O_DIRECT)
            except OSError as exc:
                if exc.errno not in DIRECT_REFUSED_ERRNOS and exc.errno != errno.ENOENT:
                    os.close(fd)
                    raise FormatError(f"{path}: cannot open for direct reading: {exc.strerror}") from None
                _log.info("%s: O_DIRECT refused at open (%s); reading buffered", path, exc.strerror)
        return Handles(path, fd, direct_fd)

    def refuse_direct(self, path: str, reason: str, identity: tuple[int, int] | None = None) -> Handles:
        """Stop using ``O_DIRECT`` for ``path`` (its file system refused a read)."""
        with self._lock:
            key = (path, identity)
            handles = self._handles[key]
            if handles.direct_fd < 0:
                return handles
            _log.info("%s: O_DIRECT refused at read (%s); reading buffered", path, reason)
            # The descriptor is not closed: another thread may be inside a read on it.
            replaced = Handles(path, handles.buffered_fd, -1)
            self._handles[key] = replaced
            self._retired.append(handles.direct_fd)
            return replaced

    def close(self) -> None:
        """Close every descriptor; later :meth:`get` calls raise."""
        with self._lock:
            self._closed = True
            for handles in self._handles.values():
                os.close(handles.buffered_fd)
                if handles.direct_fd >= 0:
                    os.close(handles.direct_fd)
            self._handles.clear()
            for fd in self._retired:
                os.close(fd)
            self._retired.clear()

"""How a staging ring fills its buffers: from the mapping, or by ``pread``.

Both release the GIL for the bulk of their work (numpy's copy loop,
``os.preadv``), so a ring fills on several threads at once.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .._errors import FormatError
from .._mapping import MappedFile
from ._jobs import Fallbacks

__all__ = ["ALIGN_NBYTES", "MappingReader", "PreadReader", "Reader"]

# Slot offsets, and O_DIRECT file offsets and lengths, are multiples of this.
ALIGN_NBYTES = 4096


class Reader(Protocol):
    name: str

    def lead(self, offset: int) -> int:
        """Bytes read before ``offset`` to keep a read aligned (0 unless O_DIRECT)."""
        ...

    def read(self, mapped: MappedFile, offset: int, out: npt.NDArray[np.uint8], nbytes: int) -> None:
        """Fill ``out[:nbytes]`` with the file bytes at ``offset``; ``out`` may be longer."""
        ...

    def close(self) -> None: ...


class MappingReader:
    """Copies out of the page cache through the mapping (faults in what is missing)."""

    name = "staged"

    def lead(self, offset: int) -> int:
        return 0

    def read(self, mapped: MappedFile, offset: int, out: npt.NDArray[np.uint8], nbytes: int) -> None:
        np.copyto(out[:nbytes], mapped.view(offset, np.dtype(np.uint8), (nbytes,)))

    def close(self) -> None:
        pass


class PreadReader:
    """``pread`` from a descriptor of the mapped file: exact bytes, no page
    faults, many reads in flight when called from several threads.

    The path is reopened, so each descriptor is checked to name the very
    file that was mapped (a re-conversion renames a new file into place);
    a mismatch is a :class:`FormatError`.  With ``direct``, reads bypass the
    page cache (``O_DIRECT``, aligned spans); where the file system refuses
    ``O_DIRECT`` the reader falls back to buffered reads, counted and logged once.
    """

    def __init__(self, fallbacks: Fallbacks, *, direct: bool = False) -> None:
        self.fallbacks = fallbacks
        self.direct = direct
        self.name = "pread"
        self._fds: dict[tuple[str, bool], int] = {}
        self._lock = threading.Lock()

    def lead(self, offset: int) -> int:
        return offset % ALIGN_NBYTES if self.direct else 0

    def _fd(self, mapped: MappedFile, direct: bool) -> int:
        key = (mapped.path, direct)
        with self._lock:
            fd = self._fds.get(key)
            if fd is not None:
                return fd
            flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | (getattr(os, "O_DIRECT", 0) if direct else 0)
            fd = os.open(mapped.path, flags)
            status = os.fstat(fd)
            if (status.st_dev, status.st_ino) != mapped.identity or status.st_size < mapped.nbytes:
                os.close(fd)
                raise FormatError(f"{mapped.path}: the path no longer names the file that was mapped; not reading it")
            self._fds[key] = fd
            return fd

    def read(self, mapped: MappedFile, offset: int, out: npt.NDArray[np.uint8], nbytes: int) -> None:
        if self.direct:
            try:
                self._read_direct(mapped, offset, out, nbytes)
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self.fallbacks.note("O_DIRECT refused", f"{mapped.path}: {exc.strerror}; reading buffered")
                self.direct = False
        self._read_exact(self._fd(mapped, False), mapped, offset, out, nbytes, nbytes)

    def _read_direct(self, mapped: MappedFile, offset: int, out: npt.NDArray[np.uint8], nbytes: int) -> None:
        span = -(-nbytes // ALIGN_NBYTES) * ALIGN_NBYTES
        if offset % ALIGN_NBYTES or span > len(out):
            raise OSError(errno.EINVAL, "unaligned direct read")
        self._read_exact(self._fd(mapped, True), mapped, offset, out[:span], nbytes, span)

    @staticmethod
    def _read_exact(fd: int, mapped: MappedFile, offset: int, out: npt.NDArray[Any], need: int, want: int) -> None:
        done = 0
        view = memoryview(out[:want])  # type: ignore[arg-type]
        while done < need:
            got = os.preadv(fd, [view[done:want]], offset + done)
            if got == 0:
                raise FormatError(
                    f"{mapped.path}: file ended at byte {offset + done}, before {offset + need}: truncated"
                )
            done += got

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

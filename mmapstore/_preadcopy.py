"""Exact reads into caller buffers: what bulk readers use instead of a mapping
when the file may shrink under them.

Touching a mapped page past the end of a truncated file kills the process
with SIGBUS; ``pread`` past the end returns fewer bytes instead.  :func:`pread_into`
turns that short read into a :class:`~mmapstore._errors.FormatError` naming
the file, so ``convert`` and ``verify`` (and any sink that copies through
it) survive a file that shrinks while they read it.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import numpy.typing as npt

from ._errors import FormatError
from ._mapping import MappedFile

__all__ = ["MAX_PREAD_NBYTES", "copy_range", "pread_into"]

# One preadv call moves at most this much (Linux caps a single read near 2 GiB).
MAX_PREAD_NBYTES = 1 << 30


def pread_into(
    source: int | MappedFile,
    offset: int,
    destination: memoryview | npt.NDArray[np.generic],
    *,
    path: str | None = None,
) -> None:
    """Fill all of ``destination`` with the file bytes starting at ``offset``.

    Parameters
    ----------
    source
        An open file descriptor, or a :class:`~mmapstore._mapping.MappedFile`
        (its own descriptor is used; the mapping is never touched).
    offset
        Absolute file offset of the first byte.
    destination
        A writable, C-contiguous buffer (numpy array of any dtype, or a
        memoryview); exactly ``destination.nbytes`` bytes are read into it.
    path
        The file's name for messages (defaults to the mapping's path).

    Raises
    ------
    FormatError
        The file ends before ``offset + destination.nbytes`` (it shrank, or
        was shorter than promised), or the read fails.
    ValueError
        ``destination`` is not writable and contiguous, or ``offset`` is negative.
    """
    if isinstance(source, MappedFile):
        fd, name = source.fd, path or source.path
        if fd < 0:
            raise FormatError(f"{name}: the mapping is closed")
    else:
        fd, name = source, path or f"file descriptor {source}"
    if offset < 0:
        raise ValueError(f"{name}: negative offset {offset}")
    if isinstance(destination, np.ndarray):
        if not destination.flags.c_contiguous or not destination.flags.writeable:
            raise ValueError(f"{name}: destination must be a writable C-contiguous array")
        target = destination.reshape(-1).view(np.uint8).data
    else:
        target = destination.cast("B") if destination.format != "B" or destination.ndim != 1 else destination
        if target.readonly:
            raise ValueError(f"{name}: destination is read-only")
    total = target.nbytes
    done = 0
    while done < total:
        try:
            got = os.preadv(fd, [target[done : done + MAX_PREAD_NBYTES]], offset + done)
        except OSError as exc:
            raise FormatError(
                f"{name}: read of bytes [{offset + done}, {offset + total}) failed: {exc.strerror}"
            ) from None
        if got == 0:
            raise FormatError(
                f"{name}: file ends before byte {offset + total} (read {done} of {total} bytes at offset "
                f"{offset}): it shrank or is truncated"
            )
        done += got


# copy_file_range cannot serve these (another filesystem on an old kernel, a
# filesystem or file kind without support): copy through a bounce buffer.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
_BOUNCE_NBYTES = 8 << 20


def copy_range(
    source: int,
    source_offset: int,
    destination: int,
    destination_offset: int,
    nbytes: int,
    *,
    path: str,
) -> None:
    """Copy exactly ``nbytes`` from ``source`` to ``destination`` at the given
    offsets, in the kernel (``copy_file_range``) where it can, else through a
    bounce buffer with ``pread``/``pwrite``.  Neither file is mapped and
    neither descriptor's position moves.

    Parameters
    ----------
    source, destination
        Open file descriptors (``destination`` opened for writing).
    source_offset, destination_offset
        Absolute offsets of the first byte in each file.
    nbytes
        Bytes to copy.
    path
        The source's name for messages.

    Raises
    ------
    FormatError
        The source ends before ``source_offset + nbytes`` (it shrank, or was
        shorter than promised): ``copy_file_range`` returns a short count
        there, never a fault.
    OSError
        Writing failed (a full or read-only disk).
    """
    if source_offset < 0 or destination_offset < 0 or nbytes < 0:
        raise ValueError(f"{path}: negative offset or length")
    done = 0
    while done < nbytes:
        try:
            got = os.copy_file_range(
                source,
                destination,
                min(nbytes - done, MAX_PREAD_NBYTES),
                source_offset + done,
                destination_offset + done,
            )
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY or done:
                raise
            _bounce_copy(source, source_offset, destination, destination_offset, nbytes, path=path)
            return
        if got == 0:
            raise FormatError(
                f"{path}: file ends before byte {source_offset + nbytes} (copied {done} of {nbytes} bytes at offset "
                f"{source_offset}): it shrank or is truncated"
            )
        done += got


def _bounce_copy(
    source: int, source_offset: int, destination: int, destination_offset: int, nbytes: int, *, path: str
) -> None:
    buffer = np.empty(min(nbytes, _BOUNCE_NBYTES), dtype=np.uint8)
    for start in range(0, nbytes, buffer.nbytes):
        chunk = buffer[: min(buffer.nbytes, nbytes - start)]
        pread_into(source, source_offset + start, chunk, path=path)
        view = chunk.data
        written = 0
        while written < chunk.nbytes:
            written += os.pwrite(destination, view[written:], destination_offset + start + written)

"""The only module that touches ``mmap``.

One read-only shared mapping per file, shared by every view of that file
(one ``np.memmap`` per tensor would exhaust file descriptors on checkpoints
with a tensor per expert).  Views are plain ``np.ndarray`` objects over the
mapping with ``writeable=False``; the kernel page cache is the only copy.

Pitfalls, stated once:

- A view stays valid after :meth:`MappedFile.close`: the mapping is released
  when the last view is garbage-collected.  ``close()`` only refuses new views.
- mmap cannot protect against another process truncating a mapped file:
  touching a page past the new end raises SIGBUS.  :meth:`MappedFile.check_size`
  lets callers check before a bulk copy, and bulk readers that must survive a
  file shrinking under them read through :func:`mmapstore._preadcopy.pread_into`
  (a short read, never a fault); publish new files by rename instead of
  rewriting them (every writer in mmapstore does).
- A file is mapped through the descriptor that :func:`open_regular` opened
  (never blocking, regular files only) and, when the caller passes the
  :class:`FileIdentity` recorded at validation, only if it is still that file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
from collections.abc import Iterable
from types import TracebackType

import numpy as np
import numpy.typing as npt

from ._errors import FileChangedError, FormatError, StoreClosedError
from .formats._files import FileIdentity, open_regular
from .formats._records import TensorRecord

__all__ = [
    "MADV_DONTNEED",
    "MADV_POPULATE_READ",
    "MADV_WILLNEED",
    "PAGE_NBYTES",
    "FileMaps",
    "MappedFile",
    "byte_span",
    "resident_nbytes",
]

PAGE_NBYTES = mmap.PAGESIZE
MADV_WILLNEED: int = mmap.MADV_WILLNEED
MADV_DONTNEED: int = mmap.MADV_DONTNEED
# Linux >= 5.14: fault the range in now (no per-page faults during the copy).
MADV_POPULATE_READ: int = getattr(mmap, "MADV_POPULATE_READ", 22)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int


def byte_span(view: npt.NDArray[np.generic]) -> tuple[int, int]:
    """Address range ``[low, high)`` that the elements of ``view`` touch."""
    if view.size == 0:
        address = int(view.__array_interface__["data"][0])
        return address, address
    low = high = int(view.__array_interface__["data"][0])
    for extent, stride in zip(view.shape, view.strides, strict=True):
        if stride >= 0:
            high += (extent - 1) * stride
        else:
            low += (extent - 1) * stride
    return low, high + view.itemsize


def resident_nbytes(view: npt.NDArray[np.generic]) -> int:
    """Bytes of the pages under ``view`` that are in memory now (``mincore``).

    Counts whole pages, so a view smaller than a page reports a page.
    """
    low, high = byte_span(view)
    return _mincore(low, high - low)


def _mincore(address: int, nbytes: int) -> int:
    if nbytes <= 0:
        return 0
    start = address - address % PAGE_NBYTES
    length = address + nbytes - start
    pages = (length + PAGE_NBYTES - 1) // PAGE_NBYTES
    vector = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vector) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mincore failed: {os.strerror(error)}")
    resident = np.frombuffer(memoryview(vector).cast("B"), dtype=np.uint8) & 1
    return int(resident.sum()) * PAGE_NBYTES


class MappedFile:
    """One read-only shared mapping of one file.

    The descriptor the file was opened with stays open (for
    :func:`mmapstore._preadcopy.pread_into`) until :meth:`close`.

    Parameters
    ----------
    path
        The file to map.
    min_nbytes
        The size its header promised; a shorter file raises :class:`FormatError`
        (it shrank after its header was read, or the header lied).
    identity
        The file as validated; if ``path`` now names another file, or the
        file changed size or mtime, :class:`FileChangedError` is raised.

    Raises
    ------
    FormatError
        The file is missing, not a regular file, or shorter than ``min_nbytes``.
    FileChangedError
        The file is not the one ``identity`` describes.
    """

    def __init__(self, path: str, min_nbytes: int = 0, identity: FileIdentity | None = None) -> None:
        self.path = path
        self._closed = False
        self.fd = -1
        fd, info = open_regular(path, what="file to map")
        try:
            change = identity.describe_change(info) if identity is not None else None
            if change is not None:
                raise FileChangedError(f"{path}: {change} since it was validated")
            size = info.st_size
            # What was mapped, so a reader that reopens the path (pread) can
            # tell whether it still names the same file.
            self.identity = (info.st_dev, info.st_ino)
            if size < min_nbytes:
                raise FormatError(f"{path}: file is {size} bytes, its header needs {min_nbytes}: truncated")
            self.nbytes = size
            # mmap cannot map an empty file; an empty file serves only empty tensors.
            self._mmap: mmap.mmap | None = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        if self._mmap is not None:
            self._base: npt.NDArray[np.uint8] = np.frombuffer(self._mmap, dtype=np.uint8)
        else:
            self._base = np.zeros(0, dtype=np.uint8)
            self._base.flags.writeable = False
        self.address = int(self._base.__array_interface__["data"][0])

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self.path}: mapping is closed")

    def view(
        self,
        offset: int,
        dtype: np.dtype[np.generic],
        shape: tuple[int, ...],
        strides: tuple[int, ...] | None = None,
    ) -> npt.NDArray[np.generic]:
        """A read-only array over ``shape`` elements of ``dtype`` at file ``offset``.

        Raises
        ------
        FormatError
            Some element would lie outside the mapping (numpy accepts negative
            offsets and strides that do; we never build such a view).
        """
        self._check_open()
        _check_inside(self.path, self.nbytes, offset, dtype, shape, strides)
        array: npt.NDArray[np.generic] = np.ndarray(
            shape, dtype=dtype, buffer=self._base, offset=offset, strides=strides
        )
        return array

    def record_view(self, record: TensorRecord) -> npt.NDArray[np.generic]:
        """The view of one validated tensor record of this file."""
        if record.offset + record.nbytes > self.nbytes:
            raise FormatError(
                f"{self.path}: tensor {record.name!r}: bytes [{record.offset}, "
                f"{record.offset + record.nbytes}) past the end of the {self.nbytes} byte file"
            )
        shape = record.shape
        if record.dtype.is_block and shape:  # encoded bytes: the last axis in bytes, every block of it
            shape = (*shape[:-1], record.dtype.row_nbytes(shape[-1]))
        return self.view(record.offset, record.dtype.numpy, shape)

    def offset_of(self, view: npt.NDArray[np.generic]) -> int:
        """File offset of the first byte ``view`` touches (it must live in this mapping)."""
        low, high = byte_span(view)
        if low < self.address or high > self.address + self.nbytes:
            raise ValueError(f"{self.path}: view does not lie inside this mapping")
        return low - self.address

    def advise(self, offset: int, nbytes: int, advice: int) -> None:
        """``madvise`` the pages covering file bytes ``[offset, offset + nbytes)``."""
        self._check_open()
        if nbytes <= 0 or self._mmap is None:
            return
        start = offset - offset % PAGE_NBYTES
        end = min(offset + nbytes, self.nbytes)
        try:
            self._mmap.madvise(advice, start, end - start)
        except OSError as exc:
            # MADV_POPULATE_READ faults the range in: EFAULT means a page lies
            # past the end of the file, which shrank under the mapping.
            if advice == MADV_POPULATE_READ and exc.errno == errno.EFAULT:
                raise FormatError(
                    f"{self.path}: file shrank under its mapping (bytes [{start}, {end}) are no longer "
                    f"in the file); refusing to read it"
                ) from None
            raise

    def resident_nbytes(self, offset: int = 0, nbytes: int | None = None) -> int:
        """Bytes of ``[offset, offset + nbytes)`` in memory now, in whole pages."""
        self._check_open()
        if nbytes is None:
            nbytes = self.nbytes - offset
        return _mincore(self.address + offset, min(nbytes, self.nbytes - offset))

    def page_resident(self, offset: int) -> bool:
        """Whether the page holding file byte ``offset`` is in memory now (one
        ``mincore`` call, no array: the cheap first look at a range)."""
        self._check_open()
        if not 0 <= offset < self.nbytes or self._mmap is None:
            return False
        start = offset - offset % PAGE_NBYTES
        flag = ctypes.c_ubyte(0)
        if _libc.mincore(ctypes.c_void_p(self.address + start), PAGE_NBYTES, ctypes.byref(flag)) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"mincore failed on {self.path}: {os.strerror(error)}")
        return bool(flag.value & 1)

    def resident_pages(self, offset: int, nbytes: int) -> npt.NDArray[np.bool_]:
        """Per page covering file bytes ``[offset, offset + nbytes)`` (the first
        page starts at ``offset`` rounded down to a page): in memory now?  One
        ``mincore`` call; pages past the end of the mapping count as absent."""
        self._check_open()
        start = offset - offset % PAGE_NBYTES
        pages = -(-(offset + nbytes - start) // PAGE_NBYTES) if nbytes > 0 else 0
        vector = np.zeros(pages, dtype=np.uint8)
        end = min(offset + nbytes, self.nbytes)
        if end > start and self._mmap is not None:
            length = end - start
            if _libc.mincore(ctypes.c_void_p(self.address + start), ctypes.c_size_t(length),
                             vector.ctypes.data_as(ctypes.c_void_p)) != 0:  # fmt: skip
                error = ctypes.get_errno()
                raise OSError(error, f"mincore failed on {self.path}: {os.strerror(error)}")
        return (vector & 1).astype(bool)

    def check_size(self) -> None:
        """Raise :class:`FormatError` if the file is now shorter than when mapped.

        Touching a mapped page past a truncated end is SIGBUS; callers check
        first before a bulk copy.
        """
        self._check_open()
        try:
            size = os.stat(self.path).st_size if self._mmap is None else self._mmap.size()
        except OSError as exc:
            raise FormatError(f"{self.path}: cannot stat mapped file: {exc.strerror}") from None
        if size < self.nbytes:
            raise FormatError(
                f"{self.path}: file shrank from {self.nbytes} to {size} bytes while mapped; refusing to read it"
            )

    def close(self) -> None:
        """Refuse new views; unmap now if no view is alive, else when the last one dies."""
        if self._closed:
            return
        self._closed = True
        del self._base
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # Views still export the buffer; the mapping goes with the last of them.
                pass
            self._mmap = None

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _check_inside(
    path: str,
    file_nbytes: int,
    offset: int,
    dtype: np.dtype[np.generic],
    shape: tuple[int, ...],
    strides: tuple[int, ...] | None,
) -> None:
    """Refuse a view any element of which would lie outside ``[0, file_nbytes)``."""
    itemsize = int(dtype.itemsize)
    low = high = offset
    if strides is None:  # C order: one contiguous run
        count = 1
        for extent in shape:
            count *= extent
        high = offset + count * itemsize
    elif all(shape):
        for extent, stride in zip(shape, strides, strict=True):
            if stride >= 0:
                high += (extent - 1) * stride
            else:
                low += (extent - 1) * stride
        high += itemsize
    if low < 0 or high > file_nbytes or offset > file_nbytes:
        raise FormatError(
            f"{path}: a view of {list(shape)} {dtype} at offset {offset} would touch bytes "
            f"[{low}, {high}) outside the {file_nbytes} byte file"
        )


class FileMaps:
    """Maps each file at most once; closes them all together.

    ``identities`` (path -> the file as validated) make every mapping check
    that it maps the very file whose header was read.  :meth:`map_all` maps
    every known file now, so later replacements of a path do not matter.
    """

    def __init__(self, sizes: dict[str, int], identities: dict[str, FileIdentity] | None = None) -> None:
        self._sizes = dict(sizes)  # path -> bytes its header needs
        self._identities = dict(identities or {})
        self._maps: dict[str, MappedFile] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def get(self, path: str) -> MappedFile:
        mapped = self._maps.get(path)
        if mapped is not None:
            return mapped
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"{path}: the store is closed")
            mapped = self._maps.get(path)
            if mapped is None:
                mapped = MappedFile(path, self._sizes.get(path, 0), self._identities.get(path))
                self._maps[path] = mapped
            return mapped

    def map_all(self, paths: Iterable[str]) -> None:
        """Map every one of ``paths`` now (each checked against its identity)."""
        for path in paths:
            self.get(path)

    def mapped(self) -> list[MappedFile]:
        return list(self._maps.values())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for mapped in self._maps.values():
                mapped.close()

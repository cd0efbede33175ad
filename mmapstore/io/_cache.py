"""Page-cache policy for stores larger than RAM.

When the experts fit in memory, leave the page cache alone (``"keep"``): a
warm refresh is then a memcpy from the mapping.  When they do not, the pool
is the cache, and the page cache should hold as little of the store as it
can so it does not fight the pool for memory:

=========================================  ===========================================
situation                                  what to do
=========================================  ===========================================
store fits in RAM                          ``keep``: nothing
store larger than RAM, ranges landed in    ``drop`` (:func:`release_landed`):
a pool (the pool is now the cache)         ``MADV_DONTNEED`` on the mapping (unmaps our
                                           page-table entries) then
                                           ``POSIX_FADV_DONTNEED`` (drops the clean pages)
an expert demoted that may come back soon  :func:`advise_cold`: ``MADV_COLD``, first to be
                                           reclaimed under pressure, kept until then
a range that must leave memory now, even   :func:`page_out`: ``MADV_PAGEOUT`` (Linux 5.4+)
if another mapping of this process holds
it
a range read with ``O_DIRECT``             nothing: it never entered the cache.  Never
                                           ``WILLNEED`` it first, which reads it twice
the next layer's experts, to be copied     :func:`read_ahead` (``POSIX_FADV_WILLNEED``),
from the mapping                           or a :class:`~mmapstore.io._prefetch.Prefetcher`
                                           into staging buffers when they will be read
=========================================  ===========================================

``DONTNEED`` drops only the cached folios that lie wholly inside a span, and
the page cache holds file data in folios of up to a few MiB: drop whole slabs
or stacks, not small pieces of them.  Every helper is advice: the kernel may ignore it, and none changes a byte
anyone reads.  ``DONTNEED`` on tmpfs does nothing (its pages are the file).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from typing import Literal

from .._errors import FormatError
from .._mapping import MADV_DONTNEED, MappedFile

__all__ = [
    "MADV_COLD",
    "MADV_PAGEOUT",
    "CachePolicy",
    "advise_cold",
    "drop_cached",
    "evict",
    "page_out",
    "read_ahead",
    "release_landed",
]

CachePolicy = Literal["keep", "drop"]

# Linux 5.4+; numbers from the kernel's uapi mman-common.h where Python lacks them.
MADV_COLD: int = getattr(mmap, "MADV_COLD", 20)
MADV_PAGEOUT: int = getattr(mmap, "MADV_PAGEOUT", 21)


def _fadvise(path: str, spans: Iterable[tuple[int, int]], advice: int, fd: int = -1) -> None:
    if fd >= 0:  # the descriptor of the file as mapped: advise that very file
        for offset, nbytes in spans:
            if nbytes > 0:
                os.posix_fadvise(fd, offset, nbytes, advice)
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK)
    except OSError as exc:
        raise FormatError(f"{path}: cannot open to advise the page cache: {exc.strerror}") from None
    try:
        for offset, nbytes in spans:
            if nbytes > 0:
                os.posix_fadvise(fd, offset, nbytes, advice)
    finally:
        os.close(fd)


def evict(path: str | os.PathLike[str], mapped: MappedFile | None = None) -> None:
    """Drop the whole of ``path`` from the page cache: its dirty pages are
    written back first (they cannot be dropped), and ``mapped``'s own page
    table entries are released (``POSIX_FADV_DONTNEED`` skips mapped pages).
    For benchmarks and tests that need a truly cold file."""
    if mapped is not None:
        mapped.advise(0, mapped.nbytes, MADV_DONTNEED)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_cached(path: str, spans: Iterable[tuple[int, int]]) -> None:
    """``POSIX_FADV_DONTNEED``: drop the clean, unmapped cached pages of ``(offset, nbytes)`` spans."""
    _fadvise(path, spans, os.POSIX_FADV_DONTNEED)


def read_ahead(path: str, spans: Iterable[tuple[int, int]]) -> None:
    """``POSIX_FADV_WILLNEED``: start reading the spans into the page cache; returns without waiting.

    For ranges that will be copied from the mapping; not for ranges read with
    ``O_DIRECT`` (they would be read twice).
    """
    _fadvise(path, spans, os.POSIX_FADV_WILLNEED)


def advise_cold(mapped: MappedFile, spans: Iterable[tuple[int, int]]) -> None:
    """``MADV_COLD``: reclaim these mapped pages first when memory is short."""
    for offset, nbytes in spans:
        mapped.advise(offset, nbytes, MADV_COLD)


def page_out(mapped: MappedFile, spans: Iterable[tuple[int, int]]) -> None:
    """``MADV_PAGEOUT``: reclaim these mapped pages now (clean file pages are simply dropped)."""
    for offset, nbytes in spans:
        mapped.advise(offset, nbytes, MADV_PAGEOUT)


def release_landed(path: str, spans: Iterable[tuple[int, int]], mapped: MappedFile | None = None) -> None:
    """The ``"drop"`` policy, after ranges landed in a pool: unmap them from
    ``mapped`` (if given) and drop them from the page cache."""
    spans = list(spans)
    if mapped is not None:
        for offset, nbytes in spans:
            mapped.advise(offset, nbytes, MADV_DONTNEED)
        _fadvise(path, spans, os.POSIX_FADV_DONTNEED, mapped.fd)
        return
    drop_cached(path, spans)

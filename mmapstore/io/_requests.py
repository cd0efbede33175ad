"""Values of the cold-read path: what to read, how, and what happened.

Everything here is a frozen value; the reader (:mod:`mmapstore.io._reader`)
is the only thing that acts on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy.typing as npt

from .._errors import OptionError
from .._mapping import MappedFile

__all__ = [
    "ALIGN_NBYTES",
    "SOURCES",
    "DirectMode",
    "FileRange",
    "ReadRequest",
    "ReadResult",
    "ReaderConfig",
    "ScatterRequest",
    "Source",
]

# O_DIRECT needs file offsets, lengths and buffer addresses aligned to the
# device's logical block size (512 B here, 4 KiB on most NVMe drives).  4 KiB
# is safe on every device and is the page size, so a page-aligned slab store
# never needs a bounce for its body.
ALIGN_NBYTES = 4096

BOUNCE_STEP_NBYTES = 1 << 20
"""The most a reader thread bounces at once (see :attr:`ReaderConfig.bounce_step`)."""

DirectMode = Literal["auto", "never"]
"""``"auto"``: ``O_DIRECT`` where the file system accepts it, buffered
``pread`` where it refuses (open or first read).  ``"never"``: always buffered."""

Source = Literal["resident", "direct", "bounced", "buffered", "prefetched"]
"""Where the bytes of a piece came from.

``resident``: copied from the mapping (``mincore`` said every page was in
memory).  ``direct``: ``O_DIRECT`` read straight into the destination.
``bounced``: ``O_DIRECT`` read into an aligned bounce buffer, then copied (the
unaligned head or tail of a range, or a destination whose alignment differs
from the file offset's).  ``buffered``: ``pread`` through the page cache
straight into the destination.  ``prefetched``: copied from a staging buffer
a :class:`~mmapstore.io._prefetch.Prefetcher` had filled.
"""

SOURCES: tuple[Source, ...] = ("resident", "direct", "bounced", "buffered", "prefetched")


@dataclass(frozen=True, slots=True)
class ReaderConfig:
    """How a :class:`~mmapstore.io._reader.ColdReader` reads.

    Parameters
    ----------
    queue_depth
        Reads in flight at once (threads, each in ``preadv`` with the GIL
        released).  Throughput on SSDs grows with it (NVMe drives want tens
        of reads in flight); on the virtio disks ``mmapstore bench --cases
        cold`` ran on, 16 was within noise of the best depth of 1-32 in every
        run.  :func:`mmapstore.io._probe.probe_reader_config` measures it for
        a disk.
    chunk_nbytes
        The largest single read; longer ranges are split so their pieces run
        in parallel.  A multiple of :data:`ALIGN_NBYTES`.
    direct
        See :data:`DirectMode`.
    piece_nbytes
        Granularity of the residency split: a range is cut into pieces of
        this size, each served from the mapping if all its pages are
        resident, else read.  A multiple of :data:`ALIGN_NBYTES`.
    """

    queue_depth: int = 16
    chunk_nbytes: int = 4 << 20
    direct: DirectMode = "auto"
    piece_nbytes: int = 1 << 20

    @property
    def bounce_step(self) -> int:
        """Bytes a thread bounces at a time when a destination's alignment
        differs from its file offset's: a chunk, at most 1 MiB."""
        return min(self.chunk_nbytes, BOUNCE_STEP_NBYTES)

    @property
    def bounce_nbytes(self) -> int:
        """Each thread's bounce buffer (made only by a thread that bounces)."""
        return self.bounce_step + 2 * ALIGN_NBYTES

    def __post_init__(self) -> None:
        if self.queue_depth < 1:
            raise OptionError(f"reader queue depth must be >= 1, got {self.queue_depth}")
        for name in ("chunk_nbytes", "piece_nbytes"):
            value = getattr(self, name)
            if value < ALIGN_NBYTES or value % ALIGN_NBYTES:
                raise OptionError(f"reader {name} must be a positive multiple of {ALIGN_NBYTES}, got {value}")
        if self.direct not in ("auto", "never"):
            raise OptionError(f"reader direct mode must be 'auto' or 'never', got {self.direct!r}")


@dataclass(frozen=True, slots=True)
class FileRange:
    """File bytes ``[offset, offset + nbytes)`` of ``path``: what a prefetch asks for.

    ``mapped`` and ``identity`` as in :class:`ReadRequest`.
    """

    path: str
    offset: int
    nbytes: int
    mapped: MappedFile | None = None
    identity: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True, eq=False)
class ReadRequest:
    """Fill all of ``destination`` with file bytes ``[offset, offset + len)``.

    Parameters
    ----------
    path
        The file to read.
    offset
        Absolute file offset of the first byte.
    destination
        A writable, C-contiguous buffer of exactly the range's length: a numpy
        array (any dtype), a pinned staging buffer, a ``memoryview``.
    mapped
        The file's mapping, if it has one: its resident pages are then copied
        from memory instead of read (the warm path).  Without it every byte
        is read.
    identity
        ``(st_dev, st_ino)`` of the file as planned; if the path names another
        file when it is opened the read refuses (a re-conversion renamed a new
        file into place).
    """

    path: str
    offset: int
    destination: memoryview | npt.NDArray[Any]
    mapped: MappedFile | None = None
    identity: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return int(self.destination.nbytes)


@dataclass(frozen=True, slots=True, eq=False)
class ScatterRequest:
    """Fill ``destinations``, in order, with the file bytes from ``offset`` on:
    one contiguous range landing in several buffers (every part of an
    expert-major record into its own pool slot) with one ``preadv``.

    ``path``, ``mapped`` and ``identity`` as in :class:`ReadRequest`; each
    destination as a :class:`ReadRequest`'s.
    """

    path: str
    offset: int
    destinations: tuple[memoryview | npt.NDArray[Any], ...]
    mapped: MappedFile | None = None
    identity: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return sum(int(destination.nbytes) for destination in self.destinations)


@dataclass(frozen=True, slots=True)
class ReadResult:
    """What a read did: bytes per source, bytes asked of the device, time.

    ``device_nbytes`` counts what ``O_DIRECT`` reads asked of the device
    (aligned, so it can exceed the direct and bounced bytes) plus buffered
    bytes (the kernel's read-ahead on them is not visible here).
    """

    nbytes: int
    seconds: float
    source_nbytes: tuple[tuple[Source, int], ...] = field(default=())
    device_nbytes: int = 0
    requests: int = 0
    pieces: int = 0

    def nbytes_from(self, source: Source) -> int:
        """Bytes served by ``source``."""
        return dict(self.source_nbytes).get(source, 0)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

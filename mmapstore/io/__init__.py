"""Explicit reads of cold byte ranges, page-cache policy and prefetch.

:class:`ColdReader` reads exact ranges into caller buffers (resident pieces
copied from the mapping, the rest read with many ``preadv`` in flight,
``O_DIRECT`` where the file system accepts it); :class:`Prefetcher` starts
likely-next reads into bounded staging; :mod:`~mmapstore.io._cache` holds the
page-cache policy helpers and says when to use which;
:func:`probe_reader_config` picks queue depth and read size.
"""

from __future__ import annotations

from ._cache import CachePolicy, advise_cold, drop_cached, evict, page_out, read_ahead, release_landed
from ._files import aligned_empty
from ._prefetch import Prefetcher, PrefetchTicket
from ._probe import ProbeResult, probe_disk, probe_files, probe_reader_config
from ._reader import ColdReader, ReadHandle
from ._requests import (
    ALIGN_NBYTES,
    SOURCES,
    DirectMode,
    FileRange,
    ReaderConfig,
    ReadRequest,
    ReadResult,
    ScatterRequest,
    Source,
)

__all__ = [
    "ALIGN_NBYTES",
    "SOURCES",
    "CachePolicy",
    "ColdReader",
    "DirectMode",
    "FileRange",
    "PrefetchTicket",
    "Prefetcher",
    "ProbeResult",
    "ReadHandle",
    "ReadRequest",
    "ReadResult",
    "ReaderConfig",
    "ScatterRequest",
    "Source",
    "advise_cold",
    "aligned_empty",
    "drop_cached",
    "evict",
    "page_out",
    "probe_disk",
    "probe_files",
    "probe_reader_config",
    "read_ahead",
    "release_landed",
]

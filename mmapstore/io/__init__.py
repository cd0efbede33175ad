"""Explicit reads of cold byte ranges, page-cache policy and prefetch.

:class:`ColdReader` reads exact ranges into caller buffers (resident pieces
copied from the mapping, the rest read with many ``preadv`` in flight,
``O_DIRECT`` where the file system accepts it); :class:`Prefetcher` starts
likely-next reads into bounded staging; :mod:`~mmapstore.io.cache` holds the
page-cache policy helpers and says when to use which;
:func:`probe_reader_config` picks queue depth and read size.
"""

from __future__ import annotations

from .cache import CachePolicy, advise_cold, drop_cached, page_out, read_ahead, release_landed
from .files import aligned_empty
from .prefetch import Prefetcher, PrefetchTicket
from .probe import ProbeResult, probe_reader_config
from .reader import ColdReader, ReadHandle
from .requests import (
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
    "page_out",
    "probe_reader_config",
    "read_ahead",
    "release_landed",
]

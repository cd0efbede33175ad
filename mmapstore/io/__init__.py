"""Explicit reads of cold byte ranges, page-cache policy and prefetch."""

from __future__ import annotations

from .files import aligned_empty
from .reader import ColdReader, ReadHandle
from .requests import ALIGN_NBYTES, SOURCES, DirectMode, ReaderConfig, ReadRequest, ReadResult, Source

__all__ = [
    "ALIGN_NBYTES",
    "SOURCES",
    "ColdReader",
    "DirectMode",
    "ReadHandle",
    "ReadRequest",
    "ReadResult",
    "ReaderConfig",
    "Source",
    "aligned_empty",
]

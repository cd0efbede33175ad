"""What the byte sources move, and what they report."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .._mapping import MappedFile

if TYPE_CHECKING:
    import torch

__all__ = ["SOURCES", "CopyJob", "Fallbacks", "Source", "SourceStats"]

_log = logging.getLogger("mmapstore.gpu")

Source = Literal["auto", "registered", "staged", "pread", "direct"]
"""How bytes reach the device.

``registered``: DMA straight from page-cache windows page-locked with the
driver; ``staged``: a pinned ring filled from the mapping by several
threads; ``pread``: a pinned ring filled by parallel ``pread`` (cold ranges:
no page faults, exact bytes); ``direct``: a plain ``copy_`` from a tensor over
the mapping (CPU pools, and the last resort on a GPU); ``auto``: registered
for resident ranges, pread for the others, each falling back down the list.
"""

SOURCES: tuple[Source, ...] = ("auto", "registered", "staged", "pread", "direct")


@dataclass(frozen=True, slots=True)
class CopyJob:
    """Copy file bytes ``[offset, offset + nbytes)`` of ``mapped`` into
    ``destination``, a contiguous 1-D ``uint8`` tensor of ``nbytes``."""

    mapped: MappedFile
    offset: int
    nbytes: int
    destination: torch.Tensor


@dataclass(slots=True)
class SourceStats:
    """Bytes moved by each source, registration work and every fallback.

    ``fallbacks`` counts, per reason, the jobs that had to take a later source
    (a failed registration or pinned allocation, a budget too small, a file
    replaced under its path); each reason is also logged once.
    """

    nbytes: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    registrations: int = 0
    registered_nbytes: int = 0
    registration_seconds: float = 0.0
    unregistrations: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    peak_pinned_nbytes: int = 0

    def moved(self, source: str, nbytes: int) -> None:
        self.nbytes[source] = self.nbytes.get(source, 0) + nbytes
        self.jobs[source] = self.jobs.get(source, 0) + 1


class Fallbacks:
    """Counts fallbacks into a :class:`SourceStats` and logs each reason once."""

    def __init__(self, stats: SourceStats) -> None:
        self.stats = stats
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def note(self, reason: str, detail: str) -> None:
        with self._lock:
            self.stats.fallbacks[reason] = self.stats.fallbacks.get(reason, 0) + 1
            if reason in self._logged:
                return
            self._logged.add(reason)
        _log.warning("%s: %s (falling back to the next source; logged once)", reason, detail)

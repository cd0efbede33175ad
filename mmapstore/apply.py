"""Execute a plan against a sink: check every write, prefetch, copy once."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .mapping import MADV_POPULATE_READ, MADV_WILLNEED
from .planner import FileRanges, RefreshPlan
from .sinks import Sink

__all__ = ["PREFETCH_MODES", "ApplyResult", "apply", "prefetch_ranges"]


@dataclass(frozen=True, slots=True)
class ApplyResult:
    nbytes: int
    seconds: float
    writes: int


PREFETCH_MODES = ("willneed", "willneed+populate", "none")
# The kernel caps one MADV_WILLNEED at max(read-ahead, device I/O size)
# (8 MiB here) and silently ignores the rest; the tail is then faulted in by
# ordinary read-ahead, which over-reads past the range (1.35x measured).
# Hinting in 4 MiB pieces schedules every byte and nothing else.
WILLNEED_CHUNK_NBYTES = 4 << 20


def prefetch_ranges(reads: Sequence[FileRanges], mode: str = "willneed") -> None:
    """Hint the kernel about exactly these ranges: ``MADV_WILLNEED`` on all of
    them (their I/O in flight at once, nothing read past them); with
    ``"willneed+populate"`` also ``MADV_POPULATE_READ`` on each (map it in one
    call instead of a minor fault per page; it waits for the I/O, so on a cold
    cache it serialises what the copy would overlap)."""
    if mode == "none":
        return
    spans = [(ranges.mapped, ranges.spans()) for ranges in reads]
    for mapped, pairs in spans:
        for offset, nbytes in pairs:
            for start in range(offset, offset + nbytes, WILLNEED_CHUNK_NBYTES):
                mapped.advise(start, min(WILLNEED_CHUNK_NBYTES, offset + nbytes - start), MADV_WILLNEED)
    if mode != "willneed+populate":
        return
    for mapped, pairs in spans:
        for offset, nbytes in pairs:
            try:
                mapped.advise(offset, nbytes, MADV_POPULATE_READ)
            except OSError:  # kernel before 5.14: the copy faults the pages in instead
                return


def apply(plan: RefreshPlan, sink: Sink, *, prefetch: str = "willneed") -> ApplyResult:
    """Copy every write of ``plan`` into ``sink``.

    Before the first byte moves: the store must be open, every write must be
    accepted by ``sink.check``, and no source file may have shrunk since it
    was mapped (touching a truncated mapping is SIGBUS).  Then the kernel
    is told ``MADV_WILLNEED`` on exactly the byte ranges the plan reads, so
    all their I/O is in flight at once with no read-ahead past them (never
    ``MADV_RANDOM``, which faults one page at a time).  Each source is then
    copied once, straight from the page cache into its destination.

    ``prefetch`` is ``"willneed"`` (default), ``"willneed+populate"`` (adds
    ``MADV_POPULATE_READ``, Linux >= 5.14) or ``"none"``; ``mmapstore bench``
    compares them (measured here: willneed 1.26x buffered pread on a cold
    cache with exactly 1.00x the bytes paged in; populate 0.99x; none 0.89x).

    Raises
    ------
    StoreClosedError, SinkError, FormatError
        Before anything is written.
    """
    if prefetch not in PREFETCH_MODES:
        raise ValueError(f"prefetch must be one of {PREFETCH_MODES}, got {prefetch!r}")
    plan.store.check_open()
    for write in plan.writes:
        sink.check(write.param, write.index, write.source)
    for ranges in plan.reads:
        ranges.mapped.check_size()
    start = time.perf_counter()
    prefetch_ranges(plan.reads, prefetch)
    for write in plan.writes:
        sink.write(write.param, write.index, write.source)
    return ApplyResult(plan.nbytes, time.perf_counter() - start, len(plan.writes))

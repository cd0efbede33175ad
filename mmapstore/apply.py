"""Execute a plan against a sink: check every write, prefetch, copy once."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .mapping import MADV_WILLNEED
from .planner import RefreshPlan
from .sinks import Sink

__all__ = ["ApplyResult", "apply"]


@dataclass(frozen=True, slots=True)
class ApplyResult:
    nbytes: int
    seconds: float
    writes: int

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def apply(plan: RefreshPlan, sink: Sink, *, prefetch: bool = True) -> ApplyResult:
    """Copy every write of ``plan`` into ``sink``.

    Before the first byte moves: the store must be open, every write must be
    accepted by ``sink.check``, and no source file may have shrunk since it
    was mapped (touching a truncated mapping is SIGBUS).  Then, with
    ``prefetch``, the kernel is told ``MADV_WILLNEED`` on exactly the byte
    ranges the plan reads (read-ahead of the right bytes, no over-read; never
    ``MADV_RANDOM``, which faults one page at a time), and each source is
    copied once, straight from the page cache into its destination.

    Raises
    ------
    StoreClosedError, SinkError, FormatError
        Before anything is written.
    """
    plan.store.check_open()
    for write in plan.writes:
        sink.check(write.param, write.index, write.source)
    checked = set()
    for span in plan.reads:
        if span.mapped.path not in checked:
            span.mapped.check_size()
            checked.add(span.mapped.path)
    start = time.perf_counter()
    if prefetch:
        for span in plan.reads:
            span.mapped.advise(span.offset, span.nbytes, MADV_WILLNEED)
    for write in plan.writes:
        sink.write(write.param, write.index, write.source)
    return ApplyResult(plan.nbytes, time.perf_counter() - start, len(plan.writes))

"""Execute a plan: check source and sink, prefetch, submit, wait, then commit."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from ._errors import SinkError
from ._planner import RefreshPlan
from ._pool import ExpertPool
from ._sinks import Completion, Sink, WriteResult
from ._source import PREFETCH_MODES, ByteSource, Prefetch

__all__ = ["PREFETCH_MODES", "ApplyResult", "Pending", "apply", "start"]


ApplyResult = WriteResult
"""What :func:`apply` delivered: the sink's :class:`~mmapstore._sinks.WriteResult`,
with ``seconds`` counted from the prefetch to the last copy."""


class Pending:
    """A plan whose copies are in flight; :meth:`wait` finishes them and then
    commits the pools (if any were given)."""

    def __init__(
        self, plan: RefreshPlan, completion: Completion, pools: Sequence[ExpertPool] | None, started: float
    ) -> None:
        self.plan = plan
        self._completion = completion
        self._pools = pools
        self._started = started
        self._result: ApplyResult | None = None

    def done(self) -> bool:
        return self._result is not None or self._completion.done()

    def wait(self) -> ApplyResult:
        """Block until the sink's copies landed, then commit the pools (once)."""
        if self._result is None:
            written = self._completion.wait()
            seconds = time.perf_counter() - self._started
            if self._pools is not None:
                self.plan.commit(self._pools)
            self._result = dataclasses.replace(written, seconds=seconds)
        return self._result


def start(
    plan: RefreshPlan,
    sink: Sink,
    source: ByteSource,
    *,
    pools: Sequence[ExpertPool] | None = None,
    prefetch: Prefetch = "willneed",
) -> Pending:
    """Check, prefetch and submit ``plan``'s write table; commit ``pools`` on ``wait()``.

    Before the first byte moves: ``source.check`` (the store is open, no file
    shrank since it was mapped, every range lies in its file: touching a
    truncated mapping is SIGBUS) and ``sink.check`` (every destination).
    Then the sink moves each row once.  A sink that reads cold rows itself
    (``sink.reads_cold``: the numpy sinks unless ``read="map"``) copies the
    resident rows from the mapping and reads the rest explicitly, and gets
    no hint (a ``WILLNEED`` would read those ranges twice).  For any other
    sink the kernel is told ``MADV_WILLNEED`` about exactly the planned
    ranges' pages that are not resident (their I/O in flight at once, nothing
    read past them, nothing spent on cached pages), and the sink copies each
    row from the page cache.

    ``prefetch`` is that hint: ``"willneed"`` (default),
    ``"willneed+populate"`` (adds ``MADV_POPULATE_READ``, Linux >= 5.14) or
    ``"none"``; ``mmapstore bench`` compares them.

    Raises
    ------
    StoreClosedError, SinkError, FormatError
        Before anything is written.
    """
    if prefetch not in PREFETCH_MODES:
        raise SinkError(f"prefetch must be one of {PREFETCH_MODES}, got {prefetch!r}")
    if pools is not None and len(pools) != len(plan.layers):
        raise SinkError(f"plan has {len(plan.layers)} layers, got {len(pools)} pools to commit")
    table = plan.table
    source.check(table)
    sink.check(table)
    started = time.perf_counter()
    if not getattr(sink, "reads_cold", False):
        source.prefetch(table, prefetch)
    return Pending(plan, sink.submit(table, source), pools, started)


def apply(
    plan: RefreshPlan,
    sink: Sink,
    source: ByteSource,
    *,
    pools: Sequence[ExpertPool] | None = None,
    prefetch: Prefetch = "willneed",
) -> ApplyResult:
    """Copy every row of ``plan`` into ``sink`` and wait for it; then commit
    ``pools`` if given.  :func:`start` followed by ``wait()``; same checks,
    same errors, nothing written when a check fails."""
    return start(plan, sink, source, pools=pools, prefetch=prefetch).wait()

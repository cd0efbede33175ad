"""``Prefetcher``: start reading likely-next ranges now, serve them later once.

``prefetch(ranges)`` returns at once.  Each accepted range is read, on the
prefetcher's own threads, into a staging buffer; the staging buffers together
stay within ``budget_nbytes`` (ranges that do not fit are skipped and
reported, never queued without bound).  A :class:`ColdReader` that the
prefetcher is attached to asks it first: a read whose bytes are staged or in
flight waits for that prefetch and copies from staging instead of reading
the disk a second time.  A cancelled or failed prefetch is never served: the
read then goes to the disk as if nothing had been prefetched.

The prefetcher's threads are separate from the reader's, so a reader thread
waiting for a prefetch can never wait for work queued behind itself.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import numpy.typing as npt

from .._errors import MmapStoreError, OptionError
from ._files import aligned_empty
from ._reader import ColdReader, ReadHandle, StagedClaim
from ._requests import FileRange, ReaderConfig, ReadRequest

__all__ = ["PrefetchTicket", "Prefetcher"]


class _Entry:
    """One staged range; ``claimed_nbytes`` counts bytes already served from it."""

    def __init__(self, request: FileRange, buffer: npt.NDArray[np.uint8], handle: ReadHandle) -> None:
        self.range = request
        self.buffer = buffer
        self.handle = handle
        self.claimed_nbytes = 0

    @property
    def end(self) -> int:
        return self.range.offset + self.range.nbytes

    def copy_into(self, destination: memoryview, offset: int) -> bool:
        try:
            self.handle.wait()
        except MmapStoreError:
            return False  # cancelled or failed: the caller reads the disk instead
        start = offset - self.range.offset
        np.copyto(np.frombuffer(destination, dtype=np.uint8), self.buffer[start : start + destination.nbytes])
        return True


@dataclass(frozen=True, slots=True)
class PrefetchTicket:
    """What one :meth:`Prefetcher.prefetch` call started, and what did not fit."""

    accepted: tuple[FileRange, ...]
    skipped: tuple[FileRange, ...]
    handle: ReadHandle | None

    @property
    def accepted_nbytes(self) -> int:
        return sum(item.nbytes for item in self.accepted)


class Prefetcher:
    """Bounded, cancellable read-ahead into staging buffers.

    Parameters
    ----------
    budget_nbytes
        Most bytes of staging buffers alive at once (count them against the
        memory the pools may use).
    config
        How the prefetcher's own reader reads (its queue depth is separate
        from the serving reader's).
    """

    def __init__(self, budget_nbytes: int, config: ReaderConfig | None = None) -> None:
        if budget_nbytes < 0:
            raise OptionError(f"prefetch budget must be >= 0 bytes, got {budget_nbytes}")
        self.budget_nbytes = budget_nbytes
        self._reader = ColdReader(config)
        self._entries: list[_Entry] = []  # oldest first
        self._lock = threading.Lock()

    @property
    def staged_nbytes(self) -> int:
        """Bytes of staging buffers alive now (in flight or landed, not yet served)."""
        with self._lock:
            return sum(entry.range.nbytes for entry in self._entries)

    def attach(self, reader: ColdReader) -> None:
        """Make ``reader`` serve staged bytes before reading the disk."""
        reader.staging = self

    def prefetch(self, ranges: Sequence[FileRange]) -> PrefetchTicket:
        """Start reading ``ranges`` into staging; returns without waiting.

        Ranges already staged are not read again.  To make room, landed
        entries are evicted oldest first; ranges that still do not fit are
        skipped (listed in the ticket).
        """
        accepted: list[FileRange] = []
        skipped: list[FileRange] = []
        requests: list[ReadRequest] = []
        buffers: list[npt.NDArray[np.uint8]] = []
        with self._lock:
            used = sum(entry.range.nbytes for entry in self._entries)
            for item in ranges:
                if self._find(item.path, item.offset, item.nbytes) is not None:
                    continue
                used = self._make_room(used, item.nbytes)
                if used + item.nbytes > self.budget_nbytes:
                    skipped.append(item)
                    continue
                buffer = aligned_empty(item.nbytes)
                requests.append(ReadRequest(item.path, item.offset, buffer, item.mapped, item.identity))
                buffers.append(buffer)
                accepted.append(item)
                used += item.nbytes
            if not requests:
                return PrefetchTicket((), tuple(skipped), None)
            handle = self._reader.submit(requests)
            for item, buffer in zip(accepted, buffers, strict=True):
                self._entries.append(_Entry(item, buffer, handle))
        return PrefetchTicket(tuple(accepted), tuple(skipped), handle)

    def _make_room(self, used: int, nbytes: int) -> int:
        """Evict landed entries, oldest first, until ``nbytes`` more fit (lock held)."""
        index = 0
        while used + nbytes > self.budget_nbytes and index < len(self._entries):
            entry = self._entries[index]
            if entry.handle.done():
                del self._entries[index]
                used -= entry.range.nbytes
            else:
                index += 1
        return used

    def _find(self, path: str, offset: int, nbytes: int) -> _Entry | None:
        for entry in self._entries:
            if entry.range.path == path and entry.range.offset <= offset and offset + nbytes <= entry.end:
                return entry
        return None

    def claim_spans(self, path: str, offset: int, nbytes: int) -> list[tuple[int, int, StagedClaim]]:
        """The staged pieces of ``[offset, offset + nbytes)`` of ``path``:
        ``(file offset, nbytes, entry)``, sorted and disjoint (a refresh row
        may span several prefetched experts, or only part of one).

        An entry is released once every one of its bytes has been claimed.
        """
        end = offset + nbytes
        spans: list[tuple[int, int, StagedClaim]] = []
        with self._lock:
            found = sorted(
                (entry for entry in self._entries
                 if entry.range.path == path and entry.range.offset < end and offset < entry.end
                 and not entry.handle.cancelled),
                key=lambda entry: entry.range.offset,
            )  # fmt: skip
            position = offset
            for entry in found:
                low, high = max(position, entry.range.offset), min(end, entry.end)
                if high <= low:
                    continue
                spans.append((low, high - low, entry))
                position = high
                entry.claimed_nbytes += high - low
                if entry.claimed_nbytes >= entry.range.nbytes:
                    self._entries.remove(entry)
        return spans

    def cancel(self, ticket: PrefetchTicket | None = None) -> None:
        """Cancel one ticket's reads (or all) and drop their staging buffers.

        A read already waiting on one of them falls back to the disk.
        """
        with self._lock:
            if ticket is None:
                handles = {id(entry.handle): entry.handle for entry in self._entries}
                self._entries.clear()
            else:
                handles = {id(ticket.handle): ticket.handle} if ticket.handle is not None else {}
                self._entries = [entry for entry in self._entries if entry.handle is not ticket.handle]
        for handle in handles.values():
            handle.cancel()

    def close(self) -> None:
        """Cancel everything and stop the prefetcher's threads."""
        self.cancel()
        self._reader.close()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

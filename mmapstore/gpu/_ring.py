"""A staging ring: pinned host slots filled on several threads while earlier
slots copy to the device.

Jobs are cut into pieces, packed into slots at aligned offsets, and each slot
is filled by every thread at once (pieces split into sub-ranges); a slot's
device copies are enqueued as soon as its fill completes and a CUDA event
marks when it may be refilled, so host fills and the link overlap.  On a CPU
device the slots are ordinary memory and copies are immediate: the same code
runs (and is tested) without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import MmapStoreError
from ._driver import PinnedBudget
from ._jobs import CopyJob
from ._readers import ALIGN_NBYTES, Reader

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_SLOTS", "DEFAULT_SLOT_NBYTES", "RingUnavailableError", "StagingRing", "default_threads"]

DEFAULT_SLOT_NBYTES = 16 << 20
DEFAULT_SLOTS = 4


def default_threads() -> int:
    """Fill threads: every core, at most 16."""
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _nothing() -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


class RingUnavailableError(MmapStoreError, MemoryError):
    """The ring's pinned buffers could not be had (budget or allocation)."""


@dataclass(frozen=True, slots=True)
class _Piece:
    job: CopyJob
    start: int  # within the job
    nbytes: int
    lead: int  # bytes read before the piece to keep the read aligned
    slot_offset: int


class StagingRing:
    """Host slots that carry bytes to ``device``.

    Parameters
    ----------
    device
        The destination device; slots are pinned when it is a CUDA device.
    slot_nbytes, slots
        Size and number of slots (``slot_nbytes * slots`` bytes of pinned
        memory, taken from ``budget`` on first use).
    threads
        Threads that fill slots.
    budget
        The pinned budget shared with registered windows (None: unbounded).
    """

    def __init__(
        self,
        device: torch.device,
        *,
        slot_nbytes: int = DEFAULT_SLOT_NBYTES,
        slots: int = DEFAULT_SLOTS,
        threads: int | None = None,
        budget: PinnedBudget | None = None,
    ) -> None:
        if slot_nbytes < 2 * ALIGN_NBYTES or slot_nbytes % ALIGN_NBYTES or slots < 2:
            raise ValueError(f"a ring needs at least 2 slots of a multiple of {ALIGN_NBYTES} bytes (>= 8 KiB)")
        self.device = device
        self.slot_nbytes = slot_nbytes
        self.slots = slots
        self.threads = threads or default_threads()
        self.budget = budget
        self.pinned = device.type == "cuda"
        self._buffer: torch.Tensor | None = None
        self._host: Any = None  # numpy view of the buffer
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mmapstore-fill")
        self._taken = 0

    @property
    def nbytes(self) -> int:
        return self.slot_nbytes * self.slots

    def _allocate(self) -> None:
        import torch

        if self._buffer is not None:
            return
        if self.budget is not None and self.pinned:
            if not self.budget.take(self.nbytes):
                raise RingUnavailableError(
                    f"a staging ring of {self.nbytes} bytes does not fit the pinned budget of "
                    f"{self.budget.limit_nbytes} bytes ({self.budget.used_nbytes} in use)"
                )
            self._taken = self.nbytes
        try:
            buffer = torch.empty(self.nbytes + ALIGN_NBYTES, dtype=torch.uint8, pin_memory=self.pinned)
        except RuntimeError as exc:
            self._give_back()
            raise RingUnavailableError(f"pinned allocation of {self.nbytes} bytes failed: {exc}") from None
        skip = (-buffer.data_ptr()) % ALIGN_NBYTES
        self._buffer = buffer[skip : skip + self.nbytes]
        self._host = self._buffer.numpy()

    def _give_back(self) -> None:
        if self.budget is not None and self._taken:
            self.budget.give(self._taken)
        self._taken = 0

    def _pack(self, jobs: Sequence[CopyJob], reader: Reader) -> list[list[_Piece]]:
        groups: list[list[_Piece]] = [[]]
        used = 0
        largest = self.slot_nbytes - ALIGN_NBYTES
        for job in jobs:
            for start in range(0, job.nbytes, largest):
                nbytes = min(largest, job.nbytes - start)
                lead = reader.lead(job.offset + start)
                reserve = -(-(lead + nbytes) // ALIGN_NBYTES) * ALIGN_NBYTES
                if used + reserve > self.slot_nbytes:
                    groups.append([])
                    used = 0
                groups[-1].append(_Piece(job, start, nbytes, lead, used))
                used += reserve
        return [group for group in groups if group]

    def copy(self, jobs: Sequence[CopyJob], reader: Reader, stream: torch.cuda.Stream | None) -> None:
        """Enqueue every job's device copy on ``stream`` (host fills done when
        this returns; device copies may still be in flight).

        Raises
        ------
        RingUnavailableError
            The pinned buffers could not be had: nothing was copied.
        """
        if not jobs:
            return
        self._allocate()
        pending: deque[tuple[list[_Piece], int, list[Future[None]]]] = deque()
        for number, group in enumerate(self._pack(jobs, reader)):
            slot = number % self.slots
            if len(pending) == self.slots:
                self._issue(*pending.popleft(), stream)
            event = self._events[slot]
            if event is not None:
                event.synchronize()  # the slot's last device copy has finished
                self._events[slot] = None
            pending.append((group, slot, self._fill(group, slot, reader)))
            while pending and all(future.done() for future in pending[0][2]):
                self._issue(*pending.popleft(), stream)
        while pending:
            self._issue(*pending.popleft(), stream)

    def _fill(self, group: list[_Piece], slot: int, reader: Reader) -> list[Future[None]]:
        base = slot * self.slot_nbytes
        total = sum(piece.lead + piece.nbytes for piece in group)
        step = max(ALIGN_NBYTES * 64, -(-total // self.threads // ALIGN_NBYTES) * ALIGN_NBYTES)
        futures = []
        for piece in group:
            span = piece.lead + piece.nbytes
            first = piece.job.offset + piece.start - piece.lead
            for low in range(0, span, step):
                high = min(span, low + step)
                out = self._host[base + piece.slot_offset + low : base + self.slot_nbytes]
                futures.append(self._pool.submit(reader.read, piece.job.mapped, first + low, out, high - low))
        return futures

    def _issue(
        self, group: list[_Piece], slot: int, futures: list[Future[None]], stream: torch.cuda.Stream | None
    ) -> None:
        import torch

        for future in futures:
            future.result()  # re-raises a failed read
        assert self._buffer is not None
        base = slot * self.slot_nbytes
        with torch.cuda.stream(stream) if self.pinned else _nothing():
            for piece in group:
                low = base + piece.slot_offset + piece.lead
                source = self._buffer[low : low + piece.nbytes]
                destination = piece.job.destination[piece.start : piece.start + piece.nbytes]
                destination.copy_(source, non_blocking=self.pinned)
        if self.pinned:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
            self._events[slot] = event

    def close(self) -> None:
        """Wait for in-flight copies, stop the threads, free the slots."""
        for event in self._events:
            if event is not None:
                event.synchronize()
        self._events = [None] * self.slots
        self._pool.shutdown(wait=True)
        self._buffer = None
        self._host = None
        self._give_back()

"""``DeviceCopier``: moves file byte ranges into device tensors, choosing a
source per range and falling back down the list when one cannot serve.

``auto`` sends a range whose pages are all resident (``mincore``) to the
registered windows and any other range to the ``pread`` ring; a refused
registration or a full pinned budget falls back to the staging ring, a
ring whose pinned buffers cannot be had to a plain pageable copy.  Every
fallback is counted in :attr:`DeviceCopier.stats` and logged once: the
device never changes and nothing fails for want of pinned memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._mapping import PAGE_NBYTES, MappedFile
from ..torch import as_tensor, require_torch
from ._driver import CudaDriver, PinnedBudget, default_pinned_budget_nbytes
from ._jobs import SOURCES, CopyJob, Fallbacks, Source, SourceStats
from ._readers import MappingReader, PreadReader
from ._ring import DEFAULT_SLOT_NBYTES, DEFAULT_SLOTS, RingUnavailableError, StagingRing
from ._windows import DEFAULT_WINDOW_NBYTES, RegisteredWindows

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceCopier", "is_resident"]


def is_resident(mapped: MappedFile, offset: int, nbytes: int) -> bool:
    """Whether every page under file bytes ``[offset, offset + nbytes)`` is in memory."""
    if nbytes <= 0:
        return True
    pages = (offset + nbytes - 1) // PAGE_NBYTES - offset // PAGE_NBYTES + 1
    return mapped.resident_nbytes(offset, nbytes) >= pages * PAGE_NBYTES


class DeviceCopier:
    """Copies :class:`CopyJob` byte ranges into device memory.

    Parameters
    ----------
    device
        The target device (``cpu`` copies directly from the mapping).
    source
        One of :data:`~mmapstore.gpu._jobs.SOURCES`; ``auto`` by default.
    pinned_budget_nbytes
        Page-locked memory for windows and the ring together (default: a
        quarter of RAM, within ``RLIMIT_MEMLOCK``).
    window_nbytes, slot_nbytes, slots, threads, direct
        Registered window size; ring slot size, count and fill threads;
        ``O_DIRECT`` for the pread ring.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        source: Source = "auto",
        pinned_budget_nbytes: int | None = None,
        window_nbytes: int = DEFAULT_WINDOW_NBYTES,
        slot_nbytes: int = DEFAULT_SLOT_NBYTES,
        slots: int = DEFAULT_SLOTS,
        threads: int | None = None,
        direct: bool = False,
        register_ahead: bool = True,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.device = device
        self.source: Source = source
        self.stats = SourceStats()
        self.fallbacks = Fallbacks(self.stats)
        self.budget = PinnedBudget(
            default_pinned_budget_nbytes() if pinned_budget_nbytes is None else pinned_budget_nbytes
        )
        self.ring = StagingRing(device, slot_nbytes=slot_nbytes, slots=slots, threads=threads, budget=self.budget)
        self._mapping_reader = MappingReader()
        self._pread_reader = PreadReader(self.fallbacks, direct=direct)
        self.windows: RegisteredWindows | None = None
        self._register_ahead = register_ahead
        self._window_nbytes = window_nbytes
        self._windows_tried = False
        self._closed = False

    def _get_windows(self) -> RegisteredWindows | None:
        if self.windows is None and not self._windows_tried:
            self._windows_tried = True
            driver = CudaDriver.load(self.device.index or 0)
            if driver is None:
                self.fallbacks.note("no CUDA driver library", "cuMemHostRegister is unavailable")
                return None
            self.windows = RegisteredWindows(
                driver,
                self.budget,
                self.stats,
                self.fallbacks,
                window_nbytes=self._window_nbytes,
                background=self._register_ahead,
            )
        return self.windows

    def register_ahead(self, ranges: Iterable[tuple[MappedFile, int, int]]) -> int:
        """Register, on the background thread, the windows of ``(mapping,
        offset, nbytes)`` ranges that a later :meth:`copy` will probably read,
        so that copy finds them registered (steady-state speed instead of
        paying registration on first touch).

        Only where that copy would use windows: a CUDA device, source
        ``registered``, or ``auto`` for ranges whose pages are all resident
        (cold ranges go to the pread ring).  Windows that do not fit the
        pinned budget are skipped without a fallback being counted.  Returns
        the bytes of windows queued (0 when nothing applies).
        """
        if self._closed or self.device.type != "cuda" or self.source not in ("auto", "registered"):
            return 0
        windows = self._get_windows()
        if windows is None:
            return 0
        queued = 0
        for mapped, offset, nbytes in ranges:
            if mapped.closed or (self.source == "auto" and not is_resident(mapped, offset, nbytes)):
                continue
            queued += windows.register_ahead(mapped, offset, nbytes, hint=True)
        return queued

    def settle(self) -> None:
        """Wait for the registrations queued by :meth:`register_ahead`."""
        if self.windows is not None:
            self.windows.settle()

    def _route(self, job: CopyJob) -> str:
        if self.device.type != "cuda":
            return "direct" if self.source in ("auto", "registered") else self.source
        if self.source != "auto":
            return self.source
        return "registered" if is_resident(job.mapped, job.offset, job.nbytes) else "pread"

    def copy(self, jobs: Sequence[CopyJob], stream: torch.cuda.Stream | None = None) -> None:
        """Enqueue every job on ``stream`` (the current stream if None).  When
        this returns the host side is done; device copies may be in flight
        (record an event on ``stream`` to wait for them).

        Raises
        ------
        FormatError
            A file was truncated or replaced under its path (pread).
        """
        require_torch("DeviceCopier")
        import torch

        if self._closed:
            raise ValueError("DeviceCopier is closed")
        if self.device.type == "cuda" and stream is None:
            stream = torch.cuda.current_stream(self.device)
        routes: dict[str, list[CopyJob]] = {name: [] for name in ("registered", "pread", "staged", "direct")}
        for job in jobs:
            routes[self._route(job)].append(job)
        routes["staged"].extend(self._registered(routes["registered"], stream))
        routes["staged"].extend(self._ring(routes["pread"], "pread", stream))
        routes["direct"].extend(self._ring(routes["staged"], "staged", stream))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for job in routes["direct"]:
                view = job.mapped.view(job.offset, np.dtype(np.uint8), (job.nbytes,))
                job.destination.copy_(as_tensor(view))
                self.stats.moved("direct", job.nbytes)
        self.stats.peak_pinned_nbytes = max(self.stats.peak_pinned_nbytes, self.budget.peak_nbytes)

    def _registered(self, jobs: list[CopyJob], stream: torch.cuda.Stream | None) -> list[CopyJob]:
        """Copy what the windows can serve; return the rest."""
        if not jobs:
            return []
        import torch

        windows = self._get_windows()
        if windows is None:
            return jobs
        windows.new_epoch()
        windows.sweep()
        for job in jobs:
            windows.register_ahead(job.mapped, job.offset, job.nbytes)
        rest: list[CopyJob] = []
        used = []
        with torch.cuda.stream(stream):
            for job in jobs:
                pieces = windows.pieces(job.mapped, job.offset, job.nbytes)
                if pieces is None:
                    rest.append(job)
                    continue
                for offset, nbytes, window in pieces:
                    low = offset - window.offset
                    start = offset - job.offset
                    source = as_tensor(window.keep[low : low + nbytes])
                    job.destination[start : start + nbytes].copy_(source, non_blocking=True)
                    used.append(window)
                self.stats.moved("registered", job.nbytes)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        windows.done(used, event)
        return rest

    def _ring(self, jobs: list[CopyJob], kind: str, stream: torch.cuda.Stream | None) -> list[CopyJob]:
        """Copy through the ring with the ``kind`` reader; return the jobs it could not take."""
        if not jobs:
            return []
        reader = self._pread_reader if kind == "pread" else self._mapping_reader
        try:
            self.ring.copy(jobs, reader, stream)
        except RingUnavailableError as exc:
            self.fallbacks.note("staging ring unavailable", str(exc))
            return jobs
        for job in jobs:
            self.stats.moved(kind, job.nbytes)
        return []

    def close(self) -> None:
        """Wait for copies in flight, unregister every window, free the ring."""
        if self._closed:
            return
        self._closed = True
        if self.windows is not None:
            self.windows.close()
        self.ring.close()
        self._pread_reader.close()

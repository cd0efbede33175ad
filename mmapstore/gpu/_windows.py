"""Registered windows: page-cache ranges page-locked with the driver for DMA.

A copy from a registered range runs at the link's speed with no host copy
(measured on an H200: 1.00x a pinned buffer).  Registering costs about
45 us per MiB and pins the pages (they cannot be evicted while registered),
so ranges are registered in large aligned *windows* kept as an LRU under a
:class:`~mmapstore.gpu._driver.PinnedBudget`: a pool's hot set stays
registered and each refresh pays only for windows it has not touched before.

Rules kept here:

- a window holds a view of its mapping, so the mapping cannot be unmapped
  while the window is registered; windows of a closed mapping are
  unregistered at the next :meth:`RegisteredWindows.sweep`, and all of them at
  :meth:`RegisteredWindows.close`;
- a window is unregistered only after the last copy that reads it has
  finished (its CUDA event), and never while a submit is using it;
- windows used in the current *epoch* (one submit) are never evicted to make
  room for others of the same epoch: a plan larger than the budget sends its
  remaining ranges to the next source rather than thrashing.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from .._mapping import PAGE_NBYTES, MappedFile
from ._driver import CudaDriver, PinnedBudget
from ._jobs import Fallbacks, SourceStats

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_WINDOW_NBYTES", "RegisteredWindows", "Window"]

DEFAULT_WINDOW_NBYTES = 64 << 20


class Window:
    """One registered range of one mapping (a resource of :class:`RegisteredWindows`)."""

    __slots__ = ("address", "busy", "epoch", "event", "keep", "mapped", "nbytes", "offset", "ok", "ready")

    def __init__(self, mapped: MappedFile, offset: int, nbytes: int, epoch: int) -> None:
        self.mapped = mapped
        self.offset = offset
        self.nbytes = nbytes
        self.address = mapped.address + offset
        # A view keeps the mapping alive while the driver holds its pages.
        self.keep: Any = mapped.view(offset, np.dtype(np.uint8), (nbytes,))
        self.epoch = epoch
        self.busy = 0
        self.event: torch.cuda.Event | None = None
        self.ready = threading.Event()
        self.ok = False


class RegisteredWindows:
    """An LRU of registered windows under a pinned-memory budget.

    Parameters
    ----------
    driver
        Registration calls for the target device.
    budget
        Shared with the staging rings; a window is registered only within it.
    stats, fallbacks
        Where registrations, their cost and refusals are counted.
    window_nbytes
        Window size (a multiple of the page size); larger windows amortise
        registration, smaller ones waste less budget on cold neighbours.
    background
        Register ahead of use (:meth:`register_ahead`) on a background thread.
    """

    def __init__(
        self,
        driver: CudaDriver,
        budget: PinnedBudget,
        stats: SourceStats,
        fallbacks: Fallbacks,
        *,
        window_nbytes: int = DEFAULT_WINDOW_NBYTES,
        background: bool = True,
    ) -> None:
        if window_nbytes <= 0 or window_nbytes % PAGE_NBYTES:
            raise ValueError(f"window_nbytes must be a positive multiple of {PAGE_NBYTES}, got {window_nbytes}")
        self.driver = driver
        self.budget = budget
        self.stats = stats
        self.fallbacks = fallbacks
        self.window_nbytes = window_nbytes
        self._windows: OrderedDict[tuple[int, int], Window] = OrderedDict()
        self._lock = threading.Lock()
        self._epoch = 0
        self._closed = False
        self._broken = False  # a registration the driver refused: stop asking
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="mmapstore-register") if background else None

    @property
    def registered_nbytes(self) -> int:
        """Bytes registered now."""
        with self._lock:
            return sum(window.nbytes for window in self._windows.values() if window.ok)

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for window in self._windows.values() if window.ok)

    def new_epoch(self) -> None:
        """Start a new submit: windows of earlier ones become evictable."""
        with self._lock:
            self._epoch += 1

    def _span(self, mapped: MappedFile, index: int) -> tuple[int, int]:
        offset = index * self.window_nbytes
        nbytes = min(self.window_nbytes, mapped.nbytes - offset)
        return offset, nbytes

    def _claim(self, mapped: MappedFile, index: int, *, busy: bool) -> tuple[Window, bool]:
        """The window (new or existing) and whether the caller must register it."""
        key = (id(mapped), index)
        with self._lock:
            window = self._windows.get(key)
            fresh = window is None or (window.ready.is_set() and not window.ok)
            if window is None or fresh:
                offset, nbytes = self._span(mapped, index)
                window = Window(mapped, offset, nbytes, self._epoch)
                self._windows[key] = window
            self._windows.move_to_end(key)
            window.epoch = self._epoch
            if busy:
                window.busy += 1
            return window, fresh

    def _register(self, window: Window, hint: bool = False) -> None:
        try:
            if not self._make_room(window.nbytes):
                if hint:  # a guess that does not fit is dropped: no copy waits for it
                    return
                self.fallbacks.note(
                    "pinned budget full",
                    f"{window.nbytes} bytes of registered window do not fit the pinned budget of "
                    f"{self.budget.limit_nbytes} bytes ({self.budget.used_nbytes} in use by this submit)",
                )
                return
            start = time.perf_counter()
            status = self.driver.register(window.address, window.nbytes)
            if status != 0:
                self.budget.give(window.nbytes)
                self._broken = True
                self.fallbacks.note(
                    "registration failed",
                    f"cuMemHostRegister of {window.nbytes} bytes of {window.mapped.path} at offset "
                    f"{window.offset} returned CUresult {status}",
                )
                return
            self.stats.registration_seconds += time.perf_counter() - start
            self.stats.registrations += 1
            self.stats.registered_nbytes += window.nbytes
            self.stats.peak_pinned_nbytes = max(self.stats.peak_pinned_nbytes, self.budget.peak_nbytes)
            window.ok = True
        finally:
            window.ready.set()

    def _make_room(self, nbytes: int) -> bool:
        while not self.budget.take(nbytes):
            victim = self._victim()
            if victim is None:
                return False
            self._unregister(victim)
        return True

    def _victim(self) -> Window | None:
        with self._lock:
            for key, window in self._windows.items():  # least recently used first
                if window.ok and window.busy == 0 and window.epoch < self._epoch:
                    del self._windows[key]
                    return window
        return None

    def _unregister(self, window: Window) -> None:
        if window.event is not None:
            window.event.synchronize()  # the last copy from it has finished
        status = self.driver.unregister(window.address)
        if status == 0:
            self.stats.unregistrations += 1
        window.ok = False
        window.keep = None
        self.budget.give(window.nbytes)

    def pieces(self, mapped: MappedFile, offset: int, nbytes: int) -> list[tuple[int, int, Window]] | None:
        """``(file offset, nbytes, window)`` pieces covering the range, each
        inside one registered window (registering, and evicting idle windows
        of earlier epochs, as needed); None when a window cannot be had.  The
        windows stay busy until :meth:`done`."""
        if self._broken or self._closed:
            return None
        first = offset // self.window_nbytes
        last = (offset + nbytes - 1) // self.window_nbytes
        taken: list[tuple[int, int, Window]] = []
        for index in range(first, last + 1):
            window, fresh = self._claim(mapped, index, busy=True)
            if fresh:
                self._register(window)
            window.ready.wait()
            start = max(offset, window.offset)
            end = min(offset + nbytes, window.offset + window.nbytes)
            taken.append((start, end - start, window))
            if not window.ok:
                self.done([piece[2] for piece in taken], None)
                return None
        return taken

    def done(self, windows: list[Window], event: torch.cuda.Event | None) -> None:
        """The copies from ``windows`` are enqueued; ``event`` marks their end."""
        with self._lock:
            for window in windows:
                window.busy -= 1
                if event is not None:
                    window.event = event

    def register_ahead(self, mapped: MappedFile, offset: int, nbytes: int, *, hint: bool = False) -> int:
        """Register the windows of a range that will be read soon, on the
        background thread (a no-op without one, or for windows already there).

        ``hint``: the range is a guess (the next refresh's likely experts), so
        a window that finds no room in the budget is dropped quietly instead
        of being counted as a fallback.  Returns the bytes of windows queued.
        """
        if self._ahead is None or self._closed or self._broken or nbytes <= 0:
            return 0
        queued = 0
        for index in range(offset // self.window_nbytes, (offset + nbytes - 1) // self.window_nbytes + 1):
            window, fresh = self._claim(mapped, index, busy=False)
            if fresh:
                self._ahead.submit(self._register, window, hint)
                queued += window.nbytes
        return queued

    def settle(self) -> None:
        """Wait until every registration queued so far has finished."""
        if self._ahead is not None and not self._closed:
            self._ahead.submit(lambda: None).result()  # one worker: runs after those queued before it

    def sweep(self) -> None:
        """Unregister the idle windows of mappings that have been closed."""
        with self._lock:
            stale = [key for key, window in self._windows.items() if window.mapped.closed and window.busy == 0]
            windows = [self._windows.pop(key) for key in stale]
        for window in windows:
            window.ready.wait()
            if window.ok:
                self._unregister(window)

    def close(self) -> None:
        """Wait for background registrations, then unregister every window."""
        if self._closed:
            return
        self._closed = True
        if self._ahead is not None:
            self._ahead.shutdown(wait=True)
        with self._lock:
            windows = list(self._windows.values())
            self._windows.clear()
        for window in windows:
            window.ready.wait()
            if window.ok:
                self._unregister(window)
        self.driver.release()

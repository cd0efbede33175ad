"""Page-locking host ranges for DMA, and the budget that bounds it.

Registration goes through the CUDA *driver* API (``cuMemHostRegister`` in
``libcuda``, loaded with ctypes) rather than the runtime binding torch
exposes: a failed runtime call leaves a "last error" behind that torch's
next kernel-launch check would report against an unrelated kernel, while a
failed driver call leaves nothing behind, so a refusal can be a quiet
fallback.  The calls use the device's primary context (the one torch uses),
made current explicitly, so they work from any thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import threading

__all__ = ["CudaDriver", "PinnedBudget", "default_pinned_budget_nbytes", "memlock_limit_nbytes"]

# cuMemHostRegister flags (cuda.h).
HOST_REGISTER_PORTABLE = 0x01
HOST_REGISTER_READ_ONLY = 0x08


class CudaDriver:
    """``cuMemHostRegister``/``cuMemHostUnregister`` in one device's primary context.

    Construct it after torch has initialised the device (any allocation on it
    does); :meth:`load` returns None where there is no driver library.
    """

    def __init__(self, library: ctypes.CDLL, device_index: int) -> None:
        self._cuda = library
        self._cuda.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        self._cuda.cuMemHostRegister_v2.restype = ctypes.c_int
        self._cuda.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
        self._cuda.cuMemHostUnregister.restype = ctypes.c_int
        self._cuda.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
        self._cuda.cuCtxSetCurrent.restype = ctypes.c_int
        self._cuda.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        self._cuda.cuDevicePrimaryCtxRetain.restype = ctypes.c_int
        self._cuda.cuDevicePrimaryCtxRelease_v2.argtypes = [ctypes.c_int]
        self._cuda.cuDevicePrimaryCtxRelease_v2.restype = ctypes.c_int
        self._device_index = device_index
        context = ctypes.c_void_p()
        status = self._cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device_index)
        if status != 0:
            raise OSError(f"cuDevicePrimaryCtxRetain({device_index}) failed with CUresult {status}")
        self._context = context
        self._released = False
        self._lock = threading.Lock()

    @classmethod
    def load(cls, device_index: int) -> CudaDriver | None:
        """The driver for ``device_index``, or None without ``libcuda`` or a usable context."""
        name = ctypes.util.find_library("cuda") or "libcuda.so.1"
        try:
            return cls(ctypes.CDLL(name), device_index)
        except (OSError, AttributeError):
            return None

    def _current(self) -> None:
        status = self._cuda.cuCtxSetCurrent(self._context)
        if status != 0:
            raise OSError(f"cuCtxSetCurrent failed with CUresult {status}")

    def register(self, address: int, nbytes: int) -> int:
        """Page-lock ``[address, address + nbytes)`` read-only for DMA; the
        CUresult (0 on success).  The pages are faulted in and stay resident
        until :meth:`unregister`."""
        self._current()
        flags = HOST_REGISTER_PORTABLE | HOST_REGISTER_READ_ONLY
        return int(self._cuda.cuMemHostRegister_v2(ctypes.c_void_p(address), nbytes, flags))

    def unregister(self, address: int) -> int:
        """Undo :meth:`register` of the range that starts at ``address``; the CUresult."""
        self._current()
        return int(self._cuda.cuMemHostUnregister(ctypes.c_void_p(address)))

    def release(self) -> None:
        """Drop this object's reference on the primary context."""
        with self._lock:
            if not self._released:
                self._released = True
                self._cuda.cuDevicePrimaryCtxRelease_v2(self._device_index)


def memlock_limit_nbytes() -> int | None:
    """The bytes this process may page-lock, or None when unlimited.

    ``RLIMIT_MEMLOCK``'s soft limit, except for root (``CAP_IPC_LOCK``
    ignores it).
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or os.geteuid() == 0:
        return None
    return int(soft)


def default_pinned_budget_nbytes() -> int:
    """A quarter of physical memory, within ``RLIMIT_MEMLOCK``."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = memlock_limit_nbytes()
    budget = physical // 4
    return budget if limit is None else min(budget, limit)


class PinnedBudget:
    """Bytes of page-locked host memory in use (registered windows and
    staging rings together), bounded by ``limit_nbytes`` (and by
    ``RLIMIT_MEMLOCK``); thread-safe.  ``peak_nbytes`` is the most ever held."""

    def __init__(self, limit_nbytes: int) -> None:
        memlock = memlock_limit_nbytes()
        self.limit_nbytes = limit_nbytes if memlock is None else min(limit_nbytes, memlock)
        self.used_nbytes = 0
        self.peak_nbytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes``; False (and nothing reserved) when it would pass the limit."""
        with self._lock:
            if self.used_nbytes + nbytes > self.limit_nbytes:
                return False
            self.used_nbytes += nbytes
            self.peak_nbytes = max(self.peak_nbytes, self.used_nbytes)
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.used_nbytes -= nbytes

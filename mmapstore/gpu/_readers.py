"""How a staging ring fills its buffers: from the mapping, or by ``pread``.

Both release the GIL for the bulk of their work (numpy's copy loop,
``os.preadv``), so a ring fills on several threads at once.
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .._mapping import MappedFile
from ..io import ALIGN_NBYTES, ColdReader, ReaderConfig, ReadRequest
from ._jobs import Fallbacks

__all__ = ["ALIGN_NBYTES", "MappingReader", "PreadReader", "Reader"]


class Reader(Protocol):
    name: str

    def lead(self, offset: int) -> int:
        """Bytes read before ``offset`` to keep a read aligned (0 unless O_DIRECT)."""
        ...

    def read(self, mapped: MappedFile, offset: int, out: npt.NDArray[np.uint8], nbytes: int) -> None:
        """Fill ``out[:nbytes]`` with the file bytes at ``offset``; ``out`` may be longer."""
        ...

    def close(self) -> None: ...


class MappingReader:
    """Copies out of the page cache through the mapping (faults in what is missing)."""

    name = "staged"

    def lead(self, offset: int) -> int:
        return 0

    def read(self, mapped: MappedFile, offset: int, out: npt.NDArray[np.uint8], nbytes: int) -> None:
        np.copyto(out[:nbytes], mapped.view(offset, np.dtype(np.uint8), (nbytes,)))

    def close(self) -> None:
        pass


class PreadReader:
    """Reads through a :class:`~mmapstore.io.ColdReader` on the ring's own
    threads (:meth:`~mmapstore.io.ColdReader.read_here`): exact bytes, no page
    faults, many reads in flight when called from several threads, the file
    that was mapped even if a re-conversion renamed another over its path.
    With ``direct``, reads bypass the page cache (``O_DIRECT``; the ring
    aligns each read's start); where the file system refuses ``O_DIRECT``
    the reader falls back to buffered reads, counted and logged once.
    """

    def __init__(self, fallbacks: Fallbacks, *, direct: bool = False) -> None:
        self.fallbacks = fallbacks
        self.direct = direct
        self.name = "pread"
        self._reader = ColdReader(ReaderConfig(queue_depth=1, direct="auto" if direct else "never"))
        self._refused: set[str] = set()
        self._lock = threading.Lock()

    def lead(self, offset: int) -> int:
        # Aligned starts stay right where O_DIRECT is refused: a buffered read takes any offset.
        return offset % ALIGN_NBYTES if self.direct else 0

    def read(self, mapped: MappedFile, offset: int, out: npt.NDArray[np.uint8], nbytes: int) -> None:
        request = ReadRequest(mapped.path, offset, out[:nbytes], mapped, mapped.identity)
        result = self._reader.read_here(request)
        if self.direct and any(source == "buffered" for source, _ in result.source_nbytes):
            with self._lock:  # once per file, whichever ring thread saw it first
                first = mapped.path not in self._refused
                self._refused.add(mapped.path)
            if first:
                self.fallbacks.note("O_DIRECT refused", f"{mapped.path}: the file system refused it; reading buffered")

    def close(self) -> None:
        self._reader.close()

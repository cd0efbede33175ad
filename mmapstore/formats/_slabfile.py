"""Writing one shard of a slab store by position: safetensors or raw.

The layout is fixed up front from the specs (the safetensors header, or
page-aligned offsets that the manifest of a raw store describes), the file is
sized once, and each tensor's bytes are then written at its own cursor, in
order within the tensor, from buffers (:meth:`SlabFileWriter.write`) or
straight from a source file by the kernel (:meth:`SlabFileWriter.copy`).
Tensors may be written by different threads; :meth:`SlabFileWriter.close`
checks that every byte arrived, then fsyncs.  Gaps between tensors are left
as holes, which read as the zero padding the layout promises.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from types import TracebackType

import numpy as np
import numpy.typing as npt

from .._preadcopy import copy_range
from ._safetensors import PAD_PREFIX, TensorSpec, layout_header

__all__ = ["STORAGES", "SlabFileWriter"]

STORAGES = ("safetensors", "raw")


class SlabFileWriter:
    """Positional writer of one shard.

    Parameters
    ----------
    path
        The file to create (truncated if it exists).
    specs
        The tensors, in file order.
    storage
        ``"safetensors"`` (a header describes the tensors) or ``"raw"`` (the
        caller's manifest does, from :attr:`offsets`).
    align
        Every tensor starts at a multiple of this many bytes.

    Attributes
    ----------
    offsets
        Absolute file offset of each tensor's first byte.
    fd
        The open descriptor, readable (to hash what was written) and writable.
    """

    def __init__(self, path: str, specs: Sequence[TensorSpec], *, storage: str, align: int) -> None:
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.path = path
        self._specs = {spec.name: spec for spec in specs}
        header = b""
        if storage == "safetensors":
            header, placed = layout_header(specs, {"format": "mmapstore"}, align)
            self.offsets = {
                spec.name: len(header) + begin for spec, begin in placed if not spec.name.startswith(PAD_PREFIX)
            }
            size = len(header) + max((begin + spec.nbytes for spec, begin in placed), default=0)
        else:
            self.offsets = {}
            size = 0
            for spec in specs:
                size += -size % align
                self.offsets[spec.name] = size
                size += spec.nbytes
        self._written = dict.fromkeys(self._specs, 0)
        self._lock = threading.Lock()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            _pwrite_all(self.fd, memoryview(header), 0)
            os.ftruncate(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    def _claim(self, name: str, nbytes: int, at: int = -1) -> int:
        """Reserve the next ``nbytes`` of tensor ``name`` (or those at byte
        ``at`` of it, for writers that fill a tensor out of order); return their
        file offset."""
        spec = self._specs.get(name)
        if spec is None:
            raise ValueError(f"{self.path}: no tensor {name!r} in this file")
        with self._lock:
            done = self._written[name]
            if done + nbytes > spec.nbytes or at + nbytes > spec.nbytes:
                raise ValueError(
                    f"{self.path}: tensor {name!r}: {max(done, at) + nbytes} bytes written, its shape holds {spec.nbytes}"
                )
            self._written[name] = done + nbytes
        return self.offsets[name] + (done if at < 0 else at)

    def write(self, name: str, data: npt.NDArray[np.generic] | memoryview, *, at: int = -1) -> int:
        """Write ``data`` (C order) at tensor ``name``'s cursor (or at its byte
        ``at``); return the file offset written."""
        if isinstance(data, np.ndarray):
            if not data.flags.c_contiguous:
                raise ValueError(f"{self.path}: tensor {name!r}: data must be C-contiguous")
            view = data.reshape(-1).view(np.uint8).data
        else:
            view = data.cast("B")
        offset = self._claim(name, view.nbytes, at)
        _pwrite_all(self.fd, view, offset)
        return offset

    def copy(self, name: str, source: int, source_offset: int, nbytes: int, *, source_path: str, at: int = -1) -> int:
        """Copy ``nbytes`` of file ``source`` at ``source_offset`` to tensor
        ``name``'s cursor with :func:`~mmapstore._preadcopy.copy_range` (a
        source that shrank is a :class:`~mmapstore._errors.FormatError`);
        return the file offset written (``at`` as in :meth:`write`)."""
        offset = self._claim(name, nbytes, at)
        copy_range(source, source_offset, self.fd, offset, nbytes, path=source_path)
        return offset

    def close(self) -> None:
        """Finish: every tensor must be complete; fsync and close."""
        if self.fd < 0:
            return
        try:
            for name, spec in self._specs.items():
                if self._written[name] != spec.nbytes:
                    raise ValueError(
                        f"{self.path}: closed with {self._written[name]} of {spec.nbytes} bytes of tensor {name!r}"
                    )
            os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without the completeness check (the caller discards the file)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> SlabFileWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)

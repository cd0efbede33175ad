"""Geometries over in-memory "files": planner and sink tests without a file.

:class:`InMemoryFiles` lays numpy arrays out as bytes, the way checkpoints
do (stacked ``[E, ...]`` tensors, one tensor per expert scattered between
others, fused gate/up halves), and returns the
:class:`~mmapstore._geometry.PartGeometry` of each; :meth:`InMemoryFiles.source`
gives an :class:`ArraySource` that serves write tables from those bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from .._dtypes import DType, code_of, dtype_from_code
from .._errors import FormatError, SinkError
from .._geometry import Orientation, PartGeometry, c_strides
from .._mapping import FileMaps, MappedFile
from .._source import MappedSource, Prefetch
from .._writes import WriteTable
from ..io import evict

__all__ = ["ArraySource", "FileSource", "InMemoryFiles"]


def _dtype(array: npt.NDArray[np.generic]) -> DType:
    return dtype_from_code(code_of(array.dtype))


class InMemoryFiles:
    """Byte buffers named ``mem0``, ``mem1``...; arrays are appended to them.

    Parameters
    ----------
    files
        How many buffers.
    gap
        Bytes of padding written before each array, so that separately added
        arrays are never back to back (gathered experts stay "scattered").
    """

    def __init__(self, files: int = 1, *, gap: int = 64) -> None:
        self.files = tuple(f"mem{index}" for index in range(files))
        self._buffers = [bytearray() for _ in range(files)]
        self._gap = gap

    def add(self, array: npt.NDArray[np.generic], file: int = 0) -> int:
        """Append ``array``'s C-order bytes to buffer ``file``; return its offset."""
        buffer = self._buffers[file]
        buffer.extend(b"\xa5" * self._gap)
        offset = len(buffer)
        buffer.extend(np.ascontiguousarray(array).tobytes())
        return offset

    def stacked(
        self, stack: str, part: str, array: npt.NDArray[np.generic], *, file: int = 0, orientation: Orientation = "kn"
    ) -> PartGeometry:
        """One ``[E, ...]`` tensor: experts evenly spaced (coalescing applies)."""
        base = self.add(array, file)
        slab_shape = tuple(array.shape[1:])
        dtype = _dtype(array)
        stride = int(np.prod(slab_shape, dtype=np.int64)) * dtype.itemsize
        return PartGeometry.stacked(
            stack,
            part,
            array.shape[0],
            dtype,
            slab_shape,
            c_strides(slab_shape, dtype.itemsize),
            file=file,
            base=base,
            stride=stride,
            extent=stride,
            orientation=orientation,
        )

    def gathered(
        self,
        stack: str,
        part: str,
        arrays: Sequence[npt.NDArray[np.generic]],
        *,
        files: Sequence[int] | None = None,
        orientation: Orientation = "kn",
    ) -> PartGeometry:
        """One tensor per expert, each in buffer ``files[e]``, never back to back."""
        chosen = list(files) if files is not None else [0] * len(arrays)
        offsets = [self.add(array, file) for array, file in zip(arrays, chosen, strict=True)]
        head = arrays[0]
        return PartGeometry.gathered(
            stack, part, _dtype(head), tuple(head.shape), chosen, offsets, head.nbytes, orientation=orientation
        )

    def fused(
        self,
        stacks: tuple[str, str],
        part: str,
        array: npt.NDArray[np.generic],
        *,
        axis: int,
        interleaved: bool,
        file: int = 0,
        orientation: Orientation = "kn",
    ) -> tuple[PartGeometry, PartGeometry]:
        """Gate and up halves of one fused ``[E, ...]`` tensor, split along slab
        axis ``axis``: every other index when ``interleaved``, else first and
        second half.  Each half's byte range is the whole fused slab."""
        base = self.add(array, file)
        dtype = _dtype(array)
        fused_shape = tuple(array.shape[1:])
        stride = int(np.prod(fused_shape, dtype=np.int64)) * dtype.itemsize
        halves = []
        for which, stack in enumerate(stacks):
            strides = list(c_strides(fused_shape, dtype.itemsize))
            shape = list(fused_shape)
            width = shape[axis] // 2
            if interleaved:
                delta = which * strides[axis]
                strides[axis] *= 2
            else:
                delta = which * width * strides[axis]
            shape[axis] = width
            halves.append(
                PartGeometry.stacked(
                    stack,
                    part,
                    array.shape[0],
                    dtype,
                    tuple(shape),
                    tuple(strides),
                    file=file,
                    base=base,
                    stride=stride,
                    extent=stride,
                    view_delta=delta,
                    orientation=orientation,
                )
            )
        return halves[0], halves[1]

    def source(self) -> ArraySource:
        """A source over the bytes added so far (read-only copies)."""
        return ArraySource(
            {
                name: np.frombuffer(bytes(buffer), dtype=np.uint8)
                for name, buffer in zip(self.files, self._buffers, strict=True)
            }
        )


class ArraySource:
    """A :class:`~mmapstore._source.ByteSource` over in-memory byte arrays
    (``name -> uint8 array``); ``mapping`` is None (no file behind it)."""

    def __init__(self, buffers: Mapping[str, npt.NDArray[np.uint8]]) -> None:
        self._buffers = dict(buffers)
        self._files = tuple(self._buffers)

    @property
    def files(self) -> tuple[str, ...]:
        return self._files

    def check(self, table: WriteTable) -> None:
        if table.files != self._files:
            raise SinkError(f"write table planned over files {list(table.files)}, source has {list(self._files)}")
        reads = table.reads
        for file, offset, nbytes in zip(reads.file.tolist(), reads.offset.tolist(), reads.nbytes.tolist(), strict=True):
            size = len(self._buffers[self._files[file]])
            if offset < 0 or offset + nbytes > size:
                raise FormatError(f"{self._files[file]}: reads [{offset}, {offset + nbytes}) of a {size} byte buffer")

    def view(self, table: WriteTable, row: int) -> npt.NDArray[np.generic]:
        geometry = table.geometries[int(table.param[row])]
        stride = geometry.stride if geometry.stride is not None else geometry.extent
        buffer = self._buffers[self._files[int(table.file[row])]]
        array: npt.NDArray[np.generic] = np.ndarray(
            (int(table.count[row]), *geometry.slab_shape),
            dtype=geometry.dtype.numpy,
            buffer=buffer,
            offset=int(table.offset[row]) + geometry.view_delta,
            strides=(stride, *geometry.slab_strides),
        )
        array.flags.writeable = False
        return array

    def mapping(self, file: int) -> MappedFile | None:
        return None

    def write_files(self, directory: str) -> FileSource:
        """The same bytes as files ``directory/<name>`` (fsynced, then dropped
        from the page cache where the file system allows), served through
        mappings by a :class:`FileSource` that takes the same tables."""
        paths = []
        for name in self._files:
            path = os.path.join(directory, name)
            with open(path, "wb") as handle:
                handle.write(self._buffers[name].tobytes())
                handle.flush()
            evict(path)
            paths.append(path)
        return FileSource(FileMaps({}), self._files, where=directory, paths=tuple(paths))

    def path(self, file: int) -> str:
        return self._files[file]

    def prefetch(self, table: WriteTable, mode: Prefetch = "willneed") -> None:
        return None


class FileSource(MappedSource):
    """A :class:`~mmapstore._source.MappedSource` that owns its mappings: :meth:`close` them."""

    def close(self) -> None:
        self._maps.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

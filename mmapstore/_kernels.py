"""The one copy kernel: ``destination[...] = source`` with cast and tiled transpose.

Sinks (a ``[k, n]`` buffer filled from ``[n, k]`` slabs) and ``convert``
(``[out, in]`` checkpoints written as ``[k, n]``) both copy transposed views.
numpy copies a transposed view element by element along the destination's
rows, so every element read touches a new cache line of the source (measured
~9x slower than a contiguous copy).  Where each slab's rows are contiguous
in memory, :func:`~mmapstore._transpose.transpose_into` (the packed-word
transpose ``convert`` also runs) does it; otherwise square tiles keep both
the tile's source and destination lines in cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ._transpose import transpose_into

__all__ = ["TILE", "copy_slab"]

TILE = 64
"""Tile edge in elements: a 64x64 tile of f32 (16 KiB each way) stays in L1/L2."""


def copy_slab(destination: npt.NDArray[np.generic], source: npt.NDArray[np.generic]) -> None:
    """``destination[...] = source``, casting as numpy's ``unsafe`` rule allows.

    When the last two axes of ``source`` are transposed relative to memory
    order (a ``swapaxes``/``.T`` view of C-ordered slabs), the copy runs tile
    by tile over those two axes, for every leading index at once.  Any other
    layout is one ``np.copyto``.

    Parameters
    ----------
    destination
        Writable array of ``source``'s shape.
    source
        Array to copy; ``[..., rows, cols]``.

    Raises
    ------
    ValueError
        Shapes differ (numpy's broadcasting is not used here).
    """
    if destination.shape != source.shape:
        raise ValueError(f"copy_slab: destination shape {list(destination.shape)} != source {list(source.shape)}")
    if source.ndim < 2 or not _transposed(source):
        # check() allowed the cast; "unsafe" lets numpy do float-to-float casts
        # between ml_dtypes types that its same_kind rule does not know.
        np.copyto(destination, source, casting="unsafe")
        return
    if source.dtype != destination.dtype:
        # Cast each slab contiguously (fast) into a scratch slab, then move
        # raw bits: a strided cast per element is slower than either step.
        scratch = np.empty((source.shape[-1], source.shape[-2]), dtype=destination.dtype)
        for index in np.ndindex(*source.shape[:-2]):
            np.copyto(scratch, source[index].T, casting="unsafe")
            _tiled(_raw(destination[index]), _raw(scratch).T)
        return
    _tiled(_raw(destination), _raw(source))


def _raw(array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """The same memory as unsigned integers of the same width: numpy's
    strided loops for plain integers beat those of user dtypes (bf16, fp8)."""
    raw = _RAW.get(array.dtype.itemsize)
    return array if raw is None or array.dtype.kind in "biu" else array.view(raw)


_RAW: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.uint16),
    4: np.dtype(np.uint32),
    8: np.dtype(np.uint64),
}


def _tiled(destination: npt.NDArray[np.generic], source: npt.NDArray[np.generic]) -> None:
    itemsize = source.dtype.itemsize
    if source.dtype == destination.dtype and source.strides[-2] == itemsize and destination.strides[-1] == itemsize:
        # Each slab is the transpose of one whose rows are contiguous: the
        # packed-word kernel (about 4x the tiles below for 2-byte elements).
        base = np.swapaxes(source, -1, -2)
        for index in np.ndindex(*source.shape[:-2]):
            transpose_into(destination[index], base[index])
        return
    rows, cols = source.shape[-2], source.shape[-1]
    for row in range(0, rows, TILE):
        for col in range(0, cols, TILE):
            np.copyto(
                destination[..., row : row + TILE, col : col + TILE],
                source[..., row : row + TILE, col : col + TILE],
                casting="unsafe",
            )


def _transposed(source: npt.NDArray[np.generic]) -> bool:
    """True when walking ``source``'s last axis jumps further in memory than
    walking its second-to-last: a transposed view, where tiling pays."""
    row_stride, col_stride = abs(source.strides[-2]), abs(source.strides[-1])
    return col_stride > row_stride and source.shape[-1] > 1 and source.shape[-2] > 1

"""A fast 2-D transpose for numpy arrays of 1-, 2- and 4-byte elements.

numpy copies a transposed view one element at a time, each element read
from another row: ~0.4 GB/s for bf16 on the development VM, ~1 GB/s when
the copy is cut into cache-sized tiles.  Most of that cost is per element,
so this kernel moves 8 bytes per element instead: it packs ``p = 8 /
itemsize`` consecutive source rows into one ``uint64`` row with contiguous
(vectorised) shifts and ors, which makes each ``uint64`` hold ``p`` elements
that are *adjacent in the destination*, transposes the ``uint64`` band, and
lets the destination's bytes fall into place (little-endian hosts).
Measured on bf16 ``[1024, 2048]`` slabs: 4 GB/s against 1 GB/s tiled.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["transpose_into"]

_BAND = 16
"""``uint64`` rows packed per step: 16 x 2048 x 8 bytes stay in L2, and the
band's transpose is one numpy call."""

_TILE = 64
_UNSIGNED: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.uint16),
    4: np.dtype(np.uint32),
    8: np.dtype(np.uint64),
}


def transpose_into(destination: npt.NDArray[np.generic], source: npt.NDArray[np.generic]) -> None:
    """``destination[...] = source.T`` for 2-D arrays of one dtype.

    Parameters
    ----------
    destination
        Writable ``[cols, rows]`` array whose rows are contiguous.
    source
        ``[rows, cols]`` array whose rows are contiguous (a column band of a
        C-ordered array qualifies).

    Raises
    ------
    ValueError
        Shapes or dtypes that do not match, or rows that are not contiguous.
    """
    if source.ndim != 2 or destination.shape != source.shape[::-1]:
        raise ValueError(f"transpose_into: destination {list(destination.shape)} is not source {list(source.shape)}.T")
    if destination.dtype != source.dtype:
        raise ValueError(f"transpose_into: dtypes differ ({destination.dtype} and {source.dtype}); cast first")
    itemsize = source.dtype.itemsize
    if source.size == 0:
        return
    if (source.shape[1] > 1 and source.strides[1] != itemsize) or (
        destination.shape[1] > 1 and destination.strides[1] != itemsize
    ):
        raise ValueError("transpose_into: source and destination rows must be contiguous")
    rows, cols = source.shape
    unsigned = _UNSIGNED.get(itemsize)
    if unsigned is None:
        _tiled(destination, source)
        return
    raw_source, raw_destination = source.view(unsigned), destination.view(unsigned)
    per_word = 8 // itemsize
    packed_rows = rows - rows % per_word if per_word > 1 and sys.byteorder == "little" else 0
    if packed_rows:
        _packed(raw_destination[:, :packed_rows], raw_source[:packed_rows], per_word)
    if packed_rows < rows:
        _tiled(raw_destination[:, packed_rows:], raw_source[packed_rows:])


def _packed(destination: npt.NDArray[np.generic], source: npt.NDArray[np.generic], per_word: int) -> None:
    rows, cols = source.shape
    shift = 8 * source.dtype.itemsize
    words = destination.view(np.uint64)  # [cols, rows / per_word]
    grouped = source.reshape(rows // per_word, per_word, cols)
    packed = np.empty((_BAND, cols), dtype=np.uint64)
    lane = np.empty((_BAND, cols), dtype=np.uint64)
    for first in range(0, rows // per_word, _BAND):
        last = min(first + _BAND, rows // per_word)
        band, spare = packed[: last - first], lane[: last - first]
        np.copyto(band, grouped[first:last, 0], casting="unsafe")
        for index in range(1, per_word):
            np.copyto(spare, grouped[first:last, index], casting="unsafe")
            np.left_shift(spare, np.uint64(shift * index), out=spare)
            np.bitwise_or(band, spare, out=band)
        np.copyto(words[:, first:last], band.T)


def _tiled(destination: npt.NDArray[np.generic], source: npt.NDArray[np.generic]) -> None:
    rows, cols = source.shape
    for row in range(0, rows, _TILE):
        for col in range(0, cols, _TILE):
            np.copyto(
                destination[col : col + _TILE, row : row + _TILE],
                source[row : row + _TILE, col : col + _TILE].T,
                casting="unsafe",
            )

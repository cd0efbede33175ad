"""One source choice per piece: copy what is resident, read what is not.

``mincore`` on the file's mapping says which pages are in memory now.  A
range is cut into pieces at file offsets that are multiples of
``piece_nbytes``; a piece whose every page is resident is copied from the
mapping (memcpy speed, no I/O), any other piece is read explicitly.
Adjacent pieces with the same choice are merged again, so a fully cold or
fully warm range stays one piece.

The answer is a snapshot: a page can be evicted between the check and the
copy (the copy then faults it in, correct but slower) or arrive (the read
then fetches it again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from .._mapping import PAGE_NBYTES, MappedFile

__all__ = ["Piece", "split_by_residency"]


@dataclass(frozen=True, slots=True)
class Piece:
    """Bytes ``[start, start + nbytes)`` of request ``request``: ``warm`` ones are copied from the mapping."""

    request: int
    start: int
    nbytes: int
    warm: bool


def split_by_residency(
    request: int, mapped: MappedFile | None, offset: int, nbytes: int, piece_nbytes: int
) -> list[Piece]:
    """Pieces of one range, each marked warm (all pages resident) or cold.

    Without a mapping (or with an empty range) the whole range is one cold
    piece.  One ``mincore`` call covers the range.
    """
    if mapped is None or nbytes == 0:
        return [Piece(request, 0, nbytes, False)] if nbytes else []
    resident = mapped.resident_pages(offset, nbytes)
    if not resident.any():
        return [Piece(request, 0, nbytes, False)]
    first_page = offset // PAGE_NBYTES
    # Missing pages counted up to each page boundary: a piece is warm when none is missing.
    missing = np.concatenate(([0], np.cumsum(~resident)))
    pieces: list[Piece] = []
    position = offset
    end = offset + nbytes
    mode: Literal["warm", "cold"] | None = None
    run_start = offset
    while position < end:
        boundary = min(end, (position // piece_nbytes + 1) * piece_nbytes)
        low = position // PAGE_NBYTES - first_page
        high = -(-boundary // PAGE_NBYTES) - first_page
        current: Literal["warm", "cold"] = "warm" if missing[high] == missing[low] else "cold"
        if mode is not None and current != mode:
            pieces.append(Piece(request, run_start - offset, position - run_start, mode == "warm"))
            run_start = position
        mode = current
        position = boundary
    pieces.append(Piece(request, run_start - offset, end - run_start, mode == "warm"))
    return pieces

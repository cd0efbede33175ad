"""Pick a queue depth and read size from a short measurement.

Each candidate ``(queue_depth, chunk_nbytes)`` reads a different slice of the
sample ranges with ``O_DIRECT`` (so no candidate finds another's bytes in the
page cache; where direct I/O is refused the slices are dropped from the cache
after each candidate).  Candidates are measured in rounds, in grid order and
then in reverse, and one replaces another only when it is faster by
``margin`` in *every* round: a throttled cloud disk serves the first reads
after a pause from its burst allowance, so whichever candidate reads first
looks fastest, and a single fastest-of-all pick follows that instead of the
disk.  A deeper queue or larger read must win that way over a shallower one,
since deeper queues cost threads and memory.  Disk speed on shared machines
moves from one second to the next: the probe is a default, the config stays
overridable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .._errors import OptionError
from ._cache import drop_cached
from ._files import aligned_empty
from ._reader import ColdReader
from ._requests import ALIGN_NBYTES, FileRange, ReaderConfig, ReadRequest

_log = logging.getLogger(__name__)

__all__ = ["ProbeResult", "probe_disk", "probe_files", "probe_reader_config"]

DEFAULT_DEPTHS = (1, 2, 4, 8, 16)
DEFAULT_CHUNKS = (1 << 20, 4 << 20)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The chosen config, every candidate's ``(queue_depth, chunk_nbytes, GB/s)``
    (the mean over rounds) and its GB/s in each round (``rounds``, in the
    order of ``candidates``)."""

    config: ReaderConfig
    candidates: tuple[tuple[int, int, float], ...]
    rounds: tuple[tuple[float, ...], ...] = ()


def probe_reader_config(
    ranges: Sequence[FileRange],
    *,
    base: ReaderConfig | None = None,
    depths: Sequence[int] = DEFAULT_DEPTHS,
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    sample_nbytes: int = 64 << 20,
    margin: float = 0.05,
    drop: bool = True,
    prefer: tuple[int, int] | None = None,
    per_thread: bool = False,
) -> ProbeResult:
    """Measure each candidate on ``sample_nbytes`` of ``ranges`` and return the best.

    Parameters
    ----------
    ranges
        Ranges like the ones to be served (e.g. the slabs of a store); they
        are cut into ``2 * len(depths) * len(chunks)`` disjoint slices, one per
        candidate and round, so they should hold at least that many times
        ``sample_nbytes``.
    sample_nbytes
        Bytes each of a candidate's two timed reads (one per round) moves; it
        should hold several chunks per thread of the deepest queue.
    base
        Fields other than queue depth and chunk size come from here.
    prefer
        A ``(queue_depth, chunk_nbytes)`` of the grid that is kept unless
        another candidate beats it by ``margin`` in both rounds.  Without
        it, a deeper queue or larger read must beat a shallower one so.
    per_thread
        Give each candidate at least one chunk per thread (``depth * chunk``
        bytes per timed slice, ``sample_nbytes`` at least), so a deep queue of
        large reads is measured with every thread reading.
    drop
        Drop each slice from the page cache after it is read (so that a
        buffered read, where ``O_DIRECT`` is refused, leaves nothing behind).
        False leaves the cache alone: pages that were resident before stay.

    Raises
    ------
    OptionError
        No candidate, or ranges too small to give each candidate one aligned block.
    """
    base = base if base is not None else ReaderConfig()
    grid = _grid(depths, chunks)
    if not grid:
        raise OptionError("probe needs at least one queue depth and one chunk size")
    order, shares = _rounds(grid, sample_nbytes, per_thread, sum(item.nbytes for item in ranges))
    pieces = _cut(ranges, shares)
    speeds: list[list[float]] = [[] for _ in grid]
    # One reader per candidate for both rounds, its threads started and its descriptors open before any
    # timing: else the first round times thread start-up, which grows with the depth a deeper queue must win by.
    readers = [ColdReader(replace(base, queue_depth=depth, chunk_nbytes=chunk)) for depth, chunk in grid]
    try:
        for reader in readers:
            reader.start(pieces[0][0].path)
        for index, slices in zip(order, pieces, strict=True):
            buffers = [aligned_empty(item.nbytes) for item in slices]
            for buffer in buffers:
                buffer[:] = 0  # fault the buffers in outside the timing
            requests = [ReadRequest(item.path, item.offset, buf) for item, buf in zip(slices, buffers, strict=True)]
            start = time.perf_counter()
            readers[index].read(requests, residency=False)
            seconds = time.perf_counter() - start
            if drop:
                for item in slices:
                    drop_cached(item.path, [(item.offset, item.nbytes)])
            nbytes = sum(item.nbytes for item in slices)
            speeds[index].append(nbytes / seconds / 1e9 if seconds > 0 else float("inf"))
    finally:
        for reader in readers:
            reader.close()
    measured = [(depth, chunk, tuple(rounds)) for (depth, chunk), rounds in zip(grid, speeds, strict=True)]
    depth, chunk = choose(measured, margin, prefer)
    return ProbeResult(
        replace(base, queue_depth=depth, chunk_nbytes=chunk),
        tuple((depth, chunk, sum(rounds) / len(rounds)) for depth, chunk, rounds in measured),
        tuple(rounds for _, _, rounds in measured),
    )


def _grid(depths: Sequence[int], chunks: Sequence[int]) -> list[tuple[int, int]]:
    return [(depth, chunk) for chunk in chunks for depth in depths]


def _rounds(
    grid: Sequence[tuple[int, int]], sample_nbytes: int, per_thread: bool, total: int
) -> tuple[list[int], list[int]]:
    """The candidates' reading order over two rounds (the second in reverse, so no candidate always
    reads first) and each timed slice's bytes (see :func:`probe_reader_config`'s ``per_thread``)."""
    order = [*range(len(grid)), *reversed(range(len(grid)))]
    if per_thread:
        return order, [max(sample_nbytes, grid[index][0] * grid[index][1]) for index in order]
    return order, [min(sample_nbytes, total // len(order))] * len(order)


def _beats(first: Sequence[float], second: Sequence[float], margin: float) -> bool:
    """Whether ``first`` is faster than ``second`` by ``margin`` in every round."""
    return all(a > b * (1 + margin) for a, b in zip(first, second, strict=True))


def choose(
    candidates: Sequence[tuple[int, int, Sequence[float]]], margin: float, prefer: tuple[int, int] | None = None
) -> tuple[int, int]:
    """The ``(queue_depth, chunk_nbytes)`` a probe settles on, from each
    candidate's GB/s per round: ``prefer`` (if measured) unless some candidate
    beats it by ``margin`` in every round (then the one with the largest
    worst-round gain); without it, candidates in grid order, each replacing
    the one chosen so far only when it beats it so (shallow queues and small
    reads first)."""
    kept = [candidate for candidate in candidates if (candidate[0], candidate[1]) == prefer]
    if kept:
        reference = kept[0][2]
        winners = [candidate for candidate in candidates if _beats(candidate[2], reference, margin)]
        chosen = kept[0]
        if winners:
            chosen = max(winners, key=lambda item: min(a / b for a, b in zip(item[2], reference, strict=True)))
    else:
        chosen = candidates[0]
        for candidate in candidates[1:]:
            if _beats(candidate[2], chosen[2], margin):
                chosen = candidate
    return chosen[0], chosen[1]


def _cut(ranges: Sequence[FileRange], shares: Sequence[int]) -> list[list[FileRange]]:
    """Disjoint lists of aligned slices of ``ranges``, list ``i`` holding ``shares[i]`` bytes."""
    total = sum(item.nbytes for item in ranges)
    shares = [share // ALIGN_NBYTES * ALIGN_NBYTES for share in shares]
    if min(shares) <= 0 or sum(shares) > total:
        raise OptionError(f"probe ranges hold {total} bytes, too few for {len(shares)} slices of {max(shares)}")
    slices: list[list[FileRange]] = [[] for _ in shares]
    current, need = 0, shares[0]
    for item in ranges:
        offset = -(-item.offset // ALIGN_NBYTES) * ALIGN_NBYTES
        end = item.offset + item.nbytes
        while offset < end and current < len(shares):
            take = min(need, (end - offset) // ALIGN_NBYTES * ALIGN_NBYTES)
            if take <= 0:
                break
            slices[current].append(FileRange(item.path, offset, take, None, item.identity))
            offset += take
            need -= take
            if need == 0:
                current += 1
                need = shares[current] if current < len(shares) else 0
    if current < len(shares):
        raise OptionError(f"probe ranges hold too few aligned bytes for {len(shares)} slices")
    return slices


SERVICE_DEPTHS = (4, 16, 32)
SERVICE_CHUNKS = (4 << 20,)
_probed: dict[tuple[int, ReaderConfig], ReaderConfig] = {}
_probed_lock = threading.Lock()


def probe_files(
    paths: Sequence[str],
    *,
    base: ReaderConfig | None = None,
    depths: Sequence[int] = SERVICE_DEPTHS,
    chunks: Sequence[int] = SERVICE_CHUNKS,
    sample_nbytes: int = 32 << 20,
) -> ReaderConfig:
    """A reader config for these files' device, measured once per device per process.

    :func:`probe_reader_config` over the files with every thread of every
    candidate reading (``per_thread``: ``max(sample_nbytes, depth * chunk)``
    per timed slice, one slice per round, two rounds; with the default grid,
    queue depths 4, 16 and 32 with 4 MiB reads, 448 MiB read with
    ``O_DIRECT``: 0.15-0.2 s at 2-3 GB/s).  ``base`` (the default config) is
    kept unless a candidate beats it by 5% in both rounds, so a disk on which
    every depth reads alike keeps it.

    Nothing is measured, and ``base`` is the answer, where the files are too
    small for the probe's slices or the file system refuses ``O_DIRECT``
    (a buffered probe would fill the page cache, and could push a user's
    warm pages out).  A measured answer is kept per device (``st_dev``) and
    ``base`` for the life of the process, so a second service over the same
    disk starts at once; an unmeasured one is not, so a small store opened
    first does not stand for a large one opened later.

    Raises
    ------
    FormatError
        A file cannot be read (from the reads themselves).
    """
    base = base if base is not None else ReaderConfig()
    if not paths:
        return base
    key = (os.stat(paths[0]).st_dev, base)
    with _probed_lock:
        known = _probed.get(key)
        if known is not None:
            return known
        result = probe_disk(paths, base=base, depths=depths, chunks=chunks, sample_nbytes=sample_nbytes)
        if result is None:  # not measured (too small, or no O_DIRECT): a later, larger store may be
            return base
        _probed[key] = result.config
        return result.config


def probe_disk(
    paths: Sequence[str],
    *,
    base: ReaderConfig | None = None,
    depths: Sequence[int] = SERVICE_DEPTHS,
    chunks: Sequence[int] = SERVICE_CHUNKS,
    sample_nbytes: int = 32 << 20,
) -> ProbeResult | None:
    """The measurement :func:`probe_files` keeps, taken every time: None where
    the files are too small for its slices or refuse ``O_DIRECT``."""
    base = base if base is not None else ReaderConfig()
    ranges = [FileRange(path, 0, os.path.getsize(path)) for path in paths]
    total = sum(item.nbytes for item in ranges)
    need = sum(_rounds(_grid(depths, chunks), sample_nbytes, True, total)[1])  # the slices probe_reader_config cuts
    if not paths or total < need or not _direct_ok(max(ranges, key=lambda item: item.nbytes), base):
        _log.info("%s: not probing the disk (%d bytes, %d needed, or O_DIRECT refused); reading with %s",
                  paths[:1], total, need, base)  # fmt: skip
        return None
    result = probe_reader_config(
        ranges, base=base, depths=depths, chunks=chunks, sample_nbytes=sample_nbytes, drop=False,
        prefer=(base.queue_depth, base.chunk_nbytes), per_thread=True,
    )  # fmt: skip
    _log.info("probed %s: %s, GB/s per round %s", paths[0], result.config, result.rounds)
    return result


def _direct_ok(item: FileRange, base: ReaderConfig) -> bool:
    """Whether the reader reads the file of ``item`` with ``O_DIRECT`` (its own rule for a refusal, one
    aligned block).

    Raises
    ------
    FormatError
        The file cannot be read at all.
    """
    if item.nbytes < ALIGN_NBYTES:
        return False
    with ColdReader(replace(base, queue_depth=1)) as reader:
        block = ReadRequest(item.path, 0, aligned_empty(ALIGN_NBYTES))
        return reader.read_here(block).nbytes_from("direct") > 0

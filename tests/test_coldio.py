"""The cold-read path: exact bytes from every source, fallbacks, truncation,
cancellation, prefetch and page-cache helpers."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from mmapstore import FormatError, OptionError, ReadCancelledError
from mmapstore._mapping import MappedFile
from mmapstore.io import (
    ALIGN_NBYTES,
    ColdReader,
    FileRange,
    Prefetcher,
    ReaderConfig,
    ReadRequest,
    aligned_empty,
    drop_cached,
    probe_files,
    probe_reader_config,
    release_landed,
)
from mmapstore.io import _probe as io_probe
from mmapstore.io import _reader as io_reader

FILE_NBYTES = (3 << 20) + 1234


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[str, npt.NDArray[np.uint8]]:
    data = np.random.default_rng(7).integers(0, 256, size=FILE_NBYTES, dtype=np.uint8)
    path = tmp_path / "slabs.bin"
    data.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # dirty pages cannot be dropped from the cache
    os.close(fd)
    return str(path), data


def _buffer(nbytes: int, shift: int) -> npt.NDArray[np.uint8]:
    """A destination whose address is ``shift`` bytes past an aligned address."""
    return aligned_empty(nbytes + shift)[shift : shift + nbytes]


SMALL = ReaderConfig(queue_depth=3, chunk_nbytes=64 << 10, piece_nbytes=16 << 10)

RANGES = [
    (0, ALIGN_NBYTES),
    (0, 1 << 20),
    (ALIGN_NBYTES, 300 << 10),
    (1, 5000),
    (4095, 200 << 10),
    (12345, 1),
    (FILE_NBYTES - 7000, 7000),  # ends at an unaligned end of file
    (FILE_NBYTES - 1, 1),
]


@pytest.mark.parametrize("direct", ["auto", "never"])
@pytest.mark.parametrize("shift", [0, 1, 7 * 512])
@pytest.mark.parametrize(("offset", "nbytes"), RANGES)
def test_read_values_exact(
    data_file: tuple[str, npt.NDArray[np.uint8]], direct: str, shift: int, offset: int, nbytes: int
) -> None:
    path, data = data_file
    destination = _buffer(nbytes, shift)
    config = ReaderConfig(queue_depth=3, chunk_nbytes=64 << 10, direct=direct)  # type: ignore[arg-type]
    with ColdReader(config) as reader:
        result = reader.read([ReadRequest(path, offset, destination)], residency=False)
    assert np.array_equal(destination, data[offset : offset + nbytes])
    assert result.nbytes == nbytes == sum(n for _, n in result.source_nbytes)
    sources = {source for source, _ in result.source_nbytes}
    if direct == "never":
        assert sources == {"buffered"}
    else:
        assert sources <= {"direct", "bounced", "buffered"}
    aligned = shift == 0 and offset % ALIGN_NBYTES == 0 and nbytes % ALIGN_NBYTES == 0
    if direct == "auto" and sources != {"buffered"} and aligned:
        assert sources == {"direct"}
        assert result.device_nbytes == nbytes


def test_misaligned_destination_bounces_in_steps_of_at_most_1_mib(
    data_file: tuple[str, npt.NDArray[np.uint8]],
) -> None:
    path, data = data_file
    config = ReaderConfig(queue_depth=2, chunk_nbytes=4 << 20)
    assert config.bounce_step == 1 << 20 and config.bounce_nbytes == (1 << 20) + 2 * ALIGN_NBYTES
    nbytes = FILE_NBYTES - 100
    destination = _buffer(nbytes, 1)  # off by one byte: every byte bounces
    with ColdReader(config) as reader:
        result = reader.read([ReadRequest(path, 100, destination)], residency=False)
    assert np.array_equal(destination, data[100:])
    assert dict(result.source_nbytes) in ({"bounced": nbytes}, {"buffered": nbytes})


def test_resident_pieces_copied_from_mapping(data_file: tuple[str, npt.NDArray[np.uint8]]) -> None:
    path, data = data_file
    with MappedFile(path) as mapped, ColdReader(SMALL) as reader:
        offset, nbytes = ALIGN_NBYTES, 512 << 10
        warm = mapped.view(offset, np.dtype(np.uint8), (nbytes,))
        assert int(warm.sum()) >= 0  # touch every page: now resident
        assert mapped.resident_nbytes(offset, nbytes) == nbytes
        destination = np.empty(nbytes, dtype=np.uint8)
        result = reader.read([ReadRequest(path, offset, destination, mapped)])
        assert np.array_equal(destination, data[offset : offset + nbytes])
        assert result.nbytes_from("resident") == nbytes


def test_partly_resident_range_split(data_file: tuple[str, npt.NDArray[np.uint8]]) -> None:
    path, data = data_file
    drop_cached(path, [(0, FILE_NBYTES)])
    with MappedFile(path) as mapped, ColdReader(SMALL) as reader:
        if mapped.resident_nbytes() > 0:
            pytest.skip("this file system keeps file pages in memory (tmpfs); nothing is cold")
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # cache exactly what is read, no read-ahead
        assert len(os.pread(fd, 64 << 10, 1 << 20)) == 64 << 10
        os.close(fd)
        destination = np.empty(2 << 20, dtype=np.uint8)
        result = reader.read([ReadRequest(path, 0, destination, mapped)])
        assert np.array_equal(destination, data[: 2 << 20])
        assert 0 < result.nbytes_from("resident") < result.nbytes
        assert (
            result.nbytes_from("resident")
            + sum(result.nbytes_from(source) for source in ("direct", "bounced", "buffered"))
            == result.nbytes
        )


def test_many_requests_and_typed_destinations(data_file: tuple[str, npt.NDArray[np.uint8]]) -> None:
    path, data = data_file
    raw = data[: 1 << 20].view(np.uint16).reshape(256, -1)
    destinations = [np.empty_like(raw[:64]) for _ in range(4)]
    requests = [ReadRequest(path, index * destinations[0].nbytes, array) for index, array in enumerate(destinations)]
    with ColdReader(SMALL) as reader:
        result = reader.read(requests)
    assert np.array_equal(np.concatenate(destinations), raw)
    assert result.requests == 4


def refuse_direct_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``os.open`` refuse ``O_DIRECT`` with ``EINVAL``, as FUSE and some network file systems do."""
    real_open = os.open

    def refusing_open(name: Any, flags: int, *args: Any) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)


def test_direct_refused_at_open_falls_back(
    data_file: tuple[str, npt.NDArray[np.uint8]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = data_file
    refuse_direct_opens(monkeypatch)
    destination = aligned_empty(1 << 20)
    with ColdReader(SMALL) as reader:
        result = reader.read([ReadRequest(path, 0, destination)], residency=False)
    assert np.array_equal(destination, data[: 1 << 20])
    assert dict(result.source_nbytes) == {"buffered": 1 << 20}


def test_direct_refused_at_read_falls_back(
    data_file: tuple[str, npt.NDArray[np.uint8]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = data_file
    calls = []

    def refusing(self: ColdReader, handles: Any, offset: int, view: memoryview) -> Any:
        calls.append(offset)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(io_reader.ColdReader, "_read_direct", refusing)
    destination = aligned_empty(1 << 20)
    with ColdReader(SMALL) as reader:
        first = reader.read([ReadRequest(path, 0, destination)], residency=False)
        calls_after_first = len(calls)
        again = aligned_empty(1 << 20)
        reader.read([ReadRequest(path, 0, again)], residency=False)
    assert np.array_equal(destination, data[: 1 << 20]) and np.array_equal(again, destination)
    assert dict(first.source_nbytes) == {"buffered": 1 << 20}
    assert len(calls) == calls_after_first  # refused once: the second read never tried O_DIRECT


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm (tmpfs) on this machine")
def test_tmpfs_reads_exact() -> None:
    data = np.random.default_rng(3).integers(0, 256, size=(1 << 20) + 99, dtype=np.uint8)
    path = f"/dev/shm/mmapstore-coldio-{os.getpid()}.bin"
    data.tofile(path)
    try:
        for shift in (0, 3):
            destination = _buffer(data.size - 5, shift)
            with ColdReader(SMALL) as reader:
                reader.read([ReadRequest(path, 5, destination)], residency=False)
            assert np.array_equal(destination, data[5:])
    finally:
        os.unlink(path)


@pytest.mark.parametrize("direct", ["auto", "never"])
@pytest.mark.parametrize("mapped_too", [False, True])
def test_truncated_file_is_a_typed_error(
    data_file: tuple[str, npt.NDArray[np.uint8]], direct: str, mapped_too: bool
) -> None:
    path, _ = data_file
    config = ReaderConfig(queue_depth=2, chunk_nbytes=64 << 10, direct=direct)  # type: ignore[arg-type]
    with MappedFile(path) as mapped, ColdReader(config) as reader:
        if mapped_too:  # every page resident: the planned source is the mapping
            assert int(mapped.view(0, np.dtype(np.uint8), (mapped.nbytes,)).sum()) >= 0
        os.truncate(path, 1 << 20)  # after the plan, before the read
        destination = aligned_empty(2 << 20)
        with pytest.raises(FormatError, match="slabs.bin"):
            reader.read([ReadRequest(path, 0, destination, mapped if mapped_too else None)])


def test_replaced_file_refused(data_file: tuple[str, npt.NDArray[np.uint8]], tmp_path: Path) -> None:
    path, _ = data_file
    info = os.stat(path)
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"\0" * FILE_NBYTES)
    os.replace(replacement, path)
    with ColdReader(SMALL) as reader, pytest.raises(FormatError, match="another file"):
        reader.read([ReadRequest(path, 0, aligned_empty(4096), identity=(info.st_dev, info.st_ino))])


def test_bad_destination_and_config() -> None:
    with pytest.raises(OptionError):
        ReaderConfig(queue_depth=0)
    with pytest.raises(OptionError):
        ReaderConfig(chunk_nbytes=1000)
    readonly = np.zeros(4096, dtype=np.uint8)
    readonly.flags.writeable = False
    with ColdReader(SMALL) as reader, pytest.raises(OptionError, match="read-only"):
        reader.submit([ReadRequest("x", 0, readonly)])


def test_reads_start_while_a_generator_still_yields(data_file: tuple[str, npt.NDArray[np.uint8]]) -> None:
    """The first request is on the disk before the generator makes the second."""
    path, data = data_file
    first, second = np.zeros(64 << 10, dtype=np.uint8), np.zeros(64 << 10, dtype=np.uint8)
    landed_before_second = []

    def requests() -> Any:
        yield ReadRequest(path, 0, first)
        for _ in range(1000):  # up to 10 s for a thread to land the first
            if np.array_equal(first, data[: first.nbytes]):
                break
            threading.Event().wait(0.01)
        landed_before_second.append(np.array_equal(first, data[: first.nbytes]))
        yield ReadRequest(path, 1 << 20, second)

    with ColdReader(SMALL) as reader:
        result = reader.read(requests(), residency=False)
    assert landed_before_second == [True]
    assert np.array_equal(second, data[1 << 20 : (1 << 20) + second.nbytes])
    assert (result.nbytes, result.requests) == (2 * first.nbytes, 2)


def test_a_bad_request_mid_generator_stops_the_reads_before_it(
    data_file: tuple[str, npt.NDArray[np.uint8]],
) -> None:
    path, _ = data_file
    readonly = np.zeros(4096, dtype=np.uint8)
    readonly.flags.writeable = False
    destinations = [np.zeros(256 << 10, dtype=np.uint8) for _ in range(4)]
    requests = [ReadRequest(path, 0, destination) for destination in destinations]
    with ColdReader(SMALL) as reader:
        with pytest.raises(OptionError, match="read-only"):
            reader.submit([*requests, ReadRequest(path, 0, readonly)], residency=False)
        # Every thread let go of the destinations before the error came out:
        # nothing lands in them afterwards.
        snapshot = [destination.copy() for destination in destinations]
        threading.Event().wait(0.05)
        assert all(np.array_equal(a, b) for a, b in zip(snapshot, destinations, strict=True))
        assert reader.read([ReadRequest(path, 0, destinations[0])], residency=False).nbytes == 256 << 10


def _finishes(fn: Any, seconds: float = 10.0) -> list[Any]:
    """Run ``fn`` on a thread; ``[result]`` or ``[exception]`` if it ended within ``seconds``, else ``[]``."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome


def test_a_generator_may_read_through_the_same_reader(data_file: tuple[str, npt.NDArray[np.uint8]]) -> None:
    """No pool thread waits for a submission's next piece, so a read started
    from inside the generator still gets threads (it deadlocked when they waited)."""
    path, data = data_file
    # One thread: the outer read must not hold it while its generator waits on the inner read.
    reader = ColdReader(ReaderConfig(queue_depth=1, chunk_nbytes=64 << 10))
    inner = np.zeros(256 << 10, dtype=np.uint8)
    outer = [np.zeros(64 << 10, dtype=np.uint8) for _ in range(2)]

    def requests() -> Any:
        yield ReadRequest(path, 0, outer[0])
        reader.read([ReadRequest(path, 1 << 20, inner)], residency=False)
        yield ReadRequest(path, 64 << 10, outer[1])

    def read_and_close() -> Any:
        try:
            return reader.read(requests(), residency=False)
        finally:
            reader.close()  # inside the timed call: a deadlock fails the test instead of hanging it

    outcome = _finishes(read_and_close)
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    assert np.array_equal(inner, data[1 << 20 : (1 << 20) + inner.nbytes])
    assert np.array_equal(np.concatenate(outer), data[: 128 << 10])


def test_close_with_reads_queued_ends_them_with_a_typed_error(
    data_file: tuple[str, npt.NDArray[np.uint8]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = data_file
    started, release = _gated(monkeypatch)
    reader = ColdReader(ReaderConfig(queue_depth=1, chunk_nbytes=64 << 10))
    first = reader.submit([ReadRequest(path, 0, np.zeros(64 << 10, dtype=np.uint8))], residency=False)
    second = reader.submit([ReadRequest(path, 0, np.zeros(1 << 20, dtype=np.uint8))], residency=False)
    assert started.wait(10)  # the first read holds the only thread; the second is queued
    closing = threading.Thread(target=reader.close)
    closing.start()
    release.set()
    closing.join(10)
    assert first.wait().nbytes == 64 << 10
    outcome = _finishes(second.wait)
    assert outcome and isinstance(outcome[0], ReadCancelledError), outcome


def _gated(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make every explicit read wait for ``release`` just before its system call;
    ``started`` is set when the first one waits."""
    started, release = threading.Event(), threading.Event()
    real_pread = io_reader.pread_exact

    def gated_pread(*args: Any, **kwargs: Any) -> int:
        started.set()
        assert release.wait(10)
        return real_pread(*args, **kwargs)

    monkeypatch.setattr(io_reader, "pread_exact", gated_pread)
    return started, release


def test_cancel_never_reports_a_half_written_destination(
    data_file: tuple[str, npt.NDArray[np.uint8]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = data_file
    started, release = _gated(monkeypatch)
    destination = np.zeros(1 << 20, dtype=np.uint8)
    committed = []
    with ColdReader(ReaderConfig(queue_depth=1, chunk_nbytes=64 << 10)) as reader:
        handle = reader.submit([ReadRequest(path, 0, destination)], residency=False)
        assert started.wait(10)  # one piece is in flight, fifteen wait
        handle.cancel()
        release.set()
        with pytest.raises(ReadCancelledError):
            handle.wait()
            committed.append(True)
        assert handle.done()
    assert committed == []
    landed = np.flatnonzero(destination != 0)
    assert landed.size > 0 and landed.max() < 64 << 10  # only the piece in flight landed
    assert np.array_equal(destination[: 64 << 10], data[: 64 << 10])


def test_prefetch_serves_later_read_once(data_file: tuple[str, npt.NDArray[np.uint8]]) -> None:
    path, data = data_file
    with Prefetcher(4 << 20, SMALL) as prefetcher, ColdReader(SMALL) as reader:
        prefetcher.attach(reader)
        ticket = prefetcher.prefetch([FileRange(path, 0, 1 << 20), FileRange(path, 2 << 20, 1 << 20)])
        assert ticket.accepted_nbytes == 2 << 20 and not ticket.skipped
        first = np.empty(1 << 20, dtype=np.uint8)
        part = np.empty(1 << 19, dtype=np.uint8)
        result = reader.read([ReadRequest(path, 0, first), ReadRequest(path, (2 << 20) + (1 << 19), part)])
        assert np.array_equal(first, data[: 1 << 20])
        assert np.array_equal(part, data[(2 << 20) + (1 << 19) : 3 << 20])
        assert dict(result.source_nbytes) == {"prefetched": (1 << 20) + (1 << 19)}
        assert result.device_nbytes == 0
        assert prefetcher.staged_nbytes == 1 << 20  # the first range was served whole and released


def test_read_waits_for_prefetch_in_flight(
    data_file: tuple[str, npt.NDArray[np.uint8]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = data_file
    started, release = _gated(monkeypatch)
    with Prefetcher(4 << 20, SMALL) as prefetcher, ColdReader(SMALL) as reader:
        prefetcher.attach(reader)
        prefetcher.prefetch([FileRange(path, 0, 1 << 20)])
        assert started.wait(10)
        destination = np.empty(1 << 20, dtype=np.uint8)
        handle = reader.submit([ReadRequest(path, 0, destination)])
        assert not handle.done()
        release.set()
        result = handle.wait()
    assert np.array_equal(destination, data[: 1 << 20])
    assert dict(result.source_nbytes) == {"prefetched": 1 << 20}


def test_cancelled_prefetch_is_never_served(
    data_file: tuple[str, npt.NDArray[np.uint8]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = data_file
    started, release = _gated(monkeypatch)
    with Prefetcher(4 << 20, SMALL) as prefetcher, ColdReader(SMALL) as reader:
        prefetcher.attach(reader)
        ticket = prefetcher.prefetch([FileRange(path, 0, 1 << 20)])
        assert started.wait(10)
        destination = np.zeros(1 << 20, dtype=np.uint8)
        handle = reader.submit([ReadRequest(path, 0, destination)])  # claims the prefetch in flight
        prefetcher.cancel(ticket)
        release.set()
        result = handle.wait()
        assert prefetcher.staged_nbytes == 0
    assert np.array_equal(destination, data[: 1 << 20])
    assert result.nbytes_from("prefetched") == 0


def test_prefetch_budget_bounds_staging(data_file: tuple[str, npt.NDArray[np.uint8]]) -> None:
    path, _ = data_file
    with Prefetcher(1 << 20, SMALL) as prefetcher:
        ticket = prefetcher.prefetch([FileRange(path, 0, 768 << 10), FileRange(path, 1 << 20, 768 << 10)])
        assert len(ticket.accepted) == 1 and len(ticket.skipped) == 1
        assert ticket.handle is not None
        ticket.handle.wait()
        again = prefetcher.prefetch([FileRange(path, 2 << 20, 768 << 10)])  # evicts the landed one
        assert len(again.accepted) == 1
        assert prefetcher.staged_nbytes == 768 << 10


def test_probe_picks_a_candidate(data_file: tuple[str, npt.NDArray[np.uint8]]) -> None:
    path, _ = data_file
    result = probe_reader_config(
        [FileRange(path, 0, FILE_NBYTES)], depths=(1, 2), chunks=(64 << 10,), sample_nbytes=256 << 10
    )
    assert len(result.candidates) == 2
    assert (result.config.queue_depth, result.config.chunk_nbytes) in {(d, c) for d, c, _ in result.candidates}
    with pytest.raises(OptionError):
        probe_reader_config([FileRange(path, 0, 4096)], depths=(1, 2), chunks=(64 << 10,))


def test_probe_keeps_the_preferred_config_unless_beaten_by_the_margin() -> None:
    flat = [(4, 1 << 20, (2.0, 2.0)), (16, 4 << 20, (2.0, 2.0)), (32, 4 << 20, (2.08, 2.08))]
    assert io_probe.choose(flat, 0.05, prefer=(16, 4 << 20)) == (16, 4 << 20)  # 4% faster: kept
    steep = [(4, 1 << 20, (2.0, 2.0)), (16, 4 << 20, (2.0, 2.0)), (32, 4 << 20, (2.2, 2.3))]
    assert io_probe.choose(steep, 0.05, prefer=(16, 4 << 20)) == (32, 4 << 20)  # 10% faster: switched
    assert io_probe.choose(flat, 0.05) == (4, 1 << 20)  # no preference: the shallowest within the margin
    assert io_probe.choose(steep, 0.05) == (32, 4 << 20)
    assert io_probe.choose(flat, 0.05, prefer=(8, 1 << 20)) == (4, 1 << 20)  # not measured: as without
    # A throttled disk's burst: whichever reads first in a round looks fast. One
    # round's win is not a win; the largest worst-round gain is.
    burst = [(4, 4 << 20, (2.6, 1.9)), (16, 4 << 20, (2.0, 2.0)), (32, 4 << 20, (1.9, 2.6))]
    assert io_probe.choose(burst, 0.05, prefer=(16, 4 << 20)) == (16, 4 << 20)
    assert io_probe.choose(burst, 0.05) == (4, 4 << 20)
    both = [(4, 4 << 20, (2.3, 2.2)), (16, 4 << 20, (2.0, 2.0)), (32, 4 << 20, (2.6, 2.15))]
    assert io_probe.choose(both, 0.05, prefer=(16, 4 << 20)) == (4, 4 << 20)


def test_probe_measures_each_candidate_once_per_round_in_alternating_order(
    data_file: tuple[str, npt.NDArray[np.uint8]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = data_file
    seen: list[int] = []
    readers: dict[int, set[int]] = {}
    threads: list[int] = []
    original = ColdReader.read

    def read(self: ColdReader, *args: Any, **kwargs: Any) -> Any:
        seen.append(self.config.queue_depth)
        readers.setdefault(self.config.queue_depth, set()).add(id(self))
        threads.append(len(self._executor._threads))  # started before the timing, not by the timed read
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ColdReader, "read", read)
    result = probe_reader_config(
        [FileRange(path, 0, FILE_NBYTES)], depths=(1, 2, 3), chunks=(64 << 10,), sample_nbytes=256 << 10
    )
    assert seen == [1, 2, 3, 3, 2, 1]
    assert all(len(ids) == 1 for ids in readers.values())  # one reader per candidate, both rounds
    assert threads == seen
    assert [len(rounds) for rounds in result.rounds] == [2, 2, 2]
    assert [gbps for _, _, gbps in result.candidates] == [sum(rounds) / 2 for rounds in result.rounds]


def test_probe_files_measures_once_per_disk_and_keeps_the_cache(
    data_file: tuple[str, npt.NDArray[np.uint8]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = data_file
    monkeypatch.setattr(io_probe, "_probed", {})
    with MappedFile(path) as mapped:
        int(mapped.view(0, np.dtype(np.uint8), (mapped.nbytes,))[::4096].sum())  # warm every page
        warm = mapped.resident_nbytes()
        grid = {"depths": (1, 2), "chunks": (64 << 10,), "sample_nbytes": 256 << 10}
        config = probe_files([path], **grid)  # type: ignore[arg-type]
        assert (config.queue_depth, config.chunk_nbytes) in {(1, 64 << 10), (2, 64 << 10)}
        assert mapped.resident_nbytes() == warm  # a store in use keeps its warm pages

    def measured_again(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the second probe of a disk measured it again")

    original = io_probe.probe_reader_config
    monkeypatch.setattr(io_probe, "probe_reader_config", measured_again)
    assert probe_files([path], **grid) == config  # type: ignore[arg-type]
    # Too few bytes for the probe's slices: the base config, unmeasured, and not kept for the disk.
    base = ReaderConfig(queue_depth=5)
    assert probe_files([path], base=base, depths=(1, 2), chunks=(1 << 20,)) == base
    measured: list[object] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        measured.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(io_probe, "probe_reader_config", counting)
    assert probe_files([path], base=base, **grid) in {
        base.__class__(queue_depth=d, chunk_nbytes=64 << 10) for d in (1, 2)
    }  # type: ignore[arg-type]
    assert len(measured) == 1  # the store that fits the probe is measured, though a smaller one came first
    # The base is the preferred candidate, and every thread of every candidate reads.
    assert measured[0]["prefer"] == (5, base.chunk_nbytes) and measured[0]["per_thread"] is True
    monkeypatch.setattr(io_probe, "probe_reader_config", measured_again)
    # A file system that refuses O_DIRECT is not probed (buffered reads would fill the page cache).
    refuse_direct_opens(monkeypatch)
    other = ReaderConfig(queue_depth=6)
    assert probe_files([path], base=other, **grid) == other  # type: ignore[arg-type]


def test_release_landed_drops_pages(data_file: tuple[str, npt.NDArray[np.uint8]]) -> None:
    path, _ = data_file
    with MappedFile(path) as mapped:
        assert int(mapped.view(0, np.dtype(np.uint8), (1 << 20,)).sum()) >= 0
        assert mapped.resident_nbytes(0, 1 << 20) == 1 << 20
        # Whole folios only: the page cache may hold this range in folios of up to a few MiB.
        release_landed(path, [(0, FILE_NBYTES)], mapped)
        if mapped.resident_nbytes(0, 1 << 20) == 1 << 20:
            pytest.skip("this file system keeps file pages in memory (tmpfs)")
        assert mapped.resident_nbytes(0, 1 << 20) == 0

"""Benchmarks of the cold-read path (``python -m mmapstore.bench_cold``).

Two cases, each measuring every method on the same byte ranges in one run
(disk speed on shared machines moves by 3x within minutes: only ratios from
one run mean anything):

``cold``
    Random 4 MiB slabs of one file, page cache dropped before each method:
    the :class:`~mmapstore.io.ColdReader` path, today's mapping + chunked
    ``MADV_WILLNEED`` + copy, buffered and ``O_DIRECT`` ``pread`` of 4 MiB
    pieces on 1-16 threads, and ``fio`` replaying the same ranges where it
    is installed.  Reported: median GB/s over the repeats, the ratio to the
    best parallel direct read, and bytes read from storage per planned byte
    (``/proc/self/io``).
``beyond-ram``
    A slab store several times larger than a memory limit imposed on a child
    process with a memory cgroup; a drifting routing trace replayed through
    residency pools whose buffers are counted against the limit.  Reported:
    sustained GB/s, bytes read per planned byte, peak memory of the cgroup,
    and whether anything was OOM-killed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from .io import ColdReader, FileRange, ReaderConfig, ReadRequest, aligned_empty, probe_reader_config
from .mapping import MADV_DONTNEED, MADV_WILLNEED, MappedFile
from .pool import ExpertPool, capacity_from_budget
from .trace_synth import recency_trace

__all__ = ["Row", "beyond_ram_case", "cold_case", "render"]

SLAB_NBYTES = 4 << 20
PIECE_NBYTES = 4 << 20
WILLNEED_CHUNK_NBYTES = 4 << 20
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)


@dataclass(frozen=True, slots=True)
class Row:
    """One method of one case: GB/s per repeat, and what it read."""

    case: str
    method: str
    gbps: tuple[float, ...]
    read_per_planned: float | None = None
    ratio: float | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.gbps) if self.gbps else float("nan")


# -- helpers ------------------------------------------------------------------


def _storage_read_nbytes() -> int:
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _write_file(path: str, nbytes: int, seed: int = 0) -> None:
    block = np.random.default_rng(seed).integers(0, 256, size=64 << 20, dtype=np.uint8)
    with open(path, "wb") as handle:
        written = 0
        while written < nbytes:
            take = min(block.size, nbytes - written)
            # Vary each block so no layer below dedupes or compresses it.
            block[:8] = np.frombuffer(np.int64(written).tobytes(), dtype=np.uint8)
            handle.write(block[:take].tobytes())
            written += take
        handle.flush()
        os.fsync(handle.fileno())


def _drop(path: str, mapped: MappedFile | None = None) -> None:
    if mapped is not None:
        mapped.advise(0, mapped.nbytes, MADV_DONTNEED)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _pread_pool(
    path: str, spans: Sequence[tuple[int, int]], destination: npt.NDArray[np.uint8], depth: int, direct: bool
) -> None:
    """The baseline: ``depth`` threads each ``preadv`` 4 MiB pieces of ``spans`` into ``destination``."""
    fd = os.open(path, os.O_RDONLY | (_O_DIRECT if direct else 0))
    pieces: list[tuple[int, int, int]] = []
    position = 0
    for offset, nbytes in spans:
        for start in range(0, nbytes, PIECE_NBYTES):
            take = min(PIECE_NBYTES, nbytes - start)
            pieces.append((offset + start, take, position + start))
        position += nbytes
    lock = threading.Lock()
    view = memoryview(destination.data)
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not pieces:
                    return
                offset, nbytes, at = pieces.pop()
            try:
                done = 0
                while done < nbytes:
                    got = os.preadv(fd, [view[at + done : at + nbytes]], offset + done)
                    if got == 0:
                        raise OSError(f"{path}: short read")
                    done += got
            except BaseException as exc:  # surfaced after join
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker) for _ in range(depth)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    os.close(fd)
    if errors:
        raise errors[0]


def _willneed_copy(mapped: MappedFile, spans: Sequence[tuple[int, int]], destination: npt.NDArray[np.uint8]) -> None:
    """Today's path: chunked ``MADV_WILLNEED`` on exactly the ranges, then one copy each."""
    for offset, nbytes in spans:
        for start in range(offset, offset + nbytes, WILLNEED_CHUNK_NBYTES):
            mapped.advise(start, min(WILLNEED_CHUNK_NBYTES, offset + nbytes - start), MADV_WILLNEED)
    position = 0
    for offset, nbytes in spans:
        np.copyto(destination[position : position + nbytes], mapped.view(offset, np.dtype(np.uint8), (nbytes,)))
        position += nbytes


def _fio(path: str, spans: Sequence[tuple[int, int]], depth: int, scratch: str) -> float | None:
    """GB/s of ``fio`` replaying exactly ``spans`` with ``O_DIRECT`` at ``depth`` (None if not installed)."""
    binary = shutil.which("fio")
    if binary is None:
        return None
    log = os.path.join(scratch, "ranges.iolog")
    with open(log, "w") as handle:
        handle.write(f"fio version 2 iolog\n{path} add\n{path} open\n")
        for offset, nbytes in spans:
            for start in range(0, nbytes, PIECE_NBYTES):
                handle.write(f"{path} read {offset + start} {min(PIECE_NBYTES, nbytes - start)}\n")
    engine = (
        "io_uring"
        if "io_uring" in subprocess.run([binary, "--enghelp"], capture_output=True, text=True).stdout
        else "libaio"
    )
    done = subprocess.run(
        [binary, "--name=cold", f"--read_iolog={log}", "--replay_no_stall=1", f"--ioengine={engine}", "--direct=1",
         f"--iodepth={depth}", "--output-format=json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = json.loads(done.stdout[done.stdout.index("{") :])["jobs"][0]["read"]
    seconds = job["runtime"] / 1e3
    return sum(nbytes for _, nbytes in spans) / seconds / 1e9 if seconds > 0 else None


def _ignore(value: object) -> None:
    del value


def _bind(function: Callable[..., None], *args: object) -> Callable[[], None]:
    def run() -> None:
        function(*args)

    return run


# -- the cold case --------------------------------------------------------------


def cold_case(
    scratch: str,
    *,
    file_nbytes: int = 2 << 30,
    planned_nbytes: int = 512 << 20,
    repeat: int = 5,
    depths: Sequence[int] = (1, 2, 4, 8, 16),
    seed: int = 0,
) -> list[Row]:
    """Every method on the same random slabs of one file, page cache dropped before each."""
    path = os.path.join(scratch, "cold.bin")
    _write_file(path, file_nbytes, seed)
    try:
        return _cold_rows(path, scratch, file_nbytes, planned_nbytes, repeat, depths, seed)
    finally:
        os.unlink(path)


def _cold_rows(
    path: str, scratch: str, file_nbytes: int, planned_nbytes: int, repeat: int, depths: Sequence[int], seed: int
) -> list[Row]:
    rng = np.random.default_rng(seed)
    slabs = file_nbytes // SLAB_NBYTES
    chosen = np.sort(rng.choice(slabs, size=min(slabs, planned_nbytes // SLAB_NBYTES), replace=False))
    spans = [(int(slab) * SLAB_NBYTES, SLAB_NBYTES) for slab in chosen]
    planned = sum(nbytes for _, nbytes in spans)
    destination = aligned_empty(planned)
    destination[:] = 0  # fault the pool in outside the timings
    mapped = MappedFile(path)
    _drop(path, mapped)
    # The probe reads other slices of the same file (two per candidate).
    grid = 2 * len(depths) * 2
    sample = min(32 << 20, file_nbytes // grid) // SLAB_NBYTES * SLAB_NBYTES
    probed = probe_reader_config(
        [FileRange(path, 0, file_nbytes)], depths=depths, chunks=(1 << 20, 4 << 20), sample_nbytes=sample
    )
    reader = ColdReader(probed.config)
    requests = []
    position = 0
    for offset, nbytes in spans:
        requests.append(ReadRequest(path, offset, destination[position : position + nbytes], mapped))
        position += nbytes

    methods: dict[str, Callable[[], None]] = {
        f"cold path (qd {probed.config.queue_depth}, {probed.config.chunk_nbytes >> 20} MiB)": lambda: _ignore(
            reader.read(requests)
        ),
        "mmap + WILLNEED (today)": lambda: _willneed_copy(mapped, spans, destination),
    }
    for depth in depths:
        methods[f"pread buffered qd {depth}"] = _bind(_pread_pool, path, spans, destination, depth, False)
    for depth in depths:
        methods[f"pread direct qd {depth}"] = _bind(_pread_pool, path, spans, destination, depth, True)
    samples: dict[str, list[float]] = {name: [] for name in methods}
    ratios: dict[str, list[float]] = {name: [] for name in methods}
    reads: dict[str, list[float]] = {name: [] for name in methods}
    expected = np.concatenate(
        [np.fromfile(path, dtype=np.uint8, count=nbytes, offset=offset) for offset, nbytes in spans[:4]]
    )
    _drop(path, mapped)
    names = list(methods)
    for index in range(repeat):
        order = names[index % len(names) :] + names[: index % len(names)]  # rotate: no method always first
        for name in order:
            _drop(path, mapped)
            before = _storage_read_nbytes()
            start = time.perf_counter()
            methods[name]()
            seconds = time.perf_counter() - start
            reads[name].append((_storage_read_nbytes() - before) / planned)
            samples[name].append(planned / seconds / 1e9)
            if not np.array_equal(destination[: expected.size], expected):
                raise AssertionError(f"{name}: wrong bytes")
            destination[: expected.size] = 0
        best = max(samples[name][-1] for name in names if name.startswith("pread direct"))
        for name in names:
            ratios[name].append(samples[name][-1] / best)
    reader.close()
    mapped.close()
    rows = [
        Row("cold", name, tuple(samples[name]), statistics.median(reads[name]), statistics.median(ratios[name]))
        for name in names
    ]
    fio_note = "fio not installed" if shutil.which("fio") is None else ""
    for depth in (1, 4, 16):
        if fio_note:
            break
        gbps: list[float] = []
        for _ in range(repeat):
            _drop(path)
            value = _fio(path, spans, depth, scratch)
            if value is not None:
                gbps.append(value)
        rows.append(Row("cold", f"fio direct qd {depth}", tuple(gbps), None, None, "own timer (ratio not per repeat)"))
    if fio_note:
        rows.append(Row("cold", "fio", (), None, None, fio_note))
    probe_text = ", ".join(f"qd{d}/{c >> 20}MiB {g:.2f}" for d, c, g in probed.candidates)
    rows.append(Row("cold", "probe (GB/s per candidate)", (), None, None, probe_text))
    return rows


# -- the beyond-RAM case -----------------------------------------------------------


def _own_memory_cgroup() -> tuple[str, int] | None:
    """(directory to create a child in, cgroup version), or None where we cannot."""
    with open("/proc/self/cgroup") as handle:
        lines = handle.read().splitlines()
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            base = "/sys/fs/cgroup" + where
            with open("/sys/fs/cgroup/cgroup.controllers") as handle:
                if "memory" in handle.read().split() and os.access(base, os.W_OK):
                    return base, 2
        if "memory" in controllers.split(","):
            base = "/sys/fs/cgroup/memory" + where
            if os.access(base, os.W_OK):
                return base, 1
    return None


def beyond_ram_case(
    scratch: str,
    *,
    store_nbytes: int = 6 << 30,
    limit_nbytes: int = 3 << 29,
    layers: int = 8,
    steps: int = 64,
    depth: int | None = None,
) -> list[Row]:
    """Replay a drifting trace through pools over a store larger than a cgroup memory limit."""
    where = _own_memory_cgroup()
    if where is None:
        return [Row("beyond-ram", "-", (), None, None, "no writable memory cgroup here: case not run")]
    base, version = where
    experts = store_nbytes // (layers * 3 * SLAB_NBYTES)
    path = os.path.join(scratch, "store.bin")
    _write_file(path, layers * 3 * experts * SLAB_NBYTES, seed=1)
    _drop(path)
    rows: list[Row] = []
    try:
        for method in ("cold", "willneed", "direct"):
            _drop(path)
            group = os.path.join(base, f"mmapstore-bench-{os.getpid()}-{method}")
            os.mkdir(group)
            try:
                limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
                with open(os.path.join(group, limit_file), "w") as handle:
                    handle.write(str(limit_nbytes))
                procs = os.path.join(group, "cgroup.procs")
                command = [
                    sys.executable, "-m", "mmapstore.bench_cold", "replay", path, "--layers", str(layers),
                    "--experts", str(experts), "--steps", str(steps), "--budget", str(limit_nbytes), "--method", method,
                ] + (["--depth", str(depth)] if depth else [])  # fmt: skip
                done = subprocess.run(
                    command, capture_output=True, text=True,
                    preexec_fn=_bind(_join, procs),
                )  # fmt: skip
                peak, kills = _cgroup_peak(group, version)
            finally:
                _remove_cgroup(group)
            within = done.returncode == 0 and kills == 0
            note = f"limit {limit_nbytes >> 20} MiB, store {os.path.getsize(path) >> 20} MiB, peak {peak >> 20} MiB, "
            note += f"OOM kills {kills}, " + ("within the limit" if within else f"FAILED rc={done.returncode}")
            if done.returncode == 0:
                report = json.loads(done.stdout.strip().splitlines()[-1])
                note += f"; {report['note']}"
                rows.append(
                    Row("beyond-ram", report["method"], (report["gbps"],), report["read_per_planned"], None, note)
                )
            else:
                rows.append(Row("beyond-ram", method, (), None, None, note + " " + done.stderr.strip()[-300:]))
    finally:
        os.unlink(path)
    best = max((row.median for row in rows if row.method.startswith("pread direct") and row.gbps), default=None)
    if best:
        rows = [
            Row(r.case, r.method, r.gbps, r.read_per_planned, r.median / best if r.gbps else None, r.note) for r in rows
        ]
    return rows


def _join(procs: str) -> None:
    with open(procs, "w") as handle:
        handle.write(str(os.getpid()))


def _cgroup_peak(group: str, version: int) -> tuple[int, int]:
    def read(name: str) -> str:
        try:
            with open(os.path.join(group, name)) as handle:
                return handle.read()
        except OSError:
            return ""

    if version == 2:
        peak = int(read("memory.peak") or 0)
        events = dict(line.split() for line in read("memory.events").splitlines())
        return peak, int(events.get("oom_kill", 0))
    control = dict(line.split() for line in read("memory.oom_control").splitlines())
    return int(read("memory.max_usage_in_bytes") or 0), int(control.get("oom_kill", 0))


def _remove_cgroup(group: str) -> None:
    for _ in range(50):
        try:
            os.rmdir(group)
            return
        except OSError:
            time.sleep(0.1)


def replay(
    path: str, layers: int, experts: int, steps: int, budget_nbytes: int, method: str, depth: int | None
) -> dict[str, object]:
    """The child's side of ``beyond-ram``: pools sized from the budget, one read per step."""
    expert_nbytes = 3 * SLAB_NBYTES
    reserve = 256 << 20  # interpreter, numpy, threads, bounce buffers
    capacity = capacity_from_budget(budget_nbytes, reserve, expert_nbytes, layers, experts)
    if capacity < 1:
        raise SystemExit(f"budget {budget_nbytes} leaves no pool slot")
    pools = [ExpertPool(experts, capacity) for _ in range(layers)]
    buffers = [[aligned_empty(capacity * SLAB_NBYTES) for _ in range(3)] for _ in range(layers)]
    for per_layer in buffers:
        for buffer in per_layer:
            buffer[:] = 0
    trace = recency_trace(steps, layers, experts, top_k=4, window=2 * capacity, speed=0.5, seed=3)
    mapped = MappedFile(path)
    config = ReaderConfig(queue_depth=depth or 8, chunk_nbytes=4 << 20)
    if method == "cold" and depth is None:
        sample = [FileRange(path, 0, min(mapped.nbytes, 512 << 20))]
        config = probe_reader_config(sample, depths=(2, 4, 8, 16), chunks=(4 << 20,), sample_nbytes=32 << 20).config
    reader = ColdReader(config)
    planned = 0
    before = _storage_read_nbytes()
    start = time.perf_counter()
    for step in range(steps):
        ids = trace.step_ids(step)
        requests: list[ReadRequest] = []
        results = []
        for layer, pool in enumerate(pools):
            hits = pool.count_hits(ids[:, layer])  # ids: [tokens, layers, top_k]
            result = pool.propose(pool.select_target(hits), hits)
            results.append(result)
            for expert, slot in zip(result.promoted, result.slots, strict=True):
                for part in range(3):
                    offset = ((layer * 3 + part) * experts + expert) * SLAB_NBYTES
                    view = buffers[layer][part][slot * SLAB_NBYTES : (slot + 1) * SLAB_NBYTES]
                    requests.append(ReadRequest(path, offset, view, mapped))
        spans = [(request.offset, request.nbytes) for request in requests]
        if method == "cold":
            reader.read(requests)
        elif method == "willneed":
            for offset, nbytes in spans:
                mapped.advise(offset, nbytes, MADV_WILLNEED)
            for request in requests:
                np.copyto(
                    np.asarray(request.destination), mapped.view(request.offset, np.dtype(np.uint8), (request.nbytes,))
                )
        else:
            direct = ColdReader(ReaderConfig(queue_depth=config.queue_depth, chunk_nbytes=4 << 20))
            direct.read(requests, residency=False)
            direct.close()
        for pool, result in zip(pools, results, strict=True):
            pool.commit(result)
        planned += sum(nbytes for _, nbytes in spans)
    seconds = time.perf_counter() - start
    read_nbytes = _storage_read_nbytes() - before
    reader.close()
    mapped.close()
    names = {
        "cold": f"cold path (qd {config.queue_depth})",
        "willneed": "mmap + WILLNEED (today)",
        "direct": f"pread direct qd {config.queue_depth}",
    }
    pool_nbytes = layers * 3 * capacity * SLAB_NBYTES
    return {
        "method": names[method],
        "gbps": planned / seconds / 1e9,
        "read_per_planned": read_nbytes / planned if planned else 0.0,
        "note": f"capacity {capacity}/{experts}, pools {pool_nbytes >> 20} MiB, moved {planned >> 20} MiB in {seconds:.1f} s",
    }


# -- rendering and entry point ---------------------------------------------------------


def render(rows: Sequence[Row]) -> str:
    """A plain-text table: case, method, median GB/s, [min-max], ratio, bytes read per planned byte, note."""
    lines = [f"{'case':<11} {'method':<34} {'GB/s':>6} {'range':>13} {'ratio':>6} {'read/plan':>9}  note"]
    for row in rows:
        spread = f"{min(row.gbps):.2f}-{max(row.gbps):.2f}" if row.gbps else "-"
        median = f"{row.median:.2f}" if row.gbps else "-"
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        read = f"{row.read_per_planned:.3f}" if row.read_per_planned is not None else "-"
        lines.append(f"{row.case:<11} {row.method:<34} {median:>6} {spread:>13} {ratio:>6} {read:>9}  {row.note}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmapstore.bench_cold", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the cases and print the table")
    run.add_argument("--scratch", default=None, help="directory for the benchmark files (deleted after)")
    run.add_argument("--cases", default="cold,beyond-ram")
    run.add_argument("--repeat", type=int, default=5)
    run.add_argument("--file-gib", type=float, default=2.0)
    run.add_argument("--store-gib", type=float, default=6.0)
    run.add_argument("--limit-gib", type=float, default=1.5)
    run.add_argument("--steps", type=int, default=64)
    run.add_argument("--json", action="store_true")
    child = sub.add_parser("replay", help="(internal) the beyond-ram child")
    child.add_argument("path")
    child.add_argument("--layers", type=int, required=True)
    child.add_argument("--experts", type=int, required=True)
    child.add_argument("--steps", type=int, required=True)
    child.add_argument("--budget", type=int, required=True)
    child.add_argument("--method", choices=("cold", "willneed", "direct"), required=True)
    child.add_argument("--depth", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "replay":
        report = replay(args.path, args.layers, args.experts, args.steps, args.budget, args.method, args.depth)
        print(json.dumps(report))
        return 0
    scratch = tempfile.mkdtemp(prefix="mmapstore-bench-cold-", dir=args.scratch)
    rows: list[Row] = []
    try:
        cases = args.cases.split(",")
        if "cold" in cases:
            rows += cold_case(scratch, file_nbytes=int(args.file_gib * (1 << 30)), repeat=args.repeat)
        if "beyond-ram" in cases:
            rows += beyond_ram_case(
                scratch,
                store_nbytes=int(args.store_gib * (1 << 30)),
                limit_nbytes=int(args.limit_gib * (1 << 30)),
                steps=args.steps,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps([asdict(row) for row in rows]) if args.json else render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

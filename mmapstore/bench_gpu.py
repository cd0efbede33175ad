"""``python -m mmapstore.bench_gpu``: expert slabs into GPU memory, next to the link's ceiling.

Measured in one run, on a file this command writes: the pinned-to-device
ceiling; a warm refresh (page cache full) into a device pool through every
source; a cold refresh (pages evicted with ``POSIX_FADV_DONTNEED``, checked
with ``mincore``) next to the best host read path for the same ranges and the
disk's own cold sequential read; registration costs; peak pinned memory
against the budget; and that nothing stays registered after close (the pages
become evictable again).  Medians of ``--repeat`` runs with min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .gpu import CopyJob, DeviceCopier, Source, SourceStats
from .gpu.driver import CudaDriver
from .gpu.ring import default_threads
from .mapping import MADV_DONTNEED, MappedFile
from .torch import require_torch

__all__ = ["main", "run"]

GIB = 1 << 30
MIB = 1 << 20


@dataclass(slots=True)
class Row:
    case: str
    what: str
    unit: str
    samples: list[float]
    baseline_name: str = ""
    baseline: list[float] = field(default_factory=list)
    target: float | None = None  # minimum ratio to the baseline
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.baseline or not self.samples:
            return None
        return statistics.median(self.samples) / statistics.median(self.baseline)

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        return None if self.target is None or ratio is None else ratio >= self.target


def _spread(samples: list[float]) -> str:
    if not samples:
        return ""
    return f"{statistics.median(samples):.3g} [{min(samples):.3g}–{max(samples):.3g}]"


def table(rows: list[Row]) -> str:
    lines = [
        "| case | measured | unit | median [min–max] | baseline | baseline median [min–max] | ratio | target | met | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        target = f">= {row.target}x" if row.target is not None else ""
        met = {None: "", True: "yes", False: "**no**"}[row.met]
        lines.append(
            f"| {row.case} | {row.what} | {row.unit} | {_spread(row.samples)} | {row.baseline_name} | "
            f"{_spread(row.baseline)} | {ratio} | {target} | {met} | {row.note} |"
        )
    return "\n".join(lines)


def _write_file(path: str, nbytes: int, slab_nbytes: int) -> None:
    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 256, size=slab_nbytes, dtype=np.uint8)
    with open(path, "wb") as handle:
        for index in range(nbytes // slab_nbytes):
            chunk[:8] = np.frombuffer(np.int64(index).tobytes(), dtype=np.uint8)  # every slab differs
            handle.write(chunk.data)
        handle.flush()
        os.fsync(handle.fileno())


def _evict(path: str, mapped: MappedFile) -> None:
    # Pages our own mapping has in its page tables are skipped by
    # POSIX_FADV_DONTNEED: drop those entries first (the pages stay cached).
    mapped.advise(0, mapped.nbytes, MADV_DONTNEED)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _warm(path: str) -> None:
    with open(path, "rb", buffering=0) as handle:
        while handle.read(64 * MIB):
            pass


def _gbps(nbytes: int, seconds: list[float]) -> list[float]:
    return [nbytes / s / 1e9 for s in seconds]


def run(
    directory: str,
    *,
    size_nbytes: int,
    slab_nbytes: int,
    refresh_nbytes: int,
    repeat: int,
    cold_repeat: int,
    threads: int,
    device_name: str,
    emit: Callable[[str], None],
) -> tuple[list[Row], dict[str, Any]]:
    require_torch("the GPU benchmark")
    import torch

    device = torch.device(device_name)
    torch.zeros(1, device=device)
    path = os.path.join(directory, "slabs.bin")
    emit(f"writing {size_nbytes / GIB:.1f} GiB of {slab_nbytes // MIB} MiB slabs to {path}")
    _write_file(path, size_nbytes, slab_nbytes)
    mapped = MappedFile(path)
    slabs = size_nbytes // slab_nbytes
    count = min(slabs, refresh_nbytes // slab_nbytes)
    rng = np.random.default_rng(1)
    chosen = np.sort(rng.choice(slabs, size=count, replace=False))
    pool = torch.empty((count, slab_nbytes), dtype=torch.uint8, device=device)
    jobs = [CopyJob(mapped, int(e) * slab_nbytes, slab_nbytes, pool[slot]) for slot, e in enumerate(chosen)]
    total = count * slab_nbytes
    stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    rows: list[Row] = []
    info: dict[str, Any] = {"refresh_nbytes": total, "slabs": count, "threads": threads}

    def timed(fn: Callable[[], None], before: Callable[[], None] | None = None) -> list[float]:
        samples = []
        for _ in range(repeat):
            if before is not None:
                before()
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            stream.synchronize()
            samples.append(time.perf_counter() - start)
        return samples

    # Ceiling: pinned host memory to the device, the same slab-sized copies.
    pinned = torch.empty(min(total, 512 * MIB), dtype=torch.uint8, pin_memory=True)
    pinned.fill_(1)
    per = pinned.numel() // slab_nbytes

    def ceiling() -> None:
        with torch.cuda.stream(stream):
            for slot in range(count):
                index = slot % per
                pool[slot].copy_(pinned[index * slab_nbytes : (index + 1) * slab_nbytes], non_blocking=True)

    ceiling()
    ceiling_gbps = _gbps(total, timed(ceiling))
    rows.append(
        Row("ceiling", f"pinned tensor -> {device_name}, {count} x {slab_nbytes // MIB} MiB", "GB/s", ceiling_gbps)
    )
    emit(f"ceiling {statistics.median(ceiling_gbps):.1f} GB/s")

    def check(label: str) -> None:
        for slot in (0, count - 1):
            expected = torch.from_numpy(mapped.view(jobs[slot].offset, np.dtype(np.uint8), (slab_nbytes,)).copy())
            if not torch.equal(pool[slot].cpu(), expected):
                raise RuntimeError(f"{label}: slot {slot} does not hold expert {chosen[slot]}'s bytes")

    # Warm refresh through each source.
    _warm(path)
    budgets: dict[str, tuple[int, int]] = {}
    registered_addresses: list[int] = []
    stats_by_source: dict[str, SourceStats] = {}
    warm_sources: tuple[Source, ...] = ("registered", "staged", "pread", "direct", "auto")
    for source in warm_sources:
        copier = DeviceCopier(device, source=source, threads=threads)
        pool.zero_()
        first = time.perf_counter()
        copier.copy(jobs, stream)
        stream.synchronize()
        first_seconds = time.perf_counter() - first
        check(source)
        samples = _gbps(total, timed(lambda copier=copier: copier.copy(jobs, stream)))  # type: ignore[misc]
        check(source)
        names = {
            "registered": "registered windows (steady state)",
            "staged": f"pinned ring filled from the mapping, {threads} threads",
            "pread": f"pinned ring filled by pread, {threads} threads",
            "direct": "pageable copy from a tensor over the mapping",
            "auto": "auto (resident -> registered)",
        }
        rows.append(
            Row(
                "warm_refresh",
                names[source],
                "GB/s",
                samples,
                "pinned ceiling",
                ceiling_gbps,
                0.9 if source in ("registered", "auto") else None,
            )
        )
        if source == "registered":
            rows.append(
                Row(
                    "warm_refresh",
                    "registered windows, first touch (registration included)",
                    "GB/s",
                    _gbps(total, [first_seconds]),
                    "pinned ceiling",
                    ceiling_gbps,
                )
            )
            if copier.windows is not None:
                with copier.windows._lock:
                    registered_addresses = [w.address for w in copier.windows._windows.values() if w.ok]
        stats_by_source[source] = copier.stats
        budgets[source] = (copier.stats.peak_pinned_nbytes, copier.budget.limit_nbytes)
        emit(f"warm {source}: {statistics.median(samples):.1f} GB/s; {copier.stats}")
        copier.close()

    # Nothing registered after close: the driver no longer knows the windows,
    # and the pages can be evicted again.
    driver = CudaDriver.load(device.index or 0)
    still = sum(1 for address in registered_addresses if driver is not None and driver.unregister(address) == 0)
    _evict(path, mapped)
    resident_after_close = mapped.resident_nbytes() / mapped.nbytes
    info["registered_after_close"] = still
    info["resident_fraction_after_close_and_evict"] = resident_after_close
    rows.append(
        Row(
            "close",
            f"windows still registered after close (of {len(registered_addresses)})",
            "count",
            [float(still)],
            note=f"file resident after DONTNEED: {resident_after_close:.1%}",
        )
    )

    # Cold refresh.
    def evict_checked() -> None:
        _evict(path, mapped)
        fraction = mapped.resident_nbytes() / mapped.nbytes
        info.setdefault("resident_fraction_before_cold", []).append(fraction)

    host = np.empty(total, dtype=np.uint8)
    host[:] = 0

    def host_pread() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:

            def one(slot: int) -> None:
                os.preadv(fd, [host[slot * slab_nbytes : (slot + 1) * slab_nbytes].data], jobs[slot].offset)

            with ThreadPoolExecutor(threads) as executor:
                list(executor.map(one, range(count)))
        finally:
            os.close(fd)

    def host_sequential() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            view = host.data
            for start in range(0, total, slab_nbytes):
                os.preadv(fd, [view[start : start + slab_nbytes]], start)
        finally:
            os.close(fd)

    def cold_samples(fn: Callable[[], None]) -> list[float]:
        samples = []
        for _ in range(cold_repeat):
            evict_checked()
            start = time.perf_counter()
            fn()
            stream.synchronize()
            samples.append(time.perf_counter() - start)
        return _gbps(total, samples)

    parallel = cold_samples(host_pread)
    sequential = cold_samples(host_sequential)
    best_name, best = max(
        (f"host pread of the same ranges, {threads} threads", parallel),
        ("host sequential read, 1 thread", sequential),
        key=lambda pair: statistics.median(pair[1]),
    )
    rows.append(Row("cold_host", f"host pread of the same ranges, {threads} threads", "GB/s", parallel))
    rows.append(Row("cold_host", f"disk's cold sequential read ({total // MIB} MiB, 1 thread)", "GB/s", sequential))
    cold_sources: tuple[tuple[str, Source, bool, int], ...] = (
        (f"auto (cold -> pread ring), {threads} threads", "auto", False, threads),
        ("pread ring, 4 threads", "pread", False, 4),
        (f"pread ring, O_DIRECT, {threads} threads", "pread", True, threads),
        ("pread ring, O_DIRECT, 4 threads", "pread", True, 4),
        (f"ring filled from the mapping (page faults), {threads} threads", "staged", False, threads),
    )
    for label, source, direct, count_threads in cold_sources:
        copier = DeviceCopier(device, source=source, threads=count_threads, direct=direct)
        samples = cold_samples(lambda copier=copier: copier.copy(jobs, stream))  # type: ignore[misc]
        check(f"cold {label}")
        note = f"fallbacks {copier.stats.fallbacks}" if copier.stats.fallbacks else ""
        target = 0.9 if source == "auto" else None
        rows.append(Row("cold_refresh", label, "GB/s", samples, best_name, best, target, note=note))
        budgets[f"cold {label}"] = (copier.stats.peak_pinned_nbytes, copier.budget.limit_nbytes)
        emit(f"cold {label}: {statistics.median(samples):.1f} GB/s; {copier.stats}")
        copier.close()
    info["resident_fraction_before_cold_max"] = max(info.pop("resident_fraction_before_cold"))

    # Registration costs: whole-file windows, and a 16 MiB register+unregister.
    _warm(path)
    if driver is not None:
        costs = []
        for _ in range(repeat):
            start = time.perf_counter()
            status = driver.register(mapped.address, mapped.nbytes)
            middle = time.perf_counter()
            driver.unregister(mapped.address)
            costs.append((middle - start, time.perf_counter() - middle, status))
        rows.append(
            Row(
                "registration",
                f"register {mapped.nbytes / GIB:.1f} GiB of the mapping (read-only flag)",
                "ms per GiB",
                [c[0] * 1e3 * GIB / mapped.nbytes for c in costs],
                note=f"status {costs[0][2]}",
            )
        )
        rows.append(
            Row("registration", "unregister it", "ms per GiB", [c[1] * 1e3 * GIB / mapped.nbytes for c in costs])
        )
        small = []
        for _ in range(repeat * 4):
            start = time.perf_counter()
            driver.register(mapped.address, slab_nbytes)
            driver.unregister(mapped.address)
            small.append(time.perf_counter() - start)
        rows.append(
            Row(
                "registration",
                f"register + unregister one {slab_nbytes // MIB} MiB slab",
                "ms",
                [s * 1e3 for s in small],
            )
        )
        driver.release()
    for label, (peak, limit) in budgets.items():
        rows.append(
            Row(
                "pinned",
                f"peak pinned, {label}",
                "MiB",
                [peak / MIB],
                "budget",
                [limit / MIB],
                note="within budget" if peak <= limit else "**over budget**",
            )
        )
    info["stats"] = {source: asdict(stats) for source, stats in stats_by_source.items()}
    mapped.close()
    return rows, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmapstore.bench_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=4.0, help="GiB of slabs to write (default 4)")
    parser.add_argument("--slab", type=int, default=16, help="MiB per slab (default 16)")
    parser.add_argument("--refresh", type=float, default=2.0, help="GiB moved per refresh (default 2)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cold-repeat", type=int, default=3, help="repeats of each cold read (default 3)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dir", default=None, help="where to write the data (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch = require_torch("the GPU benchmark")
    if not torch.cuda.is_available():
        print("mmapstore bench_gpu: no CUDA device", file=sys.stderr)
        return 2
    started = time.time()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        rows, info = run(
            directory,
            size_nbytes=int(args.size * GIB),
            slab_nbytes=args.slab * MIB,
            refresh_nbytes=int(args.refresh * GIB),
            repeat=args.repeat,
            cold_repeat=args.cold_repeat,
            threads=args.threads,
            device_name=args.device,
            emit=lambda line: print(line, file=sys.stderr, flush=True),
        )
    header = (
        f"mmapstore bench_gpu: {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, data {args.size} GiB, slabs {args.slab} MiB, "
        f"refresh {info['refresh_nbytes'] / GIB:.2f} GiB, repeat {args.repeat}, {time.time() - started:.0f} s"
    )
    print(header)
    print(table(rows))
    print(json.dumps({key: value for key, value in info.items() if key != "stats"}))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "rows": [asdict(row) for row in rows], "info": info}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

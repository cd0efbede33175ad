"""The ``gpu`` bench case: expert slabs into GPU memory, next to the link's ceiling.

Measured in one run, on a file the case writes: the pinned-to-device
ceiling; a warm refresh (page cache full) into a device pool through every
source, first touch with and without windows registered ahead; a cold
refresh (pages evicted with ``POSIX_FADV_DONTNEED``, checked with
``mincore``) next to the best host read path for the same ranges and the
disk's own cold sequential read; registration costs; peak pinned memory
against the budget; and that nothing stays registered after close (the pages
become evictable again).  Every ratio is against a baseline of the same run.
Without torch or a CUDA device the case reports one skipped row.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np

from .._mapping import MappedFile
from ..gpu import CopyJob, DeviceCopier, Source, SourceStats
from ..gpu._driver import CudaDriver
from ..gpu._ring import default_threads
from ..io import evict
from ..torch import require_torch
from .figures import Figure
from .registry import Context, case

__all__ = ["GIB", "MIB", "measure"]

GIB = 1 << 30
MIB = 1 << 20
SLAB_NBYTES = 16 * MIB


def _row(
    case: str,
    what: str,
    unit: str,
    samples: list[float],
    baseline_name: str = "",
    baseline: list[float] | None = None,
    target: float | None = None,
    note: str = "",
) -> Figure:
    """A figure whose ratio is ours / baseline (higher is better) and whose
    target, if any, is a minimum ratio."""
    figure = Figure(case, what, unit, samples, baseline_name, list(baseline or []), higher_is_better=True, note=note)
    if target is not None:
        figure.target = f">= {target}x"
        figure.met = figure.ratio is not None and figure.ratio >= target
    return figure


@case("gpu")
def case_gpu(ctx: Context) -> list[Figure]:
    """``ctx.size`` bytes of 16 MiB slabs, half of them moved per refresh, on ``cuda``."""
    try:
        torch = require_torch("the gpu bench case")
    except ImportError as exc:
        return [_row("gpu", "skipped", "", [], note=str(exc))]
    if not torch.cuda.is_available():
        return [_row("gpu", "skipped", "", [], note="no CUDA device")]
    size = max(2 * SLAB_NBYTES, ctx.size - ctx.size % SLAB_NBYTES)
    figures, _ = measure(
        ctx.scratch,
        size_nbytes=size,
        slab_nbytes=SLAB_NBYTES,
        refresh_nbytes=size // 2,
        repeat=ctx.repeat,
        cold_repeat=min(3, ctx.repeat),
        threads=default_threads(),
        device_name="cuda",
        emit=lambda line: None,
    )
    return figures


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
    evict(path, mapped)


def _warm(path: str) -> None:
    with open(path, "rb", buffering=0) as handle:
        while handle.read(64 * MIB):
            pass


def _gbps(nbytes: int, seconds: list[float]) -> list[float]:
    return [nbytes / s / 1e9 for s in seconds]


def measure(
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
) -> tuple[list[Figure], dict[str, Any]]:
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
    rows: list[Figure] = []
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
        _row(
            "ceiling",
            f"pinned tensor -> {device_name}, {count} x {slab_nbytes // MIB} MiB",
            "GB/s",
            ceiling_gbps,
            note=f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}",
        )
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
            _row(
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
                _row(
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

    # Register ahead: the windows of the next refresh's ranges registered in
    # the background (as SlabService does between refreshes), then the first
    # copy of those ranges.
    ahead_samples, ahead_ms = [], []
    for _ in range(repeat):
        copier = DeviceCopier(device, source="registered", threads=threads)
        started = time.perf_counter()
        copier.register_ahead([(job.mapped, job.offset, job.nbytes) for job in jobs])
        copier.settle()
        ahead_ms.append((time.perf_counter() - started) * 1e3)
        pool.zero_()
        torch.cuda.synchronize(device)
        first = time.perf_counter()
        copier.copy(jobs, stream)
        stream.synchronize()
        ahead_samples.append(time.perf_counter() - first)
        check("registered ahead")
        copier.close()
    rows.append(
        _row(
            "warm_refresh",
            "registered windows, first touch after register_ahead",
            "GB/s",
            _gbps(total, ahead_samples),
            "pinned ceiling",
            ceiling_gbps,
            0.9,
            note=f"registering ahead took {statistics.median(ahead_ms):.0f} ms (median), off the refresh's path",
        )
    )
    emit(f"warm registered ahead: {statistics.median(_gbps(total, ahead_samples)):.1f} GB/s")

    # Nothing registered after close: the driver no longer knows the windows,
    # and the pages can be evicted again.
    driver = CudaDriver.load(device.index or 0)
    still = sum(1 for address in registered_addresses if driver is not None and driver.unregister(address) == 0)
    _evict(path, mapped)
    resident_after_close = mapped.resident_nbytes() / mapped.nbytes
    info["registered_after_close"] = still
    info["resident_fraction_after_close_and_evict"] = resident_after_close
    rows.append(
        _row(
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
    rows.append(_row("cold_host", f"host pread of the same ranges, {threads} threads", "GB/s", parallel))
    rows.append(_row("cold_host", f"disk's cold sequential read ({total // MIB} MiB, 1 thread)", "GB/s", sequential))
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
        rows.append(_row("cold_refresh", label, "GB/s", samples, best_name, best, target, note=note))
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
            _row(
                "registration",
                f"register {mapped.nbytes / GIB:.1f} GiB of the mapping (read-only flag)",
                "ms per GiB",
                [c[0] * 1e3 * GIB / mapped.nbytes for c in costs],
                note=f"status {costs[0][2]}",
            )
        )
        rows.append(
            _row("registration", "unregister it", "ms per GiB", [c[1] * 1e3 * GIB / mapped.nbytes for c in costs])
        )
        small = []
        for _ in range(repeat * 4):
            start = time.perf_counter()
            driver.register(mapped.address, slab_nbytes)
            driver.unregister(mapped.address)
            small.append(time.perf_counter() - start)
        rows.append(
            _row(
                "registration",
                f"register + unregister one {slab_nbytes // MIB} MiB slab",
                "ms",
                [s * 1e3 for s in small],
            )
        )
        driver.release()
    for label, (peak, limit) in budgets.items():
        rows.append(
            _row(
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

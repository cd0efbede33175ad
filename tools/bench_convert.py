"""Convert at disk speed? ``mmapstore convert`` against ``cp -r`` + ``sync``.

One run measures, on the same Mixtral-style per-expert bf16 checkpoint (at
least 2 GiB), with every source file evicted from the page cache before each
trial (``POSIX_FADV_DONTNEED``) and the trials of one repeat run back to back
in a rotating order (so a noisy neighbour hits every case alike):

- ``cp -r SRC DST && sync -f DST`` (the baseline);
- ``convert`` with the defaults (native orientation, xxh3-128);
- ``convert --orientation kn`` (transposed to ``[E, k, n]``);
- optionally ``convert`` with ``--checksum blake3`` and ``sha256``.

Each convert runs in a fresh interpreter; its time is that of the
``convert()`` call (locking, streaming, fsync and the atomic rename
included; interpreter start-up and imports not), its peak RSS the
process's ``VmHWM``.  Prints a Markdown table of medians [min-max], GB/s of
expert bytes (all bytes for ``cp``), the ratio of rates to ``cp`` and peak
RSS in slabs beyond 100 MB.

    python tools/bench_convert.py --size 2.25GiB --repeat 5 [--dir /scratch] [--checksums] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from mmapstore.cli import parse_size
from mmapstore.store import open_store
from mmapstore.synth import synth_checkpoint

EXPERTS, HIDDEN, FFN = 16, 2048, 1024  # [1024, 2048] bf16 slabs of 4 MiB, as in `mmapstore bench`

CONVERT = """
import sys, time
from mmapstore.convert import convert
src, dst, orientation, checksum = sys.argv[1:5]
start = time.perf_counter()
convert(src, dst, orientation=orientation, checksum=checksum)
seconds = time.perf_counter() - start
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(seconds, int(peak) * 1024)
"""


def evict(root: str) -> None:
    """Write back and drop every file under ``root`` from the page cache."""
    for directory, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def trial(case: str, source: str, scratch: str) -> tuple[float, int]:
    """Run one trial of ``case``; return (seconds, peak RSS bytes or 0)."""
    dst = os.path.join(scratch, "out")
    shutil.rmtree(dst, ignore_errors=True)
    for name in os.listdir(scratch):  # the lock file a previous convert left
        if name.startswith(".out"):
            os.unlink(os.path.join(scratch, name))
    os.sync()
    evict(source)
    try:
        if case == "cp":
            start = time.perf_counter()
            subprocess.run(["cp", "-r", source, dst], check=True)
            subprocess.run(["sync", "-f", dst], check=True)
            return time.perf_counter() - start, 0
        orientation = "kn" if case == "convert kn" else "native"
        checksum = case.split()[-1] if case.startswith("convert ") and case != "convert kn" else "xxh3_128"
        out = subprocess.run(
            [sys.executable, "-c", CONVERT, source, dst, orientation, checksum],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        return float(out[0]), int(out[1])
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def _fmt(samples: list[float], digits: int = 3) -> str:
    return f"{statistics.median(samples):.{digits}g} [{min(samples):.{digits}g}–{max(samples):.{digits}g}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("2.25GiB"), help="checkpoint size (>= 2 GiB)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", help="scratch directory (default: the temporary directory)")
    parser.add_argument("--source", help="reuse this checkpoint (made here when absent)")
    parser.add_argument("--checksums", action="store_true", help="also convert with blake3 and sha256")
    parser.add_argument("--json", help="write the samples here")
    args = parser.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="mmapstore-bench-convert-", dir=args.dir)
    try:
        source = args.source or os.path.join(scratch, "src")
        layers = max(1, -(-args.size // (3 * EXPERTS * HIDDEN * FFN * 2)))
        if not os.path.exists(source):
            print(f"writing a {layers}-layer Mixtral-style checkpoint...", file=sys.stderr, flush=True)
            synth_checkpoint(
                source, "mixtral", layers=layers, experts=EXPERTS, hidden=HIDDEN, ffn=FFN, shard_nbytes=1 << 30
            )
        with open_store(source) as store:
            expert_nbytes = sum(layer.nbytes for layer in store.layers)
            slab_nbytes = store.layers[0].gate.slab_nbytes
        source_nbytes = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(source) for n in names)
        cases = ["cp", "convert", "convert kn"] + (["convert blake3", "convert sha256"] if args.checksums else [])
        seconds: dict[str, list[float]] = {case: [] for case in cases}
        peaks: dict[str, list[int]] = {case: [] for case in cases}
        work = os.path.join(scratch, "work")
        os.makedirs(work, exist_ok=True)
        load_before = os.getloadavg()
        for repeat in range(args.repeat):
            order = cases[repeat % len(cases) :] + cases[: repeat % len(cases)]
            for case in order:
                took, peak = trial(case, source, work)
                seconds[case].append(took)
                peaks[case].append(peak)
                print(f"repeat {repeat}: {case}: {took:.2f} s", file=sys.stderr, flush=True)
        load_after = os.getloadavg()
    finally:
        if not args.source:
            shutil.rmtree(scratch, ignore_errors=True)
    # Rates, not times: cp copies the whole checkpoint, convert only its experts.
    nbytes = {case: source_nbytes if case == "cp" else expert_nbytes for case in cases}
    cp_rate = source_nbytes / statistics.median(seconds["cp"])
    print(
        f"bench_convert: {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Linux {platform.release()}; {expert_nbytes / 2**30:.2f} GiB of experts ({source_nbytes / 2**30:.2f} GiB "
        f"of files), {expert_nbytes // slab_nbytes} slabs of {slab_nbytes / 2**20:.0f} MiB; {args.repeat} repeats; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print()
    print("| case | seconds | GB/s | vs cp (median) | peak RSS MB | (peak - 100 MB) / slab |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        rates = [nbytes[case] / took / 1e9 for took in seconds[case]]
        ratio = nbytes[case] / statistics.median(seconds[case]) / cp_rate
        rss = f"{_fmt([p / 1e6 for p in peaks[case]])}" if any(peaks[case]) else ""
        slabs = f"{(statistics.median(peaks[case]) - 100e6) / slab_nbytes:.1f}" if any(peaks[case]) else ""
        name = {"cp": "cp -r + sync", "convert": "convert (native, xxh3-128)", "convert kn": "convert --orientation kn"}
        print(f"| {name.get(case, case)} | {_fmt(seconds[case])} | {_fmt(rates)} | {ratio:.2f}x | {rss} | {slabs} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"expert_nbytes": expert_nbytes, "slab_nbytes": slab_nbytes, "seconds": seconds, "peaks": peaks},
                handle,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert at disk speed?  ``mmapstore convert`` against ``cp -r`` + ``sync``.

The ``convert`` case of ``mmapstore bench``, also runnable alone
(``python -m mmapstore.bench_convert --size 2.25GiB --repeat 5``).  On one
Mixtral-style per-expert bf16 checkpoint (4 MiB slabs; at least 2 GiB for a
meaningful figure), with every source file evicted from the page cache
before each trial (``POSIX_FADV_DONTNEED``) and the trials of one repeat run
back to back in a rotating order (so a noisy neighbour hits every case
alike), it times:

- ``cp -r SRC DST && sync -f DST`` (the baseline);
- ``convert`` with the defaults (native orientation, xxh3-128);
- ``convert --orientation kn`` (transposed to ``[E, k, n]``);
- optionally ``convert`` with ``--checksum blake3`` and ``sha256``.

Each convert runs in a fresh interpreter; its time is that of the
``convert()`` call (locking, streaming, fsync and the atomic rename
included; interpreter start-up and imports not), its peak RSS the process's
``VmHWM``.  Rates are of expert bytes for convert and of all bytes for
``cp`` (which copies the whole checkpoint); ratios compare median rates.
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
from dataclasses import dataclass

from .._store import open_store
from .._synth import synth_checkpoint
from ..io import evict as evict_file
from .figures import Figure
from .registry import Context
from .registry import case as register

__all__ = ["CASES", "ConvertTrials", "case_convert", "main", "make_source", "render", "run_trials"]

EXPERTS, HIDDEN, FFN = 16, 2048, 1024  # [1024, 2048] bf16 slabs of 4 MiB
CASES = ("cp", "convert", "convert kn")
CHECKSUM_CASES = ("convert blake3", "convert sha256")
NAMES = {"cp": "cp -r + sync", "convert": "convert (native, xxh3-128)", "convert kn": "convert --orientation kn"}

_CONVERT = """
import sys, time
from mmapstore._convert import convert
src, dst, orientation, checksum = sys.argv[1:5]
start = time.perf_counter()
convert(src, dst, orientation=orientation, checksum=checksum)
seconds = time.perf_counter() - start
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(seconds, int(peak) * 1024)
"""


@dataclass(frozen=True, slots=True)
class ConvertTrials:
    """Samples of one run: seconds and peak RSS bytes (0 for ``cp``) per case."""

    expert_nbytes: int
    source_nbytes: int
    slab_nbytes: int
    seconds: dict[str, list[float]]
    peaks: dict[str, list[int]]
    load: tuple[float, float]  # one-minute load average before and after

    def rates(self, case: str) -> list[float]:
        """GB/s of each trial: all bytes for ``cp``, expert bytes otherwise."""
        nbytes = self.source_nbytes if case == "cp" else self.expert_nbytes
        return [nbytes / seconds / 1e9 for seconds in self.seconds[case]]

    def ratio(self, case: str) -> float:
        """Median rate of ``case`` over the median rate of ``cp``."""
        return statistics.median(self.rates(case)) / statistics.median(self.rates("cp"))


def make_source(path: str, size: int) -> str:
    """A Mixtral-style checkpoint of at least ``size`` expert bytes at ``path`` (kept if there)."""
    layers = max(1, -(-size // (3 * EXPERTS * HIDDEN * FFN * 2)))
    if not os.path.exists(path):
        synth_checkpoint(path, "mixtral", layers=layers, experts=EXPERTS, hidden=HIDDEN, ffn=FFN, shard_nbytes=1 << 30)
    return path


def evict(root: str) -> None:
    """Write back and drop every file under ``root`` from the page cache."""
    for directory, _, names in os.walk(root):
        for name in names:
            evict_file(os.path.join(directory, name))


def _trial(case: str, source: str, work: str) -> tuple[float, int]:
    dst = os.path.join(work, "out")
    shutil.rmtree(dst, ignore_errors=True)
    for name in os.listdir(work):  # the lock file a previous convert left
        if name.startswith(".out"):
            os.unlink(os.path.join(work, name))
    os.sync()
    evict(source)
    try:
        if case == "cp":
            start = time.perf_counter()
            subprocess.run(["cp", "-r", source, dst], check=True)
            subprocess.run(["sync", "-f", dst], check=True)
            return time.perf_counter() - start, 0
        orientation = "kn" if case == "convert kn" else "native"
        checksum = case.split()[1] if case in CHECKSUM_CASES else "xxh3_128"
        out = subprocess.run(
            [sys.executable, "-c", _CONVERT, source, dst, orientation, checksum],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        return float(out[0]), int(out[1])
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def run_trials(source: str, work: str, repeat: int, cases: tuple[str, ...] = CASES) -> ConvertTrials:
    """Run every case ``repeat`` times in ``work`` (emptied after each trial)."""
    with open_store(source) as store:
        expert_nbytes = sum(layer.nbytes for layer in store.layers)
        slab_nbytes = store.layers[0].gate.slab_nbytes
    source_nbytes = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(source) for n in names)
    seconds: dict[str, list[float]] = {case: [] for case in cases}
    peaks: dict[str, list[int]] = {case: [] for case in cases}
    os.makedirs(work, exist_ok=True)
    load_before = os.getloadavg()[0]
    for index in range(repeat):
        for case in cases[index % len(cases) :] + cases[: index % len(cases)]:
            took, peak = _trial(case, source, work)
            seconds[case].append(took)
            peaks[case].append(peak)
    return ConvertTrials(expert_nbytes, source_nbytes, slab_nbytes, seconds, peaks, (load_before, os.getloadavg()[0]))


def _fmt(samples: list[float]) -> str:
    return f"{statistics.median(samples):.3g} [{min(samples):.3g}-{max(samples):.3g}]"


def render(trials: ConvertTrials) -> str:
    """A Markdown table: seconds, GB/s, ratio to ``cp`` and peak RSS per case."""
    lines = [
        "| case | seconds | GB/s | vs cp | peak RSS MB | (peak - 100 MB) / slab |",
        "|---|---|---|---|---|---|",
    ]
    for case, seconds in trials.seconds.items():
        peaks = trials.peaks[case]
        rss = _fmt([peak / 1e6 for peak in peaks]) if any(peaks) else ""
        slabs = f"{(statistics.median(peaks) - 100e6) / trials.slab_nbytes:.1f}" if any(peaks) else ""
        lines.append(
            f"| {NAMES.get(case, case)} | {_fmt(seconds)} | {_fmt(trials.rates(case))} | "
            f"{trials.ratio(case):.2f}x | {rss} | {slabs} |"
        )
    return "\n".join(lines)


@register("convert")
def case_convert(ctx: Context) -> list[Figure]:
    """Convert (native, and --orientation kn) against cp -r + sync, evicted before each trial."""
    source = make_source(os.path.join(ctx.scratch, "convert_src"), ctx.size)
    trials = run_trials(source, os.path.join(ctx.scratch, "convert_work"), max(2, ctx.repeat))
    slab = trials.slab_nbytes
    peaks = trials.peaks["convert"] + trials.peaks["convert kn"]
    what = f"{trials.expert_nbytes / 2**20:.0f} MiB of experts, evicted before each trial"
    return [
        Figure(
            "convert",
            f"convert mixtral per-expert -> slab store, native orientation + xxh3-128 + fsync ({what})",
            "GB/s",
            trials.rates("convert"),
            "cp -r of the source + sync",
            trials.rates("cp"),
            higher_is_better=True,
            target=">= 1.0x cp",
            met=trials.ratio("convert") >= 1.0,
        ),
        Figure(
            "convert",
            f"convert --orientation kn: transposed to [E, k, n] ({what})",
            "GB/s",
            trials.rates("convert kn"),
            "cp -r of the source + sync",
            trials.rates("cp"),
            higher_is_better=True,
            target=">= 0.6x cp",
            met=trials.ratio("convert kn") >= 0.6,
        ),
        Figure(
            "convert",
            "convert peak RSS (VmHWM, includes the interpreter), both orientations",
            "MB",
            [peak / 1e6 for peak in peaks],
            target="<= 3 slabs + 100 MB",
            met=statistics.median(peaks) <= 3 * slab + 100e6,
            note=f"slab = {slab / 2**20:.0f} MiB; total expert bytes = {trials.expert_nbytes // slab} slabs",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    from ..cli import parse_size

    """``python -m mmapstore.bench_convert``: run the trials and print the table."""
    parser = argparse.ArgumentParser(prog="python -m mmapstore.bench_convert", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("2.25GiB"), help="expert bytes (>= 2 GiB)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", help="scratch directory (default: the temporary directory)")
    parser.add_argument("--source", help="reuse this checkpoint (made there when absent, and kept)")
    parser.add_argument("--checksums", action="store_true", help="also convert with blake3 and sha256")
    parser.add_argument("--json", help="write the samples here")
    args = parser.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="mmapstore-bench-convert-", dir=args.dir)
    try:
        source = make_source(args.source or os.path.join(scratch, "src"), args.size)
        cases = CASES + (CHECKSUM_CASES if args.checksums else ())
        trials = run_trials(source, os.path.join(scratch, "work"), args.repeat, cases)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"bench_convert: {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Linux {platform.release()}; {trials.expert_nbytes / 2**30:.2f} GiB of experts "
        f"({trials.source_nbytes / 2**30:.2f} GiB of files), {trials.expert_nbytes // trials.slab_nbytes} slabs of "
        f"{trials.slab_nbytes / 2**20:.0f} MiB; {args.repeat} repeats; load average {trials.load[0]:.1f} before, "
        f"{trials.load[1]:.1f} after"
    )
    print()
    print(render(trials))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"seconds": trials.seconds, "peaks": trials.peaks, "slab_nbytes": trials.slab_nbytes}, handle)
    return 0

"""``mmapstore bench``: mmapstore next to what a user would otherwise reach for.

Every figure has a baseline measured in the same run (memcpy, ``pread``,
``cp``, the ``safetensors`` library), because machines are shared and noisy;
the table reports medians with min and max and the ratio to the baseline.
Nothing here is asserted by the test suite.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import numpy.typing as npt

from .apply import apply, prefetch_ranges
from .dtypes import dtype_from_code
from .formats import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SafetensorsWriter, TensorSpec
from .mapping import PAGE_NBYTES, MappedFile
from .planner import FileRanges, plan_refresh
from .pool import ExpertPool
from .sinks import ArraySink
from .store import ExpertStore, open_store
from .synth import routing_trace, synth_checkpoint

__all__ = ["run_bench"]

CASES = ("open", "cold_slab", "warm_refresh", "cold_refresh", "plan", "convert")
BF16 = dtype_from_code("BF16")


@dataclass(slots=True)
class Figure:
    """One row: a case, what was measured, mmapstore's samples and the baseline's."""

    case: str
    what: str
    unit: str
    ours: list[float]
    baseline_name: str = ""
    baseline: list[float] = field(default_factory=list)
    higher_is_better: bool = False
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """How many times better than the baseline (>1 is better)."""
        if not self.baseline:
            return None
        ours, base = statistics.median(self.ours), statistics.median(self.baseline)
        if ours == 0 or base == 0:
            return None
        return ours / base if self.higher_is_better else base / ours


def _times(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> list[float]:
    samples = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def _drop_cache(paths: list[str]) -> None:
    """Evict the files from the page cache (they must be clean and unmapped)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cached_nbytes(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with MappedFile(path) as probe:
            total += probe.resident_nbytes()
    return total


def _prefaulted(nbytes: int) -> npt.NDArray[np.uint8]:
    buffer = np.empty(nbytes, dtype=np.uint8)
    buffer[:] = 0
    return buffer


def _small_page_buffer(nbytes: int) -> npt.NDArray[np.uint8]:
    import mmap

    region = mmap.mmap(-1, nbytes)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    buffer = np.frombuffer(region, dtype=np.uint8)
    buffer[:] = 1
    return buffer


def write_slab_store(path: str, layers: int, experts: int, k: int, n: int, *, sparse: bool) -> list[str]:
    """A slab store of ``layers * 3`` stacks written directly (no source needed)."""
    os.makedirs(path, exist_ok=True)
    specs = [TensorSpec(f"blk.{layer}.ffn_{proj}_exps.weight", BF16, (experts, k, n) if proj != "down" else (experts, n, k))
             for layer in range(layers) for proj in ("gate", "up", "down")]
    file_name = "experts-00001-of-00001.safetensors"
    file_path = os.path.join(path, file_name)
    rng = np.random.default_rng(0)
    chunk = rng.integers(-100, 100, size=(k * n,), dtype=np.int16).astype(np.float32).astype(BF16.numpy)
    with SafetensorsWriter(file_path, specs, {"format": "mmapstore"}, align=PAGE_NBYTES, sparse=sparse) as writer:
        if not sparse:
            for spec in specs:
                for _ in range(experts):
                    writer.append(chunk)
    tensors = {spec.name: {"file": file_name, "dtype": "BF16", "shape": list(spec.shape)} for spec in specs}
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "storage": "safetensors",
                "layout": "slab", "orientation": "kn", "tensors": tensors}
    with open(os.path.join(path, MANIFEST_NAME), "w") as handle:
        json.dump(manifest, handle)
    return [file_path]


# -- cases ----------------------------------------------------------------------------

def case_open(scratch: str, repeat: int) -> list[Figure]:
    from safetensors import safe_open

    small = os.path.join(scratch, "open_small")
    huge = os.path.join(scratch, "open_huge")
    files = write_slab_store(small, 67, 8, 64, 32, sparse=False)  # 201 stacks, 6 MB
    # 201 stacks of [64, 7168, 2048] bf16: about 0.2 TB, sparse
    write_slab_store(huge, 67, 64, 7168, 112, sparse=True)
    huge_nbytes = os.path.getsize(os.path.join(huge, "experts-00001-of-00001.safetensors"))

    def ours(path: str) -> Callable[[], None]:
        def run() -> None:
            with open_store(path) as store:
                for layer in store.layers:
                    for _, stack in layer.stacks:
                        assert stack.num_experts
        return run

    def library() -> None:
        with safe_open(files[0], framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                handle.get_slice(name).get_shape()

    small_times = _times(ours(small), repeat * 4)
    huge_times = _times(ours(huge), repeat * 4)
    lib_times = _times(library, repeat * 4)
    median_small = statistics.median(small_times)
    return [
        Figure("open", "open_store, 201 stacks ready (6 MB store)", "ms", [t * 1e3 for t in small_times],
               "safe_open + get_slice().get_shape() per tensor", [t * 1e3 for t in lib_times],
               target="<= 1 ms for 200 stacks", met=median_small <= 1e-3),
        Figure("open", f"open_store, 201 stacks ready ({huge_nbytes / 1e9:.0f} GB sparse store)", "ms",
               [t * 1e3 for t in huge_times], "the same store at 6 MB", [t * 1e3 for t in small_times],
               target="flat in data size (ratio >= 0.8)",
               met=median_small / statistics.median(huge_times) >= 0.8),
    ]


def _data_store(scratch: str, size: int) -> tuple[str, int]:
    """The store of the copy cases: 4 MiB slabs ([2048, 1024] bf16), 32 experts."""
    path = os.path.join(scratch, "data")
    experts, k, n = 32, 2048, 1024
    layers = max(1, size // (3 * experts * k * n * 2))
    if not os.path.exists(path):
        write_slab_store(path, layers, experts, k, n, sparse=False)
    return path, layers


def case_cold_slab(scratch: str, size: int, repeat: int) -> list[Figure]:
    from safetensors import safe_open

    path, layers = _data_store(scratch, size)
    file_path = os.path.join(path, "experts-00001-of-00001.safetensors")
    name = "blk.0.ffn_up_exps.weight"
    with open_store(path) as store:
        stack = store.layer(0).up
        slab_nbytes, shape = stack.slab_nbytes, (stack.k, stack.n)
        stack_offset = stack.mapped_file(0).offset_of(stack.native(0))
    npy = os.path.join(scratch, "stack.npy")
    if not os.path.exists(npy):
        with open_store(path) as store:
            np.save(npy, np.asarray(store.view(name)))
    destination = np.empty(shape, dtype=BF16.numpy)
    destination.view(np.uint8)[:] = 0
    experts = list(range(1, 31, 3))
    results: dict[str, tuple[list[float], list[float]]] = {}

    def run(label: str, read: Callable[[int], None], files: list[str]) -> None:
        times, paged = [], []
        for trial in range(repeat):
            expert = experts[trial % len(experts)]
            _drop_cache(files)
            before = _cached_nbytes(files)
            start = time.perf_counter()
            read(expert)
            times.append(time.perf_counter() - start)
            paged.append((_cached_nbytes(files) - before) / slab_nbytes)
        results[label] = (times, paged)

    def ours(expert: int) -> None:
        with open_store(path) as store:
            stack = store.layer(0).up
            span = stack.source_span(expert)
            ranges = FileRanges(span.mapped, np.array([span.offset]), np.array([span.nbytes]))
            prefetch_ranges([ranges])  # what apply() does for every planned range
            np.copyto(destination, stack.expert(expert))
            del stack, span, ranges

    def naive(expert: int) -> None:
        with open_store(path) as store:
            np.copyto(destination, store.layer(0).up.expert(expert))
            store.close()

    def get_slice(expert: int) -> None:
        with safe_open(file_path, framework="numpy") as handle:
            np.copyto(destination, handle.get_slice(name)[expert])

    def get_tensor(expert: int) -> None:
        with safe_open(file_path, framework="numpy") as handle:
            np.copyto(destination, handle.get_tensor(name)[expert])

    def np_load(expert: int) -> None:
        np.copyto(destination.view(np.uint16), np.load(npy, mmap_mode="r").view(np.uint16)[expert])

    def preadv(expert: int) -> None:
        fd = os.open(file_path, os.O_RDONLY)
        try:
            os.preadv(fd, [destination.view(np.uint8).reshape(-1)], stack_offset + expert * slab_nbytes)
        finally:
            os.close(fd)

    run("mmapstore (WILLNEED on the slab, copy)", ours, [file_path])
    run("mmapstore view + np.copyto, no hint", naive, [file_path])
    run("safetensors get_slice(name)[e]", get_slice, [file_path])
    run("safetensors get_tensor(name)[e]", get_tensor, [file_path])
    run("np.load(mmap_mode='r')[e]", np_load, [npy])
    run("os.preadv of the slab bytes", preadv, [file_path])

    figures = []
    ours_times, ours_paged = results.pop("mmapstore (WILLNEED on the slab, copy)")
    for label, (times, paged) in results.items():
        figures.append(Figure("cold_slab", f"one cold 4 MiB slab: mmapstore vs {label}", "ms",
                              [t * 1e3 for t in ours_times], label, [t * 1e3 for t in times],
                              target=">= 2x faster than get_slice" if "get_slice" in label else "",
                              met=(statistics.median(times) / statistics.median(ours_times) >= 2)
                              if "get_slice" in label else None))
        figures.append(Figure("cold_slab", f"bytes paged in per slab: mmapstore vs {label}", "x slab",
                              ours_paged, label, paged,
                              target="<= 1.05x slab" if "preadv" in label else "",
                              met=statistics.median(ours_paged) <= 1.05 if "preadv" in label else None))

    # warm single slab: mmapstore view copy vs get_slice, pages cached
    with open_store(path) as store, safe_open(file_path, framework="numpy") as handle:
        view_stack = store.layer(0).up
        np.copyto(destination, view_stack.expert(5))
        warm_ours = _times(lambda: np.copyto(destination, view_stack.expert(5)), repeat * 4)
        warm_lib = _times(lambda: np.copyto(destination, handle.get_slice(name)[5]), repeat * 4)
    figures.append(Figure("warm_slab", "one warm 4 MiB slab: view + copy", "ms", [t * 1e3 for t in warm_ours],
                          "safetensors get_slice(name)[e]", [t * 1e3 for t in warm_lib],
                          target=">= 1.2x faster", met=statistics.median(warm_lib) / statistics.median(warm_ours) >= 1.2))
    return figures


def _refresh_setup(store: ExpertStore) -> tuple[list[ExpertPool], list[list[int]], ArraySink]:
    """A full swap in every layer: half the experts resident, the other half promoted."""
    experts = store.layers[0].num_experts
    pools = [ExpertPool(experts, experts // 2) for _ in store.layers]
    captured = [list(range(experts // 2, experts)) for _ in store.layers]
    sink = ArraySink.for_store(store, experts // 2)
    return pools, captured, sink


def case_refresh(scratch: str, size: int, repeat: int, cold: bool) -> list[Figure]:
    path, _ = _data_store(scratch, size)
    file_path = os.path.join(path, "experts-00001-of-00001.safetensors")
    with open_store(path) as store:
        pools, captured, sink = _refresh_setup(store)
        plan = plan_refresh(store, pools, captured, 0)
        assert plan is not None
        ranges = [span for file_ranges in plan.reads for span in file_ranges.spans()]
        nbytes = plan.nbytes
        del plan
    slabs = nbytes // (2048 * 1024 * 2)
    figures = []
    modes = ("willneed", "willneed+populate", "none")
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    paged: list[float] = []
    cached_before: list[float] = []
    for _ in range(repeat):
        for mode in modes:
            if cold:
                _drop_cache([file_path])
            else:
                _cached_nbytes([file_path])  # keep warm
                with MappedFile(file_path) as warm:
                    np.asarray(warm.view(0, np.dtype(np.uint8), (warm.nbytes,)))[:: PAGE_NBYTES].sum()
            before = _cached_nbytes([file_path]) if cold else 0
            if cold:
                cached_before.append(before / os.path.getsize(file_path))
            with open_store(path) as store:  # a fresh mapping each time: page tables start empty
                plan = plan_refresh(store, [ExpertPool(p.num_experts, p.capacity) for p in pools], captured, 0)
                assert plan is not None
                result = apply(plan, sink, prefetch=mode)
                del plan
            samples[mode].append(nbytes / result.seconds / 1e9)
            if cold and mode == "willneed":
                paged.append((_cached_nbytes([file_path]) - before) / nbytes)
    if not cold:
        source = _prefaulted(min(nbytes, 1 << 30))
        target = _prefaulted(source.nbytes)
        memcpy = [source.nbytes / t / 1e9 for t in _times(lambda: np.copyto(target, source), repeat * 2)]
        # The page cache holds 4 KiB pages; fresh anonymous buffers may get
        # 2 MiB transparent huge pages.  This baseline separates that effect.
        small_pages = _small_page_buffer(source.nbytes)
        memcpy_4k = [source.nbytes / t / 1e9 for t in _times(lambda: np.copyto(target, small_pages), repeat * 2)]
        for mode in modes:
            figures.append(Figure("warm_refresh", f"apply(plan) {nbytes / 2**20:.0f} MiB, {slabs} slabs, prefetch={mode}, "
                                  "warm page cache, fresh mapping", "GB/s", samples[mode],
                                  "np.copyto between prefaulted buffers (memcpy)", memcpy, higher_is_better=True,
                                  target=">= 0.9x memcpy" if mode == "willneed" else ""))
        head = figures[0]
        head.met = (head.ratio or 0) >= 0.9
        figures.append(Figure("warm_refresh", "the same apply(plan), prefetch=willneed", "GB/s",
                              samples["willneed"], "memcpy from a 4 KiB-page source (no THP)", memcpy_4k,
                              higher_is_better=True, note="page size alone"))
        return figures
    preads = {}
    for threads in (1, 4):
        buffers = [_prefaulted(length) for _, length in ranges]
        times = []
        for _ in range(repeat):
            _drop_cache([file_path])
            fd = os.open(file_path, os.O_RDONLY)
            try:
                def read(index: int) -> None:
                    offset, length = ranges[index]
                    os.preadv(fd, [buffers[index]], offset)

                start = time.perf_counter()
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(read, range(len(ranges))))
                times.append(time.perf_counter() - start)
            finally:
                os.close(fd)
        preads[threads] = [nbytes / t / 1e9 for t in times]
    best = max(preads, key=lambda t: statistics.median(preads[t]))
    for mode in modes:
        figures.append(Figure("cold_refresh", f"apply(plan) {nbytes / 2**20:.0f} MiB, {slabs} slabs, prefetch={mode}, cold",
                              "GB/s", samples[mode], f"buffered pread, {best} thread(s) (best of 1 and 4)", preads[best],
                              higher_is_better=True, target=">= 0.9x best pread" if mode == "willneed" else ""))
    figures[0].met = (figures[0].ratio or 0) >= 0.9
    other = 4 if best == 1 else 1
    figures.append(Figure("cold_refresh", f"buffered pread, {other} thread(s)", "GB/s", preads[other],
                          f"buffered pread, {best} thread(s)", preads[best], higher_is_better=True))
    figures.append(Figure("cold_refresh", "bytes paged in per planned byte (prefetch=willneed)", "x",
                          paged, target="<= 1.05x", met=statistics.median(paged) <= 1.05,
                          note=f"file cached before each cold trial: at most {max(cached_before):.1%}"))
    return figures


def case_plan(scratch: str, repeat: int) -> list[Figure]:
    """DeepSeek-V3 scale: 58 MoE layers (61 minus 3 dense), 256 experts, top-8.
    Slab sizes do not enter planning, so the store is sparse and small per slab."""
    path = os.path.join(scratch, "plan")
    write_slab_store(path, 58, 256, 64, 32, sparse=True)
    figures = []
    rng = np.random.default_rng(0)
    with open_store(path) as store:
        layers = store.num_layers
        for routing in ("uniform", "skewed"):
            for tokens in (1, 64, 4096):
                pools = [ExpertPool(256, 64) for _ in range(layers)]
                if routing == "skewed":
                    trace = routing_trace(repeat * 4, layers, 256, 8, tokens, seed=1, drift_every=8)
                else:
                    trace = [[rng.integers(0, 256, size=(tokens, 8)) for _ in range(layers)] for _ in range(repeat * 4)]
                per_layer, writes = [], []
                for captured in trace:
                    start = time.perf_counter()
                    plan = plan_refresh(store, pools, captured, 0)
                    per_layer.append((time.perf_counter() - start) / layers * 1e6)
                    assert plan is not None
                    writes.append(len(plan.writes) / layers)
                    plan.commit(pools)
                figures.append(Figure(
                    "plan", f"plan_refresh per layer, {routing} routing, {tokens} token(s) x top-8, 256 experts, "
                    "capacity 64", "us", per_layer, target="< 50 us per layer", met=statistics.median(per_layer) < 50,
                    note=f"{statistics.median(writes):.0f} writes per layer"))
    return figures


def case_convert(scratch: str, size: int, repeat: int) -> list[Figure]:
    source = os.path.join(scratch, "convert_src")
    experts, hidden, ffn = 16, 2048, 1024
    layers = max(1, size // (3 * experts * hidden * ffn * 2))
    if not os.path.exists(source):
        synth_checkpoint(source, "mixtral", layers=layers, experts=experts, hidden=hidden, ffn=ffn,
                         shard_nbytes=1 << 30)
    files = sorted(os.path.join(source, name) for name in os.listdir(source) if name.endswith(".safetensors"))
    nbytes = sum(os.path.getsize(file) for file in files)
    with open_store(source) as store:
        expert_nbytes = sum(layer.nbytes for layer in store.layers)
        slab_nbytes = store.layers[0].gate.slab_nbytes
    ours, rss, cp = [], [], []
    for trial in range(max(2, repeat // 2)):
        dst = os.path.join(scratch, f"convert_dst{trial}")
        code = ("import sys, time; from mmapstore.convert import convert; t = time.perf_counter(); "
                f"convert({source!r}, {dst!r}); print(time.perf_counter() - t); "
                "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        ours.append(expert_nbytes / float(out[0]) / 1e9)
        rss.append(int(out[1]) * 1024 / slab_nbytes)
        shutil.rmtree(dst)
        copy_dst = os.path.join(scratch, f"cp_dst{trial}")
        start = time.perf_counter()
        subprocess.run(["cp", "-r", source, copy_dst], check=True)
        subprocess.run(["sync", "-f", copy_dst], check=False)
        cp.append(nbytes / (time.perf_counter() - start) / 1e9)
        shutil.rmtree(copy_dst)
    return [
        Figure("convert", f"convert mixtral per-expert -> slab store ({expert_nbytes / 2**20:.0f} MiB of experts, "
               "transpose + sha256 + fsync)", "GB/s", ours, "cp -r of the source + sync", cp, higher_is_better=True,
               target=">= 0.8x cp", met=statistics.median(ours) >= 0.8 * statistics.median(cp)),
        Figure("convert", "convert peak RSS (VmHWM, includes the interpreter)", "slabs", rss,
               note=f"slab = {slab_nbytes / 2**20:.0f} MiB; total expert bytes = {expert_nbytes / slab_nbytes:.0f} slabs"),
    ]


# -- driver ---------------------------------------------------------------------------

def _fmt(samples: list[float]) -> str:
    if not samples:
        return ""
    median = statistics.median(samples)
    return f"{median:.3g} [{min(samples):.3g}–{max(samples):.3g}]"


def render(figures: list[Figure]) -> str:
    lines = ["| case | measured | unit | mmapstore median [min–max] | baseline | baseline median [min–max] | "
             "ratio (>1 better) | target | met | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for fig in figures:
        ratio = f"{fig.ratio:.2f}x" if fig.ratio is not None else ""
        met = "" if fig.met is None else ("yes" if fig.met else "**no**")
        lines.append(f"| {fig.case} | {fig.what} | {fig.unit} | {_fmt(fig.ours)} | {fig.baseline_name} | "
                     f"{_fmt(fig.baseline)} | {ratio} | {fig.target} | {met} | {fig.note} |")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    cases = args.cases or list(CASES)
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        print(f"unknown cases {unknown}; choose from {list(CASES)}", file=sys.stderr)
        return 2
    scratch_root = args.dir or tempfile.gettempdir()
    scratch = tempfile.mkdtemp(prefix="mmapstore-bench-", dir=scratch_root)
    figures: list[Figure] = []
    started = time.perf_counter()
    try:
        for case in cases:
            print(f"running {case}...", file=sys.stderr, flush=True)
            if case == "open":
                figures += case_open(scratch, args.repeat)
            elif case == "cold_slab":
                figures += case_cold_slab(scratch, args.size, args.repeat)
            elif case == "warm_refresh":
                figures += case_refresh(scratch, args.size, args.repeat, cold=False)
            elif case == "cold_refresh":
                figures += case_refresh(scratch, args.size, args.repeat, cold=True)
            elif case == "plan":
                figures += case_plan(scratch, args.repeat)
            elif case == "convert":
                figures += case_convert(scratch, args.size, args.repeat)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - started
    header = (f"mmapstore bench: {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
              f"Linux {platform.release()}, data {args.size / 2**30:.1f} GiB, repeat {args.repeat}, {elapsed:.0f} s")
    print(header)
    print()
    print(render(figures))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"header": header, "figures": [asdict(fig) | {"ratio": fig.ratio} for fig in figures]},
                      handle, indent=1)
    if args.plot:
        _plot(figures, args.plot)
    return 0


def _plot(figures: list[Figure], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'mmapstore[plot]'", file=sys.stderr)
        return
    rows = [fig for fig in figures if fig.ratio is not None]
    fig, axis = plt.subplots(figsize=(10, 0.4 * len(rows) + 1))
    axis.barh([f"{row.case}: {row.what[:60]}" for row in rows], [row.ratio for row in rows])
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_xlabel("ratio to baseline (>1 is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)

"""Bench case ``cold_layout``: one cold refresh from the stacked data store
and from its expert-major conversion, in the same run.

Both stores get the same refresh (the same pools and routed ids, so the
same experts are promoted into the same slots) through the default
``ArraySink`` (``read="auto"``, one probed reader), against the best
parallel ``O_DIRECT`` ``preadv`` depth of the same repeat over the stacked
store's ranges.  Each figure says how many read requests a promoted
expert cost and how many bytes storage read per planned byte.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from .._apply import apply
from .._convert import convert
from .._planner import RefreshPlan, geometries_of
from .._sinks import ArraySink
from .._source import MappedSource
from .._store import open_store
from ..io import (
    ColdReader,
    FileRange,
    ReaderConfig,
    ReadHandle,
    ReadRequest,
    ScatterRequest,
    aligned_empty,
    probe_reader_config,
)
from .coldtools import drop_file, pread_pool, storage_read_nbytes
from .data import EXPERTS, data_store, half_refresh
from .figures import Figure
from .registry import Context, case

__all__: list[str] = []

DEPTHS = (2, 4, 8, 16)
BASELINE = "best O_DIRECT preadv depth (4 MiB pieces, stacked ranges) of the same repeat"


class _CountingReader(ColdReader):
    """A :class:`ColdReader` that counts the requests it is given."""

    def __init__(self, config: ReaderConfig) -> None:
        super().__init__(config)
        self.requests = 0

    def submit(self, requests: Iterable[ReadRequest], *, residency: bool = True) -> ReadHandle:
        return super().submit(self._counted(requests), residency=residency)

    def _counted(self, requests: Iterable[ReadRequest]) -> Iterator[ReadRequest]:
        for request in requests:
            self.requests += 1
            yield request

    def submit_scatter(self, requests: Sequence[ScatterRequest]) -> ReadHandle:
        self.requests += len(requests)
        return super().submit_scatter(requests)


@case("cold_layout")
def case_cold_layout(ctx: Context) -> list[Figure]:
    """A refresh from a cold page cache, stacked vs expert-major (see the module docstring)."""
    path, file_path, _ = data_store(ctx.scratch, ctx.size)
    major_path = os.path.join(ctx.scratch, "data-expert-major")
    if not os.path.exists(major_path):
        convert(path, major_path, layout="expert-major", shard_nbytes=1 << 50)
    with open_store(path) as stacked, open_store(major_path) as major:
        plans = {"stacked": half_refresh(stacked), "expert-major": half_refresh(major)}
        sources = {"stacked": stacked.byte_source(), "expert-major": major.byte_source()}
        mappings = {layout: source.mapping(0) for layout, source in sources.items()}
        files = {"stacked": file_path, "expert-major": major.files[0]}
        promoted = len(plans["stacked"].update_new)
        planned = plans["stacked"].nbytes
        assert promoted == len(plans["expert-major"].update_new) and planned == plans["expert-major"].nbytes
        mapped = mappings["stacked"]
        drop_file(file_path, mapped)
        sample = min(32 << 20, mapped.nbytes // (4 * len(DEPTHS))) // (4 << 20) * (4 << 20)
        config = probe_reader_config(
            [FileRange(file_path, 0, mapped.nbytes)], depths=DEPTHS, chunks=(4 << 20,), sample_nbytes=sample
        ).config
        readers = {layout: _CountingReader(config) for layout in plans}
        sinks = {
            layout: ArraySink.for_geometries(geometries_of(store), EXPERTS // 2, reader=readers[layout])
            for layout, store in (("stacked", stacked), ("expert-major", major))
        }
        reads = plans["stacked"].table.reads
        spans = list(zip(reads.offset.tolist(), reads.nbytes.tolist(), strict=True))
        destination = aligned_empty(sum(-(-nbytes // 4096) * 4096 for _, nbytes in spans))
        destination[:] = 0
        methods: dict[str, tuple[str, Callable[[], object]]] = {}
        for layout in plans:
            label = f"{layout}: apply, ArraySink read=auto (qd {config.queue_depth}, {config.chunk_nbytes >> 20} MiB)"
            methods[label] = (layout, _apply(plans[layout], sinks[layout], sources[layout]))
        for depth in DEPTHS:
            methods[f"preadv O_DIRECT, qd {depth}"] = ("stacked", _pool(file_path, spans, destination, depth))
        samples: dict[str, list[float]] = {name: [] for name in methods}
        read_ratio: dict[str, list[float]] = {name: [] for name in methods}
        requests: dict[str, list[int]] = {name: [] for name in methods}
        best: list[float] = []
        names = list(methods)
        for index in range(ctx.repeat):
            order = names[index % len(names) :] + names[: index % len(names)]  # no method always first
            for name in order:
                layout, run = methods[name]
                for other in plans:
                    drop_file(files[other], mappings[other])
                reader = readers[layout]
                before_requests, before_read = reader.requests, storage_read_nbytes()
                start = time.perf_counter()
                run()
                seconds = time.perf_counter() - start
                read_ratio[name].append((storage_read_nbytes() - before_read) / planned)
                requests[name].append(reader.requests - before_requests)
                samples[name].append(planned / seconds / 1e9)
            best.append(max(samples[name][-1] for name in names if "O_DIRECT" in name))
        for layout in plans:
            _check(sinks["stacked"], sinks[layout])
            readers[layout].close()
    figures = []
    for name in names:
        ratios = [ours / base for ours, base in zip(samples[name], best, strict=True)]
        apply_run = "apply" in name
        per_expert = f"read requests per promoted expert {statistics.median(requests[name]) / promoted:.2f}; "
        figures.append(Figure(
            "cold_layout", f"{name}: {planned >> 20} MiB, {promoted} experts", "GB/s", samples[name], BASELINE, best,
            higher_is_better=True,
            note=(per_expert if apply_run else "")
            + f"per-repeat ratio median {statistics.median(ratios):.2f}; storage bytes read per planned byte "
            f"{statistics.median(read_ratio[name]):.3f}",
        ))  # fmt: skip
    return figures


def _apply(plan: RefreshPlan, sink: ArraySink, source: MappedSource) -> Callable[[], object]:
    def run() -> object:
        return apply(plan, sink, source)

    return run


def _pool(
    path: str, spans: list[tuple[int, int]], destination: npt.NDArray[np.uint8], depth: int
) -> Callable[[], None]:
    def run() -> None:
        pread_pool(path, spans, destination, depth, True)

    return run


def _check(reference: ArraySink, other: ArraySink) -> None:
    """Both layouts' refreshes left the same bytes in every slot."""
    for name, values in reference.arrays.items():
        if values.tobytes() != other.arrays[name].tobytes():
            raise AssertionError(f"{name}: the expert-major refresh delivered other bytes than the stacked one")

"""The child of the ``beyond_ram`` bench case (``python -m mmapstore.bench.cold_replay``).

It runs inside a memory cgroup and replays a drifting routing trace over a
slab store larger than the limit, one method per process:

``auto``
    :class:`~mmapstore._service.SlabService` sized by
    :meth:`~mmapstore._service.SlabService.from_budget`, ``read="auto"``,
    ``cache="drop"``: the default sink path with the cold reader.
``map``
    The same service and capacity with ``read="map"`` (copies from the
    mapping after ``MADV_WILLNEED``) and ``cache="keep"``: the path before.
``direct``
    The baseline: the same plans, each plan's merged ranges read with a plain
    pool of ``O_DIRECT`` ``preadv`` threads (4 MiB pieces) into a buffer of
    the pools' size; the library's reader is not involved.

It prints one JSON object: method, GB/s, storage bytes read per planned byte,
capacity and bytes moved.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np

from .._planner import geometries_of, plan_refresh
from .._pool import ExpertPool, RefreshPolicy
from .._service import SlabService
from .._store import ExpertStore, open_store
from .._trace_synth import recency_trace
from ..io import FileRange, ReaderConfig, aligned_empty, probe_reader_config
from .coldtools import pread_pool, storage_read_nbytes

__all__ = ["main", "replay"]

METHODS = ("auto", "map", "direct")


def _probe(store: ExpertStore) -> ReaderConfig:
    """Queue depth and read size from a short probe of the store's own file."""
    mapped = store.mapped_files()[0]
    sample = [FileRange(mapped.path, 0, min(mapped.nbytes, 512 << 20))]
    return probe_reader_config(sample, depths=(2, 4, 8, 16), chunks=(4 << 20,), sample_nbytes=32 << 20).config


def replay(path: str, steps: int, budget_nbytes: int, method: str, depth: int | None = None) -> dict[str, object]:
    """Replay ``steps`` steps of a drifting trace by ``method`` (see the module docstring).

    The capacity is the largest whose buffers fit ``budget_nbytes`` for the
    ``auto`` service; every method uses it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    with open_store(path) as store:
        config = ReaderConfig(queue_depth=depth, chunk_nbytes=4 << 20) if depth else _probe(store)
        capacity = SlabService.capacity_for_budget(store, budget_nbytes, reader=config)
        experts = store.layers[0].num_experts
        trace = recency_trace(steps, store.num_layers, experts, top_k=4, window=2 * capacity, speed=0.5, seed=3)
        captured = [[ids[:, layer] for layer in range(store.num_layers)] for ids in map(trace.step_ids, range(steps))]
        before = storage_read_nbytes()
        start = time.perf_counter()
        if method == "direct":
            planned = _direct(store, capacity, captured, config.queue_depth)
        else:
            policy = RefreshPolicy.every_forward()
            read, cache = ("auto", "drop") if method == "auto" else ("map", "keep")
            with SlabService(store, capacity, policy, read=read, cache=cache, reader=config, load=False) as service:  # type: ignore[arg-type]
                for ids in captured:
                    service.step(ids)
                planned = service.stats.nbytes
        seconds = time.perf_counter() - start
        read_nbytes = storage_read_nbytes() - before
        pool_nbytes = capacity * sum(layer.expert_nbytes for layer in store.layers)
    names = {
        "auto": f"SlabService read=auto cache=drop (qd {config.queue_depth})",
        "map": "SlabService read=map (mmap + WILLNEED, before)",
        "direct": f"O_DIRECT preadv pool, qd {config.queue_depth}, same ranges",
    }
    return {
        "method": names[method],
        "gbps": planned / seconds / 1e9 if seconds > 0 else 0.0,
        "read_per_planned": read_nbytes / planned if planned else 0.0,
        "planned_nbytes": planned,
        "note": f"capacity {capacity}/{experts}, pools {pool_nbytes >> 20} MiB, moved {planned >> 20} MiB "
        f"in {seconds:.1f} s",
    }


def _direct(store: ExpertStore, capacity: int, captured: Sequence[Sequence[object]], depth: int) -> int:
    """The baseline: the same plans, their ranges read by a plain ``O_DIRECT`` thread pool."""
    geometry = geometries_of(store)
    pools = [ExpertPool(layer.num_experts, capacity, RefreshPolicy.every_forward()) for layer in geometry.layers]
    destination = aligned_empty(capacity * sum(layer.expert_nbytes for layer in store.layers) + (64 << 20))
    destination[:] = 0
    planned = 0
    for step, ids in enumerate(captured):
        plan = plan_refresh(geometry, pools, ids, step)
        if plan is None:
            continue
        reads = plan.table.reads
        for file in np.unique(reads.file).tolist():
            chosen = reads.file == file
            spans = list(zip(reads.offset[chosen].tolist(), reads.nbytes[chosen].tolist(), strict=True))
            pread_pool(geometry.files[file], spans, destination, depth, direct=True)
        plan.commit(pools)
        planned += plan.nbytes
    return planned


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmapstore.bench.cold_replay", description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--budget", type=int, required=True, help="bytes the service's buffers may take")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--depth", type=int, default=None, help="queue depth (default: probed)")
    args = parser.parse_args(argv)
    print(json.dumps(replay(args.path, args.steps, args.budget, args.method, args.depth)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

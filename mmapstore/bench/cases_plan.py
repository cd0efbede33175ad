"""Bench cases that compute: planning and the transposing copy kernel (convert: :mod:`.cases_convert`)."""

from __future__ import annotations

import functools
import os
import statistics
import time

import numpy as np

from .._apply import apply
from .._planner import geometries_of, plan_full_push, plan_refresh
from .._pool import ExpertPool
from .._proposals import count_hits_rows
from .._sinks import ArraySink
from .._store import open_store
from .._synth import routing_trace
from .data import BF16, times, write_slab_store
from .figures import Figure
from .registry import Context, case

__all__: list[str] = []

PLAN_TARGET_US = 20.0


@case("plan")
def case_plan(ctx: Context) -> list[Figure]:
    """DeepSeek-V3 scale: 58 MoE layers (61 minus 3 dense), 256 experts, top-8,
    capacity 64.  Slab sizes do not enter planning, so the store is sparse."""
    path = os.path.join(ctx.scratch, "plan")
    write_slab_store(path, 58, 256, 64, 32, sparse=True)
    figures = []
    rng = np.random.default_rng(0)
    with open_store(path) as store:
        geometry = geometries_of(store)
    layers = geometry.num_layers
    labels = geometry.layer_indices
    for routing in ("uniform", "skewed"):
        for tokens in (1, 64, 4096):
            pools = [ExpertPool(256, 64) for _ in range(layers)]
            counted_pools = [ExpertPool(256, 64) for _ in range(layers)]
            steps = ctx.repeat * 8
            if routing == "skewed":
                trace = routing_trace(steps, layers, 256, 8, tokens, seed=1, drift_every=8)
            else:
                trace = [[rng.integers(0, 256, size=(tokens, 8)) for _ in range(layers)] for _ in range(steps)]
            per_layer, from_counts, rows, counting = [], [], [], []
            for captured in trace:
                start = time.perf_counter()
                plan = plan_refresh(geometry, pools, captured, 0)
                per_layer.append((time.perf_counter() - start) / layers * 1e6)
                assert plan is not None
                rows.append(plan.table.rows / layers)
                start = time.perf_counter()
                counts = count_hits_rows(captured, 256, labels)  # what a bincount on the accelerator hands over
                counting.append((time.perf_counter() - start) / layers * 1e6)
                start = time.perf_counter()
                counted = plan_refresh(geometry, counted_pools, counts, 0, counts=True)
                from_counts.append((time.perf_counter() - start) / layers * 1e6)
                assert counted is not None and counted.updates == plan.updates
                plan.commit(pools)
                counted.commit(counted_pools)
            shape = f"{tokens} token(s) x top-8, 256 experts, capacity 64, 58 layers"
            figures.append(Figure(
                "plan", f"plan_refresh per layer from ids, {routing} routing, {shape}", "us", per_layer,
                target=f"<= {PLAN_TARGET_US:.0f} us per layer", met=statistics.median(per_layer) <= PLAN_TARGET_US,
                note=f"{statistics.median(rows):.0f} table rows per layer; counting the ids alone "
                f"{statistics.median(counting):.1f} us per layer",
            ))  # fmt: skip
            figures.append(Figure(
                "plan", f"plan_refresh per layer from per-expert counts (counts=True), {routing} routing, {shape}",
                "us", from_counts, target=f"<= {PLAN_TARGET_US:.0f} us per layer",
                met=statistics.median(from_counts) <= PLAN_TARGET_US, note="the same updates as from the ids",
            ))  # fmt: skip
    return figures


@case("transpose")
def case_transpose(ctx: Context) -> list[Figure]:
    """A ``kn`` sink filled from ``[out, in]`` slabs: the shared transpose
    kernel (what sinks and convert run) against numpy's plain strided copy."""
    path = os.path.join(ctx.scratch, "transpose")
    experts, k, n = 8, 2048, 1024
    if not os.path.exists(path):
        os.makedirs(path)
        from safetensors.numpy import save_file

        values = np.random.default_rng(0).standard_normal((n, k), dtype=np.float32).astype(BF16.numpy)
        tensors = {f"model.layers.0.mlp.experts.{e}.{proj}_proj.weight": (values if proj != "down" else values.T.copy())
                   for e in range(experts) for proj in ("gate", "up", "down")}  # fmt: skip
        save_file(tensors, os.path.join(path, "model.safetensors"))
    figures = []
    with open_store(path) as store:
        plan = plan_full_push(geometries_of(store))
        source = store.byte_source()
        for dtype in (BF16.numpy, np.dtype(np.float32)):
            sink = ArraySink.for_store(store, None, dtype=dtype, orientation="kn")
            apply(plan, sink, source)
            run = functools.partial(apply, plan, sink, source)
            ours = [plan.nbytes / t / 1e9 for t in times(run, ctx.repeat)]

            def plain(sink: ArraySink = sink) -> None:
                for row in range(plan.table.rows):
                    name = plan.table.param_name(row)
                    view = source.view(plan.table, row).swapaxes(-1, -2)
                    np.copyto(sink.arrays[name][int(plan.table.slot[row])][None], view, casting="unsafe")

            baseline = [plan.nbytes / t / 1e9 for t in times(plain, ctx.repeat)]
            label = "bf16" if dtype == BF16.numpy else "bf16 -> f32"
            figures.append(Figure(
                "transpose", f"apply(full push) into a kn ArraySink ({label}), {plan.nbytes / 2**20:.0f} MiB of "
                "[out, in] slabs", "GB/s", ours, "np.copyto of the transposed views", baseline, higher_is_better=True,
                note="kernels.copy_slab: the packed-word transpose that convert --orientation kn runs",
            ))  # fmt: skip
    return figures

"""Replay a synthetic routing trace through :class:`SlabService` and check the sink."""

from __future__ import annotations

from typing import Any

import numpy as np

from .planner import param_name
from .pool import RefreshPolicy
from .service import SlabService
from .sinks import ArraySink, SinkOrientation
from .store import open_store
from .synth import routing_trace

__all__ = ["simulate"]


def simulate(
    path: str,
    *,
    capacity: int = 4,
    steps: int = 8,
    every: int = 2,
    tokens: int = 4,
    top_k: int = 2,
    seed: int = 0,
    dtype: str | None = None,
    orientation: SinkOrientation = "native",
) -> dict[str, Any]:
    """Run ``steps`` forwards; after each refresh compare every resident slot
    with the store's slab, bit for bit (in the sink's dtype and orientation)."""
    with open_store(path) as store:
        experts = store.layers[0].num_experts
        service = SlabService(
            store, capacity, RefreshPolicy.every_n_decode_steps(every), dtype=dtype, orientation=orientation
        )
        trace = routing_trace(steps, store.num_layers, experts, top_k, tokens, seed=seed, drift_every=every * 2)
        events = []
        verified = True
        for captured in trace:
            result = service.step(captured)
            if not result.refreshed:
                continue
            events.append(
                {
                    "step": result.step,
                    "nbytes": result.nbytes,
                    "seconds": result.seconds,
                    "updates": [
                        {"layer": u.layer, "slot": u.slot, "old": u.old_expert, "new": u.new_expert}
                        for u in result.updates
                    ],
                }
            )
            verified = verified and _matches(service)
        stats = service.stats
        return {
            "path": path,
            "layout": store.layout,
            "moe_layers": store.num_layers,
            "experts": experts,
            "capacity": service.pools[0].capacity,
            "events": events,
            "verified": verified,
            "stats": {
                "steps": stats.steps,
                "refreshes": stats.refreshes,
                "promotions": stats.promotions,
                "nbytes": stats.nbytes,
                "seconds": stats.seconds,
            },
        }


def _matches(service: SlabService) -> bool:
    sink = service.sink
    assert isinstance(sink, ArraySink)
    for layer, pool in zip(service.store.layers, service.pools, strict=True):
        for slot, expert in enumerate(pool.resident_experts()):
            for proj, stack in layer.stacks:
                name = param_name(service.names, layer.layer_index, proj)
                buffer = sink.arrays[name]
                source = stack.native(int(expert))
                if name in sink.transpose:
                    source = source.T
                if not np.array_equal(buffer[slot], source.astype(buffer.dtype)):
                    return False
    return True

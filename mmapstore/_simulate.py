"""Replay a synthetic routing trace through :class:`SlabService` and check the sink."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._coldrows import ReadMode
from ._dtypes import parse_user_dtype
from ._errors import OptionError
from ._planner import param_name
from ._pool import RefreshPolicy
from ._service import SlabService
from ._sinks import ArraySink, Sink, SinkOrientation
from ._store import ExpertStore, open_store
from ._synth import routing_trace
from .io import CachePolicy, ReaderConfig

if TYPE_CHECKING:
    from .gpu._sink import TorchSink

__all__ = ["DEVICE_PATTERN", "simulate"]

DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")
"""The torch devices ``simulate`` accepts: ``cpu``, ``cuda``, ``cuda:N``."""


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
    device: str | None = None,
    read: ReadMode = "auto",
    cache: CachePolicy = "keep",
    reader: ReaderConfig | Literal["probe"] | None = "probe",
    budget_nbytes: int | None = None,
) -> dict[str, Any]:
    """Run ``steps`` forwards; after each refresh compare every resident slot
    with the store's slab, bit for bit (in the sink's dtype and orientation).

    ``device`` (``cpu``, ``cuda``, ``cuda:N``) puts the pools in torch tensors
    on that device (:class:`~mmapstore.gpu._sink.TorchSink`); None keeps numpy
    buffers.  ``read``, ``cache`` and ``reader`` are :class:`SlabService`'s
    (numpy pools only); with ``budget_nbytes`` the capacity is the largest
    whose buffers fit (:meth:`SlabService.from_budget`) and ``capacity`` is
    ignored.

    Raises
    ------
    OptionError
        ``device`` is not a device name this command knows.
    TorchUnavailableError
        A device was asked for and torch is not installed.
    SinkError
        The device does not exist or is not available.
    """
    if device is not None and not DEVICE_PATTERN.match(device):
        raise OptionError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    with open_store(path) as store:
        experts = store.layers[0].num_experts
        sink = _torch_sink(device, dtype, orientation) if device is not None else None
        policy = RefreshPolicy.every_n_decode_steps(every)
        options: dict[str, Any] = {"dtype": dtype, "orientation": orientation}
        if sink is None:
            options.update(read=read, cache=cache, reader=reader)
        try:
            if budget_nbytes is not None:
                service = SlabService.from_budget(store, budget_nbytes, policy, sink=sink, **options)
            else:
                service = SlabService(store, capacity, policy, sink, **options)
            with service:
                events, verified = _replay(service, store, steps, every, tokens, top_k, seed)
        finally:
            if sink is not None:
                sink.close()
        stats = service.stats
        return {
            "path": path,
            "layout": store.layout,
            "moe_layers": store.num_layers,
            "experts": experts,
            "capacity": service.pools[0].capacity,
            "device": "numpy" if sink is None else str(sink.device),
            "events": events,
            "verified": verified,
            "stats": {
                "steps": stats.steps,
                "refreshes": stats.refreshes,
                "promotions": stats.promotions,
                "nbytes": stats.nbytes,
                "seconds": stats.seconds,
                "source_nbytes": dict(stats.source_nbytes),
                "device_nbytes": stats.device_nbytes,
            },
        }


def _replay(
    service: SlabService, store: ExpertStore, steps: int, every: int, tokens: int, top_k: int, seed: int
) -> tuple[list[dict[str, Any]], bool]:
    """Step the service through a synthetic trace: the refresh events, and
    whether every resident slot matched the store after each (and the load)."""
    experts = store.layers[0].num_experts
    trace = routing_trace(steps, store.num_layers, experts, top_k, tokens, seed=seed, drift_every=every * 2)
    events = []
    verified = _matches(service)  # the initial load too
    for captured in trace:
        result = service.step(captured)
        if not result.refreshed:
            continue
        events.append(
            {
                "step": result.step,
                "nbytes": result.nbytes,
                "seconds": result.seconds,
                "source_nbytes": dict(result.source_nbytes),
                "updates": [
                    {"layer": u.layer, "slot": u.slot, "old": u.old_expert, "new": u.new_expert} for u in result.updates
                ],
            }
        )
        verified = verified and _matches(service)
    return events, verified


def _torch_sink(device: str, dtype: str | None, orientation: SinkOrientation) -> TorchSink:
    from .gpu._sink import TorchSink

    return TorchSink(device, dtype=None if dtype is None else parse_user_dtype(dtype).numpy, orientation=orientation)


def _matches(service: SlabService) -> bool:
    sink = service.sink
    for layer, pool in zip(service.store.layers, service.pools, strict=True):
        for slot, expert in enumerate(pool.resident_experts()):
            for proj, stack in layer.stacks:
                name = param_name(service.names, layer.layer_index, proj)
                source = stack.native(int(expert))
                if not _slot_matches(sink, name, slot, source):
                    return False
    return True


def _slot_matches(sink: Sink, name: str, slot: int, source: np.ndarray[Any, Any]) -> bool:
    if isinstance(sink, ArraySink):
        buffer = sink.arrays[name]
        if name in sink.transpose:
            source = source.T
        return bool(np.array_equal(buffer[slot], source.astype(buffer.dtype)))
    import torch

    from .gpu._sink import TorchSink
    from .torch import as_tensor

    assert isinstance(sink, TorchSink)
    pool = sink.pools[name]
    expected = as_tensor(source)
    if name in sink.transpose:
        expected = expected.T
    return bool(torch.equal(pool[slot].cpu(), expected.to(pool.dtype)))

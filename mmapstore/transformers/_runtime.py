"""``OffloadedModel``: a transformers model whose routed experts are served from the store."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from .._store import ExpertStore
from .._trace import Phase, Trace, save_trace
from ._capture import TraceRecorder
from ._layer import LayerRuntime, StepState
from ._slots import SlotWriter

__all__ = ["OffloadedModel", "RunStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunStats:
    """Totals over every MoE layer since load (or :meth:`OffloadedModel.reset_stats`).

    A *pair* is one (token, routed expert) of one layer: ``pairs =
    resident_pairs + fetched_pairs + cpu_pairs``.  ``resident_pairs`` found
    their expert in the pool, ``fetched_pairs`` ran on the device after their
    expert was fetched into it (``on_miss="fetch"``), ``cpu_pairs`` ran on
    the CPU from the mapping (``on_miss="cpu"``).  ``chunks`` counts layer
    forwards plus the extra passes of ``chunked_forwards``, the layer
    forwards that routed to more experts than the pool holds.
    ``refreshes`` counts TIDE refreshes (``on_miss="cpu"``) or pool updates
    that copied experts in (``on_miss="fetch"``: one per chunk that fetched).
    ``copied_nbytes`` entered the pools (refreshes and fetches; the initial
    fill is ``initial_nbytes``); ``cpu_read_nbytes`` is the expert bytes the
    CPU path multiplied by (read from the page cache).
    """

    forwards: int
    prefill_forwards: int
    decode_forwards: int
    pairs: int
    resident_pairs: int
    fetched_pairs: int
    cpu_pairs: int
    chunked_forwards: int
    chunks: int
    refreshes: int
    promotions: int
    copied_nbytes: int
    cpu_read_nbytes: int
    initial_nbytes: int
    pool_nbytes: int
    capacities: tuple[int, ...]

    @property
    def hit_rate(self) -> float:
        """Share of pairs whose expert was already in the pool (1.0 when nothing ran)."""
        return self.resident_pairs / self.pairs if self.pairs else 1.0

    def to_json(self) -> dict[str, Any]:
        fields = {name: getattr(self, name) for name in self.__slots__}
        return fields | {"capacities": list(self.capacities), "hit_rate": self.hit_rate}


class OffloadedModel:
    """A loaded model (``.model``, a transformers ``PreTrainedModel``) plus its pools.

    Use ``.model`` as any transformers model (``generate``, ``__call__``).
    Holds the store's mappings: call :meth:`close` or use as a context
    manager.  Made by :func:`~mmapstore.transformers.load_model`.
    """

    def __init__(
        self,
        model: Any,
        store: ExpertStore,
        layers: Sequence[LayerRuntime],
        state: StepState,
        recorder: TraceRecorder | None,
        writer: SlotWriter | None = None,
        *,
        trace_path: str | None,
        initial_nbytes: int,
        non_expert_nbytes: int,
    ) -> None:
        self.model = model
        self.store = store
        self.layers = tuple(layers)
        self.state = state
        self.recorder = recorder
        self.writer = writer
        self.trace_path = trace_path
        self.initial_nbytes = initial_nbytes
        self.non_expert_nbytes = non_expert_nbytes
        self._prefills = 0
        self._decodes = 0
        self._closed = False
        self._hooks = [
            model.register_forward_pre_hook(self._begin_forward, with_kwargs=True),
            model.register_forward_hook(self._end_forward),
        ]

    # -- step boundaries ----------------------------------------------------
    def _begin_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None and args:
            inputs = args[0]
        length = int(inputs.shape[1]) if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else 1
        state = self.state
        state.prefill = length > 1  # a prompt (or a chunk of one): TIDE refreshes on every prefill block
        state.decode_step = 0 if state.prefill else state.decode_step + 1
        state.forward += 1
        if state.prefill:
            self._prefills += 1
        else:
            self._decodes += 1
        if self.recorder is not None:
            self.recorder.begin(Phase.PREFILL if state.prefill else Phase.DECODE)

    def _end_forward(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.recorder is not None:
            self.recorder.end()

    # -- results --------------------------------------------------------------
    def stats(self) -> RunStats:
        """Totals since load or the last :meth:`reset_stats`."""
        counters = [layer.counters for layer in self.layers]
        return RunStats(
            forwards=self._prefills + self._decodes,
            prefill_forwards=self._prefills,
            decode_forwards=self._decodes,
            pairs=sum(c.pairs for c in counters),
            resident_pairs=sum(c.resident_pairs for c in counters),
            fetched_pairs=sum(c.fetched_pairs for c in counters),
            cpu_pairs=sum(c.cpu_pairs for c in counters),
            chunked_forwards=sum(c.chunked_forwards for c in counters),
            chunks=sum(c.chunks for c in counters),
            refreshes=sum(c.refreshes for c in counters),
            promotions=sum(c.promotions for c in counters),
            copied_nbytes=sum(c.copied_nbytes for c in counters),
            cpu_read_nbytes=sum(c.cpu_read_nbytes for c in counters),
            initial_nbytes=self.initial_nbytes,
            pool_nbytes=sum(
                sum(t.numel() * t.element_size() for t in layer.pool_tensors().values()) for layer in self.layers
            ),
            capacities=tuple(layer.pool.capacity for layer in self.layers),
        )

    def reset_stats(self) -> None:
        from ._layer import LayerCounters

        for layer in self.layers:
            layer.counters = LayerCounters()
        self._prefills = self._decodes = 0

    def trace(self) -> Trace:
        """The trace captured so far.

        Raises
        ------
        RuntimeError
            The model was loaded without trace capture.
        """
        if self.recorder is None:
            raise RuntimeError("trace capture is off: load the model with capture_trace=True or a trace_path")
        return self.recorder.trace(source=self.trace_path or "<capture>")

    def save_trace(self, path: str | os.PathLike[str] | None = None) -> str:
        """Write the captured trace (to ``path``, else the ``trace_path`` given at load); return the path."""
        target = os.fspath(path) if path is not None else self.trace_path
        if target is None:
            raise ValueError("no trace path: pass one, or load the model with trace_path")
        save_trace(self.trace(), target)
        return target

    # -- resource -------------------------------------------------------------
    def close(self) -> None:
        """Write the trace to ``trace_path`` (if given), detach the hooks and release the mappings."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.recorder is not None and self.trace_path is not None:
                self.save_trace()
        finally:
            for hook in self._hooks:
                hook.remove()
            for layer in self.layers:
                layer._cpu_weights.clear()  # tensors over the mapping go before it
            if self.writer is not None:
                self.writer.close()  # registered page-cache windows go before the mapping
            self.store.close()

    def __enter__(self) -> OffloadedModel:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        capacities = sorted({layer.pool.capacity for layer in self.layers})
        return (
            f"OffloadedModel({type(self.model).__name__}, moe_layers={len(self.layers)}, "
            f"capacity={capacities}, device={self.layers[0].device if self.layers else None})"
        )

"""Next-layer prefetch: the experts the next MoE layer will likely route to,
copied into its pool while this layer and the next one's attention run.

At each decode step a layer's forward already waits for the router's ids
(the one host sync).  Just before that sync it applies the *next* MoE
layer's router to its own input (the residual stream changes little across
one layer, so the next router ranks nearly the same experts on it: the
"pre-gating" of Pre-gated MoE, MoE-Infinity and AdapMoE), and after its own
experts are queued it hands the predicted experts, most likely first, to one
worker thread.  The worker copies them one by one into the next layer's pool
through a :class:`~mmapstore.transformers._slots.SlotWriter` of its own, on
a CUDA stream of its own, and records an event.  It runs while this layer's
experts, the next layer's attention and that layer's wait for its router's
ids run; right after that wait, the next layer's forward stops the worker
after the expert in progress (a prefetch never holds a forward up by more
than one expert's copy), joins it, and makes its stream wait for the event
before it reads the pool.

A prefetch changes only which experts are resident, never a value: a wrong
prediction costs a copy and the slot of the least recently used expert, and
the next forward fetches what it still misses, as without prefetch.  At most
one prefetch is in flight, and nothing else touches its layer's pool until
it is joined: the layer's previous readers finished before the sync that
started it, and its next reader joins it first.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from ._slots import SlotWriter

if TYPE_CHECKING:
    from ..gpu._jobs import Source
    from ._layer import LayerRuntime

__all__ = ["Prefetcher", "Router", "find_router"]


@dataclass(frozen=True, slots=True)
class Router:
    """A MoE block's router module (``weight [experts, hidden]``, an optional
    ``bias`` and DeepSeek's ``e_score_correction_bias``), read at each use."""

    module: torch.nn.Module

    def predict(self, hidden: torch.Tensor, top_k: int) -> torch.Tensor:
        """``[rows, top_k]`` expert ids this router would rank highest for ``hidden`` (on its device).

        The ranking a router's top-k uses: logits (softmax keeps their
        order), or ``sigmoid(logits) + e_score_correction_bias`` where the
        router has that bias (group limits left out: a prediction only).
        """
        module = self.module
        weight: torch.Tensor = module.weight  # type: ignore[assignment]  # find_router checked it
        bias = getattr(module, "bias", None)
        logits = torch.nn.functional.linear(
            hidden.to(torch.float32),
            weight.to(torch.float32),
            bias.to(torch.float32) if isinstance(bias, torch.Tensor) else None,
        )
        correction = getattr(module, "e_score_correction_bias", None)
        if isinstance(correction, torch.Tensor):
            logits = logits.sigmoid() + correction.to(torch.float32)
        return logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices


def find_router(block: torch.nn.Module, num_experts: int, hidden: int) -> Router | None:
    """The child of a MoE block whose ``weight`` is ``[num_experts, hidden]`` (its router), or None."""
    for _, child in block.named_children():
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (num_experts, hidden):
            return Router(child)
    return None


def ranked(predicted: npt.NDArray[np.int64], limit: int) -> npt.NDArray[np.int64]:
    """The experts of ``predicted`` (``[rows, top_k]``, each row best first), most likely first: by the
    rows that predict them, then by their best place in a row, then by id; at most ``limit``."""
    rows, top_k = predicted.shape
    experts = predicted.reshape(-1)
    places = np.tile(np.arange(top_k), rows)
    votes = np.bincount(experts)
    best = np.full(votes.size, top_k, dtype=np.int64)
    np.minimum.at(best, experts, places)
    hot = np.flatnonzero(votes)
    order = np.lexsort((hot, best[hot], -votes[hot]))
    return hot[order[:limit]].astype(np.int64)


class Prefetcher:
    """One worker thread that copies predicted experts into the next layer's pool.

    Parameters
    ----------
    device
        Where the pools live; on CUDA the copies run on a stream of their own.
    source
        How its :class:`SlotWriter` moves bytes (as ``load_model``'s ``source``).
    """

    def __init__(self, device: torch.device, source: Source = "auto") -> None:
        self.device = device
        self.writer = SlotWriter(device, source)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmapstore-prefetch")
        self._pending: Future[None] | None = None
        self._event: torch.cuda.Event | None = None
        self._cancel = threading.Event()

    def submit(self, layer: LayerRuntime, experts: npt.NDArray[np.int64]) -> None:
        """Start copying ``experts`` into ``layer``'s pool (after joining the prefetch in flight)."""
        self.wait()
        self._cancel.clear()
        event = torch.cuda.Event() if self._stream is not None else None  # type: ignore[no-untyped-call]
        cancelled = self._cancel.is_set

        def run() -> None:
            stream = self._stream
            if stream is None:
                layer.prefetch(experts, self.writer, cancelled)
                return
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                try:
                    layer.prefetch(experts, self.writer, cancelled)
                finally:
                    assert event is not None
                    event.record(stream)

        self._event = event
        self._pending = self._worker.submit(run)

    def wait(self) -> None:
        """Stop the prefetch in flight after the expert it is copying, join it (raising what it
        raised); later work on the current stream waits for its copies."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self._cancel.set()
        pending.result()
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
            self._event = None

    def close(self) -> None:
        """Join the prefetch in flight (its error, if any, is dropped: the model is closing), stop the worker."""
        with contextlib.suppress(Exception):
            self.wait()
        self._worker.shutdown(wait=True)
        self.writer.close()

"""Next-layer prefetch: the experts the next MoE layer will likely route to,
copied into its pool while the GPU still runs the work queued before them.

At each decode step a layer's forward waits for its router's ids (the one
host sync per layer).  Just before that sync it also queues the *next* MoE
layer's router on its own input (the residual stream changes little across
one layer, so the next router ranks nearly the same experts on it: the
"pre-gating" of Pre-gated MoE, MoE-Infinity and AdapMoE) and, after the
sync, hands the predicted experts, most likely first, to the next layer.

The next layer's forward starts by copying those of them that are not
resident into its pool, on a CUDA stream of its own, *before* its own sync:
the host reads and stages their bytes while the GPU still runs that layer's
attention and router, and the device copies (and ggml decoding) run beside
them.  After the sync, the layer's stream waits for the prefetch's event
before anything reads or rewrites the pool, then fetches what it still
misses, as without prefetch.

Everything runs on the calling thread (a worker thread was measured slower:
it holds the interpreter lock while the main thread needs it to launch
kernels).  A prefetch changes only which experts are resident, never a
value.  A wrong prediction costs a copy and the slot of the least recently
used expert, more than a right one saves; so a layer acts on predictions
only once the experts its last 16 named and it did not hold were routed to
often enough (:data:`DEFAULT_PRECISION`), and keeps predicting, and
measuring, either way.  The pool's previous
readers finished before the sync that produced the prediction, and its next
readers are queued after the event.  On the CPU there is nothing to
overlap: the copies simply happen earlier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

if TYPE_CHECKING:
    from ._layer import LayerRuntime

__all__ = ["DEFAULT_PRECISION", "PRECISION_WINDOW", "Prefetcher", "Router", "find_router"]

# A layer prefetches once, over its last PRECISION_WINDOW predictions that named experts it did not hold, at least
# this share of those experts were routed to.  Measured on an H200 (tools/bench_prefetch.py): a right prediction saved
# about 0.4 ms, a wrong one cost about 3.6 ms (its copy, and the resident expert it pushed out): break-even
# near 90%.
DEFAULT_PRECISION = 0.9
PRECISION_WINDOW = 16


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
    """The stream a model's prefetches run on (CUDA), the event the next reader waits for, and the
    precision a layer's predictions must have shown before they are acted on (0: always)."""

    def __init__(self, device: torch.device, precision: float = DEFAULT_PRECISION) -> None:
        self.device = device
        self.precision = precision
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]
        self._event: torch.cuda.Event | None = None

    def trusts(self, record: Sequence[tuple[int, int]]) -> bool:
        """Whether predictions with this ``(routed, predicted)`` record are worth copying."""
        if self.precision <= 0:
            return True
        if len(record) < PRECISION_WINDOW:
            return False
        return sum(routed for routed, _ in record) >= self.precision * sum(predicted for _, predicted in record)

    def run(self, layer: LayerRuntime, experts: npt.NDArray[np.int64]) -> None:
        """Copy ``experts`` into ``layer``'s pool, on the prefetch stream beside the work queued so far."""
        stream = self._stream
        if stream is None:
            layer.prefetch(experts)
            return
        # No wait for the current stream: nothing queued on it since the sync that made the prediction
        # reads this pool (its last readers, the previous step's, finished before that sync).
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        try:
            with torch.cuda.stream(stream):
                layer.prefetch(experts)
        finally:
            event.record(stream)
            self._event = event

    def wait(self) -> None:
        """Later work on the current stream waits for the last prefetch's copies."""
        event, self._event = self._event, None
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

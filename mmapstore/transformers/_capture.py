"""Trace capture: every MoE layer's Top-K ids at every forward, as a :class:`~mmapstore._trace.Trace`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .._errors import CapturedIdsError
from .._trace import Phase, Trace

__all__ = ["TraceRecorder"]


class TraceRecorder:
    """Collects ``[tokens, layers, top_k]`` ids per step, prefill and decode marked.

    A step is one forward of the model: :meth:`begin` opens it, each MoE
    layer's experts call :meth:`record`, :meth:`end` keeps it when every
    layer reported (a forward that raised half-way is dropped).
    """

    def __init__(self, layer_indices: Sequence[int], top_k: int) -> None:
        self.layer_indices = tuple(layer_indices)
        self.top_k = top_k
        self._steps: list[npt.NDArray[np.int32]] = []
        self._phases: list[int] = []
        self._open: npt.NDArray[np.int32] | None = None
        self._seen: set[int] = set()
        self._phase = Phase.DECODE

    def begin(self, phase: Phase) -> None:
        self._open, self._seen, self._phase = None, set(), phase

    def record(self, position: int, ids: npt.NDArray[np.int64]) -> None:
        """Layer ``position`` (its place among the MoE layers) routed ``ids [tokens, top_k]``."""
        if ids.ndim != 2 or ids.shape[1] != self.top_k:
            raise CapturedIdsError(
                f"MoE layer {self.layer_indices[position]}: ids of shape {ids.shape}, expected [tokens, {self.top_k}]"
            )
        if self._open is None:
            self._open = np.full((ids.shape[0], len(self.layer_indices), self.top_k), -1, dtype=np.int32)
        elif self._open.shape[0] != ids.shape[0]:
            raise CapturedIdsError(
                f"MoE layer {self.layer_indices[position]}: {ids.shape[0]} tokens in a step "
                f"whose first layer routed {self._open.shape[0]}"
            )
        self._open[:, position] = ids
        self._seen.add(position)

    def end(self) -> None:
        if self._open is not None and len(self._seen) == len(self.layer_indices):
            self._steps.append(self._open)
            self._phases.append(int(self._phase))
        self._open, self._seen = None, set()

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def trace(self, source: str = "<capture>") -> Trace:
        """The steps kept so far as a validated trace."""
        layers = len(self.layer_indices)
        ids = np.concatenate(self._steps) if self._steps else np.zeros((0, layers, self.top_k), dtype=np.int32)
        offsets = np.zeros(len(self._steps) + 1, dtype=np.int64)
        np.cumsum([step.shape[0] for step in self._steps], out=offsets[1:])
        return Trace.build(
            ids,
            offsets,
            phase=np.asarray(self._phases, dtype=np.int8),
            layer_indices=self.layer_indices,
            source=source,
        )

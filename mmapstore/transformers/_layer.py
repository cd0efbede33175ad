"""One MoE layer at run time: its pool tensors on the device, its slot map, its forward."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from .._errors import StaleRefreshError
from .._pool import ExecMode, ExpertPool, count_hits
from .._store import ExpertStack, LayerExperts
from ._fetch import FetchChunk, plan_fetch
from ._hf import grouped_linear
from ._slots import SlotWriter
from ._torch import as_tensor

__all__ = ["ExpertsLayout", "LayerCounters", "LayerRuntime", "OnMiss", "StepState"]


class OnMiss(enum.Enum):
    """What a token routed to a non-resident expert does.

    ``CPU``: computed on the CPU straight from the mapped slabs (TIDE's
    non-refresh path; the pool changes only on refresh steps).  ``FETCH``:
    the expert is copied into the pool first (least recently used resident
    leaves), as LRU expert caches do; a forward that routes to more experts
    than the pool holds runs in chunks of at most ``capacity`` experts
    (:mod:`~mmapstore.transformers._fetch`), so every pair runs on the device.
    """

    CPU = "cpu"
    FETCH = "fetch"


@dataclass(frozen=True, slots=True)
class ExpertsLayout:
    """How an experts module holds its weights (transformers' conventions).

    Not ``transposed``: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``
    (``nn.Linear`` rows).  ``transposed``: ``[E, H, 2I]`` and ``[E, I, H]``.
    ``concatenated``: gate then up along the ``2I`` axis; else interleaved
    (gate, up, gate, up...).  ``has_bias``: ``gate_up_proj_bias [E, 2I]`` and
    ``down_proj_bias [E, H]``.
    """

    num_experts: int
    hidden: int
    intermediate: int
    transposed: bool
    concatenated: bool
    has_bias: bool

    def gate_up_shape(self, count: int) -> tuple[int, int, int]:
        two = 2 * self.intermediate
        return (count, self.hidden, two) if self.transposed else (count, two, self.hidden)

    def down_shape(self, count: int) -> tuple[int, int, int]:
        return (count, self.intermediate, self.hidden) if self.transposed else (count, self.hidden, self.intermediate)

    def expert_nbytes(self, itemsize: int) -> int:
        """Bytes one expert takes in a pool of ``itemsize``-byte elements."""
        biases = 2 * self.intermediate + self.hidden if self.has_bias else 0
        return (3 * self.hidden * self.intermediate + biases) * itemsize

    def halves(self, fused: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up parts of a fused tensor, split along ``axis``."""
        if self.concatenated:
            return fused.narrow(axis, 0, self.intermediate), fused.narrow(axis, self.intermediate, self.intermediate)
        index = [slice(None)] * fused.dim()
        index[axis] = slice(0, None, 2)
        gate = fused[tuple(index)]
        index[axis] = slice(1, None, 2)
        return gate, fused[tuple(index)]

    def fuse(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``[rows, 2I]`` from ``[rows, I]`` gate and up outputs, in this layout."""
        if self.concatenated:
            return torch.cat((gate, up), dim=-1)
        return torch.stack((gate, up), dim=-1).flatten(-2)


@dataclass(slots=True)
class StepState:
    """What the model-level hook knows about the forward in flight."""

    prefill: bool = True
    decode_step: int = 0
    forward: int = 0


@dataclass(slots=True)
class LayerCounters:
    """Per-layer running totals (see :class:`~mmapstore.transformers.RunStats`)."""

    pairs: int = 0
    resident_pairs: int = 0
    fetched_pairs: int = 0
    cpu_pairs: int = 0
    chunked_forwards: int = 0
    chunks: int = 0
    refreshes: int = 0
    promotions: int = 0
    copied_nbytes: int = 0
    cpu_read_nbytes: int = 0


Recorder = Callable[[int, npt.NDArray[np.int64]], None]
# gate, up, down as [k, n] tensors over the mapping, then their biases (or None)
_Weights = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None
]


@dataclass(frozen=True, slots=True)
class _Routed:
    """One forward's pairs: ``experts[p]`` is pair ``p``'s expert (pair ``p`` is token ``p // top_k``);
    ``rank[p]`` its place in the stock backend's sort by expert."""

    experts: npt.NDArray[np.int64]
    rank: npt.NDArray[np.int64]
    top_k: int


class LayerRuntime:
    """Pool tensors, slot map and forward of one MoE layer.

    ``gate_up``/``down`` (and biases) hold ``pool.capacity`` experts on the
    device in the module's own layout; ``slot_map[e]`` is expert ``e``'s slot
    or -1.  A forward sends resident (token, expert) pairs through a grouped
    matmul over the pool and the others through the CPU from the mapped slabs
    (``OnMiss.CPU``) or through the pool after fetching them, in chunks when
    they outnumber the slots (``OnMiss.FETCH``); then it weighs and sums every
    pair's output exactly as transformers' backends do.
    """

    def __init__(
        self,
        position: int,
        experts: LayerExperts,
        module: torch.nn.Module,
        layout: ExpertsLayout,
        pool: ExpertPool,
        *,
        device: torch.device,
        dtype: torch.dtype,
        on_miss: OnMiss,
        state: StepState,
        recorder: Recorder | None,
        writer: SlotWriter | None = None,
    ) -> None:
        self.position = position
        self.experts = experts
        self.module = module
        self.layout = layout
        self.pool = pool
        self.device = device
        self.dtype = dtype
        self.on_miss = on_miss
        self.state = state
        self.recorder = recorder
        self.writer = writer if writer is not None else SlotWriter(device, "direct")
        self.counters = LayerCounters()
        capacity = pool.capacity
        self.gate_up = torch.empty(layout.gate_up_shape(capacity), dtype=dtype, device=device)
        self.down = torch.empty(layout.down_shape(capacity), dtype=dtype, device=device)
        self.gate_up_bias: torch.Tensor | None = None
        self.down_bias: torch.Tensor | None = None
        if layout.has_bias:
            self.gate_up_bias = torch.empty((capacity, 2 * layout.intermediate), dtype=dtype, device=device)
            self.down_bias = torch.empty((capacity, layout.hidden), dtype=dtype, device=device)
        self.slot_map = np.full(layout.num_experts, -1, dtype=np.int64)
        self._last_used = np.zeros(layout.num_experts, dtype=np.int64)
        self._cpu_weights: dict[int, _Weights] = {}
        self._broken: str | None = None  # a fill failed part-way: the slots cannot be trusted

    # -- pool contents ---------------------------------------------------
    def pool_tensors(self) -> dict[str, torch.Tensor]:
        """The device tensors that stand in for the module's expert parameters."""
        tensors = {"gate_up_proj": self.gate_up, "down_proj": self.down}
        if self.gate_up_bias is not None and self.down_bias is not None:
            tensors |= {"gate_up_proj_bias": self.gate_up_bias, "down_proj_bias": self.down_bias}
        return tensors

    def fill_initial(self) -> int:
        """Copy the pool's initial residents (experts ``0..capacity-1``) in; return bytes copied."""
        experts = self.pool.resident_experts()
        slots = np.arange(experts.size)
        copied = self._fill(experts, slots)
        self.slot_map[:] = -1
        self.slot_map[experts] = slots
        return copied

    def _fill(self, experts: npt.NDArray[np.int64], slots: npt.NDArray[np.int64]) -> int:
        """Copy ``experts[i]`` into ``slots[i]`` (every part), in stream order; return bytes written."""
        layout, writer, copied = self.layout, self.writer, 0
        gate, up, down = self.experts.gate, self.experts.up, self.experts.down
        fused_axis = 1 if layout.transposed else 0  # the 2I axis of one slot
        orientation = "kn" if layout.transposed else "nk"
        for expert, slot in zip(experts.tolist(), slots.tolist(), strict=True):
            gate_dst, up_dst = layout.halves(self.gate_up[slot], fused_axis)
            copied += writer.slab(gate_dst, gate, "weight", expert, orientation)
            copied += writer.slab(up_dst, up, "weight", expert, orientation)
            copied += writer.slab(self.down[slot], down, "weight", expert, orientation)
            if self.gate_up_bias is not None and self.down_bias is not None:
                gate_bias, up_bias = layout.halves(self.gate_up_bias[slot], 0)
                copied += writer.slab(gate_bias, gate, "bias", expert, orientation)
                copied += writer.slab(up_bias, up, "bias", expert, orientation)
                copied += writer.slab(self.down_bias[slot], down, "bias", expert, orientation)
        writer.flush()
        return copied

    def _bring_in(self, target: npt.NDArray[np.int64], heat: npt.NDArray[np.int64]) -> int:
        """Make ``target`` resident (the coldest by ``heat`` leave), commit the pool; return the experts copied.

        A fill that fails part-way (a read error, a file cut short) leaves
        slots of demoted experts partly overwritten while the pool still
        lists them: the layer refuses every later forward
        (:class:`StaleRefreshError`) rather than serve those bytes.
        """
        pool = self.pool
        result = pool.propose(target, heat)
        if not result.promoted:
            return 0
        promoted = np.asarray(result.promoted, dtype=np.int64)
        slots = np.asarray(result.slots, dtype=np.int64)
        try:
            self.counters.copied_nbytes += self._fill(promoted, slots)
        except BaseException as exc:
            self._broken = f"{type(exc).__name__}: {exc}"
            raise
        pool.commit(result)  # after the copies are queued: kernels queued later see the new experts
        self.slot_map[np.asarray(result.demoted, dtype=np.int64)] = -1
        self.slot_map[promoted] = slots
        self.counters.promotions += promoted.size
        return int(promoted.size)

    def _refresh(self, hits: npt.NDArray[np.int64]) -> None:
        """TIDE's refresh (``OnMiss.CPU``), when the policy says one is due."""
        if self.pool.should_refresh(ExecMode.REUSE, self.state.decode_step, self.state.prefill):
            self._bring_in(self.pool.select_target(hits), hits)
            self.counters.refreshes += 1

    # -- forward ----------------------------------------------------------
    def forward(
        self,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *,
        router_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The routed experts' output for ``hidden [tokens, H]``, like transformers' backends.

        ``router_ids``: the router's ``[tokens, top_k]`` ids, where ``hidden`` holds
        one row per pair (``top_k_index [tokens * top_k, 1]``: Llama-4 scales
        each pair's input); the trace records those.
        """
        num_tokens, top_k = top_k_index.shape
        if self._broken is not None:
            raise StaleRefreshError(
                f"MoE layer {self.experts.layer_index}: an earlier copy into its pool failed part-way "
                f"({self._broken}); its slots may hold partial experts: load the model again"
            )
        # The stock backend's sort of the pairs by expert, on the same device: within an expert's group, pairs run
        # in its order (a CPU kernel's result for a row can depend on the row's place in the group).
        _, stock_order = torch.sort(top_k_index.reshape(-1))
        ids = top_k_index.detach().to("cpu", torch.int64).numpy()  # the one sync: placement is decided on the host
        flat = ids.reshape(-1)
        rank = np.empty(flat.size, dtype=np.int64)
        rank[stock_order.to("cpu").numpy()] = np.arange(flat.size)
        hits = count_hits(flat, self.layout.num_experts)
        if self.recorder is not None:
            recorded = ids if router_ids is None else router_ids.detach().to("cpu", torch.int64).numpy()
            self.recorder(self.position, recorded)
        self._last_used[hits > 0] = self.state.forward
        self.counters.pairs += flat.size
        # Every pair's expert output lands in its row of `out`; the weighted sum over top-k runs once at the end,
        # as in transformers' grouped_mm and batched_mm backends.
        out = torch.empty((flat.size, self.layout.hidden), dtype=self.dtype, device=hidden.device)
        routed = _Routed(flat, rank, top_k)
        if self.on_miss is OnMiss.FETCH and self.pool.offload:
            self._forward_fetch(hidden, routed, hits, out)
        else:
            if self.pool.offload:
                self._refresh(hits)
            self._forward_cpu_on_miss(hidden, routed, out)
        weighted = out * top_k_weights.reshape(-1).unsqueeze(-1)
        return weighted.view(num_tokens, top_k, self.layout.hidden).sum(dim=1).to(hidden.dtype)

    def _forward_fetch(
        self, hidden: torch.Tensor, routed: _Routed, hits: npt.NDArray[np.int64], out: torch.Tensor
    ) -> None:
        """Every pair on the device: fetch what is missing, chunk by chunk (see :func:`plan_fetch`)."""
        counters, pool, flat = self.counters, self.pool, routed.experts
        was_resident = self.slot_map >= 0
        counters.resident_pairs += int(np.count_nonzero(was_resident[flat]))
        counters.fetched_pairs += int(np.count_nonzero(~was_resident[flat]))
        chunks = plan_fetch(hits, was_resident, pool.select_target(hits))
        if len(chunks) > 1:
            counters.chunked_forwards += 1
        counters.chunks += len(chunks)
        in_chunk = np.zeros(self.layout.num_experts, dtype=bool)
        for chunk in chunks:
            if self._bring_in(chunk.experts, self._heat(chunk)):
                counters.refreshes += 1
            in_chunk[:] = False
            in_chunk[chunk.experts] = True
            pairs = np.flatnonzero(in_chunk[flat])
            if pairs.size:
                self._run_on_device(hidden, routed, pairs, out)

    def _heat(self, chunk: FetchChunk) -> npt.NDArray[np.int64]:
        """Least recently used leave first; a chunk's protected experts never do."""
        if not chunk.protected.size:
            return self._last_used
        heat: npt.NDArray[np.int64] = self._last_used.copy()
        heat[chunk.protected] = int(heat.max()) + 1
        return heat

    def _forward_cpu_on_miss(self, hidden: torch.Tensor, routed: _Routed, out: torch.Tensor) -> None:
        """Resident pairs through the pool, the others on the CPU from the mapped slabs."""
        flat, top_k = routed.experts, routed.top_k
        slots = self.slot_map[flat]
        resident = np.flatnonzero(slots >= 0)
        missing = np.flatnonzero(slots < 0)
        self.counters.resident_pairs += resident.size
        self.counters.cpu_pairs += missing.size
        cpu_rows = None
        if missing.size:  # bring the rows over first, so the device works while the CPU computes
            cpu_tokens, cpu_rows = np.unique(missing // top_k, return_inverse=True)
            cpu_hidden = hidden[torch.from_numpy(cpu_tokens).to(hidden.device)].to("cpu")
        if resident.size:
            self._run_on_device(hidden, routed, resident, out)
        if missing.size and cpu_rows is not None:
            cpu_out = self._cpu_experts(cpu_hidden, cpu_rows, flat[missing])
            out[torch.from_numpy(missing).to(hidden.device)] = cpu_out.to(hidden.device)

    def _run_on_device(
        self, hidden: torch.Tensor, routed: _Routed, pairs: npt.NDArray[np.intp], out: torch.Tensor
    ) -> None:
        """Rows ``pairs`` of ``out`` (their experts resident) from the pool, grouped by slot in the stock order."""
        slots = self.slot_map[routed.experts[pairs]]
        order = np.lexsort((routed.rank[pairs], slots))
        pairs = pairs[order]
        pair_index = torch.from_numpy(pairs).to(hidden.device)
        rows = routed.rank[pairs]
        in_place = rows.size == routed.experts.size and bool((rows == np.arange(rows.size)).all())
        stock_rows = None if in_place else torch.from_numpy(rows).to(hidden.device)
        out[pair_index] = self._device_experts(
            hidden[pair_index // routed.top_k], slots[order], stock_rows, routed.experts.size
        )

    def _device_experts(
        self, inputs: torch.Tensor, slots: npt.NDArray[np.int64], stock_rows: torch.Tensor | None, total: int
    ) -> torch.Tensor:
        """Pairs sorted by slot through the pool: grouped matmuls, gate, down.

        The gate runs over a ``[total, 2I]`` buffer with each pair at its
        row in the stock backend (``stock_rows``, None when every pair is
        there already): a vectorized CPU kernel
        can round an element differently in its scalar tail, so each
        element keeps the place it has in the stock model.
        """
        module: Any = self.module
        per_slot = np.bincount(slots, minlength=self.pool.capacity)
        offsets = torch.from_numpy(np.cumsum(per_slot).astype(np.int32)).to(inputs.device)
        slot_index = torch.from_numpy(slots).to(inputs.device) if self.gate_up_bias is not None else None
        transposed = self.layout.transposed
        bias = self.gate_up_bias[slot_index] if self.gate_up_bias is not None and slot_index is not None else None
        projected = grouped_linear(inputs, self.gate_up, offsets, bias, transposed)
        if stock_rows is not None:
            placed = projected.new_zeros((total, projected.shape[1]))
            placed[stock_rows] = projected
            projected = placed
        gated: torch.Tensor = module._apply_gate(projected)
        if stock_rows is not None:
            gated = gated[stock_rows]
        bias = self.down_bias[slot_index] if self.down_bias is not None and slot_index is not None else None
        return grouped_linear(gated, self.down, offsets, bias, transposed)

    def _cpu_experts(
        self, hidden: torch.Tensor, rows: npt.NDArray[np.intp], experts: npt.NDArray[np.int64]
    ) -> torch.Tensor:
        """Pairs whose expert is not resident, on the CPU from the mapped slabs.

        ``rows[i]`` is pair ``i``'s row of ``hidden``; ``experts[i]`` its expert.
        """
        module: Any = self.module
        out = torch.empty((experts.size, self.layout.hidden), dtype=self.dtype)
        order = np.argsort(experts, kind="stable")
        bounds = np.flatnonzero(np.diff(experts[order])) + 1
        for group in np.split(order, bounds):
            expert = int(experts[group[0]])
            gate, up, down, gate_bias, up_bias, down_bias = self._weights(expert)
            inputs = hidden[torch.from_numpy(rows[group])].to(self.dtype)
            gate_out, up_out = inputs @ gate.to(self.dtype), inputs @ up.to(self.dtype)
            if gate_bias is not None and up_bias is not None:
                gate_out, up_out = gate_out + gate_bias.to(self.dtype), up_out + up_bias.to(self.dtype)
            projected = self.layout.fuse(gate_out, up_out)
            result = module._apply_gate(projected) @ down.to(self.dtype)
            if down_bias is not None:
                result = result + down_bias.to(self.dtype)
            out[torch.from_numpy(group)] = result
            self.counters.cpu_read_nbytes += self.experts.expert_nbytes
        return out

    def _weights(self, expert: int) -> _Weights:
        """Expert ``expert``'s ``[k, n]`` weights and biases as tensors over the
        mapping (cached), or dequantized copies for quantized experts (not cached)."""
        if any(stack.encoding.encoded for stack in (self.experts.gate, self.experts.up, self.experts.down)):
            return self._dequantized_weights(expert)
        cached = self._cpu_weights.get(expert)
        if cached is None:
            gate, up, down = self.experts.gate, self.experts.up, self.experts.down
            gate_bias: torch.Tensor | None = None
            up_bias: torch.Tensor | None = None
            down_bias: torch.Tensor | None = None
            if self.layout.has_bias:
                gate_bias, up_bias, down_bias = (as_tensor(stack.part("bias", expert)) for stack in (gate, up, down))
            cached = (
                as_tensor(gate.expert(expert)),
                as_tensor(up.expert(expert)),
                as_tensor(down.expert(expert)),
                gate_bias,
                up_bias,
                down_bias,
            )
            self._cpu_weights[expert] = cached
        return cached

    def _dequantized_weights(self, expert: int) -> _Weights:
        """A quantized expert's ``[k, n]`` values (float32 copies, by the store's
        reference formulas) and its biases over the mapping."""
        gate, up, down = self.experts.gate, self.experts.up, self.experts.down

        def bias(stack: ExpertStack) -> torch.Tensor | None:
            return as_tensor(stack.part("bias", expert)) if self.layout.has_bias else None

        def values(stack: ExpertStack) -> torch.Tensor:
            return torch.from_numpy(stack.dequantize(expert, np.float32))

        return values(gate), values(up), values(down), bias(gate), bias(up), bias(down)

"""``ExpertStore`` and ``open_store``: every MoE layer of a checkpoint as views."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import FormatError, LayerNotFoundError, StoreClosedError, TensorNotFoundError
from ..formats import Checkpoint, TensorRecord, read_checkpoint
from ..mapping import FileMaps
from .layouts import LayerPlan, discover
from .stack import ExpertStack, LayerExperts

__all__ = ["ExpertStore", "open_store"]

log = logging.getLogger(__name__)


class ExpertStore:
    """All MoE layers of one checkpoint, served from read-only memory maps.

    Opening reads headers only.  Use as a context manager, or call
    :meth:`close`; views handed out stay valid after ``close()`` (the mapping
    is released with the last view) but no new view can be made.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.path = checkpoint.path
        sizes: dict[str, int] = {}
        for record in checkpoint.tensors.values():
            sizes[record.path] = max(sizes.get(record.path, 0), record.offset + record.nbytes)
        self._maps = FileMaps(sizes)
        self.layout, plans = discover(checkpoint.tensors, checkpoint.config, source=checkpoint.path)
        orientation = "kn"
        if checkpoint.manifest is not None:
            orientation = str(checkpoint.manifest.get("orientation", "kn"))
        try:
            self.layers: list[LayerExperts] = [self._build(plan, orientation) for plan in plans]
        except BaseException:
            self._maps.close()
            raise
        self._by_index = {layer.layer_index: layer for layer in self.layers}

    # -- public surface -------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Number of MoE layers (dense layers are not counted)."""
        return len(self.layers)

    @property
    def layer_indices(self) -> list[int]:
        return [layer.layer_index for layer in self.layers]

    @property
    def kind(self) -> str:
        """How the checkpoint is stored: slab_store, sharded, safetensors_dir, safetensors_file."""
        return self.checkpoint.kind

    @property
    def config(self) -> dict[str, Any] | None:
        return self.checkpoint.config

    @property
    def tensors(self) -> Mapping[str, TensorRecord]:
        return self.checkpoint.tensors

    @property
    def files(self) -> tuple[str, ...]:
        return self.checkpoint.files

    @property
    def closed(self) -> bool:
        return self._maps.closed

    def layer(self, layer_index: int) -> LayerExperts:
        """The experts of model layer ``layer_index`` (its index in the model, not in ``layers``)."""
        found = self._by_index.get(layer_index) if isinstance(layer_index, int) else None
        if found is None:
            raise LayerNotFoundError(
                f"{self.path}: model layer {layer_index!r} has no MoE experts; MoE layers are {self.layer_indices}"
            )
        return found

    def view(self, name: str) -> npt.NDArray[np.generic]:
        """Read-only view of any tensor of the checkpoint, by its file name."""
        record = self.checkpoint.tensors.get(name)
        if record is None:
            raise TensorNotFoundError(f"{self.path}: no tensor named {name!r}")
        if not record.dtype.known:
            raise FormatError(f"{record.path}: tensor {name!r}: dtype {record.dtype.code!r} has no numpy equivalent")
        return self._maps.get(record.path).record_view(record)

    def check_open(self) -> None:
        if self._maps.closed:
            raise StoreClosedError(f"{self.path}: the store is closed")

    def mapped_files(self) -> list[Any]:
        """The files mapped so far (each once)."""
        return self._maps.mapped()

    def close(self) -> None:
        """Release the mappings.  The store's own views go first, so a mapping is
        unmapped now unless the caller still holds views of it (then it goes
        with the last of them)."""
        for layer in self.layers:
            for _, stack in layer.stacks:
                stack.release()
            layer.companions.clear()
        self._maps.close()

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ExpertStore({self.path!r}, layout={self.layout}, moe_layers={self.num_layers})"

    # -- building -------------------------------------------------------
    def _stacked_view(self, record: TensorRecord) -> npt.NDArray[np.generic]:
        return self._maps.get(record.path).record_view(record)

    def _build(self, plan: LayerPlan, orientation: str) -> LayerExperts:
        layer = plan.layer_index
        if plan.layout == "per_expert":
            stacks = {}
            for proj, records in plan.experts.items():
                n, k = records[0].shape
                stacks[proj] = ExpertStack(
                    f"layers.{layer}.{proj}", k, n, records[0].dtype.numpy, "nk",
                    tuple(record.name for record in records), maps=self._maps, records=records,
                )
            result = LayerExperts(layer, stacks["gate"], stacks["up"], stacks["down"])
        elif plan.layout == "slab":
            stacks = {}
            for proj, record in plan.stacked.items():
                _, first, second = record.shape
                k, n = (first, second) if orientation == "kn" else (second, first)
                stacks[proj] = ExpertStack(
                    f"layers.{layer}.{proj}", k, n, record.dtype.numpy, orientation, (record.name,),
                    maps=self._maps, stacked=self._stacked_view(record), stacked_path=record.path,
                )
            result = LayerExperts(layer, stacks["gate"], stacks["up"], stacks["down"])
        else:
            result = self._build_fused(plan)
        self._check_shapes(result, plan)
        return result

    def _build_fused(self, plan: LayerPlan) -> LayerExperts:
        layer = plan.layer_index
        gate_up, down = plan.stacked["gate_up"], plan.stacked["down"]
        fused = self._stacked_view(gate_up)
        # Split along the fused axis: the last one for [E, H, 2I] ("kn"), the
        # middle one for [E, 2I, H] ("nk", Qwen3-VL-MoE as transformers saves it).
        axis = 2 if plan.orientation == "kn" else 1
        ffn = gate_up.shape[axis] // 2
        gate_view, up_view = _split(fused, ffn, plan.layout, axis)

        def make(proj: str, view: npt.NDArray[np.generic], record: TensorRecord) -> ExpertStack:
            first, second = view.shape[1], view.shape[2]
            k, n = (first, second) if plan.orientation == "kn" else (second, first)
            return ExpertStack(
                f"layers.{layer}.{proj}", k, n, record.dtype.numpy, plan.orientation,
                (record.name,), maps=self._maps, stacked=view, stacked_path=record.path,
            )

        companions: dict[str, npt.NDArray[np.generic]] = {}
        if "gate_up_bias" in plan.biases:
            bias = self._stacked_view(plan.biases["gate_up_bias"])
            companions["gate_bias"], companions["up_bias"] = _split(bias, ffn, plan.layout, 1)
        if "down_bias" in plan.biases:
            companions["down_bias"] = self._stacked_view(plan.biases["down_bias"])
        return LayerExperts(
            layer,
            make("gate", gate_view, gate_up),
            make("up", up_view, gate_up),
            make("down", self._stacked_view(down), down),
            companions,
        )

    def _check_shapes(self, layer: LayerExperts, plan: LayerPlan) -> None:
        gate, up, down = layer.gate, layer.up, layer.down
        problems = []
        if not gate.num_experts == up.num_experts == down.num_experts:
            problems.append(f"expert counts gate={gate.num_experts} up={up.num_experts} down={down.num_experts}")
        if (gate.k, gate.n) != (up.k, up.n):
            problems.append(f"gate [k={gate.k}, n={gate.n}] vs up [k={up.k}, n={up.n}]")
        if (down.k, down.n) != (gate.n, gate.k):
            problems.append(f"down [k={down.k}, n={down.n}] should be [k={gate.n}, n={gate.k}]")
        if problems:
            names = sorted({name for stack in (gate, up, down) for name in stack.tensor_names[:1]})
            raise FormatError(f"{self.path}: MoE layer {plan.layer_index} ({', '.join(names)}): " + "; ".join(problems))


def _split(
    fused: npt.NDArray[np.generic], ffn: int, layout: str, axis: int
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.generic]]:
    index: list[slice] = [slice(None)] * fused.ndim
    if layout == "fused_interleaved":
        gate, up = list(index), list(index)
        gate[axis], up[axis] = slice(0, None, 2), slice(1, None, 2)
    else:
        gate, up = list(index), list(index)
        gate[axis], up[axis] = slice(None, ffn), slice(ffn, None)
    return fused[tuple(gate)], fused[tuple(up)]


def open_store(path: str | os.PathLike[str]) -> ExpertStore:
    """Open a checkpoint or slab store; read headers only.

    ``path`` may be a slab store directory (``mmapstore.json``), a Hugging Face
    checkpoint directory (sharded with ``model.safetensors.index.json``, or
    plain ``*.safetensors``), a single ``.safetensors`` file, or a raw slab
    directory.

    Raises
    ------
    FormatError
        Anything malformed, truncated, unsafe or without MoE experts.
    """
    return ExpertStore(read_checkpoint(path))

"""``ExpertStore`` and ``open_store``: every MoE layer of a checkpoint as views."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from .._errors import FileChangedError, FormatError, LayerNotFoundError, StoreClosedError, TensorNotFoundError
from .._geometry import Encoding, Orientation, PartGeometry, c_strides
from .._mapping import FileMaps
from .._source import MappedSource
from ..formats import Checkpoint, TensorRecord, read_checkpoint
from ..formats._manifest import expert_major_records
from .layouts import MAX_EXPERTS, LayerPlan, discover
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
        self._maps = FileMaps(sizes, checkpoint.identities)
        self.files: tuple[str, ...] = checkpoint.files
        self._file_ids = {path: index for index, path in enumerate(self.files)}
        slab_encodings, orientation = None, "kn"
        tensors = checkpoint.tensors
        # Expert strides of parts whose experts are not back to back (expert-major stores).
        self._strides: dict[str, int] = {}
        if checkpoint.manifest is not None:
            orientation = checkpoint.manifest.orientation
            slab_encodings = checkpoint.manifest.encodings
            if checkpoint.manifest.layout == "expert-major":
                tensors, self._strides = expert_major_records(checkpoint.manifest, tensors, path=checkpoint.path)
        elif checkpoint.kind == "gguf":
            slab_encodings, orientation = {}, "nk"  # ggml ne = {in, out, E}: numpy [E, out, in]
        try:
            self.layout, plans = discover(
                tensors,
                checkpoint.config,
                source=checkpoint.path,
                slab_encodings=slab_encodings,
                slab_orientation=orientation,
            )
            # Map every file now, each checked to be the file whose header was
            # validated: a file replaced after open_store cannot be read instead.
            self._maps.map_all(checkpoint.files)
            built = [self._build(plan) for plan in plans]
        except BaseException:
            self._maps.close()
            raise
        self.layers: list[LayerExperts] = [layer for layer in built if not layer.mtp]
        # DeepSeek's next-token-prediction layers: reachable by index, never decoding layers.
        self.mtp_layers: list[LayerExperts] = [layer for layer in built if layer.mtp]
        self._by_index = {layer.layer_index: layer for layer in built}

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
        """Read-only view of any tensor of the checkpoint, by its file name.

        A block-quantized tensor (a GGUF ``Q4_K``, say) is its encoded bytes,
        ``uint8 [..., row_nbytes]`` (the logical shape with its last axis in
        bytes), never values: :meth:`values` decodes it.
        """
        record = self._record(name)
        return self._maps.get(record.path).record_view(record)

    def values(self, name: str, dtype: npt.DTypeLike = np.float32) -> npt.NDArray[np.generic]:
        """A new array of any tensor's values in ``dtype``, by its file name:
        block-quantized (GGUF) tensors decoded by the reference formulas of
        :func:`mmapstore.dequant.dequantize_ggml`, plain ones cast.

        Raises
        ------
        TensorNotFoundError
            No such tensor.
        FormatError
            A dtype with no numpy equivalent (an opaque safetensors code).
        UnsupportedEncodingError
            A block type with no decoder.
        """
        record = self._record(name)
        view = self._maps.get(record.path).record_view(record)
        if record.dtype.is_block:
            from ..dequant import dequantize_ggml

            raw = view.view(np.uint8)
            decoded = dequantize_ggml(record.dtype, raw, record.shape[-1], where=f"{record.path}: tensor {name!r}")
            return decoded.astype(dtype, copy=False)
        return view.astype(dtype)

    def _record(self, name: str) -> TensorRecord:
        record = self.checkpoint.tensors.get(name)
        if record is None:
            raise TensorNotFoundError(f"{self.path}: no tensor named {name!r}")
        if not record.dtype.known:
            raise FormatError(f"{record.path}: tensor {name!r}: dtype {record.dtype.code!r} has no numpy equivalent")
        return record

    def check_open(self) -> None:
        if self._maps.closed:
            raise StoreClosedError(f"{self.path}: the store is closed")

    def byte_source(self) -> MappedSource:
        """The source sinks read write tables through: zero-copy views of this
        store's long-lived mappings (see :mod:`mmapstore._source`)."""
        self.check_open()
        return MappedSource(self._maps, self.files, where=self.path)

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
        self._maps.close()

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ExpertStore({self.path!r}, layout={self.layout}, moe_layers={self.num_layers})"

    # -- building -------------------------------------------------------
    def _stacked(self, stack: str, part: str, record: TensorRecord, orientation: Orientation) -> PartGeometry:
        """Geometry of an ``[E, ...]`` record: expert ``e`` at ``offset + e * stride``
        (``stride`` the slab's bytes, or an expert-major record's)."""
        experts, slab_shape = self._experts_and_slab(record)
        extent = record.nbytes // experts
        return PartGeometry.stacked(
            stack,
            part,
            experts,
            record.dtype,
            slab_shape,
            c_strides(slab_shape, record.dtype.itemsize),
            file=self._file_ids[record.path],
            base=record.offset,
            stride=self._strides.get(record.name, extent),
            extent=extent,
            orientation=orientation,
        )

    def _half(
        self,
        stack: str,
        part: str,
        record: TensorRecord,
        axis: int,
        which: int,
        layout: str,
        orientation: Orientation,
    ) -> PartGeometry:
        """Gate (``which=0``) or up (``1``) half of a fused ``[E, ...]`` record,
        split along slab axis ``axis``: every other index when interleaved, the
        first or second half when concatenated.  The byte range of a slab stays
        the whole fused slab; the view is strided inside it."""
        experts, slab_shape = self._experts_and_slab(record)
        strides = list(c_strides(slab_shape, record.dtype.itemsize))
        shape = list(slab_shape)
        width = shape[axis] // 2
        if layout == "fused_interleaved":
            delta = which * strides[axis]
            strides[axis] *= 2
        else:
            delta = which * width * strides[axis]
        shape[axis] = width
        stride = record.nbytes // experts
        return PartGeometry.stacked(
            stack,
            part,
            experts,
            record.dtype,
            tuple(shape),
            tuple(strides),
            file=self._file_ids[record.path],
            base=record.offset,
            stride=stride,
            extent=stride,
            view_delta=delta,
            orientation=orientation,
        )

    def _experts_and_slab(self, record: TensorRecord) -> tuple[int, tuple[int, ...]]:
        experts = record.shape[0] if record.shape else 0
        slab_shape = storage_shape(record)[1:]
        if experts == 0 or 0 in slab_shape:
            raise FormatError(
                f"{self.path}: tensor {record.name!r}: expert stack of shape {list(record.shape)} holds no expert data"
            )
        return experts, slab_shape

    def _gathered(
        self, stack: str, part: str, records: tuple[TensorRecord, ...], orientation: Orientation
    ) -> PartGeometry:
        head = records[0]
        slab_shape = storage_shape(head)
        if 0 in slab_shape:
            raise FormatError(f"{self.path}: tensor {head.name!r}: expert slab of shape {list(head.shape)} is empty")
        return PartGeometry.gathered(
            stack,
            part,
            head.dtype,
            slab_shape,
            [self._file_ids[record.path] for record in records],
            [record.offset for record in records],
            head.nbytes,
            orientation=orientation,
        )

    def _build(self, plan: LayerPlan) -> LayerExperts:
        layer = plan.layer_index
        orientation: Orientation = "kn" if plan.orientation == "kn" else "nk"
        stacks: dict[str, ExpertStack] = {}
        if plan.layout == "per_expert":
            for proj, gathered in plan.experts.items():
                name = f"layers.{layer}.{proj}"
                geometries = {
                    part: self._gathered(name, part, records, orientation) for part, records in gathered.items()
                }
                stacks[proj] = self._stack(
                    name,
                    gathered["weight"][0],
                    plan.encodings[proj],
                    geometries,
                    tuple(record.name for record in gathered["weight"]),
                    plan.logical.get(proj),
                )
        elif plan.layout == "slab":
            for proj, parts in plan.stacked.items():
                name = f"layers.{layer}.{proj}"
                geometries = {part: self._stacked(name, part, record, orientation) for part, record in parts.items()}
                encoding = plan.encodings[proj]
                if encoding.kind == "ggml" and not parts["weight"].dtype.is_block:
                    geometries["weight"] = replace(geometries["weight"], dtype=encoding.dtype)
                stacks[proj] = self._stack(
                    name,
                    parts["weight"],
                    plan.encodings[proj],
                    geometries,
                    (parts["weight"].name,),
                    plan.logical.get(proj),
                )
        elif plan.layout == "dbrx":
            stacks = self._build_dbrx(plan)
        else:
            stacks = self._build_fused(plan, orientation)
        result = LayerExperts(layer, stacks["gate"], stacks["up"], stacks["down"], mtp=plan.mtp)
        self._check_shapes(result, plan)
        return result

    def _stack(
        self,
        name: str,
        weight: TensorRecord,
        encoding: Encoding,
        parts: dict[str, PartGeometry],
        tensor_names: tuple[str, ...],
        logical: tuple[int, int] | None = None,
    ) -> ExpertStack:
        """A stack whose logical ``[k, n]`` comes from the weight record's shape
        (the last two logical dims, in ``orientation``), or for packed stacks
        from ``logical`` (discovery's ``(k, n)``: a packed shape is not the logical one)."""
        if logical is not None:
            k, n = logical
        elif encoding.packed:
            raise FormatError(f"{self.path}: stack {name!r} is {encoding.describe()} but its logical shape is unknown")
        else:
            if encoding.kind == "mxfp4":  # blocks [E, out, in/32, 16]
                first, second = weight.shape[1], weight.shape[2] * 32
            elif encoding.kind == "ggml" and not weight.dtype.is_block:  # rows of blocks kept as bytes
                block = encoding.dtype
                first, second = weight.shape[-2], weight.shape[-1] // block.block_nbytes * block.block_elems
            else:
                first, second = weight.shape[-2], weight.shape[-1]
            k, n = (first, second) if parts["weight"].orientation == "kn" else (second, first)
        return ExpertStack(
            name,
            k,
            n,
            encoding,
            parts,
            tensor_names,
            maps=self._maps,
            files=self.files,
            stacked=len(tensor_names) == 1 and parts["weight"].stride is not None,
        )

    def _build_fused(self, plan: LayerPlan, orientation: Orientation) -> dict[str, ExpertStack]:
        """Split fused ``gate_up`` parts into gate and up stacks; ``down`` as is.

        Weights split along the fused axis: the last one for ``[E, H, 2I]``
        ("kn"), the first slab axis for ``[E, 2I, H]`` ("nk", Qwen3-VL-MoE as
        transformers saves it, and MXFP4 blocks).  Scales and biases always
        split along their first slab axis (out).
        """
        layer = plan.layer_index
        fused, down = plan.stacked["gate_up"], plan.stacked["down"]
        encoding = plan.encodings["gate_up"]
        stacks: dict[str, ExpertStack] = {}
        for which, proj in enumerate(("gate", "up")):
            name = f"layers.{layer}.{proj}"
            parts = {}
            for part, record in fused.items():
                axis = 1 if (part == "weight" and orientation == "kn") else 0
                parts[part] = self._half(name, part, record, axis, which, plan.layout, orientation)
            weight = parts["weight"]
            rows, cols = weight.slab_shape[0], weight.slab_shape[1]
            if encoding.kind == "mxfp4":
                k, n = cols * 32, rows  # blocks [out, in/32, 16]
            elif encoding.kind == "ggml":
                k, n = fused["weight"].shape[2], rows  # rows of blocks [out, row bytes]; logical [E, out, in]
            else:
                k, n = (rows, cols) if orientation == "kn" else (cols, rows)
            stacks[proj] = ExpertStack(
                name, k, n, encoding, parts, (fused["weight"].name,), maps=self._maps, files=self.files, stacked=True
            )
        name = f"layers.{layer}.down"
        parts = {part: self._stacked(name, part, record, orientation) for part, record in down.items()}
        if plan.encodings["down"].kind == "mxfp4":
            blocks = down["weight"].shape
            stacks["down"] = ExpertStack(
                name,
                blocks[2] * 32,
                blocks[1],
                plan.encodings["down"],
                parts,
                (down["weight"].name,),
                maps=self._maps,
                files=self.files,
                stacked=True,
            )
        else:
            stacks["down"] = self._stack(name, down["weight"], plan.encodings["down"], parts, (down["weight"].name,))
        return stacks

    def _build_dbrx(self, plan: LayerPlan) -> dict[str, ExpertStack]:
        """DBRX ``[E*I, H]`` records as ``E`` slabs of ``[I, H]``: ``[out, in]``
        for w1/v1, ``[in, out]`` for w2."""
        stacks: dict[str, ExpertStack] = {}
        experts = plan.num_experts
        for proj, parts in plan.stacked.items():
            record = parts["weight"]
            rows, hidden = record.shape[0] // experts, record.shape[1]
            orientation: Orientation = "kn" if plan.orientation_of(proj) == "kn" else "nk"
            stride = record.nbytes // experts
            geometry = PartGeometry.stacked(
                f"layers.{plan.layer_index}.{proj}",
                "weight",
                experts,
                record.dtype,
                (rows, hidden),
                c_strides((rows, hidden), record.dtype.itemsize),
                file=self._file_ids[record.path],
                base=record.offset,
                stride=stride,
                extent=stride,
                orientation=orientation,
            )
            k, n = (rows, hidden) if orientation == "kn" else (hidden, rows)
            stacks[proj] = ExpertStack(
                geometry.stack,
                k,
                n,
                plan.encodings[proj],
                {"weight": geometry},
                (record.name,),
                maps=self._maps,
                files=self.files,
                stacked=True,
            )
        return stacks

    def _check_shapes(self, layer: LayerExperts, plan: LayerPlan) -> None:
        gate, up, down = layer.gate, layer.up, layer.down
        problems = []
        if not gate.num_experts == up.num_experts == down.num_experts:
            problems.append(f"expert counts gate={gate.num_experts} up={up.num_experts} down={down.num_experts}")
        if (gate.k, gate.n) != (up.k, up.n):
            problems.append(f"gate [k={gate.k}, n={gate.n}] vs up [k={up.k}, n={up.n}]")
        if (down.k, down.n) != (gate.n, gate.k):
            problems.append(f"down [k={down.k}, n={down.n}] should be [k={gate.n}, n={gate.k}]")
        if not 1 <= gate.num_experts <= MAX_EXPERTS:
            problems.append(f"{gate.num_experts} experts (a MoE layer has 1 to {MAX_EXPERTS})")
        if 0 in (gate.k, gate.n):
            problems.append(f"empty slabs [k={gate.k}, n={gate.n}]")
        if problems:
            names = sorted({name for stack in (gate, up, down) for name in stack.tensor_names[:1]})
            raise FormatError(f"{self.path}: MoE layer {plan.layer_index} ({', '.join(names)}): " + "; ".join(problems))


def storage_shape(record: TensorRecord) -> tuple[int, ...]:
    """The shape a view of ``record`` has: its logical shape, with the last
    axis in bytes of blocks for block-quantized (ggml) types."""
    block_elems = int(getattr(record.dtype, "block_elems", 1))
    if block_elems <= 1:
        return record.shape
    block_nbytes = int(getattr(record.dtype, "block_nbytes", 1))
    return (*record.shape[:-1], record.shape[-1] // block_elems * block_nbytes)


def open_store(path: str | os.PathLike[str]) -> ExpertStore:
    """Open a checkpoint or slab store; read headers only.

    ``path`` may be a slab store directory (``mmapstore.json``), a Hugging Face
    checkpoint directory (sharded with ``model.safetensors.index.json``, or
    plain ``*.safetensors``), a single ``.safetensors`` file, or a raw slab
    directory.

    A store replaced while it is being opened (``convert --force`` renaming a
    new store over it, a shard re-downloaded) is read again, up to
    ``OPEN_ATTEMPTS`` times, so the result is always one consistent store.

    Raises
    ------
    FormatError
        Anything malformed, truncated, unsafe or without MoE experts.
    FileChangedError
        The store kept changing during every attempt.
    """
    path = os.fspath(path)
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        before = _identity(path)
        try:
            return ExpertStore(read_checkpoint(path))
        except FileChangedError:
            if attempt == OPEN_ATTEMPTS:
                raise
        except FormatError:
            # Something vanished or changed mid-read because the whole store was
            # renamed over: read the new one.  A store that stayed put is broken.
            if attempt == OPEN_ATTEMPTS or before is None or _identity(path) == before:
                raise
    raise AssertionError("unreachable")


OPEN_ATTEMPTS = 8


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns

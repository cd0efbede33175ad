"""``ExpertStack``: one projection of one MoE layer for all experts, as views."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .._errors import ExpertIndexError, StoreClosedError
from .._geometry import Encoding, Orientation, PartGeometry
from .._mapping import FileMaps, MappedFile
from ..dequant import dequantize_slab

__all__ = ["ExpertStack", "LayerExperts", "SourceSpan"]


@dataclass(frozen=True, slots=True)
class SourceSpan:
    """The file bytes read to serve one or more slabs."""

    mapped: MappedFile
    offset: int
    nbytes: int


class ExpertStack:
    """One projection of one layer, logically ``[E, k, n]`` (``out = x @ stack.expert(e)``).

    The bytes stay in the file.  A stack is a set of *parts* that share the
    expert axis and move together: ``weight`` (the values, or the encoded
    codes or blocks of a quantized stack) and, where the encoding has them,
    ``scale``, ``bias``, ``zero``...  Each part is described by a
    :class:`~mmapstore._geometry.PartGeometry`; views are made on use, never at open.

    :meth:`expert` is the zero-copy, read-only ``[k, n]`` view of the weight
    part: **encoded values** when ``encoding.encoded`` (FP8 codes, MXFP4
    nibbles, GGUF blocks).  :meth:`dequantize` gives the values (a copy, the
    only one), :meth:`part` any part's zero-copy view.

    ``native_orientation`` says how the file stores a weight slab: ``"kn"``
    (in, out) for slab stores and fused checkpoints, ``"nk"`` (out, in) for
    ``nn.Linear`` weights and GGUF, whose :meth:`expert` is a transposed view.
    """

    def __init__(
        self,
        name: str,
        k: int,
        n: int,
        encoding: Encoding,
        parts: Mapping[str, PartGeometry],
        tensor_names: tuple[str, ...],
        *,
        maps: FileMaps,
        files: tuple[str, ...],
        stacked: bool = False,
    ) -> None:
        if "weight" not in parts:
            raise ValueError(f"{name}: a stack needs a weight part")
        self.name = name
        self.k = k
        self.n = n
        self.encoding = encoding
        self.parts: dict[str, PartGeometry] = dict(parts)
        self.geometry = self.parts["weight"]
        self.native_orientation: Orientation = self.geometry.orientation
        self.dtype: np.dtype[np.generic] = self.geometry.dtype.numpy
        self.tensor_names = tensor_names
        self.num_experts = self.geometry.num_experts
        self._maps = maps
        self._files = files
        self._released = False
        self._stacked = stacked

    def release(self) -> None:
        """The store is closing: refuse new views from now on."""
        self._released = True

    @property
    def weight_nbytes(self) -> int:
        """Bytes of one expert's weight part (``k * n * itemsize`` for plain stacks)."""
        return self.geometry.slab_nbytes

    @property
    def slab_nbytes(self) -> int:
        """Bytes of one expert across every part (weight, scales, bias...)."""
        return sum(part.slab_nbytes for part in self.parts.values())

    @property
    def nbytes(self) -> int:
        return self.slab_nbytes * self.num_experts

    @property
    def native_shape(self) -> tuple[int, ...]:
        """Shape of one weight slab as the file stores it (rows of blocks for ggml types)."""
        return self.geometry.slab_shape

    @property
    def is_stacked(self) -> bool:
        """True for one ``[E, ...]`` tensor; False for one tensor per expert."""
        return self._stacked

    def check_expert(self, expert: object) -> int:
        """``expert`` as an int in ``[0, num_experts)``, else :class:`ExpertIndexError`."""
        if isinstance(expert, (bool, np.bool_)):
            raise ExpertIndexError(f"{self.name}: expert index must be an integer, got {expert!r}")
        try:
            index = operator.index(expert)  # type: ignore[arg-type]
        except TypeError:
            raise ExpertIndexError(
                f"{self.name}: expert index must be an integer, got {type(expert).__name__} {expert!r:.40}"
            ) from None
        if not 0 <= index < self.num_experts:
            raise ExpertIndexError(f"{self.name}: expert {index} out of range [0, {self.num_experts})")
        return index

    def _mapped(self, file: int) -> MappedFile:
        if self._released:
            raise StoreClosedError(f"{self.name}: the store is closed")
        return self._maps.get(self._files[file])

    def part(self, part: str, expert: int) -> npt.NDArray[np.generic]:
        """Zero-copy, read-only view of one expert's slab of ``part`` as the file stores it."""
        geometry = self.parts.get(part)
        if geometry is None:
            raise KeyError(f"{self.name}: no part {part!r}; parts are {sorted(self.parts)}")
        expert = self.check_expert(expert)
        file, offset, _ = geometry.range_of(expert)
        return self._mapped(file).view(
            offset + geometry.view_delta, geometry.dtype.numpy, geometry.slab_shape, geometry.slab_strides
        )

    def native(self, expert: int) -> npt.NDArray[np.generic]:
        """Expert ``expert``'s weight slab as the file stores it (see ``native_orientation``)."""
        return self.part("weight", expert)

    def expert(self, expert: int) -> npt.NDArray[np.generic]:
        """Read-only ``[k, n]`` view of one expert's weight part in GroupedMatMul
        orientation (encoded values for a quantized stack; see :meth:`dequantize`)."""
        if self.encoding.kind == "ggml" or self.encoding.kind == "mxfp4" or self.encoding.packed:
            return self.native(expert)  # rows of blocks or packed words have no [k, n] element view
        slab = self.native(expert)
        return slab if self.native_orientation == "kn" else slab.T

    def dequantize(self, expert: int, dtype: npt.DTypeLike = np.float32) -> npt.NDArray[np.generic]:
        """Expert ``expert``'s values as a new ``[k, n]`` array of ``dtype``,
        computed with the encoding's reference formula (plain stacks: a cast copy)."""
        views = {name: self.part(name, expert) for name in self.parts if name != "bias"}
        values = dequantize_slab(self.encoding, views, self.native_orientation, self.k, self.n, where=self.name)
        return np.asarray(values if self.native_orientation == "kn" else values.T).astype(dtype)

    def part_span(self, part: str, expert: int) -> SourceSpan:
        """The file bytes that serving ``part`` of ``expert`` touches."""
        file, offset, extent = self.parts[part].range_of(self.check_expert(expert))
        return SourceSpan(self._mapped(file), offset, extent)

    def __repr__(self) -> str:
        kind = "stacked" if self.is_stacked else "gathered"
        parts = "+".join(self.parts)
        return (
            f"ExpertStack({self.name!r}, experts={self.num_experts}, k={self.k}, n={self.n}, "
            f"{self.encoding.describe()}, parts={parts}, native={self.native_orientation}, {kind})"
        )


@dataclass(frozen=True, slots=True)
class LayerExperts:
    """The expert stacks of one MoE layer."""

    layer_index: int
    gate: ExpertStack
    up: ExpertStack
    down: ExpertStack
    mtp: bool = False  # DeepSeek's next-token-prediction module: used only for speculative decoding

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def stacks(self) -> tuple[tuple[str, ExpertStack], ...]:
        return (("gate", self.gate), ("up", self.up), ("down", self.down))

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert across gate, up and down and every part (for ``capacity_from_budget``)."""
        return self.gate.slab_nbytes + self.up.slab_nbytes + self.down.slab_nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of every expert of this layer."""
        return self.expert_nbytes * self.num_experts

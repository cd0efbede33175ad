"""``ExpertStack``: one projection of one MoE layer for all experts, as views."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ..errors import ExpertIndexError, StoreClosedError
from ..formats.records import TensorRecord
from ..mapping import FileMaps, MappedFile, byte_span

__all__ = ["ExpertStack", "LayerExperts", "SourceSpan"]

Orientation = str  # "kn": native slab is [k, n] (in, out); "nk": native slab is [n, k] (out, in)


@dataclass(frozen=True, slots=True)
class SourceSpan:
    """The file bytes read to serve one or more slabs."""

    mapped: MappedFile
    offset: int
    nbytes: int


class ExpertStack:
    """One projection of one layer, logically ``[E, k, n]`` (``out = x @ stack.expert(e)``).

    The bytes stay in the file.  A stack is either *stacked* (one 3-D tensor,
    possibly a strided view such as GPT-OSS's interleaved gate) or *gathered*
    (one 2-D tensor per expert).  :meth:`expert` is always a zero-copy,
    read-only view; nothing here reads a whole stack.

    ``native_orientation`` says how the file stores a slab: ``"kn"`` (in, out)
    for slab stores and fused checkpoints, ``"nk"`` (out, in) for
    ``nn.Linear`` weights, whose :meth:`expert` is a transposed view.
    """

    def __init__(
        self,
        name: str,
        k: int,
        n: int,
        dtype: np.dtype[np.generic],
        native_orientation: Orientation,
        tensor_names: tuple[str, ...],
        *,
        maps: FileMaps,
        stacked: npt.NDArray[np.generic] | None = None,
        stacked_path: str | None = None,
        records: Sequence[TensorRecord] = (),
    ) -> None:
        self.name = name
        self.k = k
        self.n = n
        self.dtype = dtype
        self.native_orientation = native_orientation
        self.tensor_names = tensor_names
        self._maps = maps
        self._released = False
        self._geometry: tuple[MappedFile, int, int, int] | None = None  # mapping, offset, stride, slab extent
        self._stacked = stacked
        self._stacked_path = stacked_path
        self._records = tuple(records)
        self.num_experts = int(stacked.shape[0]) if stacked is not None else len(self._records)

    def release(self) -> None:
        """Drop this stack's own views (the store is closing) so the mapping can go."""
        self._stacked = None
        self._released = True

    @property
    def slab_nbytes(self) -> int:
        """Bytes of one expert's slab (``k * n * itemsize``)."""
        return self.k * self.n * int(self.dtype.itemsize)

    @property
    def nbytes(self) -> int:
        return self.slab_nbytes * self.num_experts

    @property
    def native_shape(self) -> tuple[int, int]:
        return (self.k, self.n) if self.native_orientation == "kn" else (self.n, self.k)

    @property
    def is_stacked(self) -> bool:
        return self._stacked is not None

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

    def native(self, expert: int) -> npt.NDArray[np.generic]:
        """Expert ``expert``'s slab as the file stores it (see ``native_orientation``)."""
        expert = self.check_expert(expert)
        if self._released:
            raise StoreClosedError(f"{self.name}: the store is closed")
        if self._stacked is not None:
            return self._stacked[expert]
        record = self._records[expert]
        return self._maps.get(record.path).record_view(record)

    def expert(self, expert: int) -> npt.NDArray[np.generic]:
        """Read-only ``[k, n]`` view of one expert in GroupedMatMul orientation."""
        slab = self.native(expert)
        return slab if self.native_orientation == "kn" else slab.T

    def native_range(self, first: int, count: int) -> npt.NDArray[np.generic] | None:
        """Experts ``first .. first+count-1`` as one ``[count, *native_shape]`` view,
        or None when their slabs are not evenly spaced in one file."""
        located = self.range_source(first, count)
        return None if located is None else located[0]

    def stacked_geometry(self) -> tuple[npt.NDArray[np.generic], MappedFile, int, int, int] | None:
        """For a stacked stack: ``(3-D native view, mapping, file offset of
        expert 0, byte stride between experts, byte extent of one slab)``, so
        the planner computes ranges with arithmetic; None for gathered stacks."""
        if self._released:
            raise StoreClosedError(f"{self.name}: the store is closed")
        if self._stacked is None:
            return None
        if self._geometry is None:
            assert self._stacked_path is not None
            mapped = self._maps.get(self._stacked_path)
            low, high = byte_span(self._stacked[0])
            self._geometry = (mapped, mapped.offset_of(self._stacked[0]), int(self._stacked.strides[0]), high - low)
        return (self._stacked, *self._geometry)

    def range_source(
        self, first: int, count: int
    ) -> tuple[npt.NDArray[np.generic], MappedFile, int, int] | None:
        """:meth:`native_range` plus where its bytes lie: ``(view, mapping, file
        offset, byte extent)``."""
        self.check_expert(first)
        self.check_expert(first + count - 1)
        geometry = self.stacked_geometry()
        if geometry is not None:
            stacked, mapped, base, stride, extent = geometry
            return stacked[first : first + count], mapped, base + first * stride, (count - 1) * stride + extent
        records = self._records[first : first + count]
        head = records[0]
        for position, record in enumerate(records):
            if record.path != head.path or record.offset != head.offset + position * self.slab_nbytes:
                return None
        mapped = self._maps.get(head.path)
        view = mapped.view(head.offset, self.dtype, (count, *self.native_shape))
        return view, mapped, head.offset, count * self.slab_nbytes

    def mapped_file(self, expert: int) -> MappedFile:
        """The mapping that holds ``expert``'s bytes."""
        expert = self.check_expert(expert)
        if self._stacked_path is not None:
            return self._maps.get(self._stacked_path)
        return self._maps.get(self._records[expert].path)

    def source_span(self, expert: int) -> SourceSpan:
        """The file bytes that serving ``expert`` touches (for prefetch and residency)."""
        located = self.range_source(expert, 1)
        assert located is not None  # a single slab is always one range
        _, mapped, offset, extent = located
        return SourceSpan(mapped, offset, extent)

    def __repr__(self) -> str:
        kind = "stacked" if self.is_stacked else "gathered"
        return (
            f"ExpertStack({self.name!r}, experts={self.num_experts}, k={self.k}, n={self.n}, "
            f"dtype={self.dtype}, native={self.native_orientation}, {kind})"
        )


@dataclass(frozen=True, slots=True)
class LayerExperts:
    """The expert stacks of one MoE layer, plus companions (biases) as raw views."""

    layer_index: int
    gate: ExpertStack
    up: ExpertStack
    down: ExpertStack
    companions: dict[str, npt.NDArray[np.generic]] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def stacks(self) -> tuple[tuple[str, ExpertStack], ...]:
        return (("gate", self.gate), ("up", self.up), ("down", self.down))

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert across gate, up and down (for ``capacity_from_budget``)."""
        return self.gate.slab_nbytes + self.up.slab_nbytes + self.down.slab_nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of every expert of this layer."""
        return self.expert_nbytes * self.num_experts

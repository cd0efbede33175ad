"""Geometries: where each expert's bytes of one part lie, as values.

A :class:`PartGeometry` is made when a store opens, from validated records,
and never touches a file: the planner turns geometries and pools into write
tables with array arithmetic, and only a sink that needs bytes turns a row of
a table back into a view (through the store's mappings) or a ``pread``.

Both shapes of a stack are one geometry:

- *stacked* (one ``[E, ...]`` tensor): every expert in one file at
  ``base + e * stride`` (``stride`` is set);
- *gathered* (one tensor per expert): per-expert files and offsets
  (``stride`` is None unless they happen to be evenly spaced in one file).

A slab's view may be strided inside its byte range (GPT-OSS's interleaved
gate is every other column of the fused ``gate_up`` slab): ``view_delta`` and
``slab_strides`` say where its elements lie relative to the range start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import numpy.typing as npt

from ._dtypes import DType
from ._errors import ExpertIndexError

__all__ = [
    "ENCODING_KINDS",
    "PACKED_KINDS",
    "Encoding",
    "EncodingKind",
    "Orientation",
    "PartGeometry",
    "PartName",
    "c_strides",
]

Orientation = Literal["kn", "nk"]
"""How a file stores a 2-D slab: ``"kn"`` (in, out) or ``"nk"`` (out, in, ``nn.Linear``)."""

PartName = Literal["weight", "scale", "bias", "zero", "global_scale", "g_idx", "shape"]

EncodingKind = Literal["plain", "fp8_block", "mxfp4", "ggml", "int4_group", "nvfp4", "mxfp4_packed", "awq", "gptq"]
ENCODING_KINDS: tuple[EncodingKind, ...] = (
    "plain",
    "fp8_block",
    "mxfp4",
    "ggml",
    "int4_group",
    "nvfp4",
    "mxfp4_packed",
    "awq",
    "gptq",
)
PACKED_KINDS: tuple[EncodingKind, ...] = ("int4_group", "nvfp4", "mxfp4_packed", "awq", "gptq")
"""Packed 4-bit encodings: their weight part is words or bytes of codes along
one axis, so a slab has no element view and keeps its native orientation."""


@dataclass(frozen=True, slots=True)
class Encoding:
    """How the parts of one stack combine into values.

    ``kind``
        ``plain``: the weight part holds the values (any float or int dtype).
        ``fp8_block``: F8_E4M3 weight times a scale per ``block`` tile
        (``[128, 128]`` in native orientation), ``scale`` part F32 or BF16.
        ``mxfp4``: E2M1 nibbles (two per byte, low first) times ``2**(e8m0 -
        127)`` per 32 input elements (GPT-OSS); ``scale`` part U8.
        ``ggml``: a GGUF block type (``weight`` is rows of blocks, ``dtype``
        names the type); scales live inside the blocks.
        ``int4_group``: compressed-tensors ``pack-quantized`` INT4, eight
        codes per I32 word along ``in`` (``weight_packed [out, ceil(in/8)]``),
        value ``(q - zero) * scale`` per group; optional ``zero`` (packed
        along ``out``), ``g_idx`` and ``shape`` parts.
        ``nvfp4``: compressed-tensors NVFP4, E2M1 nibbles (two per byte, low
        first) times ``scale / global_scale`` (F8_E4M3 scale per 16).
        ``mxfp4_packed``: compressed-tensors MXFP4, the same nibbles times
        ``2**(e8m0 - 127)`` per 32 (``weight_packed [out, in/2]``).
        ``awq``: AutoAWQ GEMM, ``qweight [in, out/8]`` in nibble order
        0,2,4,6,1,3,5,7, ``(q - zero) * scale`` per group of ``in``.
        ``gptq``: GPTQ v1, ``qweight [in/8, out]``, ``qzeros`` holding
        ``zero - 1``, groups along ``in`` (``g_idx`` when present).
    ``dtype``
        The weight part's file dtype (``F8_E4M3``, ``Q4_K``, ``U8``...).
    ``block``
        Elements per scale along (out, in) in native orientation; ``(1, 32)``
        for MXFP4, ``(128, 128)`` for DeepSeek FP8; ``(1, block_elems)`` for
        ggml types; ``(1, 1)`` for plain; ``(1, group)`` for the packed
        ``[out, in]`` kinds and ``(group, 1)`` for AWQ/GPTQ (``[in, out]``),
        ``group`` being the whole row for per-channel scales.
    """

    kind: EncodingKind
    dtype: DType
    block: tuple[int, int] = (1, 1)

    @property
    def encoded(self) -> bool:
        """True when the weight part's bytes are not the values themselves."""
        return self.kind != "plain"

    @property
    def packed(self) -> bool:
        """True for packed 4-bit kinds (no element view; native orientation only)."""
        return self.kind in PACKED_KINDS

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "dtype": self.dtype.code, "block": list(self.block)}

    def describe(self) -> str:
        if self.kind == "plain":
            return self.dtype.code
        if self.kind == "ggml":
            return f"ggml {self.dtype.code}"
        return f"{self.kind} ({self.dtype.code}, block {self.block[0]}x{self.block[1]})"


@dataclass(frozen=True, slots=True, eq=False)
class PartGeometry:
    """Where every expert's slab of one part of one stack lies.

    Attributes
    ----------
    stack, part
        ``"layers.3.gate"`` and ``"weight"`` (or ``"scale"``, ``"bias"``...).
    num_experts
        Experts in the stack.
    dtype
        The part's file dtype (a view of it has this numpy dtype).
    slab_shape, slab_strides
        Shape and byte strides of one expert's native view (elements of
        ``dtype``); C-contiguous unless the slab is a strided half of a fused one.
    extent
        Bytes of the contiguous file range that holds one expert's slab.
    view_delta
        Bytes from the start of that range to the view's first element.
    files, offsets
        Per expert: index into the store's ``files`` and absolute file offset
        of the range start (read-only ``int32`` / ``int64`` arrays).
    stride
        Byte distance between consecutive experts when every expert lies in
        one file evenly spaced (stacked tensors), else None.
    orientation
        Native orientation of 2-D weight slabs; parts without one say ``"kn"``.
    """

    stack: str
    part: str
    num_experts: int
    dtype: DType
    slab_shape: tuple[int, ...]
    slab_strides: tuple[int, ...]
    extent: int
    view_delta: int
    files: npt.NDArray[np.int32]
    offsets: npt.NDArray[np.int64]
    stride: int | None
    orientation: Orientation = "kn"

    @classmethod
    def stacked(
        cls,
        stack: str,
        part: str,
        num_experts: int,
        dtype: DType,
        slab_shape: tuple[int, ...],
        slab_strides: tuple[int, ...],
        *,
        file: int,
        base: int,
        stride: int,
        extent: int,
        view_delta: int = 0,
        orientation: Orientation = "kn",
    ) -> PartGeometry:
        """Experts evenly spaced in one file: expert ``e`` at ``base + e * stride``."""
        files = np.full(num_experts, file, dtype=np.int32)
        offsets = base + stride * np.arange(num_experts, dtype=np.int64)
        return cls(
            stack,
            part,
            num_experts,
            dtype,
            slab_shape,
            slab_strides,
            extent,
            view_delta,
            _frozen(files),
            _frozen(offsets),
            stride,
            orientation,
        )

    @classmethod
    def gathered(
        cls,
        stack: str,
        part: str,
        dtype: DType,
        slab_shape: tuple[int, ...],
        files: npt.ArrayLike,
        offsets: npt.ArrayLike,
        extent: int,
        *,
        orientation: Orientation = "kn",
    ) -> PartGeometry:
        """One C-contiguous tensor per expert, anywhere."""
        file_ids = np.asarray(files, dtype=np.int32)
        starts = np.asarray(offsets, dtype=np.int64)
        strides = c_strides(slab_shape, dtype.itemsize)
        # Only back-to-back slabs count as one range: a larger even spacing
        # (gate, up and down of each expert interleaved) would read the others.
        stride: int | None = None
        if len(starts) == 1 or ((file_ids == file_ids[0]).all() and (np.diff(starts) == extent).all()):
            stride = extent
        return cls(
            stack,
            part,
            len(starts),
            dtype,
            slab_shape,
            strides,
            extent,
            0,
            _frozen(file_ids),
            _frozen(starts),
            stride,
            orientation,
        )

    @property
    def slab_nbytes(self) -> int:
        """Bytes of one expert's values in this part (``extent`` may be larger
        for a strided half of a fused slab)."""
        count = 1
        for dim in self.slab_shape:
            count *= dim
        return count * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.slab_nbytes * self.num_experts

    def check_expert(self, expert: int) -> int:
        if not 0 <= expert < self.num_experts:
            raise ExpertIndexError(f"{self.stack}.{self.part}: expert {expert} out of range [0, {self.num_experts})")
        return expert

    def range_of(self, expert: int) -> tuple[int, int, int]:
        """``(file id, offset, extent)`` of the bytes of ``expert``."""
        self.check_expert(expert)
        return int(self.files[expert]), int(self.offsets[expert]), self.extent

    def run_of(self, first: int, count: int) -> tuple[int, int, int] | None:
        """``(file id, offset, extent)`` covering experts ``first .. first+count-1``
        as one range, or None when they are not evenly spaced in one file."""
        self.check_expert(first)
        self.check_expert(first + count - 1)
        if count == 1:
            return self.range_of(first)
        if self.stride is None:
            return None
        return int(self.files[first]), int(self.offsets[first]), (count - 1) * self.stride + self.extent

    def __repr__(self) -> str:
        kind = "stacked" if self.stride is not None else "gathered"
        return (
            f"PartGeometry({self.stack}.{self.part}, experts={self.num_experts}, {self.dtype.code} "
            f"{list(self.slab_shape)}, extent={self.extent}, {kind})"
        )


def c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides: list[int] = []
    step = itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


_Array = TypeVar("_Array", bound=np.ndarray)


def _frozen(array: _Array) -> _Array:
    array.flags.writeable = False
    return array

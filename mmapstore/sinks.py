"""Sinks: whatever receives parameter writes.

The protocol is two methods: ``check(param, index, source)`` raises
:class:`SinkError` if the write cannot land (called for every write of a plan
before the first byte moves) and ``write(param, index, source)`` copies
``source`` (``[count, *slab]``, the store's native orientation) into
``param[index : index + count]``, casting and transposing as the sink was
told to.
"""

from __future__ import annotations

from collections.abc import Collection, MutableMapping, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .dtypes import can_cast
from .errors import SinkError
from .planner import DEFAULT_PARAM_NAME, param_name
from .store import ExpertStore

__all__ = ["ArraySink", "DictSink", "Sink"]


class Sink(Protocol):
    def check(self, param: str, index: int, source: npt.NDArray[np.generic]) -> None: ...

    def write(self, param: str, index: int, source: npt.NDArray[np.generic]) -> None: ...


class DictSink:
    """Writes into caller-owned numpy arrays, e.g. a model's state dict.

    Parameters
    ----------
    arrays
        ``param -> array`` with a leading slot (or expert) axis.
    transpose
        Params whose slabs are stored transposed relative to the source
        (``[k, n]`` destinations of ``[n, k]`` sources, or the reverse).
    """

    def __init__(self, arrays: MutableMapping[str, npt.NDArray[np.generic]], transpose: Collection[str] = ()) -> None:
        self.arrays = arrays
        self.transpose = frozenset(transpose)

    def _oriented(self, param: str, source: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        return source.swapaxes(-1, -2) if param in self.transpose else source

    def check(self, param: str, index: int, source: npt.NDArray[np.generic]) -> None:
        destination = self.arrays.get(param)
        if destination is None:
            raise SinkError(f"sink has no parameter {param!r}")
        oriented = self._oriented(param, source)
        if destination.shape[1:] != oriented.shape[1:]:
            raise SinkError(
                f"parameter {param!r}: slab shape {list(destination.shape[1:])} cannot take "
                f"{list(oriented.shape[1:])}"
            )
        count = oriented.shape[0]
        if not 0 <= index <= destination.shape[0] - count:
            raise SinkError(f"parameter {param!r}: slots [{index}, {index + count}) outside [0, {destination.shape[0]})")
        if not can_cast(source.dtype, destination.dtype):
            raise SinkError(f"parameter {param!r}: cannot cast {source.dtype} to {destination.dtype}")
        if not destination.flags.writeable:
            raise SinkError(f"parameter {param!r}: destination array is read-only")

    def write(self, param: str, index: int, source: npt.NDArray[np.generic]) -> None:
        destination = self.arrays[param]
        oriented = self._oriented(param, source)
        # check() allowed the cast; "unsafe" lets numpy do float-to-float casts
        # between ml_dtypes types that its same_kind rule does not know.
        np.copyto(destination[index : index + oriented.shape[0]], oriented, casting="unsafe")


class ArraySink(DictSink):
    """Owns one preallocated, prefaulted ``[capacity, ...]`` buffer per parameter."""

    @classmethod
    def for_store(
        cls,
        store: ExpertStore,
        capacity: int | Sequence[int] | None = None,
        *,
        dtype: npt.DTypeLike | None = None,
        orientation: str = "native",
        names: str = DEFAULT_PARAM_NAME,
    ) -> ArraySink:
        """Buffers for every stack of ``store``.

        Parameters
        ----------
        capacity
            Slots per layer (one int for all, or one per MoE layer); None
            gives every expert a slot (a full-push destination).
        dtype
            Buffer dtype; None keeps the store's.  Casting happens in the copy.
        orientation
            ``"native"``: slabs as the file stores them, so a refresh is a
            plain memcpy.  ``"kn"``: GroupedMatMul ``[k, n]``.
        """
        if orientation not in ("native", "kn"):
            raise ValueError(f"orientation must be 'native' or 'kn', got {orientation!r}")
        layers = store.layers
        if capacity is None:
            capacities = [layer.num_experts for layer in layers]
        elif isinstance(capacity, int):
            capacities = [min(capacity, layer.num_experts) for layer in layers]
        else:
            capacities = [min(int(c), layer.num_experts) for c, layer in zip(capacity, layers, strict=True)]
        arrays: dict[str, npt.NDArray[np.generic]] = {}
        transpose = []
        for layer, slots in zip(layers, capacities):
            for proj, stack in layer.stacks:
                if stack.encoding.encoded and (orientation != "native" or (dtype is not None and np.dtype(dtype) != stack.dtype)):
                    raise SinkError(
                        f"{stack.name}: {stack.encoding.describe()} slabs are encoded; a cast or transposed "
                        "copy of them would not be their values (keep the store's dtype and native orientation)"
                    )
                for part, geometry in stack.parts.items():
                    name = param_name(names, layer.layer_index, proj, part)
                    if part == "weight":
                        flip = orientation == "kn" and stack.native_orientation == "nk"
                        slab = (stack.k, stack.n) if orientation == "kn" else stack.native_shape
                        buffer_dtype = stack.dtype if dtype is None else np.dtype(dtype)
                    else:
                        flip, slab, buffer_dtype = False, geometry.slab_shape, geometry.dtype.numpy
                    buffer = np.empty((slots, *slab), dtype=buffer_dtype)
                    # Fresh anonymous memory is slow to first touch: fault it in now,
                    # outside any refresh.
                    buffer.view(np.uint8).reshape(-1)[:] = 0
                    arrays[name] = buffer
                    if flip:
                        transpose.append(name)
        return cls(arrays, transpose)

"""Reference dequantization: a slab's parts -> its values (numpy, CPU).

These are the only copies the store layer makes.  Each encoding follows the
formula its format defines (see FORMATS.md); tests check them against the
formats' own tools (gguf-py, transformers, compressed-tensors) or, for
AWQ and GPTQ, their packing definitions.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from .._errors import FormatError
from .._geometry import Encoding, Orientation
from ._blockscaled import dequantize_fp8_block, dequantize_mxfp4
from ._ggml import DEQUANTIZABLE, can_dequantize, dequantize_ggml
from ._packed import dequantize_packed

__all__ = [
    "DEQUANTIZABLE",
    "can_dequantize",
    "dequantize_fp8_block",
    "dequantize_ggml",
    "dequantize_mxfp4",
    "dequantize_packed",
    "dequantize_slab",
]


def dequantize_slab(
    encoding: Encoding,
    parts: Mapping[str, npt.NDArray[np.generic]],
    orientation: Orientation,
    k: int,
    n: int,
    *,
    where: str = "",
) -> npt.NDArray[np.float32]:
    """Values of one expert's slab, float32, in the weight part's native
    orientation (``[k, n]`` for ``"kn"``, ``[n, k]`` for ``"nk"``).

    Raises
    ------
    FormatError
        The encoding is not one this module can decode, or a part is missing
        or of the wrong shape.
    """
    rows, cols = (k, n) if orientation == "kn" else (n, k)
    weight = parts["weight"]
    if encoding.kind == "plain":
        return np.asarray(weight, dtype=np.float32)
    if encoding.kind == "fp8_block":
        return dequantize_fp8_block(weight, _need(parts, "scale", where), encoding.block, where=where)
    if encoding.kind == "mxfp4":
        return dequantize_mxfp4(weight, _need(parts, "scale", where), cols, where=where)
    if encoding.kind == "ggml":
        values = dequantize_ggml(encoding.dtype, np.asarray(weight, dtype=np.uint8), cols, where=where)
        return np.asarray(values, dtype=np.float32).reshape(rows, cols)
    if encoding.packed:
        return dequantize_packed(encoding, parts, rows, cols, where=where)
    raise FormatError(f"{where}: encoding {encoding.describe()} cannot be dequantized by mmapstore")


def _need(parts: Mapping[str, npt.NDArray[np.generic]], name: str, where: str) -> npt.NDArray[np.generic]:
    part = parts.get(name)
    if part is None:
        raise FormatError(f"{where}: encoded stack has no {name!r} part")
    return part

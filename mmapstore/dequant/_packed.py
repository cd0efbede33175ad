"""Packed 4-bit weights -> values: compressed-tensors, AWQ and GPTQ, in numpy.

Each function follows its format's own reference code, so results agree with
it exactly once rounded to that code's output dtype (the products of 4-bit
codes and bf16/f16 scales are exact in float32):

- compressed-tensors ``pack-quantized``: eight signed INT4 codes per I32 word
  along ``in``, element ``i`` at bits ``4i`` (stored as ``q + 8``); zero
  points the same way along ``out``; ``(q - zero) * scale`` per group of
  ``in`` (``weight_g_idx`` maps a column to its group when present).
- compressed-tensors NVFP4 / MXFP4: two E2M1 codes per byte, low nibble
  first; ``code * (scale / global_scale)`` in float32 (NVFP4, F8_E4M3 scale
  per 16) or ``code * 2**(e8m0 - 127)`` (MXFP4, per 32).
- AutoAWQ GEMM: ``qweight [in, out/8]``, word nibble ``i`` holds column
  ``8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]``; ``qzeros`` the same; ``(q - z) * s``.
- GPTQ v1: ``qweight [in/8, out]``, word nibble ``i`` holds row ``8r + i``;
  ``qzeros [groups, out/8]`` sequential and holding ``zero - 1``; row ``i``
  belongs to group ``g_idx[i]`` (``i // group`` without it).  A stored
  nibble of 15 (zero point 0) is refused: v1 cannot represent it and GPTQ's
  own readers disagree on it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from .._errors import FormatError
from .._geometry import Encoding
from ._blockscaled import E2M1_VALUES, dequantize_mxfp4

__all__ = ["dequantize_packed", "unpack_int4"]

_SHIFTS = np.arange(0, 32, 4, dtype=np.uint32)
# AutoAWQ's AWQ_REVERSE_ORDER: column p of a group of 8 lies in nibble _AWQ_NIBBLE[p].
_AWQ_NIBBLE = np.array([0, 4, 1, 5, 2, 6, 3, 7])


def unpack_int4(words: npt.NDArray[np.generic], axis: int) -> npt.NDArray[np.uint8]:
    """The eight nibbles of each I32 word, element ``i`` from bits ``4i``,
    laid out along ``axis`` (0 or 1) of a 2-D array: ``[r, c] -> [8r, c]`` or
    ``[r, 8c]``.  Little-endian words, whatever the host's byte order."""
    unsigned = np.asarray(words, dtype="<i4").view("<u4")
    nibbles: npt.NDArray[np.uint8] = ((unsigned[..., None] >> _SHIFTS) & 0xF).astype(np.uint8)  # [r, c, 8]
    rows, cols = unsigned.shape
    if axis == 1:
        return nibbles.reshape(rows, cols * 8)
    by_rows: npt.NDArray[np.uint8] = nibbles.transpose(0, 2, 1).reshape(rows * 8, cols)
    return by_rows


def dequantize_packed(
    encoding: Encoding,
    parts: Mapping[str, npt.NDArray[np.generic]],
    rows: int,
    cols: int,
    *,
    where: str = "",
) -> npt.NDArray[np.float32]:
    """Values of one packed expert slab, float32, ``[rows, cols]`` in native
    orientation (``[out, in]`` for compressed-tensors, ``[in, out]`` for AWQ/GPTQ).

    Raises
    ------
    FormatError
        A part is missing, ``shape`` disagrees with ``[rows, cols]``, or a
        ``g_idx`` names a group that does not exist.
    """
    weight = parts["weight"]
    if encoding.kind == "int4_group":
        return _int4_group(parts, rows, cols, encoding.block[1], where)
    if encoding.kind == "nvfp4":
        scale = np.asarray(_need(parts, "scale", where), dtype=np.float32)
        global_scale = np.asarray(_need(parts, "global_scale", where), dtype=np.float32).reshape(())
        # compressed-tensors: scale / global_scale in float32, then times the code
        effective: npt.NDArray[np.float32] = np.repeat(scale / global_scale, 16, axis=1)[:, :cols]
        return E2M1_VALUES[_e2m1_codes(weight, rows, cols)] * effective
    if encoding.kind == "mxfp4_packed":
        exponents = _need(parts, "scale", where).view(np.uint8)  # U8 or F8_E8M0: the biased exponent bits
        blocks = np.asarray(weight, dtype=np.uint8).reshape(rows, cols // 32, 16)
        return dequantize_mxfp4(blocks, exponents, cols, where=where)
    if encoding.kind == "awq":
        codes = _awq_order(unpack_int4(weight, axis=1))[:, :cols]
        awq_zeros = _awq_order(unpack_int4(_need(parts, "zero", where), axis=1))[:, :cols]
        groups = np.arange(rows) // encoding.block[0]
        return _scaled(codes, awq_zeros[groups], _need(parts, "scale", where), groups)
    if encoding.kind == "gptq":
        codes = unpack_int4(weight, axis=0)[:rows]
        stored = unpack_int4(_need(parts, "zero", where), axis=1)[:, :cols]
        if (stored == 15).any():
            # zero point 0 (or 16): v1 stores -1, which GPTQ's packers smear into
            # neighbouring nibbles and its readers disagree on; no faithful value exists.
            raise FormatError(
                f"{where}: GPTQ v1 qzeros hold nibble 15 (zero point 0), which the v1 format cannot "
                "represent; refusing rather than guessing"
            )
        zeros = stored.astype(np.int32) + 1
        gptq_scale = _need(parts, "scale", where)
        groups = _groups(parts, rows, encoding.block[0], gptq_scale.shape[0], where)
        return _scaled(codes, zeros[groups], gptq_scale, groups)
    raise FormatError(f"{where}: encoding {encoding.describe()} is not a packed 4-bit encoding")


def _int4_group(
    parts: Mapping[str, npt.NDArray[np.generic]], rows: int, cols: int, group: int, where: str
) -> npt.NDArray[np.float32]:
    shape = parts.get("shape")
    if shape is not None and [int(value) for value in shape] != [rows, cols]:
        raise FormatError(f"{where}: weight_shape {[int(value) for value in shape]} disagrees with [{rows}, {cols}]")
    scale = _need(parts, "scale", where)
    columns = _groups(parts, cols, group, scale.shape[1], where)
    codes = unpack_int4(parts["weight"], axis=1)[:, :cols].astype(np.int32) - 8
    zero = parts.get("zero")
    if zero is not None:
        codes -= (unpack_int4(zero, axis=0)[:rows].astype(np.int32) - 8)[:, columns]
    values: npt.NDArray[np.float32] = codes.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, columns]
    return values


def _groups(
    parts: Mapping[str, npt.NDArray[np.generic]], length: int, group: int, count: int, where: str
) -> npt.NDArray[np.intp]:
    """Group of each input index: ``g_idx`` when the checkpoint has one
    (GPTQ act-order), else ``index // group``."""
    g_idx = parts.get("g_idx")
    if g_idx is None:
        return np.arange(length) // group
    groups = np.asarray(g_idx).astype(np.intp)
    if groups.shape != (length,) or groups.min(initial=0) < 0 or groups.max(initial=0) >= count:
        raise FormatError(f"{where}: g_idx names groups outside [0, {count}) (shape {list(groups.shape)})")
    return groups


def _scaled(
    codes: npt.NDArray[np.uint8],
    zeros: npt.NDArray[np.generic],
    scale: npt.NDArray[np.generic],
    groups: npt.NDArray[np.intp],
) -> npt.NDArray[np.float32]:
    """``(q - z) * s`` with ``s`` picked per row of ``[in, out]`` by ``groups``."""
    difference = codes.astype(np.int32) - zeros.astype(np.int32)
    values: npt.NDArray[np.float32] = difference.astype(np.float32) * np.asarray(scale, dtype=np.float32)[groups]
    return values


def _awq_order(nibbles: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    rows, width = nibbles.shape
    return nibbles.reshape(rows, width // 8, 8)[:, :, _AWQ_NIBBLE].reshape(rows, width)


def _e2m1_codes(weight: npt.NDArray[np.generic], rows: int, cols: int) -> npt.NDArray[np.uint8]:
    packed = np.asarray(weight, dtype=np.uint8)
    codes = np.empty((rows, cols), dtype=np.uint8)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    return codes


def _need(parts: Mapping[str, npt.NDArray[np.generic]], name: str, where: str) -> npt.NDArray[np.generic]:
    part = parts.get(name)
    if part is None:
        raise FormatError(f"{where}: packed stack has no {name!r} part")
    return part

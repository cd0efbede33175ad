"""FP8 with block scales (DeepSeek-V3 style) and MXFP4 (GPT-OSS), in numpy."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .._errors import FormatError

__all__ = ["E2M1_VALUES", "dequantize_fp8_block", "dequantize_mxfp4"]

# The 16 E2M1 (FP4) code points, sign bit highest: OCP MX spec and GPT-OSS.
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)


def dequantize_fp8_block(
    weight: npt.NDArray[np.generic],
    scale: npt.NDArray[np.generic],
    block: tuple[int, int],
    *,
    where: str = "",
) -> npt.NDArray[np.float32]:
    """``w[i, j] * s[i // block[0], j // block[1]]`` in float32.

    ``weight`` is a 2-D F8 slab, ``scale`` its ``[ceil(rows / b0), ceil(cols / b1)]``
    grid (F32 ``weight_scale_inv`` or BF16 ``weight_scale``: despite the name,
    both multiply).
    """
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    if scale.shape != grid:
        raise FormatError(
            f"{where}: scale grid {list(scale.shape)} does not fit a {rows}x{cols} slab with "
            f"{block[0]}x{block[1]} blocks (expected {list(grid)})"
        )
    scales = np.asarray(scale, dtype=np.float32)
    expanded = np.repeat(np.repeat(scales, block[0], axis=0)[:rows], block[1], axis=1)[:, :cols]
    return np.asarray(weight, dtype=np.float32) * expanded


def dequantize_mxfp4(
    blocks: npt.NDArray[np.generic],
    scales: npt.NDArray[np.generic],
    cols: int,
    *,
    where: str = "",
) -> npt.NDArray[np.float32]:
    """MXFP4 rows: ``blocks`` U8 ``[rows, cols / 32, 16]`` (two E2M1 codes per
    byte, low nibble first), ``scales`` U8 E8M0 ``[rows, cols / 32]``; value
    ``= E2M1[code] * 2 ** (scale - 127)``.  Returns ``[rows, cols]``."""
    rows = blocks.shape[0]
    if blocks.shape[1:] != (cols // 32, 16) or cols % 32 or scales.shape != (rows, cols // 32):
        raise FormatError(
            f"{where}: MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not describe "
            f"{rows}x{cols} values (expected [{rows}, {cols // 32}, 16] and [{rows}, {cols // 32}])"
        )
    packed = np.asarray(blocks, dtype=np.uint8)
    codes = np.empty((*packed.shape[:-1], 32), dtype=np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    # The exponent bits: a view, since an F8_E8M0 array cast to uint8 would convert values (2**-7 -> 0).
    exponents = np.asarray(scales).view(np.uint8).astype(np.int32) - 127
    values = np.ldexp(E2M1_VALUES[codes], exponents[..., None])
    return values.reshape(rows, cols).astype(np.float32)

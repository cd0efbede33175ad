"""Dequantize on the device, after the copy: FP8 block scales and MXFP4, in torch.

The same formulas as :mod:`mmapstore.dequant` (the numpy reference the tests
compare against), batched over any leading axes (``[count, ...]`` slabs of a
pool), on whatever device the codes live.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._errors import FormatError
from ..dequant._blockscaled import E2M1_VALUES
from ..torch import require_torch

if TYPE_CHECKING:
    import torch

__all__ = ["dequantize_fp8_block", "dequantize_mxfp4"]


def dequantize_fp8_block(
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    *,
    dtype: torch.dtype | None = None,
    where: str = "",
) -> torch.Tensor:
    """``w[..., i, j] * s[..., i // block[0], j // block[1]]``.

    Parameters
    ----------
    weight
        ``[..., rows, cols]`` FP8 codes (any float dtype; computed in float32).
    scale
        ``[..., ceil(rows / b0), ceil(cols / b1)]`` (F32 ``weight_scale_inv`` or
        BF16 ``weight_scale``; both multiply).
    dtype
        Result dtype (float32 by default).

    Raises
    ------
    FormatError
        The scale grid does not fit the slab.
    """
    require_torch("dequantize_fp8_block")
    import torch

    rows, cols = weight.shape[-2:]
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale.shape[-2:]) != grid or scale.shape[:-2] != weight.shape[:-2]:
        raise FormatError(
            f"{where}: scale grid {list(scale.shape)} does not fit a {list(weight.shape)} slab with "
            f"{block[0]}x{block[1]} blocks (expected [..., {grid[0]}, {grid[1]}])"
        )
    values = weight.to(torch.float32)
    scales = scale.to(device=weight.device, dtype=torch.float32)
    if rows % block[0] == 0 and cols % block[1] == 0:
        # Tile view: no [rows, cols] scale grid is materialised.
        tiled = values.reshape(*values.shape[:-2], grid[0], block[0], grid[1], block[1])
        result = (tiled * scales[..., :, None, :, None]).reshape(values.shape)
    else:
        expanded = scales.repeat_interleave(block[0], dim=-2)[..., :rows, :]
        expanded = expanded.repeat_interleave(block[1], dim=-1)[..., :cols]
        result = values * expanded
    return result if dtype is None else result.to(dtype)


def dequantize_mxfp4(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    cols: int,
    *,
    dtype: torch.dtype | None = None,
    where: str = "",
) -> torch.Tensor:
    """MXFP4 rows: ``blocks`` U8 ``[..., rows, cols / 32, 16]`` (two E2M1 codes
    per byte, low nibble first), ``scales`` U8 E8M0 ``[..., rows, cols / 32]``;
    value ``= E2M1[code] * 2 ** (scale - 127)``.  Returns ``[..., rows, cols]``
    (float32 unless ``dtype``).  The E8M0 code 255 is NaN (OCP MX), so a
    block with that scale dequantizes to NaN, zeros included.

    Raises
    ------
    FormatError
        The shapes do not describe ``cols`` values per row.
    """
    require_torch("dequantize_mxfp4")
    import torch

    groups = cols // 32
    lead = blocks.shape[:-2]
    if cols % 32 or blocks.shape[-2:] != (groups, 16) or scales.shape != blocks.shape[:-1]:
        raise FormatError(
            f"{where}: MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not describe "
            f"{cols} values per row (expected [..., {groups}, 16] and [..., {groups}])"
        )
    packed = blocks.to(torch.uint8)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*lead, groups, 32)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = table[codes.to(torch.int64)]
    exponents = scales.to(device=blocks.device, dtype=torch.int32) - 127
    result = torch.ldexp(values, exponents[..., None].to(torch.float32)).reshape(*lead, cols)
    return result if dtype is None else result.to(dtype)

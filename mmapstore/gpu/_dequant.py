"""Dequantize on the device, after the copy: FP8 block scales, MXFP4 and ggml blocks, in torch.

The same formulas as :mod:`mmapstore.dequant` (the numpy reference the tests
compare against), batched over any leading axes (``[count, ...]`` slabs of a
pool), on whatever device the codes live.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from .._errors import FormatError
from ..dequant._blockscaled import E2M1_VALUES
from ..dequant._ggml import MXFP4_DOUBLED
from ..torch import require_torch

if TYPE_CHECKING:
    import torch

__all__ = ["GGML_DEVICE_TYPES", "dequantize_fp8_block", "dequantize_ggml", "dequantize_mxfp4"]


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
    values = _table("e2m1", blocks.device)[codes.to(torch.int64)]
    exponents = scales.to(device=blocks.device, dtype=torch.int32) - 127
    result = torch.ldexp(values, exponents[..., None].to(torch.float32)).reshape(*lead, cols)
    return result if dtype is None else result.to(dtype)


@functools.cache
def _table(name: str, device: torch.device) -> torch.Tensor:
    """A decode table on ``device``, made once per device: copying a host table to the device
    makes the host wait for the stream to drain, which a copy per slab did on every flush."""
    import torch

    values = {"e2m1": E2M1_VALUES, "mxfp4_doubled": MXFP4_DOUBLED}[name]
    return torch.from_numpy(np.asarray(values, dtype=np.float32)).to(device)


def dequantize_ggml(code: str, raw: torch.Tensor, cols: int, *, where: str = "") -> torch.Tensor:
    """Rows of ggml blocks ``raw`` U8 ``[..., row_nbytes]`` to float32 ``[..., cols]``, on their device.

    The same float32 operations, in the same order, as the numpy reference
    :func:`mmapstore.dequant.dequantize_ggml` (itself bit-identical to
    gguf-py), one elementwise kernel each: no fused multiply-add, so the
    values are bit-identical to it on any device.

    Raises
    ------
    FormatError
        ``code`` is not one of :data:`GGML_DEVICE_TYPES`, or the rows are not
        ``cols`` values long.
    """
    require_torch("dequantize_ggml")
    import torch

    from .._dtypes import GGML_BLOCK_CODES

    dtype = GGML_BLOCK_CODES.get(code)
    if code not in GGML_DEVICE_TYPES or dtype is None:
        raise FormatError(f"{where}: ggml type {code} is not decoded on the device")
    if raw.dtype != torch.uint8 or cols % dtype.block_elems or raw.shape[-1] != dtype.row_nbytes(cols):
        raise FormatError(f"{where}: {code} rows {list(raw.shape)} ({raw.dtype}) do not hold {cols} values each")
    blocks = raw.reshape(-1, dtype.block_nbytes)
    values = _GGML_KERNELS[code](blocks)
    return values.reshape(*raw.shape[:-1], cols)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The f16 at byte ``start`` of each block, as float32 ``[nb, 1]``."""
    import torch as t

    return blocks[:, start : start + 2].contiguous().view(t.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``[nb, g, L]`` bytes -> ``[nb, g * 2L]``: per group, low nibbles then high nibbles."""
    import torch as t

    return t.stack((packed & 0x0F, packed >> 4), dim=2).reshape(packed.shape[0], -1)


def _crumbs(packed: torch.Tensor) -> torch.Tensor:
    """``[nb, g, 32]`` bytes -> ``[nb, g, 4, 32]`` 2-bit values, shift 0, 2, 4, 6."""
    import torch as t

    return t.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=2)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """``[..., L]`` bytes -> ``[..., 8, L]`` bits, bit ``i`` of every byte in row ``i``."""
    import torch as t

    return t.stack([(packed >> shift) & 1 for shift in range(8)], dim=-2)


def _fifth_bits(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian u32 at ``start`` as 32 bits (bit ``i``: value ``i``), ``[nb, 32]``."""
    return _bits(blocks[:, start : start + 4]).transpose(-1, -2).reshape(blocks.shape[0], 32)


def _signed(values: torch.Tensor, offset: int) -> torch.Tensor:
    import torch as t

    return (values.to(t.int16) - offset).float()


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * _signed(_nibbles(blocks[:, None, 2:18]), 8)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * _nibbles(blocks[:, None, 4:20]).float() + _f16(blocks, 2)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, None, 6:22]) | (_fifth_bits(blocks, 2) << 4)
    return _f16(blocks, 0) * _signed(q, 16)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(blocks[:, None, 8:24]) | (_fifth_bits(blocks, 4) << 4)).float()
    return _f16(blocks, 0) * q + _f16(blocks, 2)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    import torch as t

    return blocks[:, 2:34].view(t.int8).float() * _f16(blocks, 0)


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    nb = blocks.shape[0]
    scales = blocks[:, :16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0xF).float()).reshape(nb, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(nb, 16, 1)
    q = _crumbs(blocks[:, 16:80].reshape(nb, 2, 32)).reshape(nb, 16, 16).float()
    return (dl * q - ml).reshape(nb, 256)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    import torch as t

    nb = blocks.shape[0]
    hmask, packed, scale_bytes = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)
    low = _nibbles(scale_bytes[:, None, :8]).reshape(nb, 16)
    high = _crumbs(scale_bytes[:, None, 8:]).reshape(nb, 16)
    dl = (d * _signed(low | (high << 4), 32)).reshape(nb, 16, 1)
    ql = _crumbs(packed.reshape(nb, 2, 32)).reshape(nb, 16, 16)
    qh = _bits(hmask[:, None, :]).reshape(nb, 16, 16)
    q = (ql.to(t.int16) - ((qh ^ 1) << 2).to(t.int16)).float()  # a clear mask bit subtracts 4
    return (dl * q).reshape(nb, 256)


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch as t

    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = t.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = t.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales, mins


def _k_steps(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: each 32-value group's scale ``d * sc`` and offset ``dmin * m``, ``[nb, 8, 1]``."""
    nb = blocks.shape[0]
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    dl = (_f16(blocks, 0) * scales.float()).reshape(nb, 8, 1)
    return dl, (_f16(blocks, 2) * mins.float()).reshape(nb, 8, 1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    nb = blocks.shape[0]
    dl, ml = _k_steps(blocks)
    q = _nibbles(blocks[:, 16:144].reshape(nb, 4, 32)).reshape(nb, 8, 32).float()
    return (dl * q - ml).reshape(nb, 256)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    nb = blocks.shape[0]
    dl, ml = _k_steps(blocks)
    qh = _bits(blocks[:, None, 16:48]).reshape(nb, 8, 32)
    ql = _nibbles(blocks[:, 48:176].reshape(nb, 4, 32)).reshape(nb, 8, 32)
    return (dl * (ql | (qh << 4)).float() - ml).reshape(nb, 256)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    import torch as t

    nb = blocks.shape[0]
    scales = blocks[:, 192:208].view(t.int8).float()
    dl = (_f16(blocks, 208) * scales).reshape(nb, 16, 1)
    ql = _nibbles(blocks[:, :128].reshape(nb, 2, 64)).reshape(nb, 8, 32)
    qh = _crumbs(blocks[:, 128:192].reshape(nb, 2, 32)).reshape(nb, 8, 32)
    q = _signed(ql | (qh << 4), 32).reshape(nb, 16, 16)
    return (dl * q).reshape(nb, 256)


def _mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    """ggml's MXFP4: doubled E2M1 codes times ``ggml_e8m0_to_fp32_half(e)`` = ``2**(e - 128)``."""
    import torch as t

    e = blocks[:, :1].to(t.int32)
    bits = t.where(e < 2, t.bitwise_left_shift(t.full_like(e, 0x00200000), e), (e - 1) << 23)
    return bits.view(t.float32) * _table("mxfp4_doubled", blocks.device)[_nibbles(blocks[:, None, 1:17]).long()]


_GGML_KERNELS = {
    "MXFP4": _mxfp4,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
# ggml block types decoded on the device: those of the usual GGUF quantizations (Q4_K_M, Q5_K_M, Q6_K,
# Q8_0, the legacy Q4/Q5 and Q2_K/Q3_K mixes, and GPT-OSS's MXFP4); others are decoded on the host
# (mmapstore.dequant).
GGML_DEVICE_TYPES = frozenset(_GGML_KERNELS)

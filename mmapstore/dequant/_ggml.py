"""Dequantize ggml block types to float32, in numpy, a chunk of blocks at a time.

Each kernel takes ``blocks`` ``[nb, block_nbytes]`` (uint8) and returns
``[nb, block_elems]`` float32.  The formulas, and the order of every float32
operation, follow gguf-py's ``gguf/quants.py`` (itself a port of ggml's
``dequantize_row_*``), so results are bit-identical to
``gguf.quants.dequantize``.  Block layouts (little-endian):

==========  ==================================================================
Q4_0        d f16, 16 bytes of nibbles (low nibbles: values 0-15, high: 16-31)
Q4_1        d f16, m f16, nibbles as Q4_0; value = d * q + m
Q5_0 / Q5_1 as Q4_0 / Q4_1 with a u32 of fifth bits (bit i: value i) before the nibbles
Q8_0        d f16, 32 int8
Q2_K        16 scale bytes (low nibble scale, high nibble min), 64 bytes of 2-bit q, d f16, dmin f16
Q3_K        32 bytes of high-bit mask, 64 bytes of 2-bit q, 12 bytes of 6-bit scales, d f16
Q4_K        d f16, dmin f16, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
Q5_K        as Q4_K with 32 bytes of fifth bits before the nibbles
Q6_K        128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d f16
MXFP4       one E8M0 byte, 16 bytes of E2M1 nibbles (low nibbles: values 0-15)
==========  ==================================================================

MXFP4 follows ggml: E2M1 magnitudes doubled (0, 1, 2, 3, 4, 6, 8, 12) times
``ggml_e8m0_to_fp32_half(e)`` = ``2**(e - 128)`` (subnormal for e < 2), which
is ``e2m1 * 2**(e - 127)``, the OCP value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
import numpy.typing as npt

from .._dtypes import QK_K, DType
from .._errors import FormatError, UnsupportedEncodingError

__all__ = ["DEQUANTIZABLE", "MXFP4_DOUBLED", "can_dequantize", "dequantize_ggml"]

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

# Values per chunk: bounds the temporaries (a few float32 arrays this long)
# whatever the size of the slab.
_CHUNK_ELEMS = 1 << 21

_NIBBLE_SHIFTS = np.array([0, 4], dtype=np.uint8)
_CRUMB_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)
_BIT_SHIFTS = np.arange(8, dtype=np.uint8)
_BIT_SHIFTS_32 = np.arange(32, dtype=np.uint32)
MXFP4_DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)  # ggml: E2M1 x 2
_IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


def _f16(blocks: U8, start: int) -> F32:
    """The f16 at byte ``start`` of each block, as float32 ``[nb, 1]``."""
    return blocks[:, start : start + 2].view(np.float16).astype(np.float32)


def _nibbles(packed: U8) -> U8:
    """``[nb, g, 16]`` bytes -> ``[nb, g * 32]``: per group, low nibbles then high nibbles."""
    nb = packed.shape[0]
    return cast(U8, ((packed[:, :, None, :] >> _NIBBLE_SHIFTS[None, None, :, None]) & np.uint8(0x0F)).reshape(nb, -1))


def _q4_0(blocks: U8) -> F32:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, None, 2:18]).astype(np.int8) - np.int8(8)
    return cast(F32, d * q.astype(np.float32))


def _q4_1(blocks: U8) -> F32:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, None, 4:20]).astype(np.float32)
    return d * q + m


def _fifth_bits(blocks: U8, start: int) -> U8:
    high = blocks[:, start : start + 4].view("<u4")  # [nb, 1]
    return cast(U8, ((high >> _BIT_SHIFTS_32[None, :]) & np.uint32(1)).astype(np.uint8))


def _q5_0(blocks: U8) -> F32:
    d = _f16(blocks, 0)
    q = (_nibbles(blocks[:, None, 6:22]) | (_fifth_bits(blocks, 2) << np.uint8(4))).astype(np.int8) - np.int8(16)
    return cast(F32, d * q.astype(np.float32))


def _q5_1(blocks: U8) -> F32:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = (_nibbles(blocks[:, None, 8:24]) | (_fifth_bits(blocks, 4) << np.uint8(4))).astype(np.float32)
    return cast(F32, d * q + m)


def _q8_0(blocks: U8) -> F32:
    d = _f16(blocks, 0)
    return blocks[:, 2:34].view(np.int8).astype(np.float32) * d


def _crumbs(packed: U8) -> U8:
    """``[nb, g, 32]`` bytes -> ``[nb, g, 4, 32]`` 2-bit values, shift 0, 2, 4, 6."""
    return cast(U8, (packed[:, :, None, :] >> _CRUMB_SHIFTS[None, None, :, None]) & np.uint8(3))


def _q2_k(blocks: U8) -> F32:
    nb = blocks.shape[0]
    scales = blocks[:, : QK_K // 16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0xF).astype(np.float32)).reshape(nb, QK_K // 16, 1)
    ml = (dmin * (scales >> 4).astype(np.float32)).reshape(nb, QK_K // 16, 1)
    q = _crumbs(blocks[:, 16:80].reshape(nb, 2, 32)).reshape(nb, QK_K // 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(nb, QK_K)


def _q3_k(blocks: U8) -> F32:
    nb = blocks.shape[0]
    hmask, packed, scale_bytes = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)
    # 16 six-bit scales: low nibbles of bytes 0-7 then their high nibbles,
    # each topped by two bits of bytes 8-11 (shift 0, 2, 4, 6 in turn).
    low = (scale_bytes[:, None, :8] >> _NIBBLE_SHIFTS[None, :, None]).reshape(nb, 16) & np.uint8(0x0F)
    high = (scale_bytes[:, None, 8:] >> _CRUMB_SHIFTS[None, :, None]).reshape(nb, 16) & np.uint8(0x03)
    scales = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
    dl = (d * scales).reshape(nb, 16, 1)
    ql = _crumbs(packed.reshape(nb, 2, 32)).reshape(nb, 16, QK_K // 16)
    qh = ((hmask[:, None, None, :] >> _BIT_SHIFTS[None, None, :, None]) & np.uint8(1)).reshape(nb, 16, QK_K // 16)
    # A set mask bit means "no offset"; a clear one subtracts 4.
    q = (ql.astype(np.int8) - ((qh ^ np.uint8(1)) << np.uint8(2)).astype(np.int8)).astype(np.float32)
    return cast(F32, (dl * q).reshape(nb, QK_K))


def _k_scales_mins(packed: U8) -> tuple[U8, U8]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins."""
    nb = packed.shape[0]
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scales.reshape(nb, 8), mins.reshape(nb, 8)


def _q4_k(blocks: U8) -> F32:
    nb = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    dl = (d * scales.astype(np.float32)).reshape(nb, 8, 1)
    ml = (dmin * mins.astype(np.float32)).reshape(nb, 8, 1)
    q = _nibbles(blocks[:, 16:144].reshape(nb, 4, 32)).reshape(nb, 8, 32).astype(np.float32)
    return (dl * q - ml).reshape(nb, QK_K)


def _q5_k(blocks: U8) -> F32:
    nb = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    dl = (d * scales.astype(np.float32)).reshape(nb, 8, 1)
    ml = (dmin * mins.astype(np.float32)).reshape(nb, 8, 1)
    qh = ((blocks[:, None, None, 16:48] >> _BIT_SHIFTS[None, None, :, None]) & np.uint8(1)).reshape(nb, 8, 32)
    ql = _nibbles(blocks[:, 48:176].reshape(nb, 4, 32)).reshape(nb, 8, 32)
    q = (ql | (qh << np.uint8(4))).astype(np.float32)
    return cast(F32, (dl * q - ml).reshape(nb, QK_K))


def _q6_k(blocks: U8) -> F32:
    nb = blocks.shape[0]
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(blocks, 208)
    dl = (d * scales).reshape(nb, 16, 1)
    ql = _nibbles(blocks[:, :128].reshape(nb, 2, 64)).reshape(nb, 8, 32)
    qh = _crumbs(blocks[:, 128:192].reshape(nb, 2, 32)).reshape(nb, 8, 32)
    q = ((ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(nb, 16, 16).astype(np.float32)
    return cast(F32, (dl * q).reshape(nb, QK_K))


def _e8m0_half(exponent: U8) -> F32:
    """ggml_e8m0_to_fp32_half: ``2**(e - 128)`` as float32 bits (subnormal below e = 2)."""
    e = exponent.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return cast(F32, bits.astype(np.uint32).view(np.float32))


def _mxfp4(blocks: U8) -> F32:
    d = _e8m0_half(blocks[:, :1])
    q = MXFP4_DOUBLED[_nibbles(blocks[:, None, 1:17])]
    return d * q.astype(np.float32)


def _iq4_nl(blocks: U8) -> F32:
    d = _f16(blocks, 0)
    q = _IQ4_NL_VALUES[_nibbles(blocks[:, None, 2:18])].astype(np.float32)
    return d * q


def _tq2_0(blocks: U8) -> F32:
    nb = blocks.shape[0]
    d = _f16(blocks, 64)
    q = _crumbs(blocks[:, :64].reshape(nb, 2, 32)).reshape(nb, QK_K).astype(np.int8) - np.int8(1)
    return cast(F32, d * q.astype(np.float32))


def _iq4_xs(blocks: U8) -> F32:
    nb = blocks.shape[0]
    d = _f16(blocks, 0)
    high = blocks[:, 2:4].view("<u2")  # [nb, 1]: 2 bits per sub-block scale
    high = (high >> (2 * np.arange(8, dtype=np.uint16))[None, :]).astype(np.uint8) & np.uint8(0x03)
    low = (blocks[:, 4:8, None] >> _NIBBLE_SHIFTS[None, None, :]).reshape(nb, 8) & np.uint8(0x0F)
    scales = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    dl = (d * scales.astype(np.float32)).reshape(nb, 8, 1)
    q = _IQ4_NL_VALUES[_nibbles(blocks[:, 8:136].reshape(nb, 8, 16))].astype(np.float32).reshape(nb, 8, 32)
    return cast(F32, (dl * q).reshape(nb, QK_K))


def _tq1_0(blocks: U8) -> F32:
    nb = blocks.shape[0]
    d = _f16(blocks, 52)
    # Base-3 digits packed five (four in qh) to a byte: multiplying by 3**k
    # (mod 256, as ggml does in uint8) brings digit k to the top, and
    # (byte * 3) >> 8 reads it.
    powers = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
    digits = [
        (blocks[:, None, :32] * powers[None, :, None]).reshape(nb, 160),
        (blocks[:, None, 32:48] * powers[None, :, None]).reshape(nb, 80),
        (blocks[:, None, 48:52] * powers[None, :4, None]).reshape(nb, 16),
    ]
    q = ((np.concatenate(digits, axis=-1).astype(np.uint16) * 3) >> 8).astype(np.int8) - np.int8(1)
    return cast(F32, d * q.astype(np.float32))


def _ue4m3_half(scale: U8) -> F32:
    """NVFP4's unsigned E4M3 sub-block scale, halved (the doubled E2M1 table)."""
    exponent = (scale >> 3).astype(np.int32) & 0xF
    mantissa = (scale & 0x7).astype(np.float32)
    value = np.where(
        exponent == 0,
        mantissa * np.float32(2.0**-9),
        (np.float32(1.0) + mantissa / np.float32(8.0)) * (np.float32(2.0) ** (exponent.astype(np.float32) - 7)),
    )
    return cast(F32, np.where((scale == 0) | (scale == 0x7F), np.float32(0.0), value * np.float32(0.5)))


def _nvfp4(blocks: U8) -> F32:
    nb = blocks.shape[0]
    d = _ue4m3_half(blocks[:, :4]).reshape(nb, 4, 1)
    packed = blocks[:, 4:36].reshape(nb, 4, 8)  # per 16-value sub-block: low nibbles, then high
    q = MXFP4_DOUBLED[np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)]
    return cast(F32, (d * q.astype(np.float32)).reshape(nb, 64))


_KERNELS: dict[str, Callable[[U8], F32]] = {
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
    "MXFP4": _mxfp4,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
    "TQ1_0": _tq1_0,
    "TQ2_0": _tq2_0,
    "NVFP4": _nvfp4,
}

_PLAIN = frozenset({"F32", "F16", "BF16", "F64"})

DEQUANTIZABLE: frozenset[str] = _PLAIN | frozenset(_KERNELS)
"""Codes :func:`dequantize_ggml` accepts."""


def can_dequantize(dtype: DType) -> bool:
    """Whether :func:`dequantize_ggml` decodes ``dtype`` (check before serving a tensor)."""
    return dtype.code in DEQUANTIZABLE


def dequantize_ggml(dtype: DType, raw: npt.NDArray[np.uint8], n: int, *, where: str = "") -> F32:
    """Decode rows of ggml-encoded bytes to float32.

    Parameters
    ----------
    dtype
        The encoding (a ``GGML_TYPES`` entry: a block type or F32/F16/BF16/F64).
    raw
        ``[..., row_nbytes]`` uint8, e.g. one expert's slab ``[out, row_nbytes]``
        of a GGUF experts tensor; any view, a memory map included (read only).
    n
        Values per row; ``row_nbytes`` must equal ``dtype.row_nbytes(n)``.
    where
        Prefix for error messages (file and tensor).

    Returns
    -------
    numpy.ndarray
        A new float32 array ``[..., n]``.

    Raises
    ------
    UnsupportedEncodingError
        ``dtype`` has no decoder here (the grid-based IQ types, Q8_1, Q8_K,
        Q1_0, integers).
    FormatError
        ``raw`` is not uint8 or its rows are not ``n`` values long.
    """
    prefix = f"{where}: " if where else ""
    if dtype.code not in DEQUANTIZABLE:
        raise UnsupportedEncodingError(
            f"{prefix}cannot dequantize ggml type {dtype.code}; supported: {', '.join(sorted(DEQUANTIZABLE))}"
        )
    if raw.dtype != np.uint8 or raw.ndim < 1:
        raise FormatError(
            f"{prefix}{dtype.code} rows must be a uint8 array of at least 1 dimension, found {raw.dtype} {raw.shape}"
        )
    if n < 1 or n % dtype.block_elems or raw.shape[-1] != dtype.row_nbytes(n):
        expected = dtype.row_nbytes(n) if n >= 1 and n % dtype.block_elems == 0 else None
        raise FormatError(
            f"{prefix}{dtype.code} rows of {n} values need "
            f"{expected if expected is not None else f'a positive multiple of {dtype.block_elems} values and'} "
            f"bytes per row, found {raw.shape[-1]}"
        )
    shape = (*raw.shape[:-1], n)
    if dtype.code in _PLAIN:
        return _plain(dtype, raw).reshape(shape)
    kernel = _KERNELS[dtype.code]
    block_nbytes, block_elems = dtype.block_nbytes, dtype.block_elems
    blocks = raw.reshape(-1, block_nbytes)
    out = np.empty((blocks.shape[0], block_elems), dtype=np.float32)
    step = max(1, _CHUNK_ELEMS // block_elems)
    # ggml decodes an inf or NaN scale (or an E8M0 of 255 times 6) to inf/NaN
    # without a word; so do we, faithfully, rather than warn about the data.
    with np.errstate(over="ignore", invalid="ignore"):
        for begin in range(0, blocks.shape[0], step):
            out[begin : begin + step] = kernel(blocks[begin : begin + step])
    return out.reshape(shape)


def _plain(dtype: DType, raw: U8) -> F32:
    flat = np.ascontiguousarray(raw).reshape(-1)
    if dtype.code == "BF16":
        # bf16 is the top half of an f32: widen the bits (exact, NaN payloads kept).
        return cast(F32, (flat.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32))
    return flat.view(dtype.numpy).astype(np.float32)

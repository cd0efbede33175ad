"""The one table between file dtype codes and numpy dtypes.

safetensors codes are the canonical names (``F32``, ``BF16``, ``F8_E4M3``...).
bf16 and fp8 are provided by :mod:`ml_dtypes`, so values read back exactly.

ggml's block-quantized types (``Q8_0``, ``Q4_K``, ``MXFP4``...) live in a
table of their own: a block of ``block_elems`` values is ``block_nbytes``
opaque bytes, so their ``numpy`` dtype is ``uint8``.  They are reachable from
GGUF type ids (:data:`GGML_TYPES`) and, only when asked for, from codes
(``dtype_from_code(code, block_ok=True)``); in a safetensors header such a
code is an opaque code like any unknown one (see :func:`opaque_dtype`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import numpy.typing as npt

from ._errors import FormatError, OptionError

__all__ = [
    "DTYPE_CODES",
    "GGML_BLOCK_CODES",
    "GGML_TYPES",
    "DType",
    "can_cast",
    "code_of",
    "dtype_from_code",
    "opaque_dtype",
    "parse_user_dtype",
]


@dataclass(frozen=True, slots=True)
class DType:
    """One entry of the table: file code, numpy dtype and block geometry.

    Plain types have ``block_elems == 1`` and ``block_nbytes == itemsize``.
    A block type packs ``block_elems`` consecutive values of the last axis
    into ``block_nbytes`` bytes (``numpy`` is then ``uint8``, the bytes).
    ``block_nbytes == 0`` (a hand-built plain entry) means the item size.
    """

    code: str
    numpy: np.dtype[np.generic]
    block_elems: int = 1
    block_nbytes: int = 0

    @property
    def itemsize(self) -> int:
        return int(self.numpy.itemsize)

    @property
    def known(self) -> bool:
        """False for a code read from a file that the table does not know
        (see :func:`opaque_dtype`): its bytes can be described, never served.
        ggml block types from :data:`GGML_TYPES` are known; a safetensors
        tensor whose code merely spells one (``"Q4_K"``) is opaque."""
        entry = DTYPE_CODES.get(self.code, GGML_BLOCK_CODES.get(self.code))
        return entry is self or entry == self

    @property
    def is_block(self) -> bool:
        """Whether values are packed in blocks (and need dequantizing)."""
        return self.block_elems > 1

    def row_nbytes(self, elems: int) -> int:
        """Bytes that ``elems`` values along the last axis take.

        Raises
        ------
        ValueError
            ``elems`` is negative or not a whole number of blocks.
        """
        if elems < 0 or elems % self.block_elems:
            raise ValueError(f"{self.code}: {elems} values are not a whole number of {self.block_elems}-value blocks")
        return elems // self.block_elems * (self.block_nbytes or self.itemsize)


def _entry(code: str, dtype: npt.DTypeLike) -> tuple[str, DType]:
    numpy = np.dtype(dtype).newbyteorder("<")
    return code, DType(code, numpy, 1, numpy.itemsize)


# Every multi-byte type is little-endian on disk (safetensors and GGUF both say so).
DTYPE_CODES: dict[str, DType] = dict(
    [
        _entry("F64", np.float64),
        _entry("F32", np.float32),
        _entry("F16", np.float16),
        _entry("BF16", ml_dtypes.bfloat16),
        _entry("F8_E4M3", ml_dtypes.float8_e4m3fn),
        _entry("F8_E5M2", ml_dtypes.float8_e5m2),
        _entry("F8_E8M0", ml_dtypes.float8_e8m0fnu),  # MXFP4 scales (power-of-two exponents)
        _entry("I64", np.int64),
        _entry("I32", np.int32),
        _entry("I16", np.int16),
        _entry("I8", np.int8),
        _entry("U64", np.uint64),
        _entry("U32", np.uint32),
        _entry("U16", np.uint16),
        _entry("U8", np.uint8),
        _entry("BOOL", np.bool_),
    ]
)

_BY_NUMPY: dict[np.dtype[np.generic], str] = {entry.numpy: code for code, entry in DTYPE_CODES.items()}

QK_K = 256  # elements of a ggml "K" super-block


def _block(code: str, block_elems: int, block_nbytes: int) -> tuple[str, DType]:
    return code, DType(code, np.dtype(np.uint8), block_elems, block_nbytes)


# Sizes as gguf-py's GGML_QUANT_SIZES writes them: (elements per block, bytes per block).
GGML_BLOCK_CODES: dict[str, DType] = dict(
    [
        _block("Q4_0", 32, 2 + 16),
        _block("Q4_1", 32, 2 + 2 + 16),
        _block("Q5_0", 32, 2 + 4 + 16),
        _block("Q5_1", 32, 2 + 2 + 4 + 16),
        _block("Q8_0", 32, 2 + 32),
        _block("Q8_1", 32, 4 + 4 + 32),
        _block("Q2_K", 256, 2 + 2 + QK_K // 16 + QK_K // 4),
        _block("Q3_K", 256, 2 + QK_K // 4 + QK_K // 8 + 12),
        _block("Q4_K", 256, 2 + 2 + QK_K // 2 + 12),
        _block("Q5_K", 256, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
        _block("Q6_K", 256, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
        _block("Q8_K", 256, 4 + QK_K + QK_K // 8),
        _block("IQ2_XXS", 256, 2 + QK_K // 4),
        _block("IQ2_XS", 256, 2 + QK_K // 4 + QK_K // 32),
        _block("IQ3_XXS", 256, 2 + QK_K // 4 + QK_K // 8),
        _block("IQ1_S", 256, 2 + QK_K // 8 + QK_K // 16),
        _block("IQ4_NL", 32, 2 + 16),
        _block("IQ3_S", 256, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
        _block("IQ2_S", 256, 2 + QK_K // 4 + QK_K // 16),
        _block("IQ4_XS", 256, 2 + 2 + QK_K // 2 + QK_K // 64),
        _block("IQ1_M", 256, QK_K // 8 + QK_K // 16 + QK_K // 32),
        _block("TQ1_0", 256, 2 + 4 * 13),
        _block("TQ2_0", 256, 2 + 64),
        _block("MXFP4", 32, 1 + 16),
        _block("NVFP4", 64, 4 + 32),
        _block("Q1_0", 128, 2 + 16),
    ]
)

# ggml type id (gguf-py's GGMLQuantizationType) -> entry.  Ids 4 and 5
# (Q4_2, Q4_3) were removed from ggml, 31-33 (Q4_0_4_4...) too: refused.
GGML_TYPES: dict[int, DType] = {
    0: DTYPE_CODES["F32"],
    1: DTYPE_CODES["F16"],
    2: GGML_BLOCK_CODES["Q4_0"],
    3: GGML_BLOCK_CODES["Q4_1"],
    6: GGML_BLOCK_CODES["Q5_0"],
    7: GGML_BLOCK_CODES["Q5_1"],
    8: GGML_BLOCK_CODES["Q8_0"],
    9: GGML_BLOCK_CODES["Q8_1"],
    10: GGML_BLOCK_CODES["Q2_K"],
    11: GGML_BLOCK_CODES["Q3_K"],
    12: GGML_BLOCK_CODES["Q4_K"],
    13: GGML_BLOCK_CODES["Q5_K"],
    14: GGML_BLOCK_CODES["Q6_K"],
    15: GGML_BLOCK_CODES["Q8_K"],
    16: GGML_BLOCK_CODES["IQ2_XXS"],
    17: GGML_BLOCK_CODES["IQ2_XS"],
    18: GGML_BLOCK_CODES["IQ3_XXS"],
    19: GGML_BLOCK_CODES["IQ1_S"],
    20: GGML_BLOCK_CODES["IQ4_NL"],
    21: GGML_BLOCK_CODES["IQ3_S"],
    22: GGML_BLOCK_CODES["IQ2_S"],
    23: GGML_BLOCK_CODES["IQ4_XS"],
    24: DTYPE_CODES["I8"],
    25: DTYPE_CODES["I16"],
    26: DTYPE_CODES["I32"],
    27: DTYPE_CODES["I64"],
    28: DTYPE_CODES["F64"],
    29: GGML_BLOCK_CODES["IQ1_M"],
    30: DTYPE_CODES["BF16"],
    34: GGML_BLOCK_CODES["TQ1_0"],
    35: GGML_BLOCK_CODES["TQ2_0"],
    39: GGML_BLOCK_CODES["MXFP4"],
    40: GGML_BLOCK_CODES["NVFP4"],
    41: GGML_BLOCK_CODES["Q1_0"],
}

# Short names accepted on the command line and in Python calls.
_USER_NAMES: dict[str, str] = {
    "f64": "F64",
    "f32": "F32",
    "float32": "F32",
    "f16": "F16",
    "float16": "F16",
    "bf16": "BF16",
    "bfloat16": "BF16",
    "f8_e4m3": "F8_E4M3",
    "f8_e5m2": "F8_E5M2",
    "i8": "I8",
    "u8": "U8",
}


def dtype_from_code(code: object, *, where: str = "", block_ok: bool = False) -> DType:
    """Look up a file dtype code; raise :class:`FormatError` naming ``where``.

    Only plain codes (safetensors') are accepted unless ``block_ok`` is set,
    which also accepts ggml block codes such as ``"Q4_K"``.
    """
    if isinstance(code, str):
        entry = DTYPE_CODES.get(code)
        if entry is None and block_ok:
            entry = GGML_BLOCK_CODES.get(code)
        if entry is not None:
            return entry
    prefix = f"{where}: " if where else ""
    if not block_ok and isinstance(code, str) and code in GGML_BLOCK_CODES:
        raise FormatError(
            f"{prefix}dtype {code!r} is a ggml block type, not allowed here; expected one of {sorted(DTYPE_CODES)}"
        )
    accepted = sorted(DTYPE_CODES) + (sorted(GGML_BLOCK_CODES) if block_ok else [])
    raise FormatError(f"{prefix}unknown dtype {code!r}; expected one of {accepted}")


_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,15}")


def opaque_dtype(code: object, *, where: str = "") -> DType:
    """A placeholder for a well-formed dtype code the table does not know
    (``F4``, ``F6_E2M3``, a future code): a tensor of it can sit in a
    checkpoint beside the experts, but it is refused wherever its values are
    needed.  A malformed code raises :class:`FormatError`."""
    if isinstance(code, str) and code in DTYPE_CODES:
        return DTYPE_CODES[code]
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        prefix = f"{where}: " if where else ""
        raise FormatError(f"{prefix}malformed dtype {code!r:.40}; expected a code such as 'BF16'")
    return DType(code, np.dtype(np.uint8))


def code_of(dtype: npt.DTypeLike) -> str:
    """File code of a numpy dtype (``np.float32`` -> ``"F32"``)."""
    key = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    code = _BY_NUMPY.get(key)
    if code is None:
        raise ValueError(f"numpy dtype {np.dtype(dtype)} has no file dtype code")
    return code


def parse_user_dtype(name: str) -> DType:
    """A dtype from a user-facing name (``bf16``, ``f32``) or a file code."""
    code = _USER_NAMES.get(name.lower(), name.upper())
    entry = DTYPE_CODES.get(code)
    if entry is None:
        raise OptionError(f"unknown dtype {name!r}; expected one of {sorted(_USER_NAMES)}")
    return entry


_FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"})


def _is_float(dtype: np.dtype[np.generic]) -> bool:
    code = _BY_NUMPY.get(dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype)
    return code in _FLOAT_CODES


def can_cast(source: npt.DTypeLike, destination: npt.DTypeLike) -> bool:
    """Whether a copy may cast ``source`` to ``destination``: numpy's
    ``same_kind`` rule, plus any float to any float (numpy does not know that
    bf16 and fp8 are floats of the same kind as f16)."""
    src, dst = np.dtype(source), np.dtype(destination)
    return bool(np.can_cast(src, dst, casting="same_kind")) or (_is_float(src) and _is_float(dst))

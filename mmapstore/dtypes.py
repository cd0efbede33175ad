"""The one table between file dtype codes and numpy dtypes.

safetensors codes are the canonical names (``F32``, ``BF16``, ``F8_E4M3``...).
bf16 and fp8 are provided by :mod:`ml_dtypes`, so values read back exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import FormatError

__all__ = ["DTYPE_CODES", "DType", "can_cast", "code_of", "dtype_from_code", "opaque_dtype", "parse_user_dtype"]


@dataclass(frozen=True, slots=True)
class DType:
    """One entry of the table: file code, numpy dtype and item size."""

    code: str
    numpy: np.dtype[np.generic]

    @property
    def itemsize(self) -> int:
        return int(self.numpy.itemsize)

    @property
    def known(self) -> bool:
        """False for a code read from a file that the table does not know
        (see :func:`opaque_dtype`): its bytes can be described, never served."""
        return DTYPE_CODES.get(self.code) == self


def _entry(code: str, dtype: object) -> tuple[str, DType]:
    return code, DType(code, np.dtype(dtype).newbyteorder("<"))


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


def dtype_from_code(code: object, *, where: str = "") -> DType:
    """Look up a file dtype code; raise :class:`FormatError` naming ``where``."""
    if isinstance(code, str):
        entry = DTYPE_CODES.get(code)
        if entry is not None:
            return entry
    prefix = f"{where}: " if where else ""
    raise FormatError(f"{prefix}unknown dtype {code!r}; expected one of {sorted(DTYPE_CODES)}")


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


def code_of(dtype: object) -> str:
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
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_USER_NAMES)}")
    return entry


_FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"})


def _is_float(dtype: np.dtype[np.generic]) -> bool:
    code = _BY_NUMPY.get(dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype)
    return code in _FLOAT_CODES


def can_cast(source: object, destination: object) -> bool:
    """Whether a copy may cast ``source`` to ``destination``: numpy's
    ``same_kind`` rule, plus any float to any float (numpy does not know that
    bf16 and fp8 are floats of the same kind as f16)."""
    src, dst = np.dtype(source), np.dtype(destination)
    return bool(np.can_cast(src, dst, casting="same_kind")) or (_is_float(src) and _is_float(dst))

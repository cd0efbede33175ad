"""Deterministic synthetic tensor values: a pure function of (seed, name, index).

``value(seed, name, i)`` for element ``i`` (C order) of tensor ``name``::

    key = first 4 bytes (little-endian) of blake2b(f"{seed}:{name}", digest_size=8)
    h   = uint32(i + key); h *= 0x9E3779B1; h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13
    q   = ((h >> 16) * 17) >> 16          # 0 .. 16, all arithmetic mod 2**32
    float dtypes: (q - 8) / 8             # exact in f32, f16, bf16, fp8 e4m3 and e5m2
    signed ints: q - 8;  unsigned ints: q;  bool: q > 8

so a test recomputes any slab without reading the file.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

__all__ = ["CHUNK_ELEMENTS", "synth_key", "synth_tensor", "synth_values"]

# Small chunks stay in cache; fresh large temporaries are slow to first touch.
CHUNK_ELEMENTS = 1 << 18


def synth_key(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little")


def synth_values(seed: int, name: str, start: int, count: int, dtype: np.dtype[np.generic]) -> npt.NDArray[np.generic]:
    """Elements ``start .. start+count-1`` of tensor ``name``, flat, in ``dtype``."""
    key = synth_key(seed, name)
    h = np.arange(count, dtype=np.uint32)
    h += np.uint32((start + key) & 0xFFFFFFFF)
    h *= np.uint32(0x9E3779B1)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h >>= np.uint32(16)
    h *= np.uint32(17)
    h >>= np.uint32(16)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return h > 8
    if np.issubdtype(dtype, np.unsignedinteger):
        return h.astype(dtype)
    signed = h.astype(np.int8)
    signed -= 8
    if np.issubdtype(dtype, np.signedinteger):
        return signed.astype(dtype)
    values: npt.NDArray[np.generic] = (signed.astype(np.float32) / np.float32(8)).astype(dtype)
    return values


def synth_tensor(seed: int, name: str, shape: tuple[int, ...], dtype: np.dtype[np.generic]) -> npt.NDArray[np.generic]:
    """The whole tensor (for tests and small files)."""
    count = int(np.prod(shape, dtype=np.int64))
    return synth_values(seed, name, 0, count, dtype).reshape(shape)

"""Frozen tensor records, format limits and path safety shared by every format."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

from .._dtypes import DType
from .._errors import FormatError

__all__ = [
    "MAX_DIMS",
    "MAX_ELEMENTS",
    "MAX_HEADER_NBYTES",
    "MAX_MANIFEST_NBYTES",
    "MAX_TENSORS",
    "TensorRecord",
    "parse_json_object",
    "read_exact",
    "split_by_size",
    "validate_shape",
]

# safetensors refuses headers over 100 MB; we use the same cap.
MAX_HEADER_NBYTES = 100_000_000
# A JSON manifest, index or config larger than this is refused before it is
# read.  DeepSeek-V3's index (91k tensors) is 8.9 MB; an index naming the
# MAX_TENSORS limit of tensors fits in about 50 MB.
MAX_MANIFEST_NBYTES = 64 * 1024 * 1024
# Tensors in one checkpoint (or one header, or one manifest).  DeepSeek-V3 has
# ~91k tensors, Kimi-K2 with INT4 experts (three tensors per expert
# projection) ~210k.  A header claiming more is refused before it is decoded.
MAX_TENSORS = 500_000
MAX_DIMS = 32
# Elements of one tensor, counting zero dimensions as one: numpy refuses
# shapes whose non-zero dimensions multiply past 2**63 bytes even when the
# array is empty, so a zero-byte tensor of [0, 2**63] is refused here.
MAX_ELEMENTS = 1 << 56


class TensorRecord(NamedTuple):
    """Where one tensor's bytes lie: ``path`` at absolute ``offset``, ``nbytes`` long.

    An immutable value like the frozen dataclasses elsewhere; a named tuple
    because a DeepSeek-V3 checkpoint has ~47,000 of them and a tuple is built
    several times faster, which is a third of the time to open such a store.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    path: str
    offset: int
    nbytes: int


def read_exact(fd: int, nbytes: int, offset: int, *, path: str, what: str) -> bytes:
    """``pread`` exactly ``nbytes`` or raise :class:`FormatError` (never a short read)."""
    chunks: list[bytes] = []
    remaining = nbytes
    position = offset
    while remaining > 0:
        chunk = os.pread(fd, min(remaining, 1 << 26), position)
        if not chunk:
            raise FormatError(
                f"{path}: truncated while reading {what}: expected {nbytes} bytes at offset "
                f"{offset}, found {nbytes - remaining}"
            )
        chunks.append(chunk)
        remaining -= len(chunk)
        position += len(chunk)
    return b"".join(chunks)


def _no_duplicates(path: str, what: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):  # rare: find the culprit only then
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise FormatError(f"{path}: {what} has duplicate key {key!r}")
                seen.add(key)
        return result

    return hook


def parse_json_object(raw: bytes, *, path: str, what: str) -> dict[str, Any]:
    """Decode UTF-8 JSON that must be an object with unique keys."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: {what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates(path, what))
    except FormatError:
        raise
    except RecursionError:
        raise FormatError(f"{path}: {what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise FormatError(f"{path}: {what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: {what} must be a JSON object, found {type(value).__name__}")
    return value


def validate_shape(shape: object, *, path: str, tensor: str) -> tuple[int, ...]:
    """A shape must be a list of at most MAX_DIMS non-negative Python ints."""
    if not isinstance(shape, list):
        raise FormatError(f"{path}: tensor {tensor!r}: shape must be a list, found {shape!r:.80}")
    if len(shape) > MAX_DIMS:
        raise FormatError(f"{path}: tensor {tensor!r}: {len(shape)} dimensions, limit is {MAX_DIMS}")
    elements = 1
    for dim in shape:
        # bool is an int subclass; True is not a dimension.
        if type(dim) is not int or dim < 0:
            raise FormatError(f"{path}: tensor {tensor!r}: shape must hold non-negative integers, found {shape!r:.80}")
        elements *= max(dim, 1)
        if elements > MAX_ELEMENTS:
            raise FormatError(
                f"{path}: tensor {tensor!r}: shape {shape!r:.80} has dimensions multiplying past "
                f"{MAX_ELEMENTS} elements (zero dimensions counted as one)"
            )
    return tuple(shape)


def shape_nbytes(shape: tuple[int, ...], dtype: DType, *, path: str = "", tensor: str = "") -> int:
    """Byte size with Python integers, so a hostile shape cannot overflow.

    For a block type (``dtype.is_block``) the last axis must hold a whole
    number of blocks: bytes = prod(shape[:-1]) * (last // block_elems) *
    block_nbytes.

    Raises
    ------
    FormatError
        A block type whose last dimension is not a multiple of its block
        (the message names ``path`` and ``tensor``), or a scalar shape.
    """
    if not dtype.is_block:
        count = 1
        for dim in shape:
            count *= dim
        return count * dtype.itemsize
    where = f"{path}: tensor {tensor!r}" if path else f"tensor {tensor!r}"
    if not shape:
        raise FormatError(f"{where}: a {dtype.code} tensor needs at least one dimension, found a scalar")
    last = shape[-1]
    if last % dtype.block_elems:
        raise FormatError(
            f"{where}: last dimension {last} of {dtype.code} must be a multiple of its "
            f"{dtype.block_elems}-value block, shape {list(shape)}"
        )
    rows = 1
    for dim in shape[:-1]:
        rows *= dim
    return rows * (last // dtype.block_elems) * dtype.block_nbytes


Item = TypeVar("Item")


def split_by_size(items: Sequence[Item], nbytes_of: Callable[[Item], int], limit: int) -> list[list[Item]]:
    """Group ``items`` in order into shards of at most ``limit`` bytes (an item
    larger than the limit gets a shard of its own)."""
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + nbytes_of(item) > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes_of(item)
    return shards


def string_map(value: object, *, path: str, what: str) -> dict[str, str]:
    """Check a JSON value is a string-to-string map."""
    if not isinstance(value, Mapping):
        raise FormatError(f"{path}: {what} must be an object of strings, found {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise FormatError(f"{path}: {what}[{key!r:.80}] must be a string, found {type(item).__name__}")
    return dict(value)

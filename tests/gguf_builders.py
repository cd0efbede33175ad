"""GGUF files built byte by byte with struct (independent of gguf-py and of the reader)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR_FORMATS = {
    U8: "<B",
    I8: "<b",
    U16: "<H",
    I16: "<h",
    U32: "<I",
    I32: "<i",
    F32: "<f",
    BOOL: "<B",
    U64: "<Q",
    I64: "<q",
    F64: "<d",
}

# ggml type ids and their (elements, bytes) per block
GGML_F32, GGML_F16, GGML_Q8_0, GGML_Q4_K = 0, 1, 8, 12
GGML_SIZES = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_Q8_0: (32, 34), GGML_Q4_K: (256, 144)}


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def scalar(value_type: int, value: object) -> bytes:
    if value_type == STRING:
        assert isinstance(value, (str, bytes))
        return string(value)
    return struct.pack(_SCALAR_FORMATS[value_type], value)


def array(element_type: int, values: Sequence[object]) -> bytes:
    body = b"".join(array(*value) if element_type == ARRAY else scalar(element_type, value) for value in values)  # type: ignore[misc]
    return struct.pack("<IQ", element_type, len(values)) + body


def kv(key: str | bytes, value_type: int, payload: bytes) -> bytes:
    """One key-value pair; ``payload`` is the already packed value."""
    return string(key) + struct.pack("<I", value_type) + payload


def kv_scalar(key: str | bytes, value_type: int, value: object) -> bytes:
    return kv(key, value_type, scalar(value_type, value))


def tensor_info(name: str | bytes, ne: Sequence[int], ggml_type: int, offset: int) -> bytes:
    return (
        string(name)
        + struct.pack("<I", len(ne))
        + struct.pack(f"<{len(ne)}Q", *ne)
        + struct.pack("<IQ", ggml_type, offset)
    )


def nbytes_of(ne: Sequence[int], ggml_type: int) -> int:
    elems, block = GGML_SIZES[ggml_type]
    rows = 1
    for dim in ne[1:]:
        rows *= dim
    return rows * ne[0] // elems * block


@dataclass
class GGUFBytes:
    """A GGUF file as its parts, so one part can be spoiled before packing."""

    kvs: list[bytes] = field(default_factory=list)
    infos: list[bytes] = field(default_factory=list)
    data: bytes = b""
    alignment: int = 32
    magic: bytes = b"GGUF"
    version: int = 3
    tensor_count: int | None = None
    kv_count: int | None = None

    def header(self) -> bytes:
        tensor_count = len(self.infos) if self.tensor_count is None else self.tensor_count
        kv_count = len(self.kvs) if self.kv_count is None else self.kv_count
        return (
            self.magic
            + struct.pack("<IQQ", self.version, tensor_count, kv_count)
            + b"".join(self.kvs)
            + b"".join(self.infos)
        )

    def pack(self) -> bytes:
        header = self.header()
        return header + b"\x00" * (-len(header) % self.alignment) + self.data


def moe_gguf(
    tensors: Sequence[tuple[str, Sequence[int], int]] | None = None, kvs: Sequence[bytes] = (), alignment: int = 32
) -> GGUFBytes:
    """A valid file: each tensor padded to ``alignment``, no padding after the last
    one (so every strict prefix of the file is truncated somewhere that matters)."""
    if tensors is None:
        tensors = [
            ("blk.0.ffn_gate_exps.weight", (32, 3, 2), GGML_Q8_0),
            ("blk.0.ffn_down_exps.weight", (3, 32, 2), GGML_F16),
            ("output_norm.weight", (32,), GGML_F32),
        ]
    infos, blobs, position = [], [], 0
    for index, (name, ne, ggml_type) in enumerate(tensors):
        position += -position % alignment
        infos.append(tensor_info(name, ne, ggml_type, position))
        size = nbytes_of(ne, ggml_type)
        blobs.append((position, bytes((index * 7 + offset) % 251 for offset in range(size))))
        position += size
    data = bytearray(position)
    for begin, blob in blobs:
        data[begin : begin + len(blob)] = blob
    all_kvs = [kv_scalar("general.architecture", STRING, "llama"), *kvs]
    if alignment != 32:
        all_kvs.append(kv_scalar("general.alignment", U32, alignment))
    return GGUFBytes(list(all_kvs), infos, bytes(data), alignment)

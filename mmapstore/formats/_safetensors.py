"""safetensors: a header parser that validates everything, and a streaming writer.

File layout: an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8
JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, may be padded with trailing spaces), then the data buffer.
Offsets are relative to the data buffer and must tile it exactly: contiguous
from 0, no overlap, no hole, no trailing bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import numpy.typing as npt

from .._dtypes import DTYPE_CODES, DType, dtype_from_code, opaque_dtype
from .._errors import FormatError
from ._files import FileIdentity, open_regular
from ._records import (
    MAX_DIMS,
    MAX_ELEMENTS,
    MAX_HEADER_NBYTES,
    MAX_TENSORS,
    TensorRecord,
    parse_json_object,
    read_exact,
    shape_nbytes,
    string_map,
    validate_shape,
)

__all__ = ["SafetensorsHeader", "SafetensorsWriter", "TensorSpec", "read_header_fd", "read_safetensors_header"]

_ENTRY_KEYS = ("dtype", "shape", "data_offsets")
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A fully validated safetensors header."""

    path: str
    file_nbytes: int
    data_offset: int
    metadata: dict[str, str]
    tensors: tuple[TensorRecord, ...]
    identity: FileIdentity | None = None


def read_safetensors_header(path: str) -> SafetensorsHeader:
    """Parse and validate the header of ``path``; read nothing past it.

    Raises
    ------
    FormatError
        If the file is missing, not a regular file, truncated, or its header is
        malformed in any way (the message names the file and, where one is at
        fault, the tensor).
    """
    fd, info = open_regular(path, what="safetensors file")
    try:
        return read_header_fd(fd, info, path)
    finally:
        os.close(fd)


def read_header_fd(fd: int, info: os.stat_result, path: str) -> SafetensorsHeader:
    """:func:`read_safetensors_header` from an open descriptor (``info`` is its
    ``fstat``); the header records the file's identity for whoever maps it."""
    file_nbytes = info.st_size
    if file_nbytes < 8:
        raise FormatError(f"{path}: truncated: {file_nbytes} bytes, a safetensors file needs at least 8")
    prefix = read_exact(fd, 8, 0, path=path, what="header length")
    if prefix[:4] == GGUF_MAGIC:
        raise FormatError(f"{path}: a GGUF file (magic 'GGUF'), not safetensors")
    (header_nbytes,) = struct.unpack("<Q", prefix)
    if header_nbytes > MAX_HEADER_NBYTES:
        raise FormatError(f"{path}: header length {header_nbytes} is over the {MAX_HEADER_NBYTES} byte limit")
    if 8 + header_nbytes > file_nbytes:
        raise FormatError(
            f"{path}: truncated: header length {header_nbytes} runs past the end of the {file_nbytes} byte file"
        )
    raw = read_exact(fd, header_nbytes, 8, path=path, what="header")
    # Every entry spells "data_offsets": count them before decoding, so a header
    # of millions of tensors is refused in milliseconds, not after a gigabyte.
    claimed = raw.count(b'"data_offsets"')
    if claimed > MAX_TENSORS:
        raise FormatError(f"{path}: header describes {claimed} tensors, over the {MAX_TENSORS} limit")
    header = _parse_header(raw, claimed, path)
    return _validate(path, header, 8 + header_nbytes, file_nbytes, FileIdentity.of(info))


def _parse_header(raw: bytes, claimed: int, path: str) -> dict[str, object]:
    """Decode the header JSON, refusing duplicate keys.

    The duplicate check of :func:`parse_json_object` costs a Python call per
    JSON object; it is skipped when counting proves there can be none: no
    ``\\u`` escape (so every key is spelled literally), each of ``"dtype"``,
    ``"shape"`` and ``"data_offsets"`` spelled exactly once per entry, and each
    metadata key spelled once in the whole header.  Anything else takes the
    checked path."""
    if b"\\u" not in raw:
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError):
            header = None
        if isinstance(header, dict):
            metadata = header.get("__metadata__")
            entries = len(header) - ("__metadata__" in header)
            if (
                entries == claimed
                and raw.count(b'"dtype"') == entries
                and raw.count(b'"shape"') == entries
                and raw.count(b'"__metadata__"') == ("__metadata__" in header)
                and (
                    not isinstance(metadata, dict) or all(raw.count(json.dumps(key).encode()) == 1 for key in metadata)
                )
            ):
                return header
    return parse_json_object(raw, path=path, what="safetensors header")


def _validate(
    path: str, header: dict[str, object], data_offset: int, file_nbytes: int, identity: FileIdentity
) -> SafetensorsHeader:
    metadata: dict[str, str] = {}
    if "__metadata__" in header:
        metadata = string_map(header.pop("__metadata__"), path=path, what="__metadata__")
    if len(header) > MAX_TENSORS:
        raise FormatError(f"{path}: {len(header)} tensors, over the {MAX_TENSORS} limit")
    fast = _validate_fast(path, header, data_offset, file_nbytes)
    if fast is not None:
        return SafetensorsHeader(path, file_nbytes, data_offset, metadata, fast, identity)
    spans: list[tuple[int, int, str]] = []
    entries: list[tuple[str, DType, tuple[int, ...], int, int]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise FormatError(f"{path}: tensor {name!r}: entry must be an object, found {type(entry).__name__}")
        missing = [key for key in _ENTRY_KEYS if key not in entry]
        if missing:
            raise FormatError(f"{path}: tensor {name!r}: missing {', '.join(missing)}")
        # A code the table does not know is kept as opaque bytes: refused only
        # where its values are needed (an expert stack, a view).
        dtype = opaque_dtype(entry["dtype"], where=f"{path}: tensor {name!r}")
        shape = validate_shape(entry["shape"], path=path, tensor=name)
        offsets = entry["data_offsets"]
        if not isinstance(offsets, list) or len(offsets) != 2 or any(type(value) is not int for value in offsets):
            raise FormatError(f"{path}: tensor {name!r}: data_offsets must be [begin, end], found {offsets!r:.80}")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise FormatError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] are not ordered")
        expected = shape_nbytes(shape, dtype) if dtype.known else end - begin
        if end - begin != expected:
            raise FormatError(
                f"{path}: tensor {name!r}: shape {list(shape)} of {dtype.code} needs {expected} bytes, "
                f"data_offsets [{begin}, {end}] hold {end - begin}"
            )
        spans.append((begin, end, name))
        entries.append((name, dtype, shape, begin, end))
    data_nbytes = file_nbytes - data_offset
    position = 0
    for begin, end, name in sorted(spans):
        if begin > position:
            raise FormatError(
                f"{path}: tensor {name!r}: hole in the data buffer: bytes [{position}, {begin}) belong to no tensor"
            )
        if begin < position:
            raise FormatError(
                f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] overlap the tensor before it (ends at {position})"
            )
        position = end
    if position > data_nbytes:
        raise FormatError(
            f"{path}: truncated: tensors need {position} data bytes after the header, the file holds {data_nbytes}"
        )
    if position < data_nbytes:
        raise FormatError(
            f"{path}: {data_nbytes - position} trailing bytes after the last tensor (data ends at {position}, "
            f"file data is {data_nbytes} bytes)"
        )
    tensors = tuple(
        TensorRecord(name, dtype, shape, path, data_offset + begin, end - begin)
        for name, dtype, shape, begin, end in entries
    )
    return SafetensorsHeader(path, file_nbytes, data_offset, metadata, tensors, identity)


_ITEMSIZES = {code: (entry, entry.itemsize) for code, entry in DTYPE_CODES.items()}


def _validate_fast(
    path: str, header: dict[str, object], data_offset: int, file_nbytes: int
) -> tuple[TensorRecord, ...] | None:
    """The common case of :func:`_validate` at a fraction of its cost: known
    dtypes, well-formed entries, offsets that tile the buffer.  Returns None at
    the first thing out of the ordinary, and the checked path then finds and
    names it (so both paths accept and refuse exactly the same headers)."""
    records: list[TensorRecord] = []
    begins: list[int] = []
    ends: list[int] = []
    itemsizes = _ITEMSIZES
    for name, entry in header.items():
        if type(entry) is not dict or len(entry) != 3:
            return None
        known = itemsizes.get(entry.get("dtype"))  # type: ignore[arg-type]
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if known is None or type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
            return None
        if len(shape) > MAX_DIMS:
            return None
        begin, end = offsets
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
            return None
        elements = 1
        for dim in shape:
            if type(dim) is not int or dim <= 0:
                return None
            elements *= dim
        if elements > MAX_ELEMENTS or end - begin != elements * known[1]:
            return None
        begins.append(begin)
        ends.append(end)
        records.append(TensorRecord(name, known[0], tuple(shape), path, data_offset + begin, end - begin))
    if records:
        starts, stops = np.asarray(begins, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        order = np.argsort(starts, kind="stable")
        starts, stops = starts[order], stops[order]
        if starts[0] != 0 or (starts[1:] != stops[:-1]).any() or int(stops[-1]) != file_nbytes - data_offset:
            return None
    elif file_nbytes != data_offset:
        return None
    return tuple(records)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What the writer must lay out before any data: name, dtype and shape."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return shape_nbytes(self.shape, self.dtype)


PAD_PREFIX = "__pad__."


def layout_header(
    specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None, align: int = 1
) -> tuple[bytes, list[tuple[TensorSpec, int]]]:
    """Lay out a header; return its bytes (length prefix included) and each
    spec's data offset relative to the data buffer, pads included.

    With ``align > 1`` every tensor starts at a file offset that is a multiple
    of ``align``: the header is padded with spaces and explicit ``U8`` pad
    tensors named ``__pad__.N`` fill the gaps (safetensors forbids holes).
    """
    if align < 1 or align & (align - 1):
        raise ValueError(f"align must be a power of two, got {align}")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("tensor names must be unique")
    u8 = dtype_from_code("U8")
    # Data offsets first, then the header that describes them, then pad the
    # header so the data buffer itself starts aligned.
    placed: list[tuple[TensorSpec, int]] = []
    position = 0
    pad_index = 0
    for spec in specs:
        gap = -position % align if spec.nbytes else 0
        if gap:
            placed.append((TensorSpec(f"{PAD_PREFIX}{pad_index}", u8, (gap,)), position))
            pad_index += 1
            position += gap
        placed.append((spec, position))
        position += spec.nbytes
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for spec, begin in placed:
        header[spec.name] = {
            "dtype": spec.dtype.code,
            "shape": list(spec.shape),
            "data_offsets": [begin, begin + spec.nbytes],
        }
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # safetensors itself pads to 8 bytes; we pad to max(8, align).
    total = 8 + len(text)
    padded = total + (-total % max(8, align))
    text += b" " * (padded - total)
    return struct.pack("<Q", len(text)) + text, placed


class SafetensorsWriter:
    """Streaming safetensors writer: an explicit state machine.

    The header is laid out from the specs up front; then the data of each
    tensor is appended in declared order, in as many chunks as the caller
    likes (so peak memory is a chunk, not a tensor). ``close()`` checks that
    every byte was written, flushes and fsyncs.  The writer writes ``path``
    in place: publish atomically by writing in a temporary directory or
    file and renaming (see :mod:`mmapstore._convert`).
    """

    def __init__(
        self,
        path: str,
        specs: Sequence[TensorSpec],
        metadata: dict[str, str] | None = None,
        *,
        align: int = 1,
        sparse: bool = False,
    ) -> None:
        self.path = path
        header, placed = layout_header(specs, metadata, align)
        self._data_offset = len(header)
        self._order = [(spec, begin) for spec, begin in placed if not spec.name.startswith(PAD_PREFIX)]
        self._specs = {spec.name: spec for spec, _ in self._order}
        self._pads = [(spec, begin) for spec, begin in placed if spec.name.startswith(PAD_PREFIX)]
        self._data_nbytes = max((begin + spec.nbytes for spec, begin in placed), default=0)
        self.offsets = {spec.name: self._data_offset + begin for spec, begin in placed}
        self._current = 0
        self._written = 0  # bytes of the current tensor written so far
        self._sparse = sparse
        self._file = open(path, "wb")  # noqa: SIM115 - owned by the writer, closed by close()/abort()
        self._file.write(header)
        if sparse:
            # Valid header over a hole: nothing but the header takes disk space.
            self._file.truncate(self._data_offset + self._data_nbytes)
            self._current = len(self._order)
        else:
            for spec, begin in self._pads:
                self._file.seek(self._data_offset + begin)
                self._file.write(b"\x00" * spec.nbytes)

    @property
    def pending(self) -> str | None:
        """Name of the tensor the next bytes belong to, or None when done."""
        while self._current < len(self._order) and self._order[self._current][0].nbytes == 0:
            self._current += 1
        return self._order[self._current][0].name if self._current < len(self._order) else None

    def append(self, data: npt.NDArray[np.generic] | bytes | memoryview) -> None:
        """Append bytes of the pending tensor (C order, little-endian)."""
        name = self.pending
        if name is None:
            raise ValueError(f"{self.path}: every tensor is already written")
        spec, begin = self._order[self._current]
        if isinstance(data, np.ndarray):
            if data.dtype != spec.dtype.numpy:
                raise ValueError(f"{self.path}: tensor {name!r}: expected {spec.dtype.numpy}, got {data.dtype}")
            # ml_dtypes types do not export a buffer; their bytes as uint8 do.
            buffer = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
        else:
            buffer = memoryview(data).cast("B")
        if self._written + len(buffer) > spec.nbytes:
            raise ValueError(
                f"{self.path}: tensor {name!r}: {self._written + len(buffer)} bytes appended, "
                f"its shape holds {spec.nbytes}"
            )
        self._file.seek(self._data_offset + begin + self._written)
        self._file.write(buffer)
        self._written += len(buffer)
        if self._written == spec.nbytes:
            self._current += 1
            self._written = 0

    def write_tensor(self, name: str, chunks: Iterable[npt.NDArray[np.generic]]) -> None:
        """Append every chunk of tensor ``name``, which must be the pending one
        (a zero-size tensor has no bytes: its chunks must be empty)."""
        spec = self._specs.get(name)
        if spec is not None and spec.nbytes == 0:
            for chunk in chunks:
                if chunk.nbytes:
                    raise ValueError(f"{self.path}: tensor {name!r} has zero size, got {chunk.nbytes} bytes")
            return
        if self.pending != name:
            raise ValueError(f"{self.path}: expected tensor {self.pending!r} next, got {name!r}")
        for chunk in chunks:
            self.append(chunk)
        if self.pending == name:
            raise ValueError(f"{self.path}: tensor {name!r} is short of bytes")

    def close(self) -> None:
        """Finish: every tensor must be complete; flush and fsync."""
        if self._file.closed:
            return
        try:
            if self.pending is not None:
                raise ValueError(f"{self.path}: closed before tensor {self.pending!r} was written")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        """Close without the completeness check (the caller discards the file)."""
        self._file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

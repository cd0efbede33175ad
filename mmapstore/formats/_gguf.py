"""GGUF (llama.cpp's format): a header parser that validates everything, and split sets.

File layout (little-endian, versions 2 and 3)::

    "GGUF"  u32 version  u64 tensor_count  u64 kv_count
    kv_count     x  string key, u32 value type, value
    tensor_count x  string name, u32 n_dims, n_dims x u64 ne (fastest first),
                    u32 ggml type, u64 offset (relative to the data section)
    padding to ``general.alignment`` (u32, default 32), then the data section

A string is a u64 byte length and UTF-8 bytes; an array is a u32 element
type, a u64 count and the elements.  Records give shapes in numpy order (``ne``
reversed), so an experts tensor with ``ne = {in, out, E}`` is ``(E, out, in)``.

Split checkpoints are ``<prefix>-00001-of-000NN.gguf`` ... with the KV pairs
``split.no`` (0-based), ``split.count`` and ``split.tensors.count``; each
tensor lies whole in one part.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, replace

from .._dtypes import GGML_TYPES
from .._errors import FormatError
from ._files import FileIdentity, open_regular
from ._gguf_cursor import UINT32, HeaderCursor
from ._records import MAX_TENSORS, TensorRecord, shape_nbytes

__all__ = ["GGUFHeader", "is_gguf", "read_gguf_files", "read_gguf_header"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
MAX_DIMS = 4  # GGML_MAX_DIMS

# Caps far beyond real files and far below a denial of service (the cursor
# caps header bytes, strings and arrays).
MAX_KV = 1 << 20
MAX_NAME_NBYTES = 4096  # keys and tensor names (ggml itself caps names at 64)
_INT64_MAX = (1 << 63) - 1

# Smallest possible entries, for the arithmetic caps on the counts.
_FIXED_NBYTES = 4 + 4 + 8 + 8
_MIN_KV_NBYTES = 8 + 1 + 4 + 1  # key length, one key byte, value type, a u8 value
_MIN_TENSOR_NBYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, one byte, n_dims, one dim, type, offset

_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5,})-of-(?P<count>\d{5,})\.gguf$")
SPLIT_NO_KEY = "split.no"
SPLIT_COUNT_KEY = "split.count"
SPLIT_TENSORS_KEY = "split.tensors.count"


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    """A fully validated GGUF header.

    ``metadata`` maps each key to a Python ``str``, ``int``, ``float``,
    ``bool`` or ``list`` of those; ``data_offset`` is where the data section
    starts; every record's ``offset`` is absolute.
    """

    path: str
    version: int
    file_nbytes: int
    alignment: int
    data_offset: int
    metadata: dict[str, object]
    tensors: tuple[TensorRecord, ...]
    identity: FileIdentity | None = None  # which file was read: the one later mapped must be it


def _open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open read-only without blocking (a FIFO cannot hang us); refuse non-regular files."""
    return open_regular(path, what="GGUF file")


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file that starts with the GGUF magic.

    A byte-swapped magic counts too, so that :func:`read_gguf_header` can
    refuse a big-endian file by name.  Never raises for a missing or
    unreadable path: it returns False.
    """
    try:
        fd, _ = _open_regular(os.fspath(path))
    except FormatError:
        return False
    try:
        return os.pread(fd, 4, 0) in (GGUF_MAGIC, GGUF_MAGIC[::-1])
    except OSError:
        return False
    finally:
        os.close(fd)


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse and validate the header of the GGUF file ``path``; read no tensor data.

    Parameters
    ----------
    path
        A GGUF file (one part of a split set is read on its own; see
        :func:`read_gguf_files` for the whole set).

    Returns
    -------
    GGUFHeader
        Metadata and one record per tensor, shapes in numpy order.

    Raises
    ------
    FormatError
        The file is missing, not a regular file, truncated, big-endian, of an
        unsupported version, or its header is malformed in any way; the
        message names the file and, where one is at fault, the key or tensor
        and the byte offset.
    """
    path = os.fspath(path)
    fd, info = _open_regular(path)
    try:
        return replace(_parse(HeaderCursor(fd, path, info.st_size)), identity=FileIdentity.of(info))
    finally:
        os.close(fd)


def _parse(cursor: HeaderCursor) -> GGUFHeader:
    path = cursor.path
    magic, start = cursor.take(4, "magic")
    magic = magic[start : start + 4]
    if magic == GGUF_MAGIC[::-1]:
        raise FormatError(f"{path}: big-endian GGUF (magic {magic!r}); only little-endian files are supported")
    if magic != GGUF_MAGIC:
        raise FormatError(f"{path}: not a GGUF file: magic {magic!r}, expected {GGUF_MAGIC!r}")
    version = cursor.unpack("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version & 0xFFFF == 0 and swapped in (1, 2, 3):
            raise FormatError(
                f"{path}: big-endian GGUF (version field reads {version:#x}, version {swapped} byte-swapped); "
                "only little-endian files are supported"
            )
        raise FormatError(f"{path}: GGUF version {version} is not supported, expected 2 or 3")
    tensor_count = cursor.unpack("<Q", "tensor count")
    kv_count = cursor.unpack("<Q", "key-value count")
    if tensor_count > MAX_TENSORS:
        raise FormatError(f"{path}: {tensor_count} tensors, over the {MAX_TENSORS} limit")
    if kv_count > MAX_KV:
        raise FormatError(f"{path}: {kv_count} key-value pairs, over the {MAX_KV} limit")
    least = _FIXED_NBYTES + kv_count * _MIN_KV_NBYTES + tensor_count * _MIN_TENSOR_NBYTES
    if least > cursor.file_nbytes:
        raise FormatError(
            f"{path}: {kv_count} key-value pairs and {tensor_count} tensors need at least {least} header bytes, "
            f"the file has {cursor.file_nbytes}"
        )
    metadata, alignment = _read_metadata(cursor, kv_count)
    infos = _read_tensor_infos(cursor, tensor_count, alignment)
    header_end = cursor.offset
    data_offset = header_end + (-header_end % alignment)
    tensors = _place(path, infos, data_offset, cursor.file_nbytes)
    return GGUFHeader(path, version, cursor.file_nbytes, alignment, data_offset, metadata, tensors)


def _read_metadata(cursor: HeaderCursor, kv_count: int) -> tuple[dict[str, object], int]:
    path = cursor.path
    metadata: dict[str, object] = {}
    alignment = DEFAULT_ALIGNMENT
    for index in range(kv_count):
        at = cursor.offset
        key = cursor.string(f"key #{index}", cap=MAX_NAME_NBYTES, empty_ok=False)
        if key in metadata:
            raise FormatError(f"{path}: duplicate key {key!r} at offset {at}")
        value_type = cursor.unpack("<I", f"key {key!r} value type")
        value = cursor.value(value_type, f"key {key!r}")
        if key == ALIGNMENT_KEY:
            if value_type != UINT32:
                raise FormatError(
                    f"{path}: key {key!r} at offset {at}: expected a UINT32, found value type {value_type}"
                )
            assert isinstance(value, int)
            if value == 0 or value & (value - 1):
                raise FormatError(f"{path}: key {key!r} at offset {at}: alignment {value} is not a power of two")
            alignment = value
        metadata[key] = value
    return metadata, alignment


_Info = tuple[str, int, tuple[int, ...], int, int]  # name, ggml type, numpy shape, relative offset, info offset


def _read_tensor_infos(cursor: HeaderCursor, tensor_count: int, alignment: int) -> list[_Info]:
    path = cursor.path
    infos: list[_Info] = []
    names: set[str] = set()
    for index in range(tensor_count):
        at = cursor.offset
        name = cursor.string(f"tensor #{index} name", cap=MAX_NAME_NBYTES, empty_ok=False)
        if name in names:
            raise FormatError(f"{path}: duplicate tensor name {name!r} at offset {at}")
        names.add(name)
        n_dims = cursor.unpack("<I", f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise FormatError(f"{path}: tensor {name!r} at offset {at}: n_dims is {n_dims}, expected 1 to {MAX_DIMS}")
        window, start = cursor.take(8 * n_dims, f"tensor {name!r} dimensions")
        ne = struct.unpack_from(f"<{n_dims}Q", window, start)
        count = 1
        for axis, dim in enumerate(ne):
            if dim == 0:
                raise FormatError(
                    f"{path}: tensor {name!r} at offset {at}: ne[{axis}] is 0 (an empty tensor), ne {list(ne)}"
                )
            count *= dim
            if count > _INT64_MAX:
                raise FormatError(
                    f"{path}: tensor {name!r} at offset {at}: ne {list(ne)} holds more than 2**63 - 1 elements"
                )
        ggml_type = cursor.unpack("<I", f"tensor {name!r} type")
        if ggml_type not in GGML_TYPES:
            raise FormatError(f"{path}: tensor {name!r} at offset {at}: unknown ggml type {ggml_type}")
        relative = cursor.unpack("<Q", f"tensor {name!r} offset")
        if relative % alignment:
            raise FormatError(
                f"{path}: tensor {name!r} at offset {at}: data offset {relative} is not a multiple of the "
                f"alignment {alignment}"
            )
        infos.append((name, ggml_type, tuple(reversed(ne)), relative, at))
    return infos


def _place(path: str, infos: list[_Info], data_offset: int, file_nbytes: int) -> tuple[TensorRecord, ...]:
    records: list[TensorRecord] = []
    for name, ggml_type, shape, relative, _at in infos:
        dtype = GGML_TYPES[ggml_type]
        nbytes = shape_nbytes(shape, dtype, path=path, tensor=name)
        offset = data_offset + relative
        if offset + nbytes > file_nbytes:
            raise FormatError(
                f"{path}: tensor {name!r}: {dtype.code} {list(shape)} needs bytes [{offset}, {offset + nbytes}), "
                f"past the end of the {file_nbytes} byte file"
            )
        records.append(TensorRecord(name, dtype, shape, path, offset, nbytes))
    end, previous = data_offset, ""
    for record in sorted(records, key=lambda item: item.offset):
        if record.offset < end:
            raise FormatError(
                f"{path}: tensor {record.name!r}: bytes [{record.offset}, {record.offset + record.nbytes}) "
                f"overlap tensor {previous!r}, which ends at {end}"
            )
        end, previous = record.offset + record.nbytes, record.name
    return tuple(records)


def read_gguf_files(path: str | os.PathLike[str]) -> tuple[GGUFHeader, ...]:
    """Read a GGUF checkpoint: one file, or every part of a split set.

    Parameters
    ----------
    path
        A single ``.gguf`` file, any part ``<prefix>-0000K-of-0000N.gguf`` of
        a split set (its siblings are found in the same directory), or a
        directory holding one file or one split set.

    Returns
    -------
    tuple of GGUFHeader
        In part order (``split.no``).

    Raises
    ------
    FormatError
        Any header is invalid; a part is missing or an extra one is present;
        ``split.count`` / ``split.no`` / ``split.tensors.count`` disagree with
        the file names or the parts; a tensor name appears in two parts; a
        directory holds no GGUF file or more than one checkpoint.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = _entry_of_directory(path)
    first = read_gguf_header(path)
    match = _SPLIT_NAME.match(os.path.basename(path))
    declared = first.metadata.get(SPLIT_COUNT_KEY)
    if match is None:
        if declared is not None and declared != 1:
            raise FormatError(
                f"{path}: {SPLIT_COUNT_KEY} is {declared!r} but the file name does not follow "
                "'<prefix>-00001-of-0000N.gguf', so the other parts cannot be found"
            )
        return (first,)
    directory = os.path.dirname(path)
    prefix, count = match["prefix"], int(match["count"])
    if count < 1 or not 1 <= int(match["no"]) <= count:
        raise FormatError(f"{path}: part number {match['no']} of {match['count']} is out of range")
    paths = [os.path.join(directory, f"{prefix}-{number:05d}-of-{count:05d}.gguf") for number in range(1, count + 1)]
    _refuse_strays(directory or ".", prefix, {os.path.basename(part) for part in paths}, source=path)
    headers: list[GGUFHeader] = []
    for number, part in enumerate(paths):
        if os.path.basename(part) == os.path.basename(path):
            headers.append(first)
        elif not os.path.exists(part):
            raise FormatError(f"{path}: split part {number + 1} of {count} is missing: {part}")
        else:
            headers.append(read_gguf_header(part))
    _check_split_set(headers, count)
    return tuple(headers)


def _entry_of_directory(directory: str) -> str:
    names = sorted(name for name in os.listdir(directory) if name.endswith(".gguf"))
    if not names:
        raise FormatError(f"{directory}: no .gguf file in the directory")
    if len(names) == 1:
        return os.path.join(directory, names[0])
    matches = [_SPLIT_NAME.match(name) for name in names]
    sets = {
        (match["prefix"], match["count"]) if match else ("", name) for match, name in zip(matches, names, strict=True)
    }
    if len(sets) != 1 or any(match is None for match in matches):
        raise FormatError(
            f"{directory}: holds {len(names)} .gguf files that are not one split set: {', '.join(names[:8])}"
        )
    return os.path.join(directory, names[0])


def _refuse_strays(directory: str, prefix: str, expected: set[str], *, source: str) -> None:
    for name in sorted(os.listdir(directory)):
        match = _SPLIT_NAME.match(name)
        if match is not None and match["prefix"] == prefix and name not in expected:
            raise FormatError(
                f"{source}: {os.path.join(directory, name)} is an extra part: the set has {len(expected)} parts"
            )


def _check_split_set(headers: list[GGUFHeader], count: int) -> None:
    total = sum(len(header.tensors) for header in headers)
    owners: dict[str, str] = {}
    for number, header in enumerate(headers):
        split_no = header.metadata.get(SPLIT_NO_KEY)
        split_count = header.metadata.get(SPLIT_COUNT_KEY)
        if count > 1 or split_count is not None:
            if not _is_int(split_count) or split_count != count:
                raise FormatError(
                    f"{header.path}: {SPLIT_COUNT_KEY} is {split_count!r}, the file names say {count} parts"
                )
            if not _is_int(split_no) or split_no != number:
                raise FormatError(
                    f"{header.path}: {SPLIT_NO_KEY} is {split_no!r}, expected {number} for part {number + 1}"
                )
        tensors_count = header.metadata.get(SPLIT_TENSORS_KEY)
        if tensors_count is not None and (not _is_int(tensors_count) or tensors_count != total):
            raise FormatError(
                f"{header.path}: {SPLIT_TENSORS_KEY} is {tensors_count!r}, the {count} parts hold {total} tensors"
            )
        for record in header.tensors:
            other = owners.setdefault(record.name, header.path)
            if other != header.path:
                raise FormatError(f"{header.path}: tensor {record.name!r} is also in {other}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

"""The ``mmapstore.json`` manifest of a slab store, and raw slab files.

A slab store is a directory holding safetensors shards or raw ``.bin`` files
plus ``mmapstore.json``.  With ``"storage": "raw"`` the manifest is the only
description of the bytes: per tensor a file relative to the store, a dtype, a
shape and a byte offset.  With ``"storage": "safetensors"`` the shards'
headers describe the bytes and the manifest adds checksums and provenance.
Each tensor entry may carry a checksum under the name of its algorithm
(``xxh3_128``, ``blake3``, ``sha256``: see :mod:`mmapstore.checksum`); the
top-level ``checksum`` names the one the writer used.

``"layout": "expert-major"`` (format version 2) stores each MoE layer as one
``U8 [E, record_nbytes]`` tensor whose row ``e`` holds every part of expert
``e``; the manifest's ``records`` map says where each part lies in a row
(``offset``, ``dtype``, ``shape`` ``[E, ...]``).  :func:`expert_major_records`
turns that into part records whose experts are ``record_nbytes`` apart.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from ..checksum import ALGORITHMS, HEX_DIGITS
from ..dtypes import dtype_from_code
from ..errors import FormatError
from ..geometry import ENCODING_KINDS, Encoding
from .files import Directory, FileIdentity
from .records import MAX_TENSORS, TensorRecord, shape_nbytes, validate_shape

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYOUT_VERSIONS",
    "MANIFEST_NAME",
    "check_manifest",
    "check_overlaps",
    "expert_major_records",
    "manifest_encodings",
    "raw_record",
    "raw_records",
]

MANIFEST_NAME = "mmapstore.json"
FORMAT_NAME = "mmapstore.slab_store"
FORMAT_VERSION = 2
LAYOUT_VERSIONS = {"slab": 1, "expert-major": 2}
"""The format version a writer records for each layout (the oldest reader that understands it)."""
STORAGES = ("safetensors", "raw")


def check_manifest(manifest: dict[str, Any], *, path: str) -> None:
    """Check the top level of a manifest: format, version, storage, tensors map."""
    if manifest.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: 'format' must be {FORMAT_NAME!r}, found {manifest.get('format')!r:.80}")
    version = manifest.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise FormatError(f"{path}: unsupported format_version {version!r:.40}; this reader knows 1..{FORMAT_VERSION}")
    if manifest.get("storage") not in STORAGES:
        raise FormatError(f"{path}: 'storage' must be one of {STORAGES}, found {manifest.get('storage')!r:.80}")
    layout = manifest.get("layout", "slab")
    if layout not in LAYOUT_VERSIONS:
        raise FormatError(f"{path}: 'layout' must be one of {list(LAYOUT_VERSIONS)}, found {layout!r:.40}")
    if version < LAYOUT_VERSIONS[layout]:
        raise FormatError(f"{path}: layout {layout!r} needs format_version {LAYOUT_VERSIONS[layout]}, found {version}")
    orientation = manifest.get("orientation", "kn")
    if orientation not in ("kn", "nk"):
        raise FormatError(f"{path}: 'orientation' must be 'kn' or 'nk', found {orientation!r:.40}")
    algorithm = manifest.get("checksum")
    if algorithm is not None and not isinstance(algorithm, str):
        raise FormatError(f"{path}: 'checksum' must name an algorithm, found {algorithm!r:.40}")
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict):
        raise FormatError(f"{path}: 'tensors' must be an object")
    if len(tensors) > MAX_TENSORS:
        raise FormatError(f"{path}: {len(tensors)} tensors, over the {MAX_TENSORS} limit")
    for name, entry in tensors.items():
        if not isinstance(entry, dict):
            raise FormatError(f"{path}: tensor {name!r}: entry must be an object")
        for algorithm in ALGORITHMS:
            digest = entry.get(algorithm)
            digits = HEX_DIGITS[algorithm]
            if digest is not None and (
                not isinstance(digest, str) or len(digest) != digits or not all(c in "0123456789abcdef" for c in digest)
            ):
                raise FormatError(f"{path}: tensor {name!r}: {algorithm} must be {digits} lowercase hex digits")


def raw_record(
    directory: Directory, name: str, entry: dict[str, Any], files: dict[str, tuple[str, FileIdentity]], *, path: str
) -> TensorRecord:
    """Validate one tensor entry of a raw manifest; ``files`` caches each file
    opened so far (name -> resolved path, identity).  Every byte must lie in the file."""
    where = f"tensor {name!r}"
    file_name = entry.get("file")
    if not isinstance(file_name, str) or file_name not in files:
        fd, info, target = directory.open(file_name, what=where, source=path)
        os.close(fd)
        assert isinstance(file_name, str)
        files[file_name] = (target, FileIdentity.of(info))
    file_path, identity = files[file_name]
    dtype = dtype_from_code(entry.get("dtype"), where=f"{path}: {where}")
    shape = validate_shape(entry.get("shape"), path=path, tensor=name)
    offset = entry.get("offset")
    if type(offset) is not int or offset < 0:
        raise FormatError(f"{path}: {where}: offset must be a non-negative integer, found {offset!r:.40}")
    nbytes = shape_nbytes(shape, dtype)
    if "nbytes" in entry and (type(entry["nbytes"]) is not int or entry["nbytes"] != nbytes):
        raise FormatError(
            f"{path}: {where}: nbytes {entry['nbytes']!r:.40} disagrees with shape {list(shape)} of "
            f"{dtype.code} ({nbytes} bytes)"
        )
    if offset + nbytes > identity.nbytes:
        raise FormatError(
            f"{path}: {where}: bytes [{offset}, {offset + nbytes}) run past the end of "
            f"{file_name!r} ({identity.nbytes} bytes): truncated or wrong offset"
        )
    return TensorRecord(name, dtype, shape, file_path, offset, nbytes)


def check_overlaps(records: dict[str, TensorRecord], *, path: str) -> None:
    """No two tensors of one raw file may share a byte."""
    by_file: dict[str, list[TensorRecord]] = {}
    for record in records.values():
        by_file.setdefault(record.path, []).append(record)
    for file_records in by_file.values():
        file_records.sort(key=lambda record: (record.offset, record.nbytes))
        for before, after in itertools.pairwise(file_records):
            if after.nbytes and before.offset + before.nbytes > after.offset:
                raise FormatError(f"{path}: tensors {before.name!r} and {after.name!r} overlap in {before.path!r}")


def raw_records(
    directory: Directory, manifest: dict[str, Any], *, path: str
) -> tuple[dict[str, TensorRecord], dict[str, FileIdentity]]:
    """Records of a raw slab store and the identity of each file: every file
    inside the store, every byte present, no two tensors of one file overlapping."""
    files: dict[str, tuple[str, FileIdentity]] = {}
    records = {
        name: raw_record(directory, name, entry, files, path=path) for name, entry in manifest["tensors"].items()
    }
    check_overlaps(records, path=path)
    return records, dict(files.values())


def manifest_encodings(manifest: dict[str, Any], *, path: str) -> dict[str, Encoding]:
    """The ``encodings`` map of a manifest: stack name (``blk.{L}.ffn_{proj}_exps``)
    to how its parts make values.  Stacks not named are plain (or ggml, by dtype)."""
    raw = manifest.get("encodings", {})
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: 'encodings' must be an object of stack name to encoding")
    result: dict[str, Encoding] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise FormatError(f"{path}: encoding of {name!r}: must be an object")
        kind = entry.get("kind")
        if kind not in ENCODING_KINDS:
            raise FormatError(f"{path}: encoding of {name!r}: kind {kind!r:.40} is not one of {list(ENCODING_KINDS)}")
        dtype = dtype_from_code(entry.get("dtype"), where=f"{path}: encoding of {name!r}", block_ok=True)
        block = entry.get("block", [1, 1])
        if not isinstance(block, list) or len(block) != 2 or any(type(v) is not int or v <= 0 for v in block):
            raise FormatError(f"{path}: encoding of {name!r}: block must be [rows, cols] of positive ints")
        result[name] = Encoding(kind, dtype, (block[0], block[1]))
    return result


def expert_major_records(
    manifest: dict[str, Any], tensors: dict[str, TensorRecord], *, path: str
) -> tuple[dict[str, TensorRecord], dict[str, int]]:
    """The part records of an expert-major store and each one's expert stride.

    ``tensors`` are the store's real tensors (each layer's ``U8 [E,
    record_nbytes]`` record tensor).  A returned record's ``offset`` is expert
    0's slab of that part and its ``nbytes`` are the part's values
    (``E * slab bytes``), which lie ``record_nbytes`` apart, not contiguous:
    its stride is returned beside it.  Tensors that are no record pass through.

    Raises
    ------
    FormatError
        ``records`` is malformed, names a tensor the store lacks or one that is
        not ``U8 [E, record_nbytes]``, a part does not fit its record, two
        parts of one record overlap, or a part name is used twice.
    """
    raw = manifest.get("records")
    if not isinstance(raw, dict) or not raw:
        raise FormatError(f"{path}: an expert-major store needs a non-empty 'records' object")
    result = {name: record for name, record in tensors.items() if name not in raw}
    strides: dict[str, int] = {}
    for record_name, entry in raw.items():
        where = f"{path}: record {record_name!r}"
        record = tensors.get(record_name)
        if record is None:
            raise FormatError(f"{where}: no such tensor in the store")
        if record.dtype.code != "U8" or len(record.shape) != 2 or not record.shape[0] or not record.shape[1]:
            raise FormatError(
                f"{where}: expected a U8 [experts, bytes] tensor, found {record.dtype.code} {list(record.shape)}"
            )
        experts, record_nbytes = record.shape
        parts = entry.get("parts") if isinstance(entry, dict) else None
        if not isinstance(parts, dict) or not parts:
            raise FormatError(f"{where}: 'parts' must be a non-empty object of part name to placement")
        spans: list[tuple[int, int, str]] = []
        for name, placement in parts.items():
            if not isinstance(placement, dict):
                raise FormatError(f"{where}: part {name!r}: placement must be an object")
            if name in result or name in tensors:
                raise FormatError(f"{where}: part {name!r} is named twice in the store")
            dtype = dtype_from_code(placement.get("dtype"), where=f"{where}: part {name!r}")
            shape = validate_shape(placement.get("shape"), path=path, tensor=name)
            if not shape or shape[0] != experts:
                raise FormatError(
                    f"{where}: part {name!r}: shape {list(shape)} must start with the record's {experts} experts"
                )
            offset = placement.get("offset")
            slab_nbytes = shape_nbytes(shape, dtype) // experts
            if type(offset) is not int or offset < 0 or offset + slab_nbytes > record_nbytes:
                raise FormatError(
                    f"{where}: part {name!r}: offset {offset!r:.40} with {slab_nbytes} bytes per expert does not "
                    f"fit a record of {record_nbytes} bytes"
                )
            spans.append((offset, slab_nbytes, name))
            result[name] = TensorRecord(name, dtype, shape, record.path, record.offset + offset, slab_nbytes * experts)
            strides[name] = record_nbytes
        spans.sort()
        for (offset, nbytes, before), (next_offset, _, after) in itertools.pairwise(spans):
            if offset + nbytes > next_offset:
                raise FormatError(f"{where}: parts {before!r} and {after!r} overlap")
    return result, strides

"""The ``mmapstore.json`` manifest of a slab store, and raw slab files.

A slab store is a directory holding safetensors shards or raw ``.bin`` files
plus ``mmapstore.json``.  With ``"storage": "raw"`` the manifest is the only
description of the bytes: per tensor a file relative to the store, a dtype, a
shape and a byte offset.  With ``"storage": "safetensors"`` the shards'
headers describe the bytes and the manifest adds checksums and provenance.
Each tensor entry may carry a checksum under the name of its algorithm
(``xxh3_128``, ``blake3``, ``sha256``: see :mod:`mmapstore._checksum`); the
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
from dataclasses import dataclass, field
from typing import Any, Literal

from .._checksum import ALGORITHMS, HEX_DIGITS
from .._dtypes import dtype_from_code
from .._errors import FormatError
from .._geometry import ENCODING_KINDS, Encoding
from ._files import Directory, FileIdentity
from ._records import MAX_TENSORS, TensorRecord, shape_nbytes, validate_shape

Storage = Literal["safetensors", "raw"]
Orientation = Literal["kn", "nk"]

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYOUT_VERSIONS",
    "MANIFEST_NAME",
    "Manifest",
    "ManifestSource",
    "ManifestTensor",
    "check_overlaps",
    "expert_major_records",
    "raw_record",
    "raw_records",
]

MANIFEST_NAME = "mmapstore.json"
FORMAT_NAME = "mmapstore.slab_store"
FORMAT_VERSION = 2
LAYOUT_VERSIONS = {"slab": 1, "expert-major": 2}
"""The format version a writer records for each layout (the oldest reader that understands it)."""
STORAGES: tuple[Storage, ...] = ("safetensors", "raw")
ORIENTATIONS: tuple[Orientation, ...] = ("kn", "nk")


@dataclass(frozen=True, slots=True)
class ManifestTensor:
    """One entry of the ``tensors`` map.

    ``file`` is relative to the store.  A raw store gives ``dtype``, ``shape``
    and ``offset`` for every tensor (the manifest is the only description of
    its bytes); a safetensors store may repeat ``dtype`` and ``shape``, which
    must then agree with the shard's header.  ``checksums`` are
    ``(algorithm, lowercase hex digest)`` pairs in
    :data:`~mmapstore._checksum.ALGORITHMS` order.
    """

    file: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    offset: int | None = None
    nbytes: int | None = None
    checksums: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"file": self.file}
        if self.dtype is not None:
            entry["dtype"] = self.dtype
        if self.shape is not None:
            entry["shape"] = list(self.shape)
        if self.offset is not None:
            entry["offset"] = self.offset
        if self.nbytes is not None:
            entry["nbytes"] = self.nbytes
        entry.update(self.checksums)
        return entry


@dataclass(frozen=True, slots=True)
class ManifestSource:
    """Where a converted store came from: the source's path, kind, layout,
    ``config.json`` and fingerprint (JSON values, compared as written)."""

    path: str
    kind: str
    layout: str
    config: dict[str, Any] | None
    fingerprint: list[Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "layout": self.layout,
            "config": self.config,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True, slots=True)
class Manifest:
    """The ``mmapstore.json`` of a slab store, validated.

    The only reader and writer of the schema: :meth:`from_json` checks every
    field that does not need a data file (files, headers and byte ranges are
    checked by the readers that open them); :meth:`to_json` gives the object
    a writer dumps.  ``encodings`` maps a stack name
    (``blk.{L}.ffn_{proj}_exps``) to how its parts make values; stacks not
    named are plain (or ggml, by dtype).  ``checksum`` names the algorithm
    the writer used (kept as found: :func:`~mmapstore.verify` reports one it
    does not know).
    """

    storage: Storage
    tensors: dict[str, ManifestTensor]
    format_version: int = FORMAT_VERSION
    layout: str | None = None
    records: dict[str, Any] | None = None
    orientation: Orientation = "kn"
    dtype: str | None = None
    encodings: dict[str, Encoding] = field(default_factory=dict)
    checksum: str | None = None
    tool_version: str | None = None
    source: ManifestSource | None = None
    options: dict[str, Any] | None = None
    files: tuple[str, ...] | None = None

    @classmethod
    def from_json(cls, obj: object, *, path: str) -> Manifest:
        """Validate a parsed ``mmapstore.json`` (``path`` names it in errors).

        Raises
        ------
        FormatError
            Wrong format name or version, unknown storage or orientation, a
            ``tensors`` map that is not an object or is over the limit, an
            entry whose file, dtype, shape, offset, nbytes or checksum is
            malformed, or a malformed ``encodings``, ``source``, ``options``
            or ``files``.
        """
        if not isinstance(obj, dict):
            raise FormatError(f"{path}: the manifest must be a JSON object")
        if obj.get("format") != FORMAT_NAME:
            raise FormatError(f"{path}: 'format' must be {FORMAT_NAME!r}, found {obj.get('format')!r:.80}")
        version = obj.get("format_version")
        if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
            raise FormatError(
                f"{path}: unsupported format_version {version!r:.40}; this reader knows 1..{FORMAT_VERSION}"
            )
        storage = obj.get("storage")
        if storage not in STORAGES:
            raise FormatError(f"{path}: 'storage' must be one of {STORAGES}, found {storage!r:.80}")
        layout = obj.get("layout", "slab")
        if not isinstance(layout, str) or layout not in LAYOUT_VERSIONS:
            raise FormatError(f"{path}: 'layout' must be one of {list(LAYOUT_VERSIONS)}, found {layout!r:.40}")
        if version < LAYOUT_VERSIONS[layout]:
            raise FormatError(
                f"{path}: layout {layout!r} needs format_version {LAYOUT_VERSIONS[layout]}, found {version}"
            )
        records = obj.get("records")
        if records is not None and not isinstance(records, dict):
            raise FormatError(f"{path}: 'records' must be an object of record tensor name to its parts")
        orientation = obj.get("orientation", "kn")
        if orientation not in ORIENTATIONS:
            raise FormatError(f"{path}: 'orientation' must be 'kn' or 'nk', found {orientation!r:.40}")
        algorithm = obj.get("checksum")
        if algorithm is not None and not isinstance(algorithm, str):
            raise FormatError(f"{path}: 'checksum' must name an algorithm, found {algorithm!r:.40}")
        raw_tensors = obj.get("tensors")
        if not isinstance(raw_tensors, dict):
            raise FormatError(f"{path}: 'tensors' must be an object")
        if len(raw_tensors) > MAX_TENSORS:
            raise FormatError(f"{path}: {len(raw_tensors)} tensors, over the {MAX_TENSORS} limit")
        tensors = {name: _tensor(name, entry, raw=storage == "raw", path=path) for name, entry in raw_tensors.items()}
        return cls(
            storage=storage,
            tensors=tensors,
            format_version=version,
            layout=obj.get("layout"),
            records=records,
            orientation=orientation,
            dtype=_optional_str(obj, "dtype", path=path),
            encodings=_encodings(obj.get("encodings", {}), path=path),
            checksum=algorithm,
            tool_version=_optional_str(obj, "tool_version", path=path),
            source=_source(obj.get("source"), path=path),
            options=_options(obj.get("options"), path=path),
            files=_files(obj.get("files"), path=path),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this manifest (what :meth:`from_json` reads back)."""
        obj: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "storage": self.storage,
            "orientation": self.orientation,
            "tensors": {name: entry.to_json() for name, entry in self.tensors.items()},
        }
        if self.encodings:
            obj["encodings"] = {name: encoding.to_json() for name, encoding in self.encodings.items()}
        optional = {
            "layout": self.layout,
            "records": self.records,
            "dtype": self.dtype,
            "checksum": self.checksum,
            "tool_version": self.tool_version,
            "source": self.source.to_json() if self.source is not None else None,
            "options": self.options,
            "files": list(self.files) if self.files is not None else None,
        }
        obj.update((key, value) for key, value in optional.items() if value is not None)
        return obj


def _optional_str(obj: dict[str, Any], key: str, *, path: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise FormatError(f"{path}: {key!r} must be a string, found {value!r:.40}")
    return value


def _tensor(name: str, entry: object, *, raw: bool, path: str) -> ManifestTensor:
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise FormatError(f"{path}: {where}: entry must be an object")
    file_name = entry.get("file")
    if not isinstance(file_name, str) or not file_name:
        raise FormatError(f"{path}: {where}: file name must be a non-empty string, found {file_name!r:.80}")
    dtype = entry.get("dtype")
    if raw:
        dtype = dtype_from_code(dtype, where=f"{path}: {where}").code
    elif dtype is not None and not isinstance(dtype, str):
        raise FormatError(f"{path}: {where}: dtype must be a string, found {dtype!r:.40}")
    shape = None
    if raw or "shape" in entry:
        shape = validate_shape(entry.get("shape"), path=path, tensor=name)
    offset = entry.get("offset")
    if (raw or offset is not None) and (type(offset) is not int or offset < 0):
        raise FormatError(f"{path}: {where}: offset must be a non-negative integer, found {offset!r:.40}")
    nbytes = entry.get("nbytes")
    if nbytes is not None and (type(nbytes) is not int or nbytes < 0):
        raise FormatError(f"{path}: {where}: nbytes must be a non-negative integer, found {nbytes!r:.40}")
    if raw and nbytes is not None:
        assert dtype is not None and shape is not None
        expected = shape_nbytes(shape, dtype_from_code(dtype), path=path, tensor=name)
        if nbytes != expected:
            raise FormatError(
                f"{path}: {where}: nbytes {nbytes!r:.40} disagrees with shape {list(shape)} of {dtype} ({expected} bytes)"
            )
    checksums: list[tuple[str, str]] = []
    for algorithm in ALGORITHMS:
        digest = entry.get(algorithm)
        digits = HEX_DIGITS[algorithm]
        if digest is None:
            continue
        if not isinstance(digest, str) or len(digest) != digits or not all(c in "0123456789abcdef" for c in digest):
            raise FormatError(f"{path}: {where}: {algorithm} must be {digits} lowercase hex digits")
        checksums.append((algorithm, digest))
    return ManifestTensor(file_name, dtype, shape, offset, nbytes, tuple(checksums))


def _encodings(raw: object, *, path: str) -> dict[str, Encoding]:
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


def _source(raw: object, *, path: str) -> ManifestSource | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: 'source' must be an object, found {raw!r:.40}")
    fields = {key: raw.get(key) for key in ("path", "kind", "layout")}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise FormatError(f"{path}: source {key!r} must be a string, found {value!r:.40}")
    config = raw.get("config")
    if config is not None and not isinstance(config, dict):
        raise FormatError(f"{path}: source 'config' must be an object, found {config!r:.40}")
    fingerprint = raw.get("fingerprint", [])
    if not isinstance(fingerprint, list):
        raise FormatError(f"{path}: source 'fingerprint' must be a list, found {fingerprint!r:.40}")
    return ManifestSource(str(fields["path"]), str(fields["kind"]), str(fields["layout"]), config, fingerprint)


def _options(raw: object, *, path: str) -> dict[str, Any] | None:
    if raw is not None and not isinstance(raw, dict):
        raise FormatError(f"{path}: 'options' must be an object, found {raw!r:.40}")
    return raw


def _files(raw: object, *, path: str) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(name, str) for name in raw):
        raise FormatError(f"{path}: 'files' must be a list of file names")
    return tuple(raw)


def raw_record(
    directory: Directory,
    name: str,
    entry: ManifestTensor,
    files: dict[str, tuple[str, FileIdentity]],
    *,
    path: str,
) -> TensorRecord:
    """The record of one tensor of a raw store; ``files`` caches each file
    opened so far (name -> resolved path, identity).  Every byte must lie in the file.

    Raises
    ------
    FormatError
        The file escapes the store, does not exist or is not a regular file,
        or the tensor's bytes run past its end.
    """
    where = f"tensor {name!r}"
    if entry.dtype is None or entry.shape is None or entry.offset is None:
        raise FormatError(f"{path}: {where}: a raw store gives dtype, shape and offset for every tensor")
    if entry.file not in files:
        fd, info, target = directory.open(entry.file, what=where, source=path)
        os.close(fd)
        files[entry.file] = (target, FileIdentity.of(info))
    file_path, identity = files[entry.file]
    dtype = dtype_from_code(entry.dtype, where=f"{path}: {where}")
    nbytes = shape_nbytes(entry.shape, dtype)
    offset = entry.offset
    if offset + nbytes > identity.nbytes:
        raise FormatError(
            f"{path}: {where}: bytes [{offset}, {offset + nbytes}) run past the end of "
            f"{entry.file!r} ({identity.nbytes} bytes): truncated or wrong offset"
        )
    return TensorRecord(name, dtype, entry.shape, file_path, offset, nbytes)


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
    directory: Directory, manifest: Manifest, *, path: str
) -> tuple[dict[str, TensorRecord], dict[str, FileIdentity]]:
    """Records of a raw slab store and the identity of each file: every file
    inside the store, every byte present, no two tensors of one file overlapping."""
    files: dict[str, tuple[str, FileIdentity]] = {}
    records = {name: raw_record(directory, name, entry, files, path=path) for name, entry in manifest.tensors.items()}
    check_overlaps(records, path=path)
    return records, dict(files.values())


def expert_major_records(
    manifest: Manifest, tensors: dict[str, TensorRecord], *, path: str
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
    raw = manifest.records
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

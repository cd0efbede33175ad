"""Find and validate every tensor of a checkpoint, whatever its shape on disk.

Accepted: a slab store directory (``mmapstore.json``), a sharded Hugging Face
directory (``model.safetensors.index.json``), a directory of ``*.safetensors``
files, or a single ``.safetensors`` file.  Every header is validated before
any record is returned; nothing here maps or reads weight bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError
from .gguf import is_gguf, read_gguf_files
from .manifest import MANIFEST_NAME, check_manifest, raw_records
from .records import PathResolver, TensorRecord, load_json_object, resolve_inside
from .safetensors import PAD_PREFIX, read_safetensors_header

__all__ = ["INDEX_NAME", "Checkpoint", "read_checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a checkpoint holds, as validated records.

    ``kind`` is ``"slab_store"``, ``"sharded"``, ``"safetensors_dir"``,
    ``"safetensors_file"`` or ``"gguf"``.  ``files`` are absolute paths of every data file.
    """

    path: str
    kind: str
    tensors: dict[str, TensorRecord]
    files: tuple[str, ...]
    config: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = field(default=None)
    metadata: dict[str, Any] | None = field(default=None)  # GGUF key-value metadata


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Validate the checkpoint at ``path`` and describe its tensors.

    Raises
    ------
    FormatError
        The path does not exist, holds no checkpoint, or any header, index or
        manifest is malformed, truncated or points outside the directory.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and is_gguf(path):
        return _gguf(path)
    if os.path.isfile(path):
        header = read_safetensors_header(path)
        tensors = _collect([header.tensors], source=path)
        return Checkpoint(path, "safetensors_file", tensors, (header.path,), _config(os.path.dirname(path)))
    if not os.path.isdir(path):
        raise FormatError(f"{path}: no such file or directory")
    if os.path.exists(os.path.join(path, MANIFEST_NAME)):
        return _slab_store(path)
    if os.path.exists(os.path.join(path, INDEX_NAME)):
        return _sharded(path)
    names = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    if not names and any(name.endswith(".gguf") for name in os.listdir(path)):
        return _gguf(path)
    if not names:
        raise FormatError(f"{path}: no {MANIFEST_NAME}, {INDEX_NAME} or *.safetensors file here")
    files = [resolve_inside(path, name, what="shard", source=path) for name in names]
    headers = [read_safetensors_header(file) for file in files]
    tensors = _collect([header.tensors for header in headers], source=path)
    return Checkpoint(path, "safetensors_dir", tensors, tuple(files), _config(path))


def _gguf(path: str) -> Checkpoint:
    """A GGUF file, a split set (any part), or a directory holding one of them."""
    headers = read_gguf_files(path)
    tensors = _collect([header.tensors for header in headers], source=path)
    metadata: dict[str, Any] = dict(headers[0].metadata)
    return Checkpoint(path, "gguf", tensors, tuple(header.path for header in headers), None, None, metadata)


def _collect(groups: list[tuple[TensorRecord, ...]], *, source: str) -> dict[str, TensorRecord]:
    tensors: dict[str, TensorRecord] = {}
    for group in groups:
        for record in group:
            if record.name.startswith(PAD_PREFIX):
                continue
            if record.name in tensors:
                raise FormatError(
                    f"{source}: tensor {record.name!r} appears in both {tensors[record.name].path!r} "
                    f"and {record.path!r}"
                )
            tensors[record.name] = record
    return tensors


def _config(directory: str) -> dict[str, Any] | None:
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        return None
    return load_json_object(config_path, what="config.json")


def _sharded(root: str) -> Checkpoint:
    index_path = os.path.join(root, INDEX_NAME)
    index = load_json_object(index_path, what="safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index_path}: 'weight_map' must be an object of tensor name to file")
    by_file: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        if not isinstance(file_name, str):
            raise FormatError(f"{index_path}: tensor {name!r}: file must be a string, found {file_name!r:.80}")
        by_file.setdefault(file_name, []).append(name)
    tensors: dict[str, TensorRecord] = {}
    files: list[str] = []
    for file_name, names in sorted(by_file.items()):
        file_path = resolve_inside(root, file_name, what=f"shard of tensor {names[0]!r}", source=index_path)
        header = read_safetensors_header(file_path)
        files.append(file_path)
        present = {record.name: record for record in header.tensors}
        for name in names:
            record = present.get(name)
            if record is None:
                raise FormatError(
                    f"{index_path}: tensor {name!r} is mapped to {file_name!r}, which does not hold it"
                )
            tensors[name] = record
    return Checkpoint(root, "sharded", tensors, tuple(files), _config(root))


def _slab_store(root: str) -> Checkpoint:
    manifest_path = os.path.join(root, MANIFEST_NAME)
    manifest = load_json_object(manifest_path, what="manifest")
    check_manifest(manifest, path=manifest_path)
    entries: dict[str, dict[str, Any]] = manifest["tensors"]
    if manifest["storage"] == "raw":
        tensors = raw_records(root, manifest, path=manifest_path)
        files = tuple(sorted({record.path for record in tensors.values()}))
        return Checkpoint(root, "slab_store", tensors, files, _source_config(manifest), manifest)
    tensors = {}
    headers: dict[str, dict[str, TensorRecord]] = {}
    resolve = PathResolver(root, manifest_path)
    for name, entry in entries.items():
        file_path = resolve(entry.get("file"), what=f"tensor {name!r}")
        if file_path not in headers:
            header = read_safetensors_header(file_path)
            headers[file_path] = {record.name: record for record in header.tensors}
        record = headers[file_path].get(name)
        if record is None:
            raise FormatError(f"{manifest_path}: tensor {name!r} is listed in {entry.get('file')!r}, which does not hold it")
        if "dtype" in entry and entry["dtype"] != record.dtype.code:
            raise FormatError(
                f"{manifest_path}: tensor {name!r}: manifest says dtype {entry['dtype']!r:.20}, "
                f"{record.path} holds {record.dtype.code}"
            )
        if "shape" in entry and entry["shape"] != list(record.shape):
            raise FormatError(
                f"{manifest_path}: tensor {name!r}: manifest says shape {entry['shape']!r:.80}, "
                f"{record.path} holds {list(record.shape)}"
            )
        tensors[name] = record
    return Checkpoint(root, "slab_store", tensors, tuple(sorted(headers)), _source_config(manifest), manifest)


def _source_config(manifest: dict[str, Any]) -> dict[str, Any] | None:
    source = manifest.get("source")
    if isinstance(source, dict) and isinstance(source.get("config"), dict):
        return source["config"]
    return None

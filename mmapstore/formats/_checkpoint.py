"""Find and validate every tensor of a checkpoint, whatever its shape on disk.

Accepted: a slab store directory (``mmapstore.json``), a sharded Hugging Face
directory (``model.safetensors.index.json``), a directory of ``*.safetensors``
files, or a single ``.safetensors`` file.  Every header is validated before
any record is returned; nothing here maps or reads weight bytes.

A directory is opened once and every file in it is opened relative to that
descriptor, and the identity of each data file (device, inode, size, mtime)
is recorded, so the mapping layer maps exactly the files that were validated.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any

from .._errors import FormatError
from ._files import Directory, FileIdentity, open_regular
from ._gguf import is_gguf, read_gguf_files
from ._manifest import MANIFEST_NAME, Manifest, raw_records
from ._records import MAX_TENSORS, TensorRecord
from ._safetensors import PAD_PREFIX, SafetensorsHeader, read_header_fd

__all__ = ["CONFIG_NAME", "INDEX_NAME", "Checkpoint", "read_checkpoint", "read_header_in"]

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a checkpoint holds, as validated records.

    ``kind`` is ``"slab_store"``, ``"sharded"``, ``"safetensors_dir"``,
    ``"safetensors_file"`` or ``"gguf"``.  ``files`` are absolute paths of every
    data file; ``identities`` say which file each path named when it was
    validated (GGUF files are not recorded yet).
    """

    path: str
    kind: str
    tensors: dict[str, TensorRecord]
    files: tuple[str, ...]
    config: dict[str, Any] | None = None
    manifest: Manifest | None = field(default=None)
    metadata: dict[str, Any] | None = field(default=None)  # GGUF key-value metadata
    identities: dict[str, FileIdentity] = field(default_factory=dict)


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Validate the checkpoint at ``path`` and describe its tensors.

    Raises
    ------
    FormatError
        The path does not exist, holds no checkpoint, is not a regular file or
        directory, or any header, index or manifest is malformed, truncated or
        points outside the directory.
    FileChangedError
        A file was replaced while the checkpoint was being read (open again).
    """
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file or directory") from None
    except (OSError, UnicodeEncodeError, ValueError) as exc:
        raise FormatError(f"{path}: cannot stat: {getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISREG(info.st_mode) and is_gguf(path):
        return _gguf(path)
    if stat.S_ISREG(info.st_mode):
        return _single_file(path)
    if not stat.S_ISDIR(info.st_mode):
        raise FormatError(f"{path}: neither a regular file nor a directory")
    with Directory(path) as directory:
        if directory.has(MANIFEST_NAME):
            return _slab_store(directory)
        if directory.has(INDEX_NAME):
            return _sharded(directory)
        listing = directory.listdir()
        names = sorted(name for name in listing if name.endswith(".safetensors"))
        if not names and any(name.endswith(".gguf") for name in listing):
            return _gguf(path)
        if not names:
            raise FormatError(f"{path}: no {MANIFEST_NAME}, {INDEX_NAME} or *.safetensors file here")
        headers = [read_header_in(directory, name, what="shard", source=path) for name in names]
        return _from_headers(path, "safetensors_dir", headers, _config(directory))


def _single_file(path: str) -> Checkpoint:
    fd, info = open_regular(path, what="safetensors file")
    try:
        header = read_header_fd(fd, info, path)
    finally:
        os.close(fd)
    parent = os.path.dirname(path) or "."
    config = None
    if os.path.lexists(os.path.join(parent, CONFIG_NAME)):
        with Directory(parent) as directory:
            config = _config(directory)
    return _from_headers(path, "safetensors_file", [header], config)


def read_header_in(directory: Directory, name: object, *, what: str, source: str) -> SafetensorsHeader:
    """The validated header of the safetensors file ``name`` (from ``source``) in ``directory``."""
    fd, info, target = directory.open(name, what=what, source=source)
    try:
        return read_header_fd(fd, info, target)
    finally:
        os.close(fd)


def _gguf(path: str) -> Checkpoint:
    """A GGUF file, a split set (any part), or a directory holding one of them."""
    headers = read_gguf_files(path)
    tensors = _collect([header.tensors for header in headers], source=path)
    metadata: dict[str, Any] = dict(headers[0].metadata)
    identities = {header.path: header.identity for header in headers if header.identity is not None}
    return Checkpoint(
        path, "gguf", tensors, tuple(header.path for header in headers), None, None, metadata, identities=identities
    )


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
        if len(tensors) > MAX_TENSORS:
            raise FormatError(f"{source}: more than {MAX_TENSORS} tensors, over the limit")
    return tensors


def _from_headers(path: str, kind: str, headers: list[SafetensorsHeader], config: dict[str, Any] | None) -> Checkpoint:
    tensors = _collect([header.tensors for header in headers], source=path)
    identities = {header.path: header.identity for header in headers if header.identity is not None}
    files = tuple(header.path for header in headers)
    return Checkpoint(path, kind, tensors, files, config, identities=identities)


def _config(directory: Directory) -> dict[str, Any] | None:
    if not directory.has(CONFIG_NAME):
        return None
    return directory.load_json(CONFIG_NAME, what="config.json")


def _sharded(directory: Directory) -> Checkpoint:
    root = directory.path
    index_path = os.path.join(root, INDEX_NAME)
    index = directory.load_json(INDEX_NAME, what="safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index_path}: 'weight_map' must be an object of tensor name to file")
    if len(weight_map) > MAX_TENSORS:
        raise FormatError(f"{index_path}: {len(weight_map)} tensors, over the {MAX_TENSORS} limit")
    by_file: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        if not isinstance(file_name, str):
            raise FormatError(f"{index_path}: tensor {name!r}: file must be a string, found {file_name!r:.80}")
        by_file.setdefault(file_name, []).append(name)
    tensors: dict[str, TensorRecord] = {}
    identities: dict[str, FileIdentity] = {}
    for file_name, names in sorted(by_file.items()):
        header = read_header_in(directory, file_name, what=f"shard of tensor {names[0]!r}", source=index_path)
        if header.identity is not None:
            identities[header.path] = header.identity
        present = {record.name: record for record in header.tensors}
        for name in names:
            record = present.get(name)
            if record is None:
                raise FormatError(f"{index_path}: tensor {name!r} is mapped to {file_name!r}, which does not hold it")
            tensors[name] = record
    return Checkpoint(root, "sharded", tensors, tuple(identities), _config(directory), identities=identities)


def _slab_store(directory: Directory) -> Checkpoint:
    root = directory.path
    manifest_path = os.path.join(root, MANIFEST_NAME)
    manifest = Manifest.from_json(directory.load_json(MANIFEST_NAME, what="manifest"), path=manifest_path)
    config = manifest.source.config if manifest.source is not None else None
    if manifest.storage == "raw":
        tensors, identities = raw_records(directory, manifest, path=manifest_path)
        files = tuple(sorted(identities))
        return Checkpoint(root, "slab_store", tensors, files, config, manifest, identities=identities)
    tensors = {}
    headers: dict[str, dict[str, TensorRecord]] = {}
    identities = {}
    for name, entry in manifest.tensors.items():
        if entry.file not in headers:
            header = read_header_in(directory, entry.file, what=f"tensor {name!r}", source=manifest_path)
            headers[entry.file] = {record.name: record for record in header.tensors}
            if header.identity is not None:
                identities[header.path] = header.identity
        record = headers[entry.file].get(name)
        if record is None:
            raise FormatError(f"{manifest_path}: tensor {name!r} is listed in {entry.file!r}, which does not hold it")
        if entry.dtype is not None and entry.dtype != record.dtype.code:
            raise FormatError(
                f"{manifest_path}: tensor {name!r}: manifest says dtype {entry.dtype!r:.20}, "
                f"{record.path} holds {record.dtype.code}"
            )
        if entry.shape is not None and entry.shape != record.shape:
            raise FormatError(
                f"{manifest_path}: tensor {name!r}: manifest says shape {list(entry.shape)!r:.80}, "
                f"{record.path} holds {list(record.shape)}"
            )
        tensors[name] = record
    files = tuple(sorted(identities))
    return Checkpoint(root, "slab_store", tensors, files, config, manifest, identities=identities)

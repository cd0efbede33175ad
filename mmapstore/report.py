"""``inspect`` and ``verify``: what a store holds, and whether it is intact."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import FormatError
from .formats import MANIFEST_NAME, read_safetensors_header
from .formats.manifest import check_manifest
from .formats.records import load_json_object, resolve_inside
from .mapping import MADV_DONTNEED, MappedFile
from .store import open_store

__all__ = ["Problem", "VerifyReport", "describe", "verify"]

_HASH_CHUNK = 64 << 20


def describe(path: str) -> dict[str, Any]:
    """A JSON-ready description: layout, MoE layers, stacks, files and sizes."""
    with open_store(path) as store:
        layers = []
        for layer in store.layers:
            stacks = {}
            for proj, stack in layer.stacks:
                stacks[proj] = {
                    "shape": [stack.num_experts, stack.k, stack.n],
                    "dtype": str(stack.dtype),
                    "encoding": stack.encoding.describe(),
                    "parts": {name: {"dtype": part.dtype.code, "slab_shape": list(part.slab_shape)}
                              for name, part in stack.parts.items()},
                    "orientation": stack.native_orientation,
                    "storage": "stacked" if stack.is_stacked else "per_expert",
                    "nbytes": stack.nbytes,
                    "tensors": list(stack.tensor_names[:1]) + ([f"... {len(stack.tensor_names) - 1} more"]
                                                                if len(stack.tensor_names) > 1 else []),
                }
            layers.append({"layer": layer.layer_index, "experts": layer.num_experts, "stacks": stacks})
        files = [{"path": file, "nbytes": os.stat(file).st_size} for file in store.files]
        return {
            "path": os.path.abspath(path),
            "kind": store.kind,
            "layout": store.layout,
            "moe_layers": store.num_layers,
            "num_tensors": len(store.tensors),
            "expert_nbytes": sum(layer.nbytes for layer in store.layers),
            "layers": layers,
            "files": files,
            "total_nbytes": sum(entry["nbytes"] for entry in files),
            "model_type": (store.config or {}).get("model_type"),
        }


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    tensor: str | None
    message: str


@dataclass(slots=True)
class VerifyReport:
    path: str
    checked_tensors: int = 0
    checked_nbytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str) -> VerifyReport:
    """Check structure and, for slab stores, every tensor's sha256.

    Every file and tensor is checked; a damaged one does not stop the rest.
    """
    report = VerifyReport(os.path.abspath(path))
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if os.path.isdir(path) and os.path.exists(manifest_path):
        _verify_slab_store(path, manifest_path, report)
    try:
        with open_store(path) as store:
            if not os.path.exists(manifest_path):
                report.checked_tensors = len(store.tensors)
    except FormatError as exc:
        if not report.problems:  # the per-tensor pass did not already say it
            report.problems.append(Problem(path, None, str(exc)))
    return report


def _verify_slab_store(root: str, manifest_path: str, report: VerifyReport) -> None:
    try:
        manifest = load_json_object(manifest_path, what="manifest")
        check_manifest(manifest, path=manifest_path)
    except FormatError as exc:
        report.problems.append(Problem(manifest_path, None, str(exc)))
        return
    headers: dict[str, dict[str, Any] | FormatError] = {}
    for name, entry in manifest["tensors"].items():
        file_name = entry.get("file")
        try:
            file_path = resolve_inside(root, file_name, what=f"tensor {name!r}", source=manifest_path)
        except FormatError as exc:
            report.problems.append(Problem(str(file_name), name, str(exc)))
            continue
        if manifest["storage"] == "safetensors":
            if file_path not in headers:
                try:
                    header = read_safetensors_header(file_path)
                    headers[file_path] = {record.name: record for record in header.tensors}
                except FormatError as exc:
                    headers[file_path] = exc
            found = headers[file_path]
            if isinstance(found, FormatError):
                report.problems.append(Problem(file_path, name, str(found)))
                continue
            record = found.get(name)
            if record is None:
                report.problems.append(Problem(file_path, name, "tensor missing from the file"))
                continue
            offset, nbytes = record.offset, record.nbytes
        else:
            offset, nbytes = entry.get("offset", 0), entry.get("nbytes", 0)
        report.checked_tensors += 1
        problem = _check_bytes(file_path, name, offset, nbytes, entry.get("sha256"))
        if problem is not None:
            report.problems.append(problem)
        else:
            report.checked_nbytes += nbytes


def _check_bytes(path: str, name: str, offset: int, nbytes: int, expected: str | None) -> Problem | None:
    size = os.stat(path).st_size
    if offset + nbytes > size:
        return Problem(path, name, f"truncated: bytes [{offset}, {offset + nbytes}) but the file is {size} bytes")
    if expected is None:
        return None
    digest = hashlib.sha256()
    with MappedFile(path, offset + nbytes) as mapped:
        for start in range(offset, offset + nbytes, _HASH_CHUNK):
            length = min(_HASH_CHUNK, offset + nbytes - start)
            chunk = mapped.view(start, np.dtype(np.uint8), (length,))
            digest.update(memoryview(chunk))
            del chunk
            mapped.advise(start, length, MADV_DONTNEED)
    if digest.hexdigest() != expected:
        return Problem(path, name, f"sha256 mismatch: manifest {expected[:16]}..., file {digest.hexdigest()[:16]}...")
    return None

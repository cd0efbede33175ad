"""``inspect`` and ``verify``: what a store holds, and whether it is intact."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ._checksum import ALGORITHMS, Hasher, new_hasher
from ._errors import FormatError
from ._preadcopy import pread_into
from ._store import open_store
from .formats import MANIFEST_NAME, FileIdentity, TensorRecord
from .formats._checkpoint import read_header_in
from .formats._files import Directory, open_regular
from .formats._manifest import Manifest, check_overlaps, raw_record

__all__ = ["Problem", "VerifyReport", "describe", "verify"]

_HASH_CHUNK = 8 << 20


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
                    "parts": {
                        name: {"dtype": part.dtype.code, "slab_shape": list(part.slab_shape)}
                        for name, part in stack.parts.items()
                    },
                    "orientation": stack.native_orientation,
                    "storage": "stacked" if stack.is_stacked else "per_expert",
                    "nbytes": stack.nbytes,
                    "tensors": list(stack.tensor_names[:1])
                    + ([f"... {len(stack.tensor_names) - 1} more"] if len(stack.tensor_names) > 1 else []),
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
    """Check structure and, for slab stores, every tensor's checksum
    (whichever of :data:`~mmapstore._checksum.ALGORITHMS` the manifest names).

    The structure is validated by the same code as :func:`open_store` (one
    problem per tensor, so a damaged one does not stop the rest); bytes are
    read with ``pread`` (a file that shrinks while it is hashed is a problem
    in the report, never a SIGBUS) and never through a mapping.
    """
    report = VerifyReport(os.path.abspath(path))
    if os.path.isdir(path) and os.path.lexists(os.path.join(path, MANIFEST_NAME)):
        try:
            with Directory(path) as directory:
                _verify_slab_store(directory, report)
        except FormatError as exc:
            report.problems.append(Problem(path, None, str(exc)))
        slab_store = True
    else:
        slab_store = False
    try:
        with open_store(path) as store:
            if not slab_store:
                report.checked_tensors = len(store.tensors)
    except FormatError as exc:
        if not report.problems:  # the per-tensor pass did not already say it
            report.problems.append(Problem(path, None, str(exc)))
    return report


def _verify_slab_store(directory: Directory, report: VerifyReport) -> None:
    manifest_path = os.path.join(directory.path, MANIFEST_NAME)
    manifest = Manifest.from_json(directory.load_json(MANIFEST_NAME, what="manifest"), path=manifest_path)
    raw_files: dict[str, tuple[str, FileIdentity]] = {}
    headers: dict[str, dict[str, TensorRecord] | FormatError] = {}
    records: dict[str, TensorRecord] = {}
    for name, entry in manifest.tensors.items():
        file_name = entry.file
        try:
            if manifest.storage == "raw":
                records[name] = raw_record(directory, name, entry, raw_files, path=manifest_path)
                continue
            key = file_name
            if key not in headers:
                try:
                    header = read_header_in(directory, file_name, what=f"tensor {name!r}", source=manifest_path)
                    headers[key] = {record.name: record for record in header.tensors}
                except FormatError as exc:
                    headers[key] = exc
            found = headers[key]
            if isinstance(found, FormatError):
                raise found
            record = found.get(name)
            if record is None:
                raise FormatError(f"{manifest_path}: tensor {name!r} is missing from {file_name!r}")
            records[name] = record
        except FormatError as exc:
            report.problems.append(Problem(os.path.join(directory.path, file_name), name, str(exc)))
    if manifest.storage == "raw":
        try:
            check_overlaps(records, path=manifest_path)
        except FormatError as exc:
            report.problems.append(Problem(manifest_path, None, str(exc)))
    algorithm = manifest.checksum
    if algorithm is not None and algorithm not in ALGORITHMS:
        report.problems.append(
            Problem(
                manifest_path, None, f"checksum {algorithm!r:.40} is not one of {list(ALGORITHMS)}: bytes not checked"
            )
        )
    buffer = np.empty(_HASH_CHUNK, dtype=np.uint8)
    descriptors: dict[str, int] = {}
    try:
        for name, record in records.items():
            report.checked_tensors += 1
            expected = list(manifest.tensors[name].checksums)
            if not expected and algorithm in ALGORITHMS:
                report.problems.append(Problem(record.path, name, f"the manifest gives no {algorithm} checksum"))
                continue
            problem = _check_bytes(record, expected, descriptors, buffer)
            if problem is not None:
                report.problems.append(problem)
            else:
                report.checked_nbytes += record.nbytes
    finally:
        for fd in descriptors.values():
            os.close(fd)


def _check_bytes(
    record: TensorRecord,
    expected: list[tuple[str, str]],
    descriptors: dict[str, int],
    buffer: npt.NDArray[np.uint8],
) -> Problem | None:
    try:
        if record.path not in descriptors:
            descriptors[record.path] = open_regular(record.path, what="data file")[0]
        fd = descriptors[record.path]
        size = os.fstat(fd).st_size
        if record.offset + record.nbytes > size:
            return Problem(
                record.path,
                record.name,
                f"truncated: bytes [{record.offset}, {record.offset + record.nbytes}) but the file is {size} bytes",
            )
        if not expected:
            return None
        hashers: list[Hasher] = [new_hasher(algorithm) for algorithm, _ in expected]
        end = record.offset + record.nbytes
        for start in range(record.offset, end, _HASH_CHUNK):
            chunk = buffer[: min(_HASH_CHUNK, end - start)]
            pread_into(fd, start, chunk, path=record.path)
            for hasher in hashers:
                hasher.update(chunk.data)
    except FormatError as exc:
        return Problem(record.path, record.name, str(exc))
    except ImportError as exc:  # a blake3 store without the blake3 package
        return Problem(record.path, record.name, f"cannot check: {exc}")
    for (algorithm, digest), hasher in zip(expected, hashers, strict=True):
        found = hasher.hexdigest()
        if found != digest:
            return Problem(
                record.path, record.name, f"{algorithm} mismatch: manifest {digest[:16]}..., file {found[:16]}..."
            )
    return None

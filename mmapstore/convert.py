"""Streaming conversion of any checkpoint ``open_store`` opens into a slab store.

Each stack is written contiguous as ``[E, k, n]`` (GroupedMatMul orientation,
transposed from ``[out, in]`` sources), page-aligned, named
``blk.{L}.ffn_{gate,up,down}_exps.weight``, with an ``mmapstore.json``
manifest carrying provenance and a sha256 per tensor.  Conversion streams
slab by slab: peak memory is a few slabs whatever the checkpoint size.  Source
bytes are read with ``pread`` into reused buffers, never through the mapping,
so a source file truncated under a running conversion is a
:class:`~mmapstore.errors.FormatError`, not a SIGBUS.  The output is built in
a staging directory beside the destination under a lock and renamed into
place (see :mod:`mmapstore.publish`).  A destination that is the source, or
holds it, is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .dequant import dequantize_slab
from .dtypes import DType, can_cast, dtype_from_code, parse_user_dtype
from .errors import ConvertError, FormatError
from .formats import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SafetensorsWriter, TensorSpec, read_checkpoint
from .formats.records import split_by_size
from .geometry import Encoding
from .kernels import copy_slab
from .mapping import PAGE_NBYTES
from .preadcopy import pread_into
from .publish import clean_partials, locked, staged_dir
from .store import ExpertStack, ExpertStore, open_store

__all__ = ["ConvertResult", "convert", "source_fingerprint"]

TOOL_VERSION = "0.1.0"


@dataclass(frozen=True, slots=True)
class ConvertResult:
    path: str
    files: tuple[str, ...]
    num_tensors: int
    nbytes: int
    skipped: bool  # the destination already held this conversion


def source_fingerprint(store: ExpertStore) -> list[list[object]]:
    """Name, size and mtime of every source file: what 'the same source' means."""
    result: list[list[object]] = []
    for path in store.files:
        info = os.stat(path)
        result.append([os.path.relpath(path, os.path.dirname(store.path) or "."), info.st_size, info.st_mtime_ns])
    return result


def _parse_layers(layers: str | None, available: list[int]) -> list[int]:
    if layers is None:
        return available
    try:
        first, _, last = layers.partition("-")
        low, high = int(first), int(last or first)
    except ValueError:
        raise ConvertError(f"--layers must look like A-B or A, got {layers!r}") from None
    chosen = [index for index in available if low <= index <= high]
    if not chosen:
        raise ConvertError(f"--layers {layers}: no MoE layer in that range (MoE layers are {available})")
    return chosen


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    storage: str = "safetensors",
    dtype: str = "keep",
    shard_nbytes: int = 4 << 30,
    layers: str | None = None,
    force: bool = False,
    lock_timeout: float = -1,
    progress: Callable[[int], None] | None = None,
) -> ConvertResult:
    """Convert ``src`` into a slab store at ``dst``; atomic, locked, streaming.

    Without ``force`` an existing ``dst`` is refused, unless it already holds
    this very conversion (same source files, sizes, mtimes and options): then
    nothing is written and ``skipped`` is True, so racing converters agree.

    Raises
    ------
    FormatError
        The source is malformed.
    ConvertError
        ``dst`` exists, options are invalid, or the lock timed out.
    """
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    if storage not in ("safetensors", "raw"):
        raise ConvertError(f"storage must be 'safetensors' or 'raw', got {storage!r}")
    with open_store(src) as store:
        _refuse_overlap(src, dst, store.files)
        out_dtype = None if dtype == "keep" else parse_user_dtype(dtype)
        if out_dtype is not None:
            for layer in store.layers:
                for _, stack in layer.stacks:
                    if not stack.encoding.encoded and not can_cast(stack.dtype, out_dtype.numpy):
                        raise ConvertError(f"cannot convert {stack.dtype} experts to {out_dtype.code}")
                    if stack.encoding.encoded and not out_dtype.numpy.kind == "f" and out_dtype.code not in _ML_FLOATS:
                        raise ConvertError(
                            f"{stack.name}: {stack.encoding.describe()} experts dequantize to floats, not {out_dtype.code}"
                        )
        chosen = _parse_layers(layers, sorted(store.layer_indices + [layer.layer_index for layer in store.mtp_layers]))
        options = {"storage": storage, "dtype": dtype, "shard_nbytes": shard_nbytes, "layers": chosen}
        fingerprint = source_fingerprint(store)
        orientation = _orientation(store, chosen)
        plan = [
            item
            for index in chosen
            for proj, stack in store.layer(index).stacks
            for item in _stack_items(index, proj, stack, out_dtype, orientation)
        ]
        with locked(dst, lock_timeout):
            clean_partials(dst)
            if not force:
                done = _existing_conversion(dst, os.path.abspath(src), fingerprint, options, plan)
                if done is not None:
                    return done
            try:
                with staged_dir(dst, replace=force) as staging:
                    entries = _write(staging, plan, storage, shard_nbytes, progress)
                    encodings = {
                        f"blk.{index}.ffn_{proj}_exps": _written_encoding(stack, out_dtype, orientation).to_json()
                        for index in chosen
                        for proj, stack in store.layer(index).stacks
                        if out_dtype is None and stack.encoding.encoded
                    }
                    manifest = {
                        "format": FORMAT_NAME,
                        "format_version": FORMAT_VERSION,
                        "storage": storage,
                        "layout": "slab",
                        "orientation": orientation,
                        "encodings": encodings,
                        "dtype": (out_dtype.code if out_dtype else "keep"),
                        "tool_version": TOOL_VERSION,
                        "source": {
                            "path": os.path.abspath(src),
                            "kind": store.kind,
                            "layout": store.layout,
                            "config": store.config,
                            "fingerprint": fingerprint,
                        },
                        "options": options,
                        "files": sorted({entry["file"] for entry in entries.values()}),
                        "tensors": entries,
                    }
                    with open(os.path.join(staging, MANIFEST_NAME), "w", encoding="utf-8") as handle:
                        json.dump(manifest, handle, indent=1, sort_keys=True)
                        handle.write("\n")
            except OSError as exc:  # disk full, read-only or vanished destination
                raise ConvertError(f"{dst}: cannot write the conversion: {exc.strerror or exc}") from None
    files = tuple(os.path.join(dst, name) for name in sorted({entry["file"] for entry in entries.values()}))
    return ConvertResult(dst, files, len(entries), sum(entry["nbytes"] for entry in entries.values()), False)


def _refuse_overlap(src: str, dst: str, files: tuple[str, ...]) -> None:
    """Refuse a destination that is the source, or a directory holding any of it
    (replacing it would delete the checkpoint being read), like ``cp a a``."""
    real_dst = os.path.realpath(dst)
    for path in (src, *files):
        real = os.path.realpath(path)
        if os.path.commonpath([real_dst, real]) == real_dst:
            what = "is" if real == real_dst else "contains"
            raise ConvertError(f"{dst} {what} the source {path}: refusing to convert a checkpoint onto itself")
    try:
        target = os.stat(dst)
    except OSError:
        return
    # The same directory under another name (a bind mount, a hard-linked file):
    # compare identities along the source's ancestors.
    current = os.path.realpath(src)
    while True:
        try:
            info = os.stat(current)
        except OSError:
            return
        if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
            raise ConvertError(f"{dst} is {current}, which holds the source {src}: refusing to convert onto it")
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def _existing_conversion(
    dst: str, src: str, fingerprint: list[list[object]], options: dict[str, Any], plan: list[_Item]
) -> ConvertResult | None:
    """``dst`` as a result if it already holds this very conversion, intact in
    structure (every header valid, every file of the size its header needs,
    every expected stack present with its dtype and shape), else None."""
    if not os.path.lexists(os.path.join(dst, MANIFEST_NAME)):
        return None
    try:
        checkpoint = read_checkpoint(dst)
    except FormatError:
        return None  # damaged or not a store: not "this conversion"
    manifest = checkpoint.manifest or {}
    source = manifest.get("source")
    if not isinstance(source, dict):
        return None
    same = source.get("path") == src and source.get("fingerprint") == fingerprint and manifest.get("options") == options
    if not same or len(checkpoint.tensors) != len(plan):
        return None
    for spec in (item.spec for item in plan):
        record = checkpoint.tensors.get(spec.name)
        if record is None or record.dtype.code != spec.dtype.code or record.shape != spec.shape:
            return None
    total = sum(record.nbytes for record in checkpoint.tensors.values())
    return ConvertResult(dst, checkpoint.files, len(checkpoint.tensors), total, True)


def _write(
    staging: str,
    plan: list[_Item],
    storage: str,
    shard_nbytes: int,
    progress: Callable[[int], None] | None,
) -> dict[str, dict[str, Any]]:
    shards = split_by_size(plan, lambda item: item.spec.nbytes, shard_nbytes)
    entries: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmapstore-sha256") as hasher:
        for number, shard in enumerate(shards, start=1):
            _write_shard(staging, number, len(shards), shard, storage, hasher, progress, entries)
    return entries


def _write_shard(
    staging: str,
    number: int,
    count: int,
    shard: list[_Item],
    storage: str,
    hasher: ThreadPoolExecutor,
    progress: Callable[[int], None] | None,
    entries: dict[str, dict[str, Any]],
) -> None:
    suffix = "safetensors" if storage == "safetensors" else "bin"
    file_name = f"experts-{number:05d}-of-{count:05d}.{suffix}"
    path = os.path.join(staging, file_name)
    specs = [item.spec for item in shard]
    writer: SafetensorsWriter | _RawWriter
    if storage == "safetensors":
        writer = SafetensorsWriter(path, specs, {"format": "mmapstore"}, align=PAGE_NBYTES)
    else:
        writer = _RawWriter(path, specs, PAGE_NBYTES)
    with writer:
        for item in shard:
            spec = item.spec
            digest = _stream_stack(writer, item, hasher, progress)
            entries[spec.name] = {
                "file": file_name,
                "dtype": spec.dtype.code,
                "shape": list(spec.shape),
                "offset": writer.offsets[spec.name],
                "nbytes": spec.nbytes,
                "sha256": digest,
            }


@dataclass(frozen=True, slots=True)
class _Item:
    """One ``[E, ...]`` tensor to write: ``slab(reader, e)`` gives expert
    ``e``'s slab as written (bytes read by ``reader``, possibly transposed, or
    values computed from its parts); ``reads`` are the parts it reads."""

    spec: TensorSpec
    stack: ExpertStack
    slab: Callable[[_Reader, int], npt.NDArray[np.generic]]
    reads: tuple[str, ...]


class _Reader:
    """Reads one stack's expert slabs with ``pread`` into buffers reused from
    slab to slab (one per part): a source that shrinks is a short read and a
    :class:`FormatError`, never a fault on a mapped page.  A returned array is
    valid until the next read of the same part."""

    def __init__(self, stack: ExpertStack) -> None:
        self.stack = stack
        self._buffers: dict[str, npt.NDArray[np.uint8]] = {}

    def part(self, part: str, expert: int) -> npt.NDArray[np.generic]:
        span = self.stack.part_span(part, expert)
        layout = self.stack.part(part, expert)  # a view of the mapping: only its layout is used, never its bytes
        buffer = self._buffers.get(part)
        if buffer is None or buffer.nbytes < span.nbytes:
            buffer = self._buffers[part] = np.empty(span.nbytes, dtype=np.uint8)
        pread_into(span.mapped, span.offset, buffer[: span.nbytes])
        delta = span.mapped.offset_of(layout) - span.offset
        slab: npt.NDArray[np.generic] = np.ndarray(
            layout.shape, dtype=layout.dtype, buffer=buffer, offset=delta, strides=layout.strides
        )
        return slab

    def dequantize(self, expert: int) -> npt.NDArray[np.generic]:
        """:meth:`ExpertStack.dequantize` over the bytes read (``[k, n]`` float32)."""
        stack = self.stack
        views = {name: self.part(name, expert) for name in stack.parts if name != "bias"}
        values = dequantize_slab(stack.encoding, views, stack.native_orientation, stack.k, stack.n, where=stack.name)
        return np.asarray(values if stack.native_orientation == "kn" else values.T).astype(np.float32)


# Encodings whose bytes cannot be transposed (blocks or words packed along one axis).
_NATIVE_ONLY = ("mxfp4", "ggml", "int4_group", "nvfp4", "mxfp4_packed", "awq", "gptq")
_ML_FLOATS = ("BF16", "F8_E4M3", "F8_E5M2")


def _orientation(store: ExpertStore, layers: list[int]) -> str:
    """``kn`` (GroupedMatMul ``[E, k, n]``) unless a stack's encoded blocks
    cannot be transposed: then every stack keeps its native orientation
    (``nk``, or ``kn`` for AWQ/GPTQ), which must be one for the whole store."""
    stacks = [stack for index in layers for _, stack in store.layer(index).stacks]
    if any(stack.encoding.kind in _NATIVE_ONLY for stack in stacks):
        native = {stack.native_orientation for stack in stacks}
        if len(native) != 1:
            raise ConvertError(
                f"{store.path}: block-encoded stacks mixed with stacks of another orientation cannot share one store"
            )
        return native.pop()
    return "kn"


def _written_encoding(stack: ExpertStack, out_dtype: DType | None, orientation: str) -> Encoding:
    """The encoding of a stack as written: kept, with its block grid
    transposed when the weight is; plain when dequantized."""
    if out_dtype is not None or not stack.encoding.encoded:
        return Encoding("plain", out_dtype or stack.geometry.dtype)
    encoding = stack.encoding
    if orientation != stack.native_orientation:
        return Encoding(encoding.kind, encoding.dtype, (encoding.block[1], encoding.block[0]))
    return encoding


def _stack_items(layer: int, proj: str, stack: ExpertStack, out_dtype: DType | None, orientation: str) -> list[_Item]:
    """What to write for one stack: its weight (cast, or dequantized with
    every part it needs, never encoded values cast as if they were weights),
    and, when encodings are kept, each other part; biases always."""
    flip = orientation != stack.native_orientation
    items: list[_Item] = []
    name = f"blk.{layer}.ffn_{proj}_exps"
    experts = stack.num_experts

    def oriented(part: str) -> Callable[[_Reader, int], npt.NDArray[np.generic]]:
        return (lambda reader, e: reader.part(part, e).T) if flip else (lambda reader, e: reader.part(part, e))

    if stack.encoding.encoded and out_dtype is not None:
        shape: tuple[int, ...] = (stack.k, stack.n) if orientation == "kn" else (stack.n, stack.k)
        dequantized: Callable[[_Reader, int], npt.NDArray[np.generic]] = (
            (lambda reader, e: reader.dequantize(e))
            if orientation == "kn"
            else (lambda reader, e: reader.dequantize(e).T)
        )
        reads = tuple(part for part in stack.parts if part != "bias")
        items.append(_Item(TensorSpec(f"{name}.weight", out_dtype, (experts, *shape)), stack, dequantized, reads))
    else:
        for part, geometry in stack.parts.items():
            if part == "bias":
                continue
            data_type = geometry.dtype if (out_dtype is None or part != "weight") else out_dtype
            if data_type.block_elems > 1:  # ggml blocks travel as bytes; the manifest names their type
                data_type = dtype_from_code("U8")
            shape = geometry.slab_shape[::-1] if flip else geometry.slab_shape
            items.append(
                _Item(TensorSpec(f"{name}.{part}", data_type, (experts, *shape)), stack, oriented(part), (part,))
            )
    if "bias" in stack.parts:
        bias = stack.parts["bias"]
        data_type = out_dtype or bias.dtype
        items.append(
            _Item(
                TensorSpec(f"{name}.bias", data_type, (experts, *bias.slab_shape)),
                stack,
                lambda reader, e: reader.part("bias", e),
                ("bias",),
            )
        )
    return items


def _stream_stack(
    writer: SafetensorsWriter | _RawWriter,
    item: _Item,
    hasher: ThreadPoolExecutor,
    progress: Callable[[int], None] | None,
) -> str:
    """Write one ``[E, ...]`` part stack slab by slab; return its sha256.

    Each slab is read with ``pread`` (see :class:`_Reader`), transposed or
    cast into one of two output slabs, hashed on ``hasher`` (one thread, so
    updates stay in order; hashlib releases the GIL) while this thread reads
    and writes the next slab; the two output slabs alternate so neither is
    overwritten while being hashed.
    """
    spec, stack = item.spec, item.stack
    digest = hashlib.sha256()
    reader = _Reader(stack)
    staging = [np.empty(spec.shape[1:], dtype=spec.dtype.numpy) for _ in range(2)]
    pending: list[Future[None] | None] = [None, None]
    for expert in range(stack.num_experts):
        which = expert % 2
        previous = pending[which]
        if previous is not None:
            previous.result()  # its last hash must finish before we overwrite it
        out = staging[which]
        copy_slab(out, item.slab(reader, expert))
        pending[which] = hasher.submit(digest.update, out.reshape(-1).view(np.uint8).data)
        writer.append(out)
        if progress is not None:
            progress(out.nbytes)
    for future in pending:
        if future is not None:
            future.result()
    return digest.hexdigest()


class _RawWriter:
    """Raw slab file: each tensor at a page-aligned offset, described by the manifest."""

    def __init__(self, path: str, specs: list[TensorSpec], align: int) -> None:
        self.offsets: dict[str, int] = {}
        position = 0
        for spec in specs:
            position += -position % align
            self.offsets[spec.name] = position
            position += spec.nbytes
        self._specs = specs
        self._current = 0
        self._written = 0
        self._file = open(path, "wb")  # noqa: SIM115 - owned by the writer, closed in __exit__
        self._file.truncate(position)

    def append(self, data: npt.NDArray[np.generic]) -> None:
        spec = self._specs[self._current]
        self._file.seek(self.offsets[spec.name] + self._written)
        self._file.write(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data)
        self._written += data.nbytes
        if self._written >= spec.nbytes:
            self._current += 1
            self._written = 0

    def __enter__(self) -> _RawWriter:
        return self

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        try:
            if kind is None:
                if self._current != len(self._specs):
                    raise ValueError(f"{self._file.name}: closed before every tensor was written")
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()

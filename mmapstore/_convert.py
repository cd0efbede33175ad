"""Streaming conversion of any checkpoint ``open_store`` opens into a slab store.

Each part of each stack is written contiguous as ``[E, ...]``, page-aligned,
named ``blk.{L}.ffn_{gate,up,down}_exps.{part}``, with an ``mmapstore.json``
manifest carrying provenance, the orientation and a checksum per tensor.

By default slabs keep the source's *native orientation* (``[out, in]`` for
``nn.Linear`` checkpoints): the manifest records it and ``stack.expert(e)``
still gives ``[k, n]``, as a transposed view, so slabs that need no cast pass
through unchanged and are copied file to file by the kernel.
``orientation="kn"`` writes the GroupedMatMul layout ``[E, k, n]`` instead,
transposing on the way (packed, ggml and MXFP4 encodings have no element
view to transpose and are refused there unless dequantized).

Conversion streams slab by slab through :mod:`mmapstore._convert_pipeline`
(read, transform, hash and write overlapped on two threads): peak memory is
a few slabs whatever the checkpoint size.  Source bytes are never read
through the mapping, so a source file truncated under a running conversion
is a :class:`~mmapstore._errors.FormatError`, not a SIGBUS.  The output is
built in a staging directory beside the destination under a lock and renamed
into place (see :mod:`mmapstore._publish`).  A destination that is the
source, or holds it, is refused.
"""

from __future__ import annotations

import collections
import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._checksum import ALGORITHMS, DEFAULT_ALGORITHM, new_hasher
from ._convert_pipeline import CopyFrom, Job, SlabReader, run_jobs
from ._dtypes import DType, can_cast, dtype_from_code, parse_user_dtype
from ._errors import ConvertError, FormatError
from ._geometry import Encoding, PartGeometry, c_strides
from ._mapping import PAGE_NBYTES
from ._publish import clean_partials, locked, staged_dir
from ._store import ExpertStack, ExpertStore, open_store
from .formats import MANIFEST_NAME, Manifest, ManifestSource, ManifestTensor, TensorSpec, read_checkpoint
from .formats._manifest import LAYOUT_VERSIONS
from .formats._records import split_by_size
from .formats._slabfile import SlabFileWriter

__all__ = ["LAYOUTS", "ORIENTATIONS", "ConvertResult", "convert", "source_fingerprint"]

TOOL_VERSION = "0.1.0"
ORIENTATIONS = ("native", "kn")
LAYOUTS = ("slab", "expert-major")
PART_ALIGN_NBYTES = 64
"""Alignment of a part inside an expert-major record: any dtype's views, and
a cache line.  Parts of real models are multiples of it, so a record is
one dense range."""
"""``slab``: each part one ``[E, ...]`` tensor.  ``expert-major``: per layer one
``[E, record]`` byte tensor whose row ``e`` holds every part of expert ``e``
(gate, up, down, their scales and biases), so a promotion is one read."""


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
    orientation: str = "native",
    layout: str = "slab",
    checksum: str = DEFAULT_ALGORITHM,
    shard_nbytes: int = 4 << 30,
    layers: str | None = None,
    force: bool = False,
    lock_timeout: float = -1,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> ConvertResult:
    """Convert ``src`` into a slab store at ``dst``; atomic, locked, streaming.

    Without ``force`` an existing ``dst`` is refused, unless it already holds
    this very conversion (same source files, sizes, mtimes and options): then
    nothing is written and ``skipped`` is True, so racing converters agree.

    Parameters
    ----------
    storage
        ``"safetensors"`` shards or ``"raw"`` ``.bin`` files.
    dtype
        ``"keep"``, or ``"f32"``, ``"f16"``, ``"bf16"``: values (encoded
        stacks are dequantized).
    orientation
        ``"native"`` (keep the source's slab orientation; no transpose) or
        ``"kn"`` (GroupedMatMul ``[E, k, n]``).
    layout
        ``"slab"`` (each part one ``[E, ...]`` tensor) or ``"expert-major"``
        (all parts of one expert in one contiguous, page-aligned record; the
        manifest says where each part lies in it, and stack views over it
        stay zero-copy, strided by the record size).
    checksum
        The per-tensor checksum, one of :data:`~mmapstore._checksum.ALGORITHMS`.
    progress
        Called with byte counts as they reach the disk (their sum is the
        total given to ``on_plan``).
    on_plan
        Called once, before writing, with the bytes the conversion writes.

    Raises
    ------
    FormatError
        The source is malformed, or shrank while it was read.
    ConvertError
        ``dst`` exists, options are invalid, the lock timed out, or the
        destination could not be written.
    ImportError
        ``checksum="blake3"`` without the ``blake3`` package.
    """
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    if storage not in ("safetensors", "raw"):
        raise ConvertError(f"storage must be 'safetensors' or 'raw', got {storage!r}")
    if orientation not in ORIENTATIONS:
        raise ConvertError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if layout not in LAYOUTS:
        raise ConvertError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if checksum not in ALGORITHMS:
        raise ConvertError(f"checksum must be one of {ALGORITHMS}, got {checksum!r}")
    new_hasher(checksum)  # a missing optional package fails before any work
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
        options = {
            "storage": storage,
            "dtype": dtype,
            "orientation": orientation,
            "checksum": checksum,
            "shard_nbytes": shard_nbytes,
            "layers": chosen,
        }
        if layout != "slab":  # stores converted before layouts existed still match their options
            options["layout"] = layout
        fingerprint = source_fingerprint(store)
        written = _orientation(store, chosen, orientation, out_dtype)
        items = {
            index: [
                item
                for proj, stack in store.layer(index).stacks
                for item in _stack_items(index, proj, stack, out_dtype, written)
            ]
            for index in chosen
        }
        plan: list[_Item] | list[_Record] = (
            [item for index in chosen for item in items[index]]
            if layout == "slab"
            else [_record(index, items[index]) for index in chosen]
        )
        with locked(dst, lock_timeout):
            clean_partials(dst)
            if not force:
                done = _existing_conversion(dst, os.path.abspath(src), fingerprint, options, plan)
                if done is not None:
                    return done
            if on_plan is not None:
                on_plan(sum(unit.spec.nbytes for unit in plan))
            try:
                with staged_dir(dst, replace=force) as staging:
                    entries = _write(staging, plan, storage, shard_nbytes, checksum, progress)
                    encodings = {
                        f"blk.{index}.ffn_{proj}_exps": _written_encoding(stack, out_dtype, written)
                        for index in chosen
                        for proj, stack in store.layer(index).stacks
                        if out_dtype is None and stack.encoding.encoded
                    }
                    records = None
                    if layout == "expert-major":
                        records = {unit.spec.name: unit.to_json() for unit in plan if isinstance(unit, _Record)}
                    manifest = Manifest(
                        storage="raw" if storage == "raw" else "safetensors",
                        tensors=entries,
                        format_version=LAYOUT_VERSIONS[layout],
                        layout=layout,
                        records=records,
                        orientation="nk" if written == "nk" else "kn",
                        dtype=(out_dtype.code if out_dtype else "keep"),
                        encodings=encodings,
                        checksum=checksum,
                        tool_version=TOOL_VERSION,
                        source=ManifestSource(
                            os.path.abspath(src), store.kind, store.layout, store.config, fingerprint
                        ),
                        options=options,
                        files=tuple(sorted({entry.file for entry in entries.values()})),
                    )
                    with open(os.path.join(staging, MANIFEST_NAME), "w", encoding="utf-8") as handle:
                        json.dump(manifest.to_json(), handle, indent=1, sort_keys=True)
                        handle.write("\n")
            except OSError as exc:  # disk full, read-only or vanished destination
                raise ConvertError(f"{dst}: cannot write the conversion: {exc.strerror or exc}") from None
    files = tuple(os.path.join(dst, name) for name in sorted({entry.file for entry in entries.values()}))
    return ConvertResult(dst, files, len(entries), sum(entry.nbytes or 0 for entry in entries.values()), False)


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
    dst: str, src: str, fingerprint: list[list[object]], options: dict[str, Any], plan: Sequence[_Item | _Record]
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
    manifest = checkpoint.manifest
    if manifest is None or manifest.source is None:
        return None
    source = manifest.source
    same = source.path == src and source.fingerprint == fingerprint and manifest.options == options
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
    plan: Sequence[_Item | _Record],
    storage: str,
    shard_nbytes: int,
    checksum: str,
    progress: Callable[[int], None] | None,
) -> dict[str, ManifestTensor]:
    """Write every shard of ``plan`` into ``staging``; return the manifest's tensor entries."""
    shards = split_by_size(list(plan), lambda unit: unit.spec.nbytes, shard_nbytes)
    suffix = "safetensors" if storage == "safetensors" else "bin"
    writers: list[SlabFileWriter] = []
    jobs: list[Job] = []
    placed: list[tuple[_Item | _Record, str, SlabFileWriter]] = []
    try:
        for number, shard in enumerate(shards, start=1):
            file_name = f"experts-{number:05d}-of-{len(shards):05d}.{suffix}"
            writer = SlabFileWriter(
                os.path.join(staging, file_name), [item.spec for item in shard], storage=storage, align=PAGE_NBYTES
            )
            writers.append(writer)
            for item in shard:
                placed.append((item, file_name, writer))
                jobs += _jobs(item, writer) if isinstance(item, _Item) else item.jobs(writer)
        digests = run_jobs(jobs, algorithm=checksum, progress=progress)
    finally:
        for writer in writers:
            writer.abort()  # a no-op for the writers run_jobs closed
    entries: dict[str, ManifestTensor] = {}
    for item, file_name, writer in placed:
        spec = item.spec
        entries[spec.name] = ManifestTensor(
            file_name,
            spec.dtype.code,
            spec.shape,
            writer.offsets[spec.name],
            spec.nbytes,
            ((checksum, digests[spec.name]),),
        )
    return entries


def _jobs(item: _Item, writer: SlabFileWriter) -> list[Job]:
    """One job per expert: a kernel copy when the bytes pass through, else a read and a transform."""
    return [_expert_job(item, writer, expert, item.spec.name) for expert in range(item.stack.num_experts)]


def _expert_job(item: _Item, writer: SlabFileWriter, expert: int, tensor: str, at: int = -1) -> Job:
    """Expert ``expert``'s slab of ``item``, written at the cursor of ``tensor`` (or at its byte ``at``)."""
    spec, stack = item.spec, item.stack
    dtype, shape = spec.dtype.numpy, spec.shape[1:]
    if item.copy_part is not None:
        span = stack.part_span(item.copy_part, expert)
        source = CopyFrom(span.mapped.fd, span.offset, span.mapped.path)
        return Job(writer, tensor, dtype, shape, copy=source, at=at)
    reads = tuple(
        (span.mapped.fd, span.offset, span.nbytes) for span in (stack.part_span(part, expert) for part in item.reads)
    )
    make = functools.partial(item.slab, expert=expert)
    return Job(writer, tensor, dtype, shape, make=make, reads=reads, at=at)


_Slab = Callable[..., npt.NDArray[np.generic]]
"""``slab(reader, expert=e)``: expert ``e``'s slab as written, from bytes read by a :class:`SlabReader`."""


@dataclass(frozen=True, slots=True)
class _Item:
    """One ``[E, ...]`` tensor to write: ``slab(reader, expert=e)`` gives
    expert ``e``'s slab as written (bytes read by ``reader``, possibly a
    transposed or strided view, or values computed from its parts); ``reads``
    are the parts it reads; ``copy_part`` names the part whose file bytes
    are the written slab exactly, when there is one (then no byte needs
    reading into memory)."""

    spec: TensorSpec
    stack: ExpertStack
    slab: _Slab
    reads: tuple[str, ...]
    copy_part: str | None = None


@dataclass(frozen=True, slots=True)
class _Record:
    """One layer written expert-major: ``spec`` is a ``U8 [E, record_nbytes]``
    tensor whose row ``e`` holds expert ``e``'s slab of each of ``items`` at
    ``offsets``, back to back (each on a :data:`PART_ALIGN_NBYTES` boundary,
    zero padding between them); ``record_nbytes`` is a whole number of
    pages, so every record starts page-aligned and reads directly."""

    spec: TensorSpec
    items: tuple[_Item, ...]
    offsets: tuple[int, ...]

    def jobs(self, writer: SlabFileWriter) -> list[Job]:
        """Per expert, each part's slab then its padding, in file order."""
        record_nbytes = self.spec.shape[1]
        ends = [*self.offsets[1:], record_nbytes]
        jobs: list[Job] = []
        for expert in range(self.spec.shape[0]):
            row = expert * record_nbytes
            for item, offset, end in zip(self.items, self.offsets, ends, strict=True):
                jobs.append(_expert_job(item, writer, expert, self.spec.name, at=row + offset))
                slab_nbytes = item.spec.nbytes // self.spec.shape[0]
                pad = end - offset - slab_nbytes
                if pad:
                    at = row + offset + slab_nbytes
                    jobs.append(Job(writer, self.spec.name, np.dtype(np.uint8), (pad,), make=_zeros(pad), at=at))
        return jobs

    def to_json(self) -> dict[str, Any]:
        """The manifest's description of the record: where each part lies in it."""
        return {
            "parts": {
                item.spec.name: {"offset": offset, "dtype": item.spec.dtype.code, "shape": list(item.spec.shape)}
                for item, offset in zip(self.items, self.offsets, strict=True)
            }
        }


def _record(layer: int, items: list[_Item]) -> _Record:
    """Lay one layer's parts out in an expert-major record."""
    experts = items[0].stack.num_experts
    offsets: list[int] = []
    cursor = 0
    for item in items:
        cursor += -cursor % PART_ALIGN_NBYTES
        offsets.append(cursor)
        cursor += item.spec.nbytes // experts
    cursor += -cursor % PAGE_NBYTES
    spec = TensorSpec(f"blk.{layer}.ffn_exps.records", dtype_from_code("U8"), (experts, cursor))
    return _Record(spec, tuple(items), tuple(offsets))


def _zeros(nbytes: int) -> Callable[[SlabReader], npt.NDArray[np.generic]]:
    def make(reader: SlabReader) -> npt.NDArray[np.generic]:
        return np.zeros(nbytes, dtype=np.uint8)

    return make


# Encodings whose bytes cannot be transposed (blocks or words packed along one axis).
_NATIVE_ONLY = ("mxfp4", "ggml", "int4_group", "nvfp4", "mxfp4_packed", "awq", "gptq")
_ML_FLOATS = ("BF16", "F8_E4M3", "F8_E5M2")


def _orientation(store: ExpertStore, layers: list[int], requested: str, out_dtype: DType | None) -> str:
    """The one orientation of the store written.

    ``"kn"`` when asked; ``"native"`` is the orientation the stacks already
    have (where they differ, as DBRX's down stacks do, the one holding most
    bytes, and the others are transposed).  Encoded stacks kept encoded
    whose blocks or packed words cannot be transposed pin their native
    orientation: asking for another, or mixing two, is refused.
    """
    stacks = [stack for index in layers for _, stack in store.layer(index).stacks]
    pinned = [stack for stack in stacks if out_dtype is None and stack.encoding.kind in _NATIVE_ONLY]
    fixed = {stack.native_orientation for stack in pinned}
    if len(fixed) > 1:
        raise ConvertError(
            f"{store.path}: block-encoded stacks mixed with stacks of another orientation cannot share one store"
        )
    if requested == "kn":
        for stack in pinned:
            if stack.native_orientation != "kn":
                raise ConvertError(
                    f"{store.path}: --orientation kn: {stack.name} is {stack.encoding.describe()}, whose encoded "
                    "bytes cannot be transposed; keep the native orientation or dequantize with --dtype"
                )
        return "kn"
    if fixed:
        return fixed.pop()
    nbytes: collections.Counter[str] = collections.Counter()
    for stack in stacks:
        nbytes[stack.native_orientation] += stack.nbytes
    return "kn" if nbytes["kn"] >= nbytes["nk"] else "nk"


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

    def read(part: str, transpose: bool) -> _Slab:
        def slab(reader: SlabReader, expert: int) -> npt.NDArray[np.generic]:
            values = reader.part(stack, part, expert)
            return values.T if transpose else values

        return slab

    if stack.encoding.encoded and out_dtype is not None:
        shape: tuple[int, ...] = (stack.k, stack.n) if orientation == "kn" else (stack.n, stack.k)

        def dequantized(reader: SlabReader, expert: int) -> npt.NDArray[np.generic]:
            values = reader.dequantize(stack, expert)  # [k, n]
            return values if orientation == "kn" else values.T

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
            spec = TensorSpec(f"{name}.{part}", data_type, (experts, *shape))
            copy = part if not flip and _passes_through(geometry, spec) else None
            items.append(_Item(spec, stack, read(part, flip), (part,), copy))
    if "bias" in stack.parts:
        bias = stack.parts["bias"]
        spec = TensorSpec(f"{name}.bias", out_dtype or bias.dtype, (experts, *bias.slab_shape))
        copy = "bias" if _passes_through(bias, spec) else None
        items.append(_Item(spec, stack, read("bias", False), ("bias",), copy))
    return items


def _passes_through(geometry: PartGeometry, spec: TensorSpec) -> bool:
    """True when each expert's file bytes of ``geometry`` are exactly its slab
    of ``spec``: one contiguous range in C order, of the same bytes (a ggml
    block type written as ``U8`` bytes counts), nothing cast."""
    same_bytes = geometry.dtype.code == spec.dtype.code or (geometry.dtype.block_elems > 1 and spec.dtype.code == "U8")
    return (
        same_bytes
        and geometry.view_delta == 0
        and geometry.extent == geometry.slab_nbytes == spec.nbytes // geometry.num_experts
        and (
            geometry.dtype.block_elems > 1
            or geometry.slab_strides == c_strides(geometry.slab_shape, geometry.dtype.itemsize)
        )
    )

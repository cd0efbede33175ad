"""``Trace``: the captured router Top-K ids of every MoE layer at every step.

A trace is a value: arrays, built and tested without any checkpoint.  Rows
are tokens; a step owns a contiguous run of rows (``step_offsets``), so a
4,000-token prefill and one-token decode steps share one array without
padding.  Saved as an uncompressed ``.npz`` whose members are memory-mapped
on load when the file is large, so a long trace costs page cache, not heap.

Layout
------
``ids``
    ``[rows, layers, top_k]`` integers, the expert each token was routed to.
``step_offsets``
    ``[steps + 1]`` int64, non-decreasing, from 0 to ``rows``: step ``s``
    holds rows ``step_offsets[s]:step_offsets[s + 1]``.
``phase``
    ``[steps]`` int8 :class:`Phase` codes (prefill, decode, denoise).
``block``
    ``[steps]`` int32: the denoising block a step belongs to, -1 when none.
``weights``
    optional ``[rows, layers, top_k]`` float32 routing weights.
"""

from __future__ import annotations

import enum
import os
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._errors import CapturedIdsError, FormatError

__all__ = ["MMAP_THRESHOLD_NBYTES", "Phase", "Trace", "load_trace", "save_trace"]

TRACE_FORMAT = "mmapstore-trace/1"
MMAP_THRESHOLD_NBYTES = 64 << 20  # larger .npz files are memory-mapped, not read
_HIT_CHUNK_CELLS = 1 << 24  # hit counting works on steps*layers*experts chunks of this size


class Phase(enum.IntEnum):
    """What a step of a trace was doing."""

    PREFILL = 0
    DECODE = 1
    DENOISE = 2


@dataclass(frozen=True, slots=True)
class Trace:
    """Router Top-K ids per step and MoE layer, with phase and block marks.

    Construct with :meth:`build` (validates); the fields are the arrays of the
    module docstring.  ``layer_indices`` names the model layer of each trace
    layer; ``source`` says where the trace came from (for messages).
    """

    ids: npt.NDArray[np.integer]
    step_offsets: npt.NDArray[np.int64]
    phase: npt.NDArray[np.int8]
    block: npt.NDArray[np.int32]
    weights: npt.NDArray[np.float32] | None
    layer_indices: tuple[int, ...]
    source: str = "<memory>"

    @classmethod
    def build(
        cls,
        ids: npt.ArrayLike,
        step_offsets: npt.ArrayLike,
        *,
        phase: npt.ArrayLike | None = None,
        block: npt.ArrayLike | None = None,
        weights: npt.ArrayLike | None = None,
        layer_indices: Sequence[int] | None = None,
        source: str = "<memory>",
    ) -> Trace:
        """A validated trace; ``phase`` defaults to decode, ``block`` to -1.

        Raises
        ------
        FormatError
            An array has the wrong rank, dtype or length, offsets are not a
            non-decreasing run from 0 to ``rows``, or an id is negative.
        """
        id_array = np.asarray(ids) if not isinstance(ids, np.ndarray) else ids
        if id_array.ndim != 3:
            raise FormatError(f"{source}: ids must be [rows, layers, top_k], got shape {id_array.shape}")
        if id_array.dtype == np.bool_ or not np.issubdtype(id_array.dtype, np.integer):
            raise FormatError(f"{source}: ids must be integers, got dtype {id_array.dtype}")
        offsets = np.asarray(step_offsets)
        if offsets.ndim != 1 or offsets.size < 1 or not np.issubdtype(offsets.dtype, np.integer):
            raise FormatError(
                f"{source}: step_offsets must be a 1-d integer array, got {offsets.dtype} {offsets.shape}"
            )
        offsets = offsets.astype(np.int64)
        rows = id_array.shape[0]
        if offsets[0] != 0 or offsets[-1] != rows or np.any(np.diff(offsets) < 0):
            raise FormatError(
                f"{source}: step_offsets must rise from 0 to {rows} rows, got {offsets[0]}..{offsets[-1]}"
            )
        steps = offsets.size - 1
        phases = _marks(phase, steps, np.int8, int(Phase.DECODE), "phase", source)
        if phases.size and (phases.min() < 0 or phases.max() > max(Phase)):
            raise FormatError(
                f"{source}: phase codes must be in 0..{int(max(Phase))}, got {sorted(set(phases.tolist()))}"
            )
        blocks = _marks(block, steps, np.int32, -1, "block", source)
        weight_array = None
        if weights is not None:
            weight_array = np.asarray(weights, dtype=np.float32)
            if weight_array.shape != id_array.shape:
                raise FormatError(f"{source}: weights shape {weight_array.shape} differs from ids {id_array.shape}")
        layers = id_array.shape[1]
        indices = tuple(range(layers)) if layer_indices is None else tuple(int(i) for i in layer_indices)
        if len(indices) != layers:
            raise FormatError(f"{source}: {len(indices)} layer indices for {layers} trace layers")
        if id_array.size and int(id_array.min()) < 0:
            raise FormatError(f"{source}: ids: negative expert id {int(id_array.min())}")
        return cls(id_array, offsets, phases.astype(np.int8), blocks.astype(np.int32), weight_array, indices, source)

    # -- shape ------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return int(self.step_offsets.size - 1)

    @property
    def num_layers(self) -> int:
        return int(self.ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[2])

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])

    def tokens(self) -> npt.NDArray[np.int64]:
        """Tokens in each step."""
        return np.diff(self.step_offsets)

    def step_ids(self, step: int) -> npt.NDArray[np.integer]:
        """``[tokens, layers, top_k]`` ids of one step (a view)."""
        return self.ids[self.step_offsets[step] : self.step_offsets[step + 1]]

    def max_expert(self) -> npt.NDArray[np.int64]:
        """The largest id seen in each layer (-1 for an empty trace)."""
        if self.ids.shape[0] == 0:
            return np.full(self.num_layers, -1, dtype=np.int64)
        return np.asarray(self.ids.max(axis=(0, 2)), dtype=np.int64)

    def segment_starts(self) -> npt.NDArray[np.bool_]:
        """True at a step that starts a new segment: the first step, a prefill,
        or a change of denoising block."""
        starts = np.zeros(self.num_steps, dtype=bool)
        if self.num_steps:
            starts[0] = True
            starts[1:] = self.block[1:] != self.block[:-1]
            starts |= self.phase == Phase.PREFILL
        return starts

    # -- derived ----------------------------------------------------------
    def check_experts(self, num_experts: Sequence[int]) -> None:
        """Refuse ids a model with ``num_experts[i]`` experts in layer ``i`` cannot hold.

        Raises
        ------
        CapturedIdsError
            Layer count differs, or an id is at or above its layer's experts.
        """
        if len(num_experts) != self.num_layers:
            raise CapturedIdsError(
                f"{self.source}: trace has {self.num_layers} MoE layers, the model has {len(num_experts)}"
            )
        for layer, (highest, experts) in enumerate(zip(self.max_expert(), num_experts, strict=True)):
            if highest >= experts:
                raise CapturedIdsError(
                    f"{self.source}: trace layer {layer} (model layer {self.layer_indices[layer]}) routes to "
                    f"expert {int(highest)}, the model has {experts} experts there"
                )

    def hit_counts(self, num_experts: Sequence[int]) -> npt.NDArray[np.int32]:
        """``[steps, layers, max(num_experts)]`` routed-token hits per expert.

        Counted in chunks of steps, so a memory-mapped trace is streamed.

        Raises
        ------
        CapturedIdsError
            As :meth:`check_experts`.
        """
        self.check_experts(num_experts)
        width = max(num_experts) if len(num_experts) else 0
        layers = self.num_layers
        counts = np.zeros((self.num_steps, layers, width), dtype=np.int32)
        if width == 0 or self.num_rows == 0:
            return counts
        tokens = self.tokens()
        chunk_steps = max(1, _HIT_CHUNK_CELLS // max(1, layers * width))
        layer_base = (np.arange(layers, dtype=np.int64) * width)[None, :, None]
        for first in range(0, self.num_steps, chunk_steps):
            last = min(self.num_steps, first + chunk_steps)
            rows = slice(int(self.step_offsets[first]), int(self.step_offsets[last]))
            ids = np.asarray(self.ids[rows], dtype=np.int64)
            step_of_row = np.repeat(np.arange(last - first, dtype=np.int64), tokens[first:last])
            flat = step_of_row[:, None, None] * (layers * width) + layer_base + ids
            chunk = np.bincount(flat.reshape(-1), minlength=(last - first) * layers * width)
            counts[first:last] = chunk.reshape(last - first, layers, width)
        return counts


def _marks(
    values: npt.ArrayLike | None, steps: int, dtype: type[np.generic], default: int, name: str, source: str
) -> npt.NDArray[np.generic]:
    if values is None:
        return np.full(steps, default, dtype=dtype)
    array = np.asarray(values)
    if array.shape != (steps,) or not np.issubdtype(array.dtype, np.integer):
        raise FormatError(f"{source}: {name} must be {steps} integers (one per step), got {array.dtype} {array.shape}")
    return array.astype(dtype)


# -- .npz files ---------------------------------------------------------------
_MEMBERS = ("ids", "step_offsets", "phase", "block", "layer_indices")


def save_trace(trace: Trace, path: str | os.PathLike[str]) -> None:
    """Write ``trace`` to ``path`` as an uncompressed ``.npz`` (atomically:
    a temporary file beside it, then rename)."""
    path = os.fspath(path)
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "format": np.array(TRACE_FORMAT),
        "ids": np.asarray(trace.ids),
        "step_offsets": trace.step_offsets,
        "phase": trace.phase,
        "block": trace.block,
        "layer_indices": np.asarray(trace.layer_indices, dtype=np.int64),
    }
    if trace.weights is not None:
        arrays["weights"] = np.asarray(trace.weights)
    partial = f"{path}.partial-{os.getpid()}"
    try:
        with open(partial, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise


def load_trace(path: str | os.PathLike[str], *, mmap: bool | None = None) -> Trace:
    """Read a trace written by :func:`save_trace`.

    ``mmap=None`` maps the members of files above :data:`MMAP_THRESHOLD_NBYTES`
    (read-only views of the file); ``True``/``False`` force it.

    Raises
    ------
    FormatError
        Not a zip of ``.npy`` members, a member is missing, compressed when
        mapping is asked for, or the arrays do not form a valid trace.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    use_map = size > MMAP_THRESHOLD_NBYTES if mmap is None else mmap
    try:
        with zipfile.ZipFile(path) as archive:
            infos = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            for name in ("format", *_MEMBERS):
                if name not in infos:
                    raise FormatError(f"{path}: not a trace file: array {name!r} is missing")
            members: dict[str, npt.NDArray[np.generic]] = {}
            for name, info in infos.items():
                if use_map and name in ("ids", "weights"):
                    members[name] = _map_member(path, info)
                else:
                    with archive.open(info) as handle:
                        members[name] = np.lib.format.read_array(handle, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        if isinstance(exc, FormatError):
            raise
        raise FormatError(f"{path}: not a readable trace .npz: {exc}") from None
    if str(members["format"]) != TRACE_FORMAT:
        raise FormatError(f"{path}: trace format {str(members['format'])!r}, expected {TRACE_FORMAT!r}")
    return Trace.build(
        members["ids"],
        members["step_offsets"],
        phase=members["phase"],
        block=members["block"],
        weights=members.get("weights"),
        layer_indices=[int(i) for i in members["layer_indices"]],
        source=path,
    )


def _map_member(path: str, info: zipfile.ZipInfo) -> npt.NDArray[np.generic]:
    """A read-only view of one stored (uncompressed) ``.npy`` member."""
    from ._mapping import MappedFile

    if info.compress_type != zipfile.ZIP_STORED:
        raise FormatError(f"{path}: array {info.filename!r} is compressed; save with save_trace to map it")
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise FormatError(f"{path}: array {info.filename!r}: bad zip local header at {info.header_offset}")
        name_nbytes, extra_nbytes = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_nbytes + extra_nbytes
        handle.seek(start)
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        data_offset = handle.tell()
    if fortran or dtype.hasobject:
        raise FormatError(f"{path}: array {info.filename!r} is not a C-ordered numeric array")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if data_offset - start + nbytes != info.file_size:
        raise FormatError(
            f"{path}: array {info.filename!r}: header says {nbytes} bytes, member holds "
            f"{info.file_size - (data_offset - start)}"
        )
    mapped = MappedFile(path, min_nbytes=data_offset + nbytes)
    view = mapped.view(data_offset, dtype, tuple(shape))
    mapped.close()  # refuses new views; this one keeps the mapping alive
    return view

"""``TorchSink``: residency pools as torch tensors on a device, fed by write tables.

One pool tensor per parameter (and per part), ``[capacity, *slab]``, in the
dtype and orientation chosen (native by default, so a refresh is a plain
byte copy).  ``submit`` enqueues every row on a side stream through a
:class:`~mmapstore.gpu._copier.DeviceCopier` (registered windows, staging
rings, pread; see :mod:`mmapstore.gpu._jobs`) and returns a completion backed
by a CUDA event; ``wait`` synchronises.  Rows whose bytes are not the pool's
bytes (a cast, a transpose, a strided half of a fused slab) are copied as
raw bytes into device scratch and laid out by torch on the device.

``dequantize`` keeps FP8-block and MXFP4 stacks' codes and scales in hidden
device pools and exposes a float pool per weight, filled on the device after
each copy (:mod:`mmapstore.gpu._dequant`).

Everything that can be wrong is refused with a typed error before any copy:
an unavailable device, a pool of the wrong device, shape or dtype, slots out
of range, a pinned budget too small for one slab when pinned memory is
required, a closed sink or store.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._dtypes import can_cast
from .._errors import SinkError, StoreClosedError
from .._geometry import PartGeometry, c_strides
from .._planner import DEFAULT_PARAM_NAME, StoreGeometry, geometries_of, param_name
from .._sinks import SinkOrientation, WriteResult, check_slots
from ..torch import as_tensor, require_torch, torch_dtype
from ._copier import DeviceCopier
from ._dequant import dequantize_fp8_block, dequantize_mxfp4
from ._jobs import CopyJob, Source

if TYPE_CHECKING:
    import torch

    from .._source import ByteSource
    from .._store import ExpertStore
    from .._writes import WriteTable

__all__ = ["TorchCompletion", "TorchSink"]

DEQUANTIZABLE = ("fp8_block", "mxfp4")


class TorchCompletion:
    """Copies of one submit in flight on a stream; :meth:`wait` blocks until they landed."""

    __slots__ = ("_event", "_nbytes", "_result", "_rows", "_started")

    def __init__(self, event: torch.cuda.Event | None, nbytes: int, rows: int, started: float) -> None:
        self._event = event
        self._nbytes = nbytes
        self._rows = rows
        self._started = started
        self._result: WriteResult | None = None

    def done(self) -> bool:
        return self._result is not None or self._event is None or bool(self._event.query())  # type: ignore[no-untyped-call]

    def wait(self) -> WriteResult:
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            self._result = WriteResult(self._nbytes, time.perf_counter() - self._started, self._rows)
        return self._result


class _Dequantized:
    """A float pool computed from hidden code and scale pools of one stack."""

    __slots__ = ("block", "cols", "kind", "scale", "transpose", "weight")

    def __init__(self, kind: str, weight: str, scale: str, block: tuple[int, int], cols: int, transpose: bool) -> None:
        self.kind = kind
        self.weight = weight
        self.scale = scale
        self.block = block
        self.cols = cols
        self.transpose = transpose


class TorchSink:
    """Device pools fed by write tables (see the module docstring).

    Parameters
    ----------
    device
        ``"cuda"``, ``"cuda:1"``, ``"cpu"`` or a ``torch.device``.
    pools
        Caller-owned ``param -> tensor`` destinations (a model's parameters);
        without them, pools are allocated by :meth:`bind` (``SlabService``
        calls it) or :meth:`for_store`.
    transpose
        Parameters whose slabs are stored transposed relative to the source.
    dtype, orientation
        For allocated pools: the weight dtype (a torch or numpy dtype; None
        keeps the file's) and ``"native"`` or ``"kn"``.
    dequantize
        Serve FP8-block and MXFP4 stacks as float pools (``dtype``, bf16 by
        default) dequantized on the device.
    source, pinned_budget_nbytes, threads, direct, window_nbytes
        How bytes reach the device (:class:`~mmapstore.gpu._copier.DeviceCopier`).

    Raises
    ------
    SinkError
        The device does not exist or is not available.
    """

    def __init__(
        self,
        device: str | torch.device = "cuda",
        *,
        pools: Mapping[str, torch.Tensor] | None = None,
        transpose: Sequence[str] = (),
        dtype: Any = None,
        orientation: SinkOrientation = "native",
        dequantize: bool = False,
        source: Source = "auto",
        pinned_budget_nbytes: int | None = None,
        threads: int | None = None,
        direct: bool = False,
        window_nbytes: int | None = None,
    ) -> None:
        require_torch("TorchSink")
        import torch

        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise SinkError(f"TorchSink: {device!r} is not a torch device ({exc})") from None
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise SinkError(f"TorchSink: device {self.device} requested but CUDA is not available")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            if self.device.index >= torch.cuda.device_count():
                raise SinkError(f"TorchSink: no device {self.device} ({torch.cuda.device_count()} CUDA devices)")
        elif self.device.type != "cpu":
            raise SinkError(f"TorchSink: device type {self.device.type!r} is not supported (cpu or cuda)")
        if orientation not in ("native", "kn"):
            raise SinkError(f"orientation must be 'native' or 'kn', got {orientation!r}")
        self.pools: dict[str, torch.Tensor] = dict(pools or {})
        self.transpose = frozenset(transpose)
        self.dtype = dtype
        self.orientation: SinkOrientation = orientation
        self.dequantize = dequantize
        self._hidden: dict[str, torch.Tensor] = {}  # code and scale pools behind float ones
        self._dequantized: dict[str, _Dequantized] = {}
        options: dict[str, Any] = {"source": source, "threads": threads, "direct": direct}
        if window_nbytes is not None:
            options["window_nbytes"] = window_nbytes
        self.copier = DeviceCopier(self.device, pinned_budget_nbytes=pinned_budget_nbytes, **options)
        self._stream: torch.cuda.Stream | None = (
            torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            if self.device.type == "cuda"
            else None
        )
        self._checked: WriteTable | None = None
        self._closed = False

    # -- pools -------------------------------------------------------------------------------

    @classmethod
    def for_store(
        cls, store: ExpertStore, capacity: int | Sequence[int] | None = None, device: str = "cuda", **options: Any
    ) -> TorchSink:
        """A sink with pools for every part of every stack of ``store``."""
        names = options.pop("names", DEFAULT_PARAM_NAME)
        sink = cls(device, **options)
        geometry = geometries_of(store)
        if capacity is None:
            capacities = [layer.num_experts for layer in geometry.layers]
        elif isinstance(capacity, int):
            capacities = [min(capacity, layer.num_experts) for layer in geometry.layers]
        else:
            capacities = [int(c) for c in capacity]
        sink.bind(geometry, capacities, names=names)
        return sink

    @property
    def buffers(self) -> Mapping[str, torch.Tensor]:
        """The pools (``param -> [capacity, ...]`` tensors on the device)."""
        return self.pools

    def bind(self, geometry: StoreGeometry, capacities: Sequence[int], *, names: str = DEFAULT_PARAM_NAME) -> None:
        """Allocate a zeroed pool for every part of every stack that has none yet.

        Raises
        ------
        SinkError
            A capacity list of the wrong length, a cast or transpose of an
            encoded stack without ``dequantize``, or device memory exhausted.
        """
        if len(capacities) != len(geometry.layers):
            raise SinkError(f"{len(capacities)} capacities for {len(geometry.layers)} MoE layers")
        for layer, slots in zip(geometry.layers, capacities, strict=True):
            for stack in layer.stacks:
                parts = {part.part: part for part in stack.parts}
                float_pool = self.dequantize and stack.encoding.kind in DEQUANTIZABLE and "scale" in parts
                for part in stack.parts:
                    name = param_name(names, layer.layer, stack.proj, part.part)
                    if name in self.pools or name in self._hidden:
                        continue
                    if float_pool and part.part in ("weight", "scale"):
                        self._hidden[name] = self._allocate((slots, *part.slab_shape), torch_dtype(part.dtype), name)
                        continue
                    shape, dtype, flip = self._layout(part, stack.encoding.encoded, name)
                    self.pools[name] = self._allocate((slots, *shape), dtype, name)
                    if flip:
                        self.transpose = self.transpose | {name}
                if float_pool:
                    self._bind_dequantized(layer.layer, stack.proj, stack.encoding, parts, slots, names)

    def _layout(self, part: PartGeometry, encoded: bool, name: str) -> tuple[tuple[int, ...], torch.dtype, bool]:
        if part.part != "weight":
            return part.slab_shape, torch_dtype(part.dtype), False
        native = torch_dtype(part.dtype)
        wanted = native if self.dtype is None else _as_torch_dtype(self.dtype)
        flip = self.orientation == "kn" and part.orientation == "nk" and len(part.slab_shape) == 2
        if encoded and (flip or wanted != native):
            raise SinkError(
                f"parameter {name!r} (from {part.stack}.{part.part}): encoded slabs cannot be cast or transposed; "
                "keep the file's dtype and native orientation, or pass dequantize=True"
            )
        return (part.slab_shape[::-1] if flip else part.slab_shape), wanted, flip

    def _bind_dequantized(
        self, layer: int, proj: str, encoding: Any, parts: Mapping[str, PartGeometry], slots: int, names: str
    ) -> None:
        import torch

        weight = parts["weight"]
        weight_name = param_name(names, layer, proj, "weight")
        if encoding.kind == "fp8_block":
            rows, cols = weight.slab_shape
        else:  # mxfp4: [rows, cols / 32, 16] bytes
            rows, cols = weight.slab_shape[0], weight.slab_shape[1] * 32
        flip = self.orientation == "kn" and weight.orientation == "nk"
        dtype = torch.bfloat16 if self.dtype is None else _as_torch_dtype(self.dtype)
        self.pools[weight_name] = self._allocate((slots, *((cols, rows) if flip else (rows, cols))), dtype, weight_name)
        self._dequantized[weight_name] = _Dequantized(
            encoding.kind, weight_name, param_name(names, layer, proj, "scale"), encoding.block, cols, flip
        )

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> torch.Tensor:
        import torch

        try:
            return torch.zeros(shape, dtype=dtype, device=self.device)
        except RuntimeError as exc:  # out of device memory
            raise SinkError(
                f"parameter {name!r}: cannot allocate a {list(shape)} {dtype} pool on {self.device}: {exc}"
            ) from None

    # -- the sink protocol ----------------------------------------------------------------------

    def check(self, table: WriteTable) -> None:
        """Every destination of ``table`` can take its rows; raises :class:`SinkError` before any copy."""
        if self._closed:
            raise SinkError("TorchSink is closed")
        self._check_budget(table)
        check_slots(table, self._check_param)
        self._checked = table

    def _check_budget(self, table: WriteTable) -> None:
        if self.device.type != "cuda" or not table.rows:
            return
        largest = max(table.geometries[param].slab_nbytes for param in table.used_params().tolist())
        limit = self.copier.budget.limit_nbytes
        if limit < largest:
            raise SinkError(
                f"the pinned budget of {limit} bytes cannot hold one slab of {largest} bytes; "
                "raise pinned_budget_nbytes (or RLIMIT_MEMLOCK)"
            )

    def _destination(self, name: str) -> torch.Tensor | None:
        return self._hidden.get(name, self.pools.get(name))

    def _check_param(self, table: WriteTable, param: int) -> int:
        name, geometry, encoding = table.params[param], table.geometries[param], table.encodings[param]
        where = f"parameter {name!r} (from {geometry.stack}.{geometry.part})"
        destination = self._destination(name)
        if destination is None:
            raise SinkError(f"sink has no {where}")
        if destination.device != self.device:
            raise SinkError(f"{where}: pool is on {destination.device}, the sink copies to {self.device}")
        shape = geometry.slab_shape
        flip = name in self.transpose and name not in self._hidden
        if flip:
            if len(shape) != 2:
                raise SinkError(f"{where}: cannot transpose a {len(shape)}-D slab {list(shape)}")
            shape = shape[::-1]
        if destination.dim() < 1 or tuple(destination.shape[1:]) != shape:
            raise SinkError(
                f"{where}: slab shape {list(destination.shape[1:])} cannot take {list(shape)}"
                + (" (transposed)" if flip else "")
            )
        source_dtype = torch_dtype(geometry.dtype)
        if encoding.encoded and geometry.part == "weight" and (flip or destination.dtype != source_dtype):
            raise SinkError(
                f"{where}: {encoding.describe()} slabs are encoded; a cast or transposed copy of them would not "
                f"be their values (destination {destination.dtype}{', transposed' if flip else ''})"
            )
        if destination.dtype != source_dtype and not can_cast(geometry.dtype.numpy, _numpy_of(destination.dtype)):
            raise SinkError(f"{where}: cannot cast {geometry.dtype.code} to {destination.dtype}")
        if not destination.is_contiguous():
            raise SinkError(f"{where}: pool tensor must be contiguous")
        return int(destination.shape[0])

    def submit(self, table: WriteTable, source: ByteSource) -> TorchCompletion:
        """Enqueue every row's copy on the sink's stream; see the module docstring.

        Raises
        ------
        SinkError, StoreClosedError, FormatError
            Before any copy (``check``, and the source's own check of the table).
        """
        import torch

        if self._checked is not table:
            self.check(table)
        started = time.perf_counter()
        stream = self._stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # pools may be in use on the default stream
        jobs: list[CopyJob] = []
        layouts: list[tuple[torch.Tensor, torch.Tensor, PartGeometry, int, bool]] = []
        touched: dict[str, set[int]] = {}
        with torch.cuda.stream(stream) if stream is not None else _nullcontext():
            for row in range(table.rows):
                self._plan_row(table, source, row, jobs, layouts, touched)
            self.copier.copy(jobs, stream)
            for scratch, destination, geometry, count, flip in layouts:
                view = _typed_view(scratch, geometry, count)
                destination.copy_(view.transpose(-1, -2) if flip else view)
            for name, slots in touched.items():
                self._fill_dequantized(self._dequantized[name], sorted(slots))
        event = None
        if stream is not None:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        return TorchCompletion(event, table.nbytes, table.rows, started)

    def _plan_row(
        self,
        table: WriteTable,
        source: ByteSource,
        row: int,
        jobs: list[CopyJob],
        layouts: list[tuple[torch.Tensor, torch.Tensor, PartGeometry, int, bool]],
        touched: dict[str, set[int]],
    ) -> None:
        import torch

        param = int(table.param[row])
        name, geometry = table.params[param], table.geometries[param]
        slot, count = int(table.slot[row]), int(table.count[row])
        destination = self._destination(name)
        assert destination is not None  # check() saw it
        destination = destination[slot : slot + count]
        if name in self._hidden:
            weight = name if name in self._dequantized else _weight_of(self._dequantized, name)
            touched.setdefault(weight, set()).update(range(slot, slot + count))
        flip = name in self.transpose and name not in self._hidden
        mapped = source.mapping(int(table.file[row]))
        if mapped is not None and mapped.closed:
            raise StoreClosedError(f"{mapped.path}: the store is closed")
        if mapped is None:  # not a file mapping (in-memory test sources): copy its view
            view = source.view(table, row)
            host = as_tensor(view)
            destination.copy_(host.transpose(-1, -2) if flip else host)
            return
        # The row's extent already spans its whole run: (count - 1) strides plus one expert.
        offset, span = int(table.offset[row]), int(table.extent[row])
        plain = (
            not flip
            and destination.dtype == torch_dtype(geometry.dtype)
            and geometry.view_delta == 0
            and geometry.slab_strides == c_strides(geometry.slab_shape, geometry.dtype.itemsize)
            and geometry.extent == geometry.slab_nbytes
            and span == count * geometry.slab_nbytes
        )
        if plain:
            jobs.append(CopyJob(mapped, offset, span, destination.reshape(-1).view(torch.uint8)))
            return
        scratch = torch.empty(span, dtype=torch.uint8, device=self.device)
        jobs.append(CopyJob(mapped, offset, span, scratch))
        layouts.append((scratch, destination, geometry, count, flip))

    @property
    def registers_ahead(self) -> bool:
        """Whether :meth:`register_ahead` can do anything (a CUDA device and
        a source that reads registered windows)."""
        return not self._closed and self.device.type == "cuda" and self.copier.source in ("auto", "registered")

    def register_ahead(self, table: WriteTable, source: ByteSource) -> int:
        """Register the page-cache windows of ``table``'s file ranges on a
        background thread, ahead of the submit that will copy them
        (:meth:`DeviceCopier.register_ahead`); only the ranges are used, not
        the slots.  A hint: nothing is checked or copied, windows that do not
        fit the pinned budget are skipped.  Returns the bytes of windows queued.
        """
        if not self.registers_ahead:
            return 0
        reads = table.reads
        ranges = []
        for file, offset, nbytes in zip(reads.file.tolist(), reads.offset.tolist(), reads.nbytes.tolist(), strict=True):
            mapped = source.mapping(file)
            if mapped is not None and not mapped.closed:
                ranges.append((mapped, offset, nbytes))
        return self.copier.register_ahead(ranges)

    def _fill_dequantized(self, entry: _Dequantized, slots: list[int]) -> None:
        import torch

        index = torch.tensor(slots, dtype=torch.int64, device=self.device)
        codes = self._hidden[entry.weight].index_select(0, index)
        scales = self._hidden[entry.scale].index_select(0, index)
        if entry.kind == "fp8_block":
            values = dequantize_fp8_block(codes, scales, entry.block)
        else:
            values = dequantize_mxfp4(codes, scales, entry.cols)
        pool = self.pools[entry.weight]
        pool.index_copy_(0, index, (values.transpose(-1, -2) if entry.transpose else values).to(pool.dtype))

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for copies in flight and unregister every window (the pools stay usable)."""
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            self._stream.synchronize()
        self.copier.close()

    def __enter__(self) -> TorchSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Registered pages must not outlive the sink; close() is the way, this is the net.
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # interpreter shutdown: nothing more can be done
                pass


def _weight_of(dequantized: Mapping[str, _Dequantized], scale: str) -> str:
    for name, entry in dequantized.items():
        if entry.scale == scale:
            return name
    raise SinkError(f"parameter {scale!r}: no dequantized weight uses it")


def _typed_view(scratch: torch.Tensor, geometry: PartGeometry, count: int) -> torch.Tensor:
    """``[count, *slab_shape]`` elements of ``geometry`` over raw bytes copied to the device."""
    import torch

    item = geometry.dtype.itemsize
    stride = geometry.stride if geometry.stride is not None else geometry.extent
    usable = scratch.numel() - scratch.numel() % item
    typed = scratch[:usable].view(torch_dtype(geometry.dtype))
    return torch.as_strided(
        typed,
        (count, *geometry.slab_shape),
        (stride // item, *(s // item for s in geometry.slab_strides)),
        geometry.view_delta // item,
    )


def _as_torch_dtype(dtype: Any) -> torch.dtype:
    import torch

    return dtype if isinstance(dtype, torch.dtype) else torch_dtype(np.dtype(dtype))


def _numpy_of(dtype: torch.dtype) -> np.dtype[Any]:
    from .._dtypes import DTYPE_CODES
    from ..torch import TORCH_DTYPE_NAMES

    for code, name in TORCH_DTYPE_NAMES.items():
        if str(dtype) == f"torch.{name}":
            return DTYPE_CODES[code].numpy
    raise SinkError(f"pool dtype {dtype} has no file dtype")


def _nullcontext() -> Any:
    import contextlib

    return contextlib.nullcontext()

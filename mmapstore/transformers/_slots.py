"""``SlotWriter``: every byte that enters a runtime pool passes here.

On a CUDA device, a slab whose file bytes are the pool slot's bytes (same
dtype, same orientation, contiguous on both sides: every plain
``nn.Linear``-layout checkpoint) becomes a :class:`~mmapstore.gpu._jobs.CopyJob`
for the :class:`~mmapstore.gpu._copier.DeviceCopier` that also feeds
:class:`~mmapstore.gpu._sink.TorchSink`: DMA from page-cache windows
registered with the driver, a pinned staging ring, or parallel ``pread`` for
cold ranges.  Other slabs (a cast, a transpose, a strided half of a fused
tensor) and every copy to a CPU pool are a torch ``copy_`` from a tensor over
the mapping.  All copies are enqueued on the current stream, so kernels
queued before them finish reading a slot before it is overwritten, and
kernels queued after them see the new expert.

Quantized experts (MXFP4, FP8 block scales, GGUF's ggml blocks, and every
other encoding the store serves) are dequantized on the way in: on CUDA,
MXFP4, FP8 and the common ggml types (:data:`~mmapstore.gpu._dequant.GGML_DEVICE_TYPES`)
move only their encoded bytes (and scales) to the device, by the same
copier, and are dequantized there after the copies (in stream order);
elsewhere the store's reference formulas run on the host.  Pools always hold values in
the model's dtype.

The runtime does not go through ``TorchSink`` itself: its pools are
transformers' fused ``gate_up_proj`` tensors, whose gate and up halves are
strided across slots (interleaved for GPT-OSS), while a sink's pools are one
contiguous tensor per part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .._geometry import c_strides
from ._torch import as_tensor, torch_dtype

if TYPE_CHECKING:
    from .._store import ExpertStack
    from .._store.stack import SourceSpan
    from ..gpu._copier import DeviceCopier
    from ..gpu._jobs import CopyJob, Source

__all__ = ["SlotWriter"]


class SlotWriter:
    """Copies expert slabs from the mapped store into pool slots on ``device``.

    Parameters
    ----------
    device
        Where the pools live.
    source
        How bytes reach a CUDA device (:data:`~mmapstore.gpu._jobs.Source`);
        ``"direct"`` copies every slab with a torch ``copy_`` from the
        mapping (pageable memory).  Ignored on the CPU.
    copier
        A copier to send plain slabs to instead of making one (on any
        device: a CPU copier copies from the mapping with the same byte jobs).
    """

    def __init__(self, device: torch.device, source: Source = "auto", *, copier: DeviceCopier | None = None) -> None:
        self.device = device
        self.source = source
        self._copier: DeviceCopier | None = copier
        if copier is None and device.type == "cuda" and source != "direct":
            from ..gpu._copier import DeviceCopier

            self._copier = DeviceCopier(device, source=source)
        self._jobs: list[CopyJob] = []
        # Encoded slabs whose bytes are queued in _jobs: dequantized into their
        # destinations after the copies, in stream order.
        self._staged: list[tuple[torch.Tensor, ExpertStack, dict[str, torch.Tensor], str]] = []
        self._spans: dict[tuple[str, int, int], torch.Tensor] = {}  # staged file ranges of this flush

    @property
    def copier(self) -> DeviceCopier | None:
        """The device copier (its ``stats`` say which source moved what), or None."""
        return self._copier

    def slab(self, destination: torch.Tensor, stack: ExpertStack, part: str, expert: int, orientation: str) -> int:
        """Queue part ``part`` of ``expert`` into ``destination``; return the bytes it writes.

        ``orientation`` is the destination's: ``"nk"`` (``[out, in]``) or
        ``"kn"``; 1-D parts ignore it.  The copy is complete on the device
        after :meth:`flush` (in stream order).
        """
        if part == "weight" and stack.encoding.encoded:
            if not self._stage(destination, stack, expert, orientation):
                values = torch.from_numpy(stack.dequantize(expert, np.float32)).to(self.device)  # [k, n]
                destination.copy_(values if orientation == "kn" else values.T)
            return destination.numel() * destination.element_size()
        geometry = stack.parts[part]
        flip = len(geometry.slab_shape) == 2 and geometry.orientation != orientation
        plain = (
            self._copier is not None
            and not flip
            and destination.is_contiguous()
            and destination.dtype == torch_dtype(geometry.dtype.numpy)
            and geometry.view_delta == 0
            and geometry.slab_strides == c_strides(geometry.slab_shape, geometry.dtype.itemsize)
            and geometry.extent == geometry.slab_nbytes
        )
        if plain:
            from ..gpu._jobs import CopyJob

            span = stack.part_span(part, expert)
            self._jobs.append(CopyJob(span.mapped, span.offset, span.nbytes, destination.view(-1).view(torch.uint8)))
        else:
            source = as_tensor(stack.part(part, expert))
            destination.copy_(source.T if flip else source)
        return destination.numel() * destination.element_size()

    def _stage(self, destination: torch.Tensor, stack: ExpertStack, expert: int, orientation: str) -> bool:
        """Queue an MXFP4, FP8 or ggml slab's encoded bytes (and scales) for the
        device to dequantize into ``destination`` at :meth:`flush`; False where it
        cannot (another encoding, no copier: a CPU pool without one, or
        ``source="direct"``; a part whose view does not start on its element
        size): the caller dequantizes on the host.

        The bytes take the copier's path like any plain slab (DMA from
        registered windows, the pinned ring, ``pread``): a quarter (MXFP4) or
        half (FP8) of the bf16 bytes cross the link.
        """
        kind = stack.encoding.kind
        if self._copier is None or kind not in ("mxfp4", "fp8_block", "ggml"):
            return False
        if kind == "ggml":
            return self._stage_ggml(destination, stack, expert, orientation)

        # MXFP4 blocks and E8M0 scales are bytes to the kernel; FP8 keeps its types.
        dtypes = {
            name: torch.uint8 if kind == "mxfp4" else torch_dtype(stack.parts[name].dtype.numpy)
            for name in ("weight", "scale")
        }
        for name, dtype in dtypes.items():
            geometry = stack.parts[name]
            if geometry.view_delta % dtype.itemsize or any(stride % dtype.itemsize for stride in geometry.slab_strides):
                return False
        views: dict[str, torch.Tensor] = {}
        for name, dtype in dtypes.items():
            geometry, itemsize = stack.parts[name], dtype.itemsize
            span = stack.part_span(name, expert)
            typed = self._staging(span)[geometry.view_delta :].view(dtype)
            strides = [stride // itemsize for stride in geometry.slab_strides]
            views[name] = typed.as_strided(geometry.slab_shape, strides)
        self._staged.append((destination, stack, views, orientation))
        return True

    def _staging(self, span: SourceSpan) -> torch.Tensor:
        """Device bytes that the copier fills with ``span`` at :meth:`flush` (one per file range)."""
        from ..gpu._jobs import CopyJob

        key = (span.mapped.path, span.offset, span.nbytes)
        staging = self._spans.get(key)  # the gate and up halves of a fused slab share one copy
        if staging is None:
            staging = torch.empty(-(-span.nbytes // 8) * 8, dtype=torch.uint8, device=self.device)
            self._jobs.append(CopyJob(span.mapped, span.offset, span.nbytes, staging[: span.nbytes]))
            self._spans[key] = staging
        return staging

    def _stage_ggml(self, destination: torch.Tensor, stack: ExpertStack, expert: int, orientation: str) -> bool:
        """Queue a GGUF slab's rows of ggml blocks (one contiguous range per
        expert) for the device to decode at :meth:`flush`; False for a type
        the device kernels do not decode, or rows not stored back to back."""
        from ..gpu._dequant import GGML_DEVICE_TYPES

        geometry = stack.parts["weight"]
        rows = geometry.slab_shape[0]
        contiguous = geometry.view_delta == 0 and geometry.extent == geometry.slab_nbytes
        if geometry.dtype.code not in GGML_DEVICE_TYPES or not contiguous or geometry.slab_nbytes % rows:
            return False
        span = stack.part_span("weight", expert)
        weight = self._staging(span)[: span.nbytes].view(rows, span.nbytes // rows)
        self._staged.append((destination, stack, {"weight": weight}, orientation))
        return True

    def _dequantize_staged(self) -> None:
        from ..gpu._dequant import dequantize_fp8_block, dequantize_ggml, dequantize_mxfp4

        staged, self._staged = self._staged, []
        self._spans = {}
        for destination, stack, views, orientation in staged:
            weight, scale = views["weight"], views.get("scale")
            if stack.encoding.kind == "ggml":
                cols = stack.k if stack.native_orientation == "nk" else stack.n
                native = dequantize_ggml(stack.parts["weight"].dtype.code, weight, cols, where=stack.name)
            elif scale is None:  # pragma: no cover - staged MXFP4 and FP8 always carry their scales
                raise AssertionError(f"{stack.name}: staged without its scales")
            elif stack.encoding.kind == "mxfp4":
                cols = stack.k if stack.native_orientation == "nk" else stack.n
                native = dequantize_mxfp4(weight, scale, cols, where=stack.name)
            else:
                native = dequantize_fp8_block(weight, scale, stack.encoding.block, where=stack.name)
            values = native if stack.native_orientation == "kn" else native.T  # [k, n]
            destination.copy_(values if orientation == "kn" else values.T)

    def flush(self) -> None:
        """Enqueue the queued jobs on the current stream, then the dequantization of staged slabs."""
        if self._jobs and self._copier is not None:
            jobs, self._jobs = self._jobs, []
            self._copier.copy(jobs)
        if self._staged:
            self._dequantize_staged()

    def close(self) -> None:
        """Wait for copies in flight and unregister every page-cache window (before the store unmaps)."""
        self._jobs = []
        self._staged = []
        self._spans = {}
        if self._copier is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._copier.close()

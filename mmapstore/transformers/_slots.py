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

Quantized experts (MXFP4, FP8 block scales, and every other encoding the
store serves) are dequantized on the way in: on CUDA, MXFP4 and FP8 move
only their encoded bytes and scales to the device and dequantize there;
elsewhere the store's reference formulas run on the host.  Pools always
hold values in the model's dtype.

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
            values = self._dequantized(stack, expert)  # [k, n]
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

    def _dequantized(self, stack: ExpertStack, expert: int) -> torch.Tensor:
        """Expert ``expert``'s values as ``[k, n]`` float32 on the pool's device.

        Only the encoded bytes cross to the device where it can dequantize
        them itself (MXFP4 and FP8 block scales on CUDA: a quarter to a half
        of the bf16 bytes); every other encoding is dequantized on the host
        with the store's reference formulas.
        """
        encoding = stack.encoding
        if self.device.type == "cuda" and encoding.kind in ("mxfp4", "fp8_block"):
            from ..gpu._dequant import dequantize_fp8_block, dequantize_mxfp4

            # Encoded bytes go through a private host copy: the mapping's pages
            # may lie in a window the copier registered read-only with the driver.
            weight, scale = (
                as_tensor(np.array(stack.part(name, expert), copy=True)).to(self.device) for name in ("weight", "scale")
            )
            if encoding.kind == "mxfp4":
                cols = stack.k if stack.native_orientation == "nk" else stack.n
                native = dequantize_mxfp4(weight, scale, cols, where=stack.name)
            else:
                native = dequantize_fp8_block(weight, scale, encoding.block, where=stack.name)
            return native if stack.native_orientation == "kn" else native.T
        return torch.from_numpy(stack.dequantize(expert, np.float32)).to(self.device)

    def flush(self) -> None:
        """Enqueue the queued jobs on the current stream."""
        if self._jobs and self._copier is not None:
            jobs, self._jobs = self._jobs, []
            self._copier.copy(jobs)

    def close(self) -> None:
        """Wait for copies in flight and unregister every page-cache window (before the store unmaps)."""
        self._jobs = []
        if self._copier is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._copier.close()

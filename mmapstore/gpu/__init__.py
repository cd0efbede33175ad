"""Moving expert slabs into device memory (the ``torch`` extra).

- :class:`~mmapstore.gpu._copier.DeviceCopier` copies file byte ranges into
  device tensors through one of several sources (registered page-cache
  windows, a pinned ring filled from the mapping or by ``pread``, a plain
  copy), with fallbacks counted and logged once;
- :class:`~mmapstore.gpu._sink.TorchSink` is the sink that holds device pools
  (``SlabService(store, capacity, sink=TorchSink("cuda"))``);
- :mod:`~mmapstore.gpu._dequant` dequantizes FP8 block and MXFP4 slabs on the
  device after the copy.

torch is imported by the modules that need it, on use.
"""

from __future__ import annotations

from ._copier import DeviceCopier, is_resident
from ._dequant import dequantize_fp8_block, dequantize_mxfp4
from ._driver import PinnedBudget
from ._jobs import SOURCES, CopyJob, Source, SourceStats
from ._sink import TorchSink

__all__ = [
    "SOURCES",
    "CopyJob",
    "DeviceCopier",
    "PinnedBudget",
    "Source",
    "SourceStats",
    "TorchSink",
    "dequantize_fp8_block",
    "dequantize_mxfp4",
    "is_resident",
]

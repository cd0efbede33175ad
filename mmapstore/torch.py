"""Zero-copy torch CPU tensors over the store's read-only views (the ``torch`` extra).

``as_tensor(view)`` gives a CPU tensor that shares the page-cache bytes of a
view of the mapping: no copy, no page touched.  bf16, the fp8 types and
E8M0 keep their element type (torch has all of them); encoded parts (GGUF
blocks, MXFP4 nibbles) are ``uint8`` bytes, as their geometry says.

How it is made safe
-------------------
torch has no read-only tensors: ``torch.from_numpy`` of a non-writable array
warns that writing to it is undefined behaviour.  Here the tensor is built over
a *writable-flagged alias* of the same memory (a numpy array made from the
view's ``__array_interface__`` that keeps the view, and so the mapping, alive
as long as the tensor lives), so nothing warns.  The file and the page cache
are still protected, by the kernel rather than by a flag: every mapping that
mmapstore makes is ``PROT_READ``, so an in-place operation on such a tensor
(``t.add_(1)``, ``t[0] = 0``, ``out=t``) faults with ``SIGSEGV`` and kills the
process; it can never change a weight.  Treat these tensors as read-only: use
them as inputs (``x @ w``), copy them (``w.clone()``, ``w.to("cuda")``) before
writing.  A tensor of an expert whose store has been closed stays valid (the
mapping goes with the last view or tensor over it).

torch is imported on first use; without it every call raises
:class:`~mmapstore._errors.TorchUnavailableError`, which names the extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._dtypes import DTYPE_CODES, DType
from ._errors import CapturedIdsError, FormatError, TorchUnavailableError

if TYPE_CHECKING:
    import torch

    from ._store import ExpertStack

__all__ = [
    "TORCH_DTYPE_NAMES",
    "TORCH_EXTRA",
    "as_tensor",
    "expert_counts",
    "expert_tensor",
    "require_torch",
    "torch_dtype",
]

TORCH_EXTRA = "pip install 'mmapstore[torch]'"

# File dtype code -> attribute of the torch module.  Every code of
# mmapstore._dtypes has an entry (a test keeps them in step).
TORCH_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}

# The integer carrier of each item size: torch.from_numpy accepts these for
# any strides, and Tensor.view(dtype) reinterprets them without a copy.
_CARRIERS: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8),
    2: np.dtype("<i2"),
    4: np.dtype("<i4"),
    8: np.dtype("<i8"),
}


def require_torch(what: str = "this call") -> ModuleType:
    """The ``torch`` module, or :class:`TorchUnavailableError` naming the extra."""
    try:
        import torch
    except ImportError as exc:
        raise TorchUnavailableError(f"{what} needs PyTorch, which is not installed: {TORCH_EXTRA}") from exc
    return torch


def torch_dtype(dtype: DType | npt.DTypeLike) -> torch.dtype:
    """The torch dtype of a file dtype (:class:`DType`, its code, or a numpy dtype).

    Raises
    ------
    FormatError
        The dtype has no torch counterpart, or this torch is too old for it
        (``float8_e8m0fnu`` needs torch 2.7).
    """
    require_torch("torch_dtype")
    import torch

    code = _code(dtype)
    name = TORCH_DTYPE_NAMES.get(code)
    found = getattr(torch, name, None) if name is not None else None
    if found is None:
        raise FormatError(
            f"dtype {code} has no torch dtype in torch {torch.__version__}"
            + (f" (torch.{name} needs a newer torch)" if name is not None else "")
        )
    result: torch.dtype = found
    return result


def _code(dtype: DType | npt.DTypeLike) -> str:
    if isinstance(dtype, DType):
        return dtype.code
    if isinstance(dtype, str) and dtype in DTYPE_CODES:
        return dtype
    numpy_dtype = np.dtype(dtype)
    for code, entry in DTYPE_CODES.items():
        if entry.numpy == numpy_dtype:
            return code
    raise FormatError(f"numpy dtype {numpy_dtype} has no file dtype code, so no torch dtype")


class _Alias:
    """Presents a view's memory as writable to numpy, and keeps the view alive."""

    __slots__ = ("__array_interface__", "view")

    def __init__(self, view: npt.NDArray[Any]) -> None:
        interface = dict(view.__array_interface__)
        address, _readonly = interface["data"]
        interface["data"] = (address, False)
        self.__array_interface__ = interface
        self.view = view


def as_tensor(view: npt.NDArray[Any]) -> torch.Tensor:
    """A CPU tensor over exactly the memory of ``view``: same shape, strides
    (in elements) and element type; no copy.  See the module docstring for why
    it is safe and what not to do with it.

    Raises
    ------
    TorchUnavailableError
        torch is not installed.
    FormatError
        The dtype has no torch counterpart, or ``view`` has negative or
        non-item-aligned strides (torch cannot describe those).
    """
    require_torch("as_tensor")
    import torch

    target = torch_dtype(view.dtype)
    itemsize = view.dtype.itemsize
    if any(stride < 0 or stride % itemsize for stride in view.strides):
        raise FormatError(f"a view with strides {view.strides} ({view.dtype}) has no torch tensor over the same memory")
    carried = view.view(_CARRIERS[itemsize])
    alias = np.asarray(_Alias(carried))
    tensor = torch.from_numpy(alias)
    return tensor if tensor.dtype == target else tensor.view(target)


def expert_tensor(stack: ExpertStack, expert: int, part: str = "weight", *, native: bool = False) -> torch.Tensor:
    """Zero-copy CPU tensor of one expert's slab of ``part``.

    The weight part is ``[k, n]`` (GroupedMatMul orientation, a transposed
    tensor for ``[out, in]`` files) unless ``native`` is set, like
    :meth:`ExpertStack.expert`; encoded weights (FP8 codes, MXFP4 and GGUF
    bytes) are their codes, not values: dequantize them with
    :mod:`mmapstore.gpu._dequant` (any device) or ``stack.dequantize``.
    """
    if part == "weight" and not native:
        return as_tensor(stack.expert(expert))
    return as_tensor(stack.part(part, expert))


def expert_counts(captured: Sequence[torch.Tensor], num_experts: int) -> npt.NDArray[np.int64]:
    """``[len(captured), num_experts]`` routed-token counts of each layer's
    Top-K ids, counted where the ids are (one ``bincount`` over every
    layer on their device) and brought to the host in one copy of
    ``layers x experts`` integers: the input of ``plan_refresh(...,
    counts=True)`` and ``SlabService.step(..., counts=True)``, which then
    never read the ids themselves (a prefill of 4096 tokens at top-8 is
    32,768 ids per layer).

    Raises
    ------
    CapturedIdsError
        An id tensor that is not integers, or ids on different devices.
        Ids out of range are refused after the count (a per-layer count
        longer than ``num_experts``, or a negative id), naming the layer.
    """
    torch = require_torch("expert_counts")
    if not captured:
        return np.zeros((0, num_experts), dtype=np.int64)
    for layer, ids in enumerate(captured):
        if not isinstance(ids, torch.Tensor):
            raise CapturedIdsError(
                f"layer {layer}: captured expert ids must be a torch tensor, got {type(ids).__name__}"
            )
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise CapturedIdsError(f"layer {layer}: captured expert ids must be integers, got {ids.dtype}")
    devices = {ids.device for ids in captured}
    if len(devices) > 1:
        raise CapturedIdsError(f"captured ids live on several devices: {sorted(map(str, devices))}")
    total = len(captured) * num_experts
    # Each layer's ids offset into its own row; an id out of range goes to one spare bin past the
    # rows (so a wild id allocates nothing), and is reported, by layer, after the one copy.
    rows = [ids.reshape(-1).to(torch.int64) for ids in captured]
    flat = torch.cat([torch.where((ids >= 0) & (ids < num_experts), ids + layer * num_experts, total)
                      for layer, ids in enumerate(rows)])  # fmt: skip
    host: npt.NDArray[np.int64] = torch.bincount(flat, minlength=total + 1).cpu().numpy().astype(np.int64, copy=False)
    if host[total]:
        for layer, item in enumerate(rows):
            if item.numel() and (int(item.min()) < 0 or int(item.max()) >= num_experts):
                raise CapturedIdsError(f"layer {layer}: captured expert id out of range [0, {num_experts})")
    return host[:total].reshape(len(captured), num_experts)

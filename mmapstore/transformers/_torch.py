"""Torch at the edge of the runtime: zero-copy tensors over mapped slabs, dtypes and devices."""

from __future__ import annotations

import warnings

import numpy as np
import numpy.typing as npt
import torch

from .._errors import RuntimeConfigError

__all__ = ["as_tensor", "resolve_device", "torch_dtype"]

# numpy dtypes (from ml_dtypes) that torch.from_numpy cannot take: read them
# through a same-width integer view, then reinterpret in torch.
_REINTERPRET: dict[str, tuple[type[np.generic], torch.dtype]] = {
    "bfloat16": (np.uint16, torch.bfloat16),
    "float8_e4m3fn": (np.uint8, torch.float8_e4m3fn),
    "float8_e5m2": (np.uint8, torch.float8_e5m2),
}


def torch_dtype(dtype: np.dtype[np.generic]) -> torch.dtype:
    """The torch dtype holding the same values as numpy ``dtype``."""
    special = _REINTERPRET.get(dtype.name)
    if special is not None:
        return special[1]
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def as_tensor(array: npt.NDArray[np.generic]) -> torch.Tensor:
    """A CPU tensor over the same memory as ``array`` (no copy, strides kept).

    The memory of a mapped view is read-only: the tensor must never be
    written (torch cannot mark a tensor read-only, so its warning about
    that is silenced here, in the one place such tensors are made).
    """
    special = _REINTERPRET.get(array.dtype.name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if special is None:
            return torch.from_numpy(array)
        raw, reinterpreted = special
        return torch.from_numpy(array.view(raw)).view(reinterpreted)


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine.

    Raises
    ------
    RuntimeConfigError
        Not a device torch knows, a backend that is not available here, an
        index beyond the machine's devices, or the meta device.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise RuntimeConfigError(f"device {device!r} is not a device torch knows: {exc}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "meta":
        raise RuntimeConfigError(f"device {device!r}: the meta device holds no data; pick cpu or an accelerator")
    backend = getattr(torch, resolved.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None or not is_available():
        raise RuntimeConfigError(f"device {device!r}: no {resolved.type} device is available on this machine")
    count_of = getattr(backend, "device_count", None)
    if count_of is not None:
        count = int(count_of())
        if resolved.index is not None and resolved.index >= count:
            raise RuntimeConfigError(f"device {device!r}: this machine has {count} {resolved.type} device(s)")
        if resolved.index is None and resolved.type == "cuda":
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved

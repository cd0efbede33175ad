"""The exception hierarchy of mmapstore.

Every error the library raises on purpose derives from :class:`MmapStoreError`.
Subclasses also inherit the built-in exception a caller would expect, so
``except ValueError`` or ``except KeyError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "CapturedIdsError",
    "ConvertError",
    "ExpertIndexError",
    "FormatError",
    "LayerNotFoundError",
    "MmapStoreError",
    "SinkError",
    "StaleRefreshError",
    "StoreClosedError",
    "TensorNotFoundError",
    "TorchUnavailableError",
]


class MmapStoreError(Exception):
    """Root of every error raised by mmapstore."""


class FormatError(MmapStoreError, ValueError):
    """A file, header, manifest or index is malformed, truncated or unsafe.

    The message names the file, the tensor where one is concerned, and what
    was expected versus found.
    """


class TensorNotFoundError(MmapStoreError, KeyError):
    """A tensor name is not in the store."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the sentence readable
        return str(self.args[0]) if self.args else ""


class LayerNotFoundError(MmapStoreError, KeyError):
    """A model layer index has no MoE experts in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ExpertIndexError(MmapStoreError, IndexError):
    """An expert index is outside ``[0, num_experts)`` or not an integer."""


class StoreClosedError(MmapStoreError, ValueError):
    """The store (or the mapping behind a view or plan) has been closed."""


class CapturedIdsError(MmapStoreError, ValueError):
    """Captured router Top-K ids are out of range, not integers, or for the
    wrong number of layers."""


class SinkError(MmapStoreError, ValueError):
    """A sink cannot take a write: unknown parameter, wrong shape or dtype,
    or a slot out of range."""


class StaleRefreshError(MmapStoreError, RuntimeError):
    """A refresh result was computed against a pool state that has changed
    since, so committing it would corrupt the placement."""


class ConvertError(MmapStoreError, RuntimeError):
    """A conversion could not be carried out (destination exists, lock
    timeout, unsupported option)."""


class TorchUnavailableError(MmapStoreError, ImportError):
    """PyTorch (the ``torch`` extra) is needed for this call and is not
    installed, or the installed version lacks what the call needs."""

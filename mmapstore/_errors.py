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
    "FileChangedError",
    "FormatError",
    "LayerNotFoundError",
    "MmapStoreError",
    "OptionError",
    "ReadCancelledError",
    "RuntimeConfigError",
    "SinkError",
    "StaleRefreshError",
    "StoreClosedError",
    "TensorNotFoundError",
    "TorchUnavailableError",
    "UnsupportedEncodingError",
    "UnsupportedModelError",
]


class MmapStoreError(Exception):
    """Root of every error raised by mmapstore."""


class FormatError(MmapStoreError, ValueError):
    """A file, header, manifest or index is malformed, truncated or unsafe.

    The message names the file, the tensor where one is concerned, and what
    was expected versus found.
    """


class UnsupportedEncodingError(FormatError):
    """Well-formed data in an encoding the library cannot decode (a ggml
    block type without a dequantizer, say).  The message names the encoding.
    """


class FileChangedError(FormatError):
    """A file or directory was replaced, or changed size, between the moment
    it was validated and the moment it was used (for instance a store being
    re-converted while it is opened).  Opening again sees a consistent state.
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


class OptionError(MmapStoreError, ValueError):
    """An argument is outside its allowed range: zero layers or experts, a
    destination that overlaps the source, an unknown dtype."""


class ReadCancelledError(MmapStoreError, RuntimeError):
    """A read was cancelled before all its bytes landed: its destination
    holds a mix of old and new bytes and must not be committed."""


class UnsupportedModelError(MmapStoreError, ValueError):
    """A checkpoint's model family cannot be run with its experts served from
    the store (its transformers class does not use the experts interface,
    or its experts are shaped in a way the runtime does not serve)."""


class RuntimeConfigError(MmapStoreError, ValueError):
    """A model runtime was asked for something it cannot do: a budget too
    small for one expert per layer, a device that does not exist, a trace
    path that cannot be written.  Raised before any weight is loaded."""


class TorchUnavailableError(MmapStoreError, ImportError):
    """PyTorch (the ``torch`` extra) is needed for this call and is not
    installed, or the installed version lacks what the call needs."""

"""mmapstore: serve Mixture-of-Experts expert weights from memory-mapped files."""

from .errors import (
    CapturedIdsError,
    ConvertError,
    ExpertIndexError,
    FileChangedError,
    FormatError,
    LayerNotFoundError,
    MmapStoreError,
    OptionError,
    SinkError,
    StaleRefreshError,
    StoreClosedError,
    TensorNotFoundError,
)
from .store import ExpertStack, ExpertStore, LayerExperts, open_store

__version__ = "0.1.0"

__all__ = [
    "CapturedIdsError",
    "ConvertError",
    "ExpertIndexError",
    "ExpertStack",
    "ExpertStore",
    "FileChangedError",
    "FormatError",
    "LayerExperts",
    "LayerNotFoundError",
    "MmapStoreError",
    "OptionError",
    "SinkError",
    "StaleRefreshError",
    "StoreClosedError",
    "TensorNotFoundError",
    "__version__",
    "open_store",
]

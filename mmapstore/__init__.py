"""mmapstore: serve Mixture-of-Experts expert weights from memory-mapped files."""

from .errors import (
    CapturedIdsError,
    ConvertError,
    ExpertIndexError,
    FormatError,
    LayerNotFoundError,
    MmapStoreError,
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
    "FormatError",
    "LayerExperts",
    "LayerNotFoundError",
    "MmapStoreError",
    "SinkError",
    "StaleRefreshError",
    "StoreClosedError",
    "TensorNotFoundError",
    "__version__",
    "open_store",
]

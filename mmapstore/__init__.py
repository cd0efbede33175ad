"""mmapstore: serve Mixture-of-Experts expert weights from memory-mapped files.

The names a user needs, re-exported here; submodules hold the rest (formats,
dequantizers, the cold reader in ``mmapstore.io``, device pools in
``mmapstore.gpu``, the transformers runtime in ``mmapstore.transformers``).
Optional dependencies (torch, transformers, gguf, matplotlib) are imported
only by the modules that need them.
"""

from __future__ import annotations

from ._apply import (
    ApplyResult,
    apply,
    start,
)
from ._convert import (
    ConvertResult,
    convert,
)
from ._replay import (
    ReplayGeometry,
    SimulationReport,
    replay,
)
from ._version import VERSION
from .errors import (
    CapturedIdsError,
    ConvertError,
    ExpertIndexError,
    FileChangedError,
    FormatError,
    LayerNotFoundError,
    MmapStoreError,
    OptionError,
    ReadCancelledError,
    RuntimeConfigError,
    SinkError,
    StaleRefreshError,
    StoreClosedError,
    TensorNotFoundError,
    TorchUnavailableError,
    UnsupportedEncodingError,
    UnsupportedModelError,
)
from .geometry import (
    Encoding,
    PartGeometry,
)
from .planner import (
    DEFAULT_PARAM_NAME,
    LayerGeometry,
    PoolUpdate,
    RefreshPlan,
    StackGeometry,
    StoreGeometry,
    geometries_of,
    param_name,
    plan_full_push,
    plan_refresh,
    plan_resident,
)
from .pool import (
    ExecMode,
    ExpertPool,
    RefreshPolicy,
    capacity_from_budget,
)
from .report import (
    VerifyReport,
    verify,
)
from .service import (
    SlabService,
    StepResult,
)
from .sinks import (
    ArraySink,
    Completion,
    DictSink,
    Sink,
    WriteResult,
)
from .source import (
    ByteSource,
    MappedSource,
)
from .store import (
    ExpertStack,
    ExpertStore,
    LayerExperts,
    open_store,
)
from .trace import (
    Trace,
    load_trace,
    save_trace,
)
from .writes import (
    WriteTable,
)

__version__ = VERSION

__all__ = [
    "DEFAULT_PARAM_NAME",
    "ApplyResult",
    "ArraySink",
    "ByteSource",
    "CapturedIdsError",
    "Completion",
    "ConvertError",
    "ConvertResult",
    "DictSink",
    "Encoding",
    "ExecMode",
    "ExpertIndexError",
    "ExpertPool",
    "ExpertStack",
    "ExpertStore",
    "FileChangedError",
    "FormatError",
    "LayerExperts",
    "LayerGeometry",
    "LayerNotFoundError",
    "MappedSource",
    "MmapStoreError",
    "OptionError",
    "PartGeometry",
    "PoolUpdate",
    "ReadCancelledError",
    "RefreshPlan",
    "RefreshPolicy",
    "ReplayGeometry",
    "RuntimeConfigError",
    "SimulationReport",
    "Sink",
    "SinkError",
    "SlabService",
    "StackGeometry",
    "StaleRefreshError",
    "StepResult",
    "StoreClosedError",
    "StoreGeometry",
    "TensorNotFoundError",
    "TorchUnavailableError",
    "Trace",
    "UnsupportedEncodingError",
    "UnsupportedModelError",
    "VerifyReport",
    "WriteResult",
    "WriteTable",
    "__version__",
    "apply",
    "capacity_from_budget",
    "convert",
    "geometries_of",
    "load_trace",
    "open_store",
    "param_name",
    "plan_full_push",
    "plan_refresh",
    "plan_resident",
    "replay",
    "save_trace",
    "start",
    "verify",
]

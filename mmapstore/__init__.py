"""mmapstore: serve Mixture-of-Experts expert weights from memory-mapped files.

The names a user needs, re-exported here.  Public subpackages hold the rest:
readers and writers in ``mmapstore.formats``, dequantizers in
``mmapstore.dequant``, the cold reader in ``mmapstore.io``, device pools in
``mmapstore.gpu``, the torch bridge in ``mmapstore.torch``, the transformers
runtime in ``mmapstore.transformers``, synthetic checkpoints, traces and the
sink conformance suite in ``mmapstore.testing``, benchmarks in
``mmapstore.bench`` and the command line in ``mmapstore.cli``.  Modules whose
name starts with ``_`` are implementation and may change without notice.
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
from ._errors import (
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
from ._geometry import (
    Encoding,
    PartGeometry,
)
from ._planner import (
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
from ._pool import (
    ExecMode,
    ExpertPool,
    RefreshPolicy,
    capacity_from_budget,
)
from ._replay import (
    ReplayGeometry,
    SimulationReport,
    replay,
)
from ._report import (
    VerifyReport,
    verify,
)
from ._service import (
    SlabService,
    StepResult,
)
from ._sinks import (
    ArraySink,
    Completion,
    DictSink,
    Sink,
    WriteResult,
)
from ._source import (
    ByteSource,
    MappedSource,
)
from ._store import (
    ExpertStack,
    ExpertStore,
    LayerExperts,
    open_store,
)
from ._trace import (
    Trace,
    load_trace,
    save_trace,
)
from ._trace_import import (
    from_llama_csv,
    from_step_array,
    from_vllm,
)
from ._version import VERSION
from ._writes import (
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
    "from_llama_csv",
    "from_step_array",
    "from_vllm",
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

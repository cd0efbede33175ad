"""Run a transformers MoE model whose routed experts are served from the store.

``load_model(checkpoint, capacity=..., device=...)`` opens a Hugging Face
checkpoint directory, loads the non-expert weights (attention, norms,
embeddings, routers, shared experts, dense layers) onto the device, and
serves the routed experts through per-layer residency pools: resident
experts run on the device from pool tensors, the others on the CPU straight
from the mapped checkpoint (or are fetched on demand).  The experts backend
is registered with transformers' ``ExpertsInterface`` as ``"mmapstore"``.

Needs the ``transformers`` extra (``pip install 'mmapstore[transformers]'``).
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"mmapstore.transformers needs torch and transformers ({exc.name} is missing): "
        "pip install 'mmapstore[transformers]'"
    ) from exc

from ._backend import BACKEND_NAME, register_backend
from ._loader import load_model
from ._runtime import OffloadedModel, RunStats

__all__ = ["BACKEND_NAME", "OffloadedModel", "RunStats", "load_model", "register_backend"]

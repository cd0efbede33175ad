"""The ``"mmapstore"`` experts backend of transformers' ``ExpertsInterface``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .._errors import MmapStoreError
from ._hf import interface_registry

if TYPE_CHECKING:
    from ._layer import LayerRuntime

__all__ = ["BACKEND_NAME", "LAYER_ATTRIBUTE", "layer_of", "mmapstore_experts_forward", "register_backend"]

BACKEND_NAME = "mmapstore"
LAYER_ATTRIBUTE = "_mmapstore_layer"  # set on each experts module by load_model


def mmapstore_experts_forward(
    module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward with the signature transformers' backends share.

    Raises
    ------
    MmapStoreError
        ``module`` was not prepared by :func:`~mmapstore.transformers.load_model`.
    """
    result: torch.Tensor = layer_of(module).forward(hidden_states, top_k_index, top_k_weights)
    return result


def layer_of(module: torch.nn.Module) -> LayerRuntime:
    """The runtime layer :func:`~mmapstore.transformers.load_model` attached to an experts module.

    Raises
    ------
    MmapStoreError
        ``module`` was not prepared by ``load_model``.
    """
    layer: LayerRuntime | None = getattr(module, LAYER_ATTRIBUTE, None)
    if layer is None:
        raise MmapStoreError(
            f"{type(module).__name__}: experts_implementation={BACKEND_NAME!r} serves only models loaded with "
            "mmapstore.transformers.load_model"
        )
    return layer


def register_backend() -> None:
    """Register :func:`mmapstore_experts_forward` as ``"mmapstore"`` (idempotent)."""
    interface_registry().register(BACKEND_NAME, mmapstore_experts_forward)

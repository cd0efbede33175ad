"""What the runtime borrows from transformers, in one place.

transformers 5 builds a model on the meta device, renames checkpoint keys
(``block_sparse_moe`` -> ``mlp``), merges per-expert tensors into
``gate_up_proj``/``down_proj`` with converters, and keeps some modules in
float32.  The runtime reuses those rules for the non-expert weights so it
loads exactly what ``from_pretrained`` would, without ever merging experts.
Private helpers are imported here with a plain fallback, so a transformers
release that moves them degrades in one module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = [
    "KeyMapper",
    "dtype_overrides",
    "experts_modules",
    "grouped_linear",
    "interface_registry",
    "key_mapper",
]

# Attributes `use_experts_implementation` gives an experts module.
_INTERFACE_ATTRIBUTES = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "_apply_gate")


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every module that dispatches through the experts interface."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if all(hasattr(module, attribute) for attribute in _INTERFACE_ATTRIBUTES)
    ]


def interface_registry() -> Any:
    """transformers' ``ExpertsInterface`` class (``register(name, forward)``)."""
    from transformers.integrations.moe import ExpertsInterface

    return ExpertsInterface


KeyMapper = Callable[[str], tuple[str | None, bool]]


def key_mapper(model: Any) -> KeyMapper:
    """A function from a checkpoint key to ``(model key or None, converted)``.

    ``converted`` is true when the key feeds one of transformers' weight
    converters (per-expert tensors merged into fused ones): the runtime
    never loads those through the model.  Renamings and the base-model
    prefix are applied as ``from_pretrained`` applies them.
    """
    meta_state = dict(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None) or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [entry for entry in transforms if isinstance(entry, WeightRenaming)]
        converters = [entry for entry in transforms if isinstance(entry, WeightConverter)]
    except ImportError:  # an older or newer layout of transformers: names as they are

        def plain(key: str) -> tuple[str | None, bool]:
            return (key if key in meta_state else None), False

        return plain

    def mapped(key: str) -> tuple[str | None, bool]:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta_state)
        if pattern is not None:
            return renamed, True
        return (renamed if renamed in meta_state else None), False

    return mapped


def dtype_overrides(model: Any, dtype: torch.dtype) -> Callable[[str], torch.dtype | None]:
    """The dtype a model key must keep (``_keep_in_fp32_modules``), or None."""
    plan_of = getattr(model, "_get_dtype_plan", None)
    plan: Mapping[str, torch.dtype] = plan_of(dtype) if plan_of is not None else {}
    patterns = [(re.compile(glob.replace("*", ".*")), forced) for glob, forced in plan.items()]

    def override(key: str) -> torch.dtype | None:
        for pattern, forced in patterns:
            if pattern.search(key):
                return forced
        return None

    return override


def _grouped_fallback(
    inputs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    """One matmul per group: rows ``offsets[g-1]:offsets[g]`` times ``weight[g]``."""
    matrices = weight if transposed else weight.transpose(-2, -1)
    out = torch.zeros(inputs.shape[0], matrices.shape[2], device=inputs.device, dtype=weight.dtype)
    start = 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(inputs[start:end].to(weight.dtype), matrices[group], out=out[start:end])
        start = end
    if bias is not None:
        out.add_(bias)
    return out


def grouped_linear(
    inputs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    """Rows sorted by group times their group's matrix, as transformers'
    ``grouped_mm`` backend computes it (same kernel choice), so resident
    experts give the stock backend's numbers."""
    try:
        from transformers.integrations.moe import _grouped_linear
    except ImportError:
        return _grouped_fallback(inputs, weight, offsets, bias, transposed)
    result: torch.Tensor = _grouped_linear(inputs, weight, offsets, bias=bias, is_transposed=transposed)
    return result

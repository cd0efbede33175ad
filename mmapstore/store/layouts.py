"""Layout discovery: which tensors are expert stacks, from their names alone.

Three layouts, one per checkpoint:

- ``slab``: ``blk.{L}.ffn_{gate,up,down}_exps.weight``, 3-D ``[E, k, n]``
  (what ``mmapstore convert`` writes; a manifest may say ``"orientation": "nk"``).
- ``per_expert``: one 2-D ``[out, in]`` tensor per expert. Mixtral
  (``block_sparse_moe.experts.{e}.w1/w3/w2``), Qwen2/3-MoE, DeepSeek-V2/V3,
  OLMoE, LLaDA2-MoE (``mlp.experts.{e}.{gate,up,down}_proj``).  Dense MLPs and
  shared experts (``mlp.shared_expert(s).*``) do not match.
- ``fused``: GPT-OSS (``mlp.experts.gate_up_proj``, gate/up interleaved on
  the last axis) and Llama-4 (``feed_forward.experts.gate_up_proj``, gate
  then up), ``[E, hidden, 2*ffn]`` plus ``down_proj`` ``[E, ffn, hidden]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError
from ..formats.records import TensorRecord

__all__ = ["LAYOUTS", "LayerPlan", "discover"]

LAYOUTS = ("slab", "per_expert", "fused_interleaved", "fused_concatenated")

_SLAB = re.compile(r"blk\.(?P<layer>\d+)\.ffn_(?P<proj>gate|up|down)_exps\.weight")
_PER_EXPERT = re.compile(
    r"(?P<prefix>(?:[\w]+\.)*?)layers\.(?P<layer>\d+)\.(?P<block>block_sparse_moe|mlp|feed_forward)"
    r"\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight"
)
_FUSED = re.compile(
    r"(?P<prefix>(?:[\w]+\.)*?)layers\.(?P<layer>\d+)\.(?P<block>mlp|feed_forward)"
    r"\.experts\.(?P<proj>gate_up_proj|down_proj)(?P<bias>_bias)?"
)
_PROJ = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_INTERLEAVED_MODELS = {"gpt_oss"}
_CONCATENATED_MODELS = {"llama4", "llama4_text"}


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """Which records make up one MoE layer, before any view exists.

    ``per_expert``: ``experts[proj]`` lists one record per expert.
    ``slab`` / fused: ``stacked[proj]`` is the 3-D record (``gate_up`` for fused).
    """

    layer_index: int
    layout: str
    experts: Mapping[str, tuple[TensorRecord, ...]]
    stacked: Mapping[str, TensorRecord]
    biases: Mapping[str, TensorRecord]


def discover(
    tensors: Mapping[str, TensorRecord], config: Mapping[str, Any] | None, *, source: str
) -> tuple[str, list[LayerPlan]]:
    """Find the expert stacks among ``tensors``; return the layout and layers in order.

    Raises
    ------
    FormatError
        Layouts are mixed, an expert or projection is missing, or ranks and
        shapes disagree within a layer.
    """
    slab: dict[int, dict[str, TensorRecord]] = {}
    per_expert: dict[int, dict[str, dict[int, TensorRecord]]] = {}
    fused: dict[int, dict[str, TensorRecord]] = {}
    fused_blocks: set[str] = set()
    for name, record in tensors.items():
        match = _SLAB.fullmatch(name)
        if match:
            slab.setdefault(int(match["layer"]), {})[match["proj"]] = record
            continue
        match = _PER_EXPERT.fullmatch(name)
        if match:
            by_proj = per_expert.setdefault(int(match["layer"]), {})
            by_proj.setdefault(_PROJ[match["proj"]], {})[int(match["expert"])] = record
            continue
        match = _FUSED.fullmatch(name)
        if match:
            key = ("gate_up" if match["proj"] == "gate_up_proj" else "down") + ("_bias" if match["bias"] else "")
            fused.setdefault(int(match["layer"]), {})[key] = record
            fused_blocks.add(match["block"])
    found = [kind for kind, layers in (("slab", slab), ("per_expert", per_expert), ("fused", fused)) if layers]
    if len(found) > 1:
        raise FormatError(f"{source}: mixed expert layouts {found}; one checkpoint must use one")
    if not found:
        raise FormatError(f"{source}: no MoE expert tensors found (no slab, per-expert or fused stacks)")
    if found == ["slab"]:
        return "slab", [_slab_layer(layer, slab[layer], source) for layer in sorted(slab)]
    if found == ["per_expert"]:
        return "per_expert", [_per_expert_layer(layer, per_expert[layer], source) for layer in sorted(per_expert)]
    layout = _fused_layout(config, fused_blocks)
    return layout, [_fused_layer(layer, fused[layer], layout, source) for layer in sorted(fused)]


def _require(found: Mapping[str, object], wanted: tuple[str, ...], layer: int, source: str) -> None:
    missing = [proj for proj in wanted if proj not in found]
    if missing:
        raise FormatError(f"{source}: MoE layer {layer} has no {'/'.join(missing)} expert tensor")


def _rank(record: TensorRecord, rank: int, source: str) -> None:
    if len(record.shape) != rank:
        raise FormatError(
            f"{source}: tensor {record.name!r} ({record.path}): expected {rank}-D, found shape {list(record.shape)}"
        )


def _slab_layer(layer: int, found: dict[str, TensorRecord], source: str) -> LayerPlan:
    _require(found, ("gate", "up", "down"), layer, source)
    for record in found.values():
        _rank(record, 3, source)
    return LayerPlan(layer, "slab", {}, found, {})


def _per_expert_layer(layer: int, found: dict[str, dict[int, TensorRecord]], source: str) -> LayerPlan:
    _require(found, ("gate", "up", "down"), layer, source)
    experts: dict[str, tuple[TensorRecord, ...]] = {}
    count = max(max(by_expert) for by_expert in found.values()) + 1
    for proj in ("gate", "up", "down"):
        by_expert = found[proj]
        missing = [expert for expert in range(count) if expert not in by_expert]
        if missing:
            raise FormatError(
                f"{source}: MoE layer {layer} {proj}: experts {missing[:8]} missing "
                f"(found {len(by_expert)} of {count})"
            )
        records = tuple(by_expert[expert] for expert in range(count))
        head = records[0]
        for record in records:
            _rank(record, 2, source)
            if record.shape != head.shape or record.dtype != head.dtype:
                raise FormatError(
                    f"{source}: tensor {record.name!r}: {record.dtype.code} {list(record.shape)} differs from "
                    f"{head.name!r}: {head.dtype.code} {list(head.shape)}"
                )
        experts[proj] = records
    return LayerPlan(layer, "per_expert", experts, {}, {})


def _fused_layout(config: Mapping[str, Any] | None, blocks: set[str]) -> str:
    model_type = str((config or {}).get("model_type", ""))
    if model_type in _INTERLEAVED_MODELS:
        return "fused_interleaved"
    if model_type in _CONCATENATED_MODELS:
        return "fused_concatenated"
    # No config: GPT-OSS names its block `mlp`, Llama-4 `feed_forward`.
    return "fused_concatenated" if blocks == {"feed_forward"} else "fused_interleaved"


def _fused_layer(layer: int, found: dict[str, TensorRecord], layout: str, source: str) -> LayerPlan:
    _require(found, ("gate_up", "down"), layer, source)
    gate_up, down = found["gate_up"], found["down"]
    _rank(gate_up, 3, source)
    _rank(down, 3, source)
    if gate_up.shape[2] % 2:
        raise FormatError(
            f"{source}: tensor {gate_up.name!r}: last axis {gate_up.shape[2]} must be even (gate and up fused)"
        )
    biases = {key: record for key, record in found.items() if key.endswith("_bias")}
    stacked = {"gate_up": gate_up, "down": down}
    return LayerPlan(layer, layout, {}, stacked, biases)

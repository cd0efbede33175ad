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

# Canonical ASCII numbers only: `\d` would accept Unicode digits and leading
# zeros would let `experts.1` and `experts.01` collide on one key.
_NUM = r"(?:0|[1-9][0-9]{0,8})"
_SLAB = re.compile(rf"blk\.(?P<layer>{_NUM})\.ffn_(?P<proj>gate|up|down)_exps\.weight")
_PER_EXPERT = re.compile(
    rf"(?P<prefix>(?:[\w]+\.)*?)layers\.(?P<layer>{_NUM})\.(?P<block>block_sparse_moe|mlp|feed_forward)"
    rf"\.experts\.(?P<expert>{_NUM})\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight"
)
_FUSED = re.compile(
    rf"(?P<prefix>(?:[\w]+\.)*?)layers\.(?P<layer>{_NUM})\.(?P<block>mlp|feed_forward)"
    r"\.experts\.(?P<proj>gate_up_proj|down_proj)(?P<bias>_bias)?"
)
# Anything under an experts block must be claimed by a pattern above or refused.
_UNDER_EXPERTS = re.compile(r"(?:^|\.)experts\.|_exps\.|(?:^|\.)blk\.[^.]+\.ffn_(?:gate|up|down)\.[^.]+\.")
_PROJ = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
# Fused gate_up: how gate and up share the last axis, by model_type.
_INTERLEAVED_MODELS = frozenset({"gpt_oss"})
_CONCATENATED_MODELS = frozenset({"llama4", "llama4_text", "qwen3_vl_moe", "qwen3_vl_moe_text"})
# Checkpoints whose fused stacks may be saved either way round ([E, H, 2I] or [E, 2I, H]).
_EITHER_ORIENTATION_MODELS = frozenset({"qwen3_vl_moe", "qwen3_vl_moe_text"})
MAX_EXPERTS = 1 << 16  # DeepSeek-V3 has 256 routed experts; far above any real model, far below a DoS

# Suffixes that mark a quantized expert tensor, and the format they belong to.
_PACKED_SUFFIXES = (
    ("weight_scale_inv", "FP8 block-quantized (weight_scale_inv)"),
    ("weight_scale", "compressed-tensors / FP8 (weight_scale)"),
    ("weight_packed", "compressed-tensors packed (weight_packed)"),
    ("weight_shape", "compressed-tensors packed (weight_shape)"),
    ("weight_zero_point", "compressed-tensors (weight_zero_point)"),
    ("weight_global_scale", "compressed-tensors NVFP4 (weight_global_scale)"),
    ("weight_g_idx", "compressed-tensors (weight_g_idx)"),
    ("qweight", "AWQ/GPTQ (qweight)"),
    ("qzeros", "AWQ/GPTQ (qzeros)"),
    ("scales", "AWQ/GPTQ (scales)"),
    ("g_idx", "GPTQ (g_idx)"),
    ("_blocks", "MXFP4 (_blocks)"),
    ("_scales", "MXFP4 (_scales)"),
    ("absmax", "bitsandbytes (absmax)"),
    ("quant_map", "bitsandbytes (quant_map)"),
    ("quant_state", "bitsandbytes (quant_state)"),
)


def quantization_method(config: Mapping[str, Any] | None) -> str | None:
    """``config.json``'s ``quantization_config.quant_method`` (also under
    ``text_config``), or None for an unquantized checkpoint."""
    for holder in (config or {}, (config or {}).get("text_config") or {}):
        if isinstance(holder, Mapping):
            quant = holder.get("quantization_config")
            if isinstance(quant, Mapping):
                return str(quant.get("quant_method", "unknown"))
            if quant is not None:
                return "unknown"
    return None


def model_type(config: Mapping[str, Any] | None) -> str:
    return str((config or {}).get("model_type", ""))


def _config_int(config: Mapping[str, Any] | None, *keys: str) -> int | None:
    """The first integer under ``keys`` in ``config`` or its ``text_config``."""
    for holder in (config or {}, (config or {}).get("text_config") or {}):
        if not isinstance(holder, Mapping):
            continue
        for key in keys:
            value = holder.get(key)
            if type(value) is int and value > 0:
                return value
    return None


def _unclaimed(name: str, source: str, config: Mapping[str, Any] | None) -> FormatError:
    """The refusal for a tensor under an experts block that no layout claims."""
    last = name.rsplit(".", 1)[-1]
    for suffix, fmt in _PACKED_SUFFIXES:
        if last == suffix or (suffix.startswith("_") and last.endswith(suffix)):
            return FormatError(
                f"{source}: tensor {name!r} is part of a {fmt} expert encoding that mmapstore does not serve; "
                "refusing rather than serving encoded values as weights"
            )
    return FormatError(
        f"{source}: tensor {name!r} lies under an experts block but matches no expert layout mmapstore knows "
        f"(model_type {model_type(config)!r}); refusing rather than dropping it"
    )


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """Which records make up one MoE layer, before any view exists.

    ``per_expert``: ``experts[proj]`` lists one record per expert.
    ``slab`` / fused: ``stacked[proj]`` is the 3-D record (``gate_up`` for fused).
    ``orientation`` is the fused stacks' native orientation: ``"kn"``
    (``[E, H, 2I]``, as GPT-OSS and Llama-4 save) or ``"nk"`` (``[E, 2I, H]``).
    """

    layer_index: int
    layout: str
    experts: Mapping[str, tuple[TensorRecord, ...]]
    stacked: Mapping[str, TensorRecord]
    biases: Mapping[str, TensorRecord]
    orientation: str = "kn"


def discover(
    tensors: Mapping[str, TensorRecord], config: Mapping[str, Any] | None, *, source: str
) -> tuple[str, list[LayerPlan]]:
    """Find the expert stacks among ``tensors``; return the layout and layers in order.

    Every tensor under an experts block is claimed by a stack or refused:
    nothing is silently dropped, and encoded values are never served as weights.

    Raises
    ------
    FormatError
        A quantization the library does not serve, an unclaimed tensor under
        an experts block, mixed layouts, a missing expert or projection, a
        fused layout that cannot be told apart, or ranks and shapes that
        disagree within a layer.
    """
    method = quantization_method(config)
    if method is not None:
        raise FormatError(
            f"{source}: config.json quantization_config.quant_method {method!r} is not served by mmapstore; "
            "refusing rather than serving encoded values as weights"
        )
    slab: dict[int, dict[str, TensorRecord]] = {}
    per_expert: dict[int, dict[str, dict[int, TensorRecord]]] = {}
    fused: dict[int, dict[str, TensorRecord]] = {}
    for name, record in tensors.items():
        match = _SLAB.fullmatch(name)
        if match:
            slab.setdefault(int(match["layer"]), {})[match["proj"]] = record
            continue
        match = _PER_EXPERT.fullmatch(name)
        if match:
            by_proj = per_expert.setdefault(int(match["layer"]), {})
            by_expert = by_proj.setdefault(_PROJ[match["proj"]], {})
            expert = int(match["expert"])
            if expert in by_expert:  # e.g. w1 and gate_proj of the same expert
                raise FormatError(
                    f"{source}: tensors {by_expert[expert].name!r} and {name!r} are the same expert projection"
                )
            by_expert[expert] = record
            continue
        match = _FUSED.fullmatch(name)
        if match:
            key = ("gate_up" if match["proj"] == "gate_up_proj" else "down") + ("_bias" if match["bias"] else "")
            layer = fused.setdefault(int(match["layer"]), {})
            if key in layer:  # two prefixes (or blocks) fused for the same layer
                raise FormatError(f"{source}: tensors {layer[key].name!r} and {name!r} are the same fused stack")
            layer[key] = record
            continue
        if _UNDER_EXPERTS.search(name):
            raise _unclaimed(name, source, config)
    _check_dtypes(slab, per_expert, fused, source)
    found = [kind for kind, layers in (("slab", slab), ("per_expert", per_expert), ("fused", fused)) if layers]
    if len(found) > 1:
        raise FormatError(f"{source}: mixed expert layouts {found}; one checkpoint must use one")
    if not found:
        raise FormatError(f"{source}: no MoE expert tensors found (no slab, per-expert or fused stacks)")
    if found == ["slab"]:
        return "slab", [_slab_layer(layer, slab[layer], source) for layer in sorted(slab)]
    if found == ["per_expert"]:
        return "per_expert", [_per_expert_layer(layer, per_expert[layer], source) for layer in sorted(per_expert)]
    layout = _fused_layout(config, source, fused)
    return layout, [_fused_layer(layer, fused[layer], layout, config, source) for layer in sorted(fused)]


def _check_dtypes(
    slab: Mapping[int, Mapping[str, TensorRecord]],
    per_expert: Mapping[int, Mapping[str, Mapping[int, TensorRecord]]],
    fused: Mapping[int, Mapping[str, TensorRecord]],
    source: str,
) -> None:
    """Every claimed record must have a dtype whose values mmapstore knows."""
    records = [record for layer in (*slab.values(), *fused.values()) for record in layer.values()]
    records += [record for layer in per_expert.values() for by in layer.values() for record in by.values()]
    for record in records:
        if not record.dtype.known:
            raise FormatError(
                f"{source}: tensor {record.name!r} ({record.path}): dtype {record.dtype.code!r} cannot be "
                "served as expert weights"
            )


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
    if count > MAX_EXPERTS:
        raise FormatError(f"{source}: MoE layer {layer}: expert id {count - 1} is over the {MAX_EXPERTS} limit")
    for proj in ("gate", "up", "down"):
        by_expert = found[proj]
        if len(by_expert) != count:
            missing = [expert for expert in range(count) if expert not in by_expert][:8]
            raise FormatError(
                f"{source}: MoE layer {layer} {proj}: experts {missing} missing (found {len(by_expert)} of {count})"
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


def _fused_layout(config: Mapping[str, Any] | None, source: str, fused: Mapping[int, Mapping[str, TensorRecord]]) -> str:
    """Interleaved (GPT-OSS) or concatenated (Llama-4, Qwen3-VL-MoE) gate/up, from
    ``config.json``'s model_type: the two share names and shapes, so a guess
    from the name would silently swap gate and up rows."""
    kind = model_type(config)
    text_kind = model_type((config or {}).get("text_config") if isinstance((config or {}).get("text_config"), Mapping) else None)
    for candidate in (kind, text_kind):
        if candidate in _INTERLEAVED_MODELS:
            return "fused_interleaved"
        if candidate in _CONCATENATED_MODELS:
            return "fused_concatenated"
    example = next(iter(next(iter(fused.values())).values())).name
    raise FormatError(
        f"{source}: fused expert stack {example!r} with model_type {kind!r}: cannot tell whether gate and up are "
        "interleaved (gpt_oss) or concatenated (llama4, qwen3_vl_moe); config.json with a known model_type is needed"
    )


def _fused_orientation(
    gate_up: TensorRecord, down: TensorRecord, config: Mapping[str, Any] | None, source: str
) -> str:
    """``"kn"`` for ``gate_up [E, H, 2I]``, ``"nk"`` for ``[E, 2I, H]``, decided by
    the shapes against ``hidden_size``; refused when both readings fit."""
    hidden = _config_int(config, "hidden_size")
    _, first, second = gate_up.shape
    either = model_type(config) in _EITHER_ORIENTATION_MODELS or model_type(
        (config or {}).get("text_config") if isinstance((config or {}).get("text_config"), Mapping) else None
    ) in _EITHER_ORIENTATION_MODELS
    if hidden is None:
        if either:
            raise FormatError(
                f"{source}: tensor {gate_up.name!r} {list(gate_up.shape)}: config.json has no hidden_size, "
                "so the orientation of the fused stack cannot be decided"
            )
        return "kn"
    fits_kn = first == hidden and second % 2 == 0 and down.shape[1:] == (second // 2, hidden)
    fits_nk = either and second == hidden and first % 2 == 0 and down.shape[1:] == (hidden, first // 2)
    if fits_kn and fits_nk:
        raise FormatError(
            f"{source}: tensor {gate_up.name!r} {list(gate_up.shape)} with hidden_size {hidden}: both "
            "[E, H, 2I] and [E, 2I, H] fit (H == 2I); refusing to guess the orientation"
        )
    if fits_kn:
        return "kn"
    if fits_nk:
        return "nk"
    expected = f"[E, {hidden}, 2I] and down_proj [E, I, {hidden}]" + (
        f" (or [E, 2I, {hidden}] and [E, {hidden}, I])" if either else ""
    )
    raise FormatError(
        f"{source}: fused stacks {gate_up.name!r} {list(gate_up.shape)} and {down.name!r} {list(down.shape)} "
        f"do not fit hidden_size {hidden}: expected gate_up_proj {expected}"
    )


def _fused_layer(
    layer: int, found: dict[str, TensorRecord], layout: str, config: Mapping[str, Any] | None, source: str
) -> LayerPlan:
    _require(found, ("gate_up", "down"), layer, source)
    gate_up, down = found["gate_up"], found["down"]
    _rank(gate_up, 3, source)
    _rank(down, 3, source)
    orientation = _fused_orientation(gate_up, down, config, source)
    fused_axis = 2 if orientation == "kn" else 1
    if gate_up.shape[fused_axis] % 2:
        raise FormatError(
            f"{source}: tensor {gate_up.name!r}: fused axis {gate_up.shape[fused_axis]} must be even "
            "(gate and up fused)"
        )
    biases = {key: record for key, record in found.items() if key.endswith("_bias")}
    experts, ffn = gate_up.shape[0], gate_up.shape[fused_axis] // 2
    hidden = down.shape[2] if orientation == "kn" else down.shape[1]
    expected_bias = {"gate_up_bias": (experts, 2 * ffn), "down_bias": (experts, hidden)}
    for key, record in biases.items():
        if record.shape != expected_bias[key]:
            raise FormatError(
                f"{source}: tensor {record.name!r}: expected shape {list(expected_bias[key])}, found {list(record.shape)}"
            )
    stacked = {"gate_up": gate_up, "down": down}
    return LayerPlan(layer, layout, {}, stacked, biases, orientation)

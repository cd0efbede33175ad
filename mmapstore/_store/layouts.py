"""Layout discovery: which tensors are expert stacks and their parts, from names and config.

Three layouts, one per checkpoint:

- ``slab``: ``blk.{L}.ffn_{gate,up,down}_exps.{weight,scale,bias}``, 3-D
  ``[E, ...]`` stacks (what ``mmapstore convert`` writes, orientation and
  encodings in its manifest; GGUF files use the same names, ``[E, out, in]``).
- ``per_expert``: one 2-D ``[out, in]`` tensor per expert and part. Mixtral
  (``block_sparse_moe.experts.{e}.w1/w3/w2``), Qwen2/3-MoE, DeepSeek-V2/V3,
  OLMoE, LLaDA2-MoE (``mlp.experts.{e}.{gate,up,down}_proj``); FP8 block
  checkpoints add ``weight_scale_inv`` (or ``weight_scale``).  Dense MLPs and
  shared experts (``mlp.shared_expert(s).*``) do not match.
- ``fused``: GPT-OSS (``mlp.experts.gate_up_proj``, gate/up interleaved;
  MXFP4 ``_blocks``/``_scales``), Llama-4 and Qwen3-VL-MoE (gate then up),
  ``[E, hidden, 2*ffn]`` plus ``down_proj`` ``[E, ffn, hidden]``, and ``_bias``.

Every tensor under an experts block is claimed by a part or refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .._dtypes import DType
from .._errors import FormatError
from .._geometry import Encoding
from ..formats._records import TensorRecord
from .packed import packed_layer, packed_part, packed_slab_layer, packed_weight
from .schemes import QuantScheme, model_type, quant_scheme, text_config

__all__ = ["LAYOUTS", "LayerPlan", "discover"]

LAYOUTS = ("slab", "per_expert", "fused_interleaved", "fused_concatenated", "dbrx")

# Canonical ASCII numbers only: `\d` would accept Unicode digits and leading
# zeros would let `experts.1` and `experts.01` collide on one key.
_NUM = r"(?:0|[1-9][0-9]{0,8})"
_SLAB = re.compile(
    rf"blk\.(?P<layer>{_NUM})\.ffn_(?P<proj>gate|up|down)_exps\.(?P<part>weight|scale|bias|zero|g_idx|global_scale|shape)"
)
_PER_EXPERT = re.compile(
    rf"(?P<prefix>(?:[\w]+\.)*?)layers\.(?P<layer>{_NUM})\.(?P<block>block_sparse_moe|mlp|feed_forward|ffn|mixer)"
    rf"\.experts\.(?P<expert>{_NUM})\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)"
    r"\.(?P<suffix>weight|weight_scale_inv|weight_scale|weight_packed|weight_zero_point|weight_g_idx"
    r"|weight_global_scale|weight_shape|qweight|qzeros|scales|g_idx)"
)
_FUSED = re.compile(
    rf"(?P<prefix>(?:[\w]+\.)*?)layers\.(?P<layer>{_NUM})\.(?P<block>mlp|feed_forward)"
    r"\.experts\.(?P<proj>gate_up_proj|down_proj)(?P<suffix>_bias|_blocks|_scales)?"
)
# GraniteMoE / Granite-4 (block_sparse_moe) and JetMoE (mlp): input_linear [E, 2I, H]
# (gate rows first), output_linear [E, H, I].
_LINEAR_FUSED = re.compile(
    rf"(?P<prefix>(?:[\w]+\.)*?)layers\.(?P<layer>{_NUM})\.(?P<block>block_sparse_moe|mlp)"
    r"\.(?P<proj>input_linear|output_linear)\.weight"
)
# DBRX: w1 (gate) and v1 (up) [E*I, H] hold [out, in] slabs; w2 [E*I, H] holds [in, out] slabs.
_DBRX = re.compile(rf"(?P<prefix>(?:[\w]+\.)*?)blocks\.(?P<layer>{_NUM})\.ffn\.experts\.mlp\.(?P<proj>w1|v1|w2)")
# GGUF: fused gate/up stack (gate rows first), and the legacy one-tensor-per-expert names.
_GGUF_FUSED = re.compile(rf"blk\.(?P<layer>{_NUM})\.ffn_gate_up_exps\.(?P<part>weight|bias)")
_GGUF_PER_EXPERT = re.compile(rf"blk\.(?P<layer>{_NUM})\.ffn_(?P<proj>gate|up|down)\.(?P<expert>{_NUM})\.weight")
_FUSED_PART = {None: "weight", "_bias": "bias", "_blocks": "weight", "_scales": "scale"}
_UNDER_EXPERTS = re.compile(r"(?:^|\.)experts\.|_exps\.|(?:^|\.)blk\.[^.]+\.ffn_(?:gate|up|down)\.[^.]+\.")
# JetMoE's mixture of attention heads: attention weights, not routed FFN experts.
_ATTENTION_EXPERTS = re.compile(r"(?:^|\.)self_attention\.experts\.")
_PROJ = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
# Fused gate_up: how gate and up share the last axis, by model_type.
_INTERLEAVED_MODELS = frozenset({"gpt_oss"})
_CONCATENATED_MODELS = frozenset({"llama4", "llama4_text", "qwen3_vl_moe", "qwen3_vl_moe_text"})
_LINEAR_FUSED_MODELS = frozenset({"granitemoe", "granitemoeshared", "granitemoehybrid", "jetmoe"})
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


def _config_int(config: Mapping[str, Any] | None, *keys: str) -> int | None:
    """The first positive integer under ``keys`` in ``config`` or its ``text_config``."""
    for holder in (config or {}, text_config(config)):
        for key in keys:
            value = holder.get(key)
            if type(value) is int and value > 0:
                return value
    return None


def _per_expert_part(suffix: str, scheme: QuantScheme) -> str | None:
    """The part a per-expert tensor suffix is under ``scheme``; None: unclaimed."""
    if suffix == "weight":
        return "weight"
    if suffix == scheme.scale_suffix:
        return "scale"
    return packed_part(suffix, scheme)


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

    ``per_expert``: ``experts[proj][part]`` lists one record per expert.
    ``slab`` / fused: ``stacked[proj][part]`` is the ``[E, ...]`` record
    (``proj`` is ``gate_up`` and ``down`` for fused layouts).
    ``encodings[proj]`` says how each projection's parts make values.
    ``orientation`` is the native orientation of 2-D weight slabs: ``"kn"``
    (``[in, out]``) or ``"nk"`` (``[out, in]``).
    """

    layer_index: int
    layout: str
    experts: Mapping[str, Mapping[str, tuple[TensorRecord, ...]]]
    stacked: Mapping[str, Mapping[str, TensorRecord]]
    encodings: Mapping[str, Encoding]
    orientation: str = "kn"
    projections: tuple[str, ...] = field(default=("gate", "up", "down"))
    orientations: Mapping[str, str] = field(default_factory=dict)  # per projection, where they differ
    num_experts: int = 0  # DBRX: experts folded into the first axis of each record
    mtp: bool = False  # DeepSeek's next-token-prediction layer (speculative decoding only)
    logical: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # packed stacks: (k, n) per projection

    def orientation_of(self, proj: str) -> str:
        return self.orientations.get(proj, self.orientation)


def discover(
    tensors: Mapping[str, TensorRecord],
    config: Mapping[str, Any] | None,
    *,
    source: str,
    slab_encodings: Mapping[str, Encoding] | None = None,
    slab_orientation: str = "kn",
) -> tuple[str, list[LayerPlan]]:
    """Find the expert stacks among ``tensors``; return the layout and layers in order.

    Every tensor under an experts block is claimed by a part of a stack or
    refused: nothing is silently dropped, and encoded values are never served
    as weights.  ``slab_encodings`` (stack name ``blk.{L}.ffn_{proj}_exps`` ->
    encoding) and ``slab_orientation`` describe slab stacks (from a slab
    store's manifest, or GGUF's ``[E, out, in]``).

    Raises
    ------
    FormatError
        A quantization the library does not serve, an unclaimed tensor under
        an experts block, mixed layouts, a missing expert, projection or
        part, a fused layout that cannot be told apart, or ranks, shapes and
        dtypes that disagree within a layer.
    """
    scheme = quant_scheme(config, source=source) if slab_encodings is None else QuantScheme(None)
    slab: dict[int, dict[str, dict[str, TensorRecord]]] = {}
    per_expert: dict[int, dict[str, dict[str, dict[int, TensorRecord]]]] = {}
    fused: dict[int, dict[str, dict[str, TensorRecord]]] = {}
    linear: dict[int, dict[str, dict[str, TensorRecord]]] = {}
    gguf_fused: dict[int, dict[str, dict[str, TensorRecord]]] = {}
    dbrx: dict[int, dict[str, dict[str, TensorRecord]]] = {}
    for name, record in tensors.items():
        # Cheap substring tests first: most names of a real checkpoint are
        # per-expert weights or plainly not experts at all.
        if ".experts." in name:
            match = _PER_EXPERT.fullmatch(name)
            if match:
                layer_text, proj_name, expert_text, suffix = match.group("layer", "proj", "expert", "suffix")
                part = "weight" if suffix == "weight" else _per_expert_part(suffix, scheme)
                if part is not None:
                    expert_parts = per_expert.setdefault(int(layer_text), {}).setdefault(_PROJ[proj_name], {})
                    by_expert = expert_parts.setdefault(part, {})
                    expert = int(expert_text)
                    if expert in by_expert:  # e.g. w1 and gate_proj of the same expert
                        raise FormatError(
                            f"{source}: tensors {by_expert[expert].name!r} and {name!r} are the same expert projection"
                        )
                    by_expert[expert] = record
                    continue
            match = _FUSED.fullmatch(name)
            if match and (match["suffix"] not in ("_blocks", "_scales") or scheme.mxfp4):
                proj = "gate_up" if match["proj"] == "gate_up_proj" else "down"
                by_part = fused.setdefault(int(match["layer"]), {}).setdefault(proj, {})
                part = _FUSED_PART[match["suffix"]]
                if part in by_part:  # two prefixes (or blocks) fused for the same layer
                    raise FormatError(f"{source}: tensors {by_part[part].name!r} and {name!r} are the same fused stack")
                by_part[part] = record
                continue
            match = _DBRX.fullmatch(name)
            if match:
                proj = {"w1": "gate", "v1": "up", "w2": "down"}[match["proj"]]
                by_part = dbrx.setdefault(int(match["layer"]), {}).setdefault(proj, {})
                if "weight" in by_part:
                    raise FormatError(f"{source}: tensors {by_part['weight'].name!r} and {name!r} are the same stack")
                by_part["weight"] = record
                continue
        elif name.startswith("blk."):
            match = _SLAB.fullmatch(name)
            if match:
                slab.setdefault(int(match["layer"]), {}).setdefault(match["proj"], {})[match["part"]] = record
                continue
            match = _GGUF_FUSED.fullmatch(name)
            if match:
                by_part = gguf_fused.setdefault(int(match["layer"]), {}).setdefault("gate_up", {})
                by_part[match["part"]] = record
                continue
            match = _GGUF_PER_EXPERT.fullmatch(name)
            if match:
                legacy = per_expert.setdefault(int(match["layer"]), {}).setdefault(match["proj"], {})
                legacy.setdefault("weight", {})[int(match["expert"])] = record
                continue
        elif "_linear." in name:
            match = _LINEAR_FUSED.fullmatch(name)
            if match:
                proj = "gate_up" if match["proj"] == "input_linear" else "down"
                by_part = linear.setdefault(int(match["layer"]), {}).setdefault(proj, {})
                if "weight" in by_part:
                    raise FormatError(
                        f"{source}: tensors {by_part['weight'].name!r} and {name!r} are the same fused stack"
                    )
                by_part["weight"] = record
                continue
        if _UNDER_EXPERTS.search(name) and not _ATTENTION_EXPERTS.search(name):
            raise _unclaimed(name, source, config)
    if gguf_fused:
        return "fused_concatenated", [
            _gguf_fused_layer(layer, gguf_fused[layer]["gate_up"], slab.pop(layer, {}), source)
            for layer in sorted(gguf_fused)
        ] + _leftover_slab(slab, source)
    kinds = (("slab", slab), ("per_expert", per_expert), ("fused", fused), ("linear", linear), ("dbrx", dbrx))
    found = [kind for kind, layers in kinds if layers]
    if len(found) > 1:
        raise FormatError(f"{source}: mixed expert layouts {found}; one checkpoint must use one")
    if not found:
        raise FormatError(f"{source}: no MoE expert tensors found (no slab, per-expert or fused stacks)")
    if found == ["slab"]:
        encodings = slab_encodings or {}
        plans = [_slab_layer(layer, slab[layer], encodings, slab_orientation, source) for layer in sorted(slab)]
        return "slab", _mark_mtp(plans, config)
    if scheme.method is not None and found != ["per_expert"] and not (found == ["fused"] and scheme.mxfp4):
        raise FormatError(f"{source}: quant_method {scheme.method!r} on {found[0]} expert stacks is not served")
    if found == ["per_expert"]:
        plans = [_per_expert_layer(layer, per_expert[layer], scheme, source) for layer in sorted(per_expert)]
        return "per_expert", _mark_mtp(plans, config)
    if found == ["linear"]:
        return "fused_concatenated", [_linear_layer(layer, linear[layer], config, source) for layer in sorted(linear)]
    if found == ["dbrx"]:
        return "dbrx", [_dbrx_layer(layer, dbrx[layer], config, source) for layer in sorted(dbrx)]
    layout = _fused_layout(config, source, fused)
    return layout, [_fused_layer(layer, fused[layer], layout, scheme, config, source) for layer in sorted(fused)]


def _known(record: TensorRecord, source: str) -> None:
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


def _shape(record: TensorRecord, expected: tuple[int, ...], source: str, what: str) -> None:
    if record.shape != expected:
        raise FormatError(
            f"{source}: tensor {record.name!r}: {what}: expected shape {list(expected)}, found {list(record.shape)}"
        )


def _dtype(record: TensorRecord, codes: tuple[str, ...], source: str, what: str) -> None:
    if record.dtype.code not in codes:
        raise FormatError(
            f"{source}: tensor {record.name!r}: {what} must be {' or '.join(codes)}, found {record.dtype.code}"
        )


def _fp8_grid(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    *lead, rows, cols = weight_shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def _slab_layer(
    layer: int,
    found: dict[str, dict[str, TensorRecord]],
    encodings: Mapping[str, Encoding],
    orientation: str,
    source: str,
) -> LayerPlan:
    _require(found, ("gate", "up", "down"), layer, source)
    chosen: dict[str, Encoding] = {}
    for proj, parts in found.items():
        name = f"blk.{layer}.ffn_{proj}_exps"
        if "weight" not in parts:
            raise FormatError(f"{source}: stack {name!r} has parts {sorted(parts)} but no weight")
        weight = parts["weight"]
        _known(weight, source)
        encoding = encodings.get(name)
        if encoding is None:
            encoding = _implied_encoding(weight.dtype)
        chosen[proj] = encoding
        _rank(weight, 4 if encoding.kind == "mxfp4" else 3, source)
        if encoding.kind == "mxfp4":
            scale = parts.get("scale")
            if scale is None or orientation != "nk":
                raise FormatError(f"{source}: stack {name!r} is MXFP4: it needs a scale part and orientation 'nk'")
            _dtype(weight, ("U8",), source, "MXFP4 blocks")
            _dtype(scale, ("U8", "F8_E8M0"), source, "MXFP4 scales")
            if weight.shape[3] != 16:
                raise FormatError(f"{source}: tensor {weight.name!r}: last axis must be 16 bytes (32 E2M1 values)")
            _shape(scale, weight.shape[:3], source, "one E8M0 scale per 32 values")
        elif encoding.kind == "fp8_block":
            scale = parts.get("scale")
            if scale is None:
                raise FormatError(f"{source}: stack {name!r} is {encoding.describe()} but has no scale part")
            _dtype(weight, ("F8_E4M3",), source, "an FP8 block weight")
            _dtype(scale, ("F32", "BF16"), source, "an FP8 block scale")
            _shape(scale, _fp8_grid(weight.shape, encoding.block), source, f"scale grid of {encoding.describe()}")
        elif encoding.kind == "ggml":
            if weight.dtype.code not in ("U8", encoding.dtype.code):
                raise FormatError(f"{source}: stack {name!r} is {encoding.describe()} but holds {weight.dtype.code}")
            if weight.dtype.code == "U8" and weight.shape[2] % encoding.dtype.block_nbytes:
                raise FormatError(
                    f"{source}: tensor {weight.name!r}: rows of {weight.shape[2]} bytes are not whole "
                    f"{encoding.dtype.code} blocks of {encoding.dtype.block_nbytes} bytes"
                )
        if encoding.packed:
            pass  # checked below, with the other projections that pin its logical shape
        elif set(parts) - _ALLOWED_PARTS.get(encoding.kind, {"weight", "bias"}):
            extra = sorted(set(parts) - _ALLOWED_PARTS.get(encoding.kind, {"weight", "bias"}))[0]
            raise FormatError(
                f"{source}: tensor {parts[extra].name!r}: a {extra} part on a {encoding.describe()} stack; "
                "the manifest must name its encoding"
            )
        if "bias" in parts:
            bias = parts["bias"]
            _known(bias, source)
            out = weight.shape[2] if orientation == "kn" else weight.shape[1]
            _shape(bias, (weight.shape[0], out), source, "bias [E, out]")
    if any(encoding.packed for encoding in chosen.values()):
        logical = packed_slab_layer(found, chosen, orientation, source)
        return LayerPlan(layer, "slab", {}, found, chosen, orientation, logical=logical)
    return LayerPlan(layer, "slab", {}, found, chosen, orientation)


_ALLOWED_PARTS = {"fp8_block": {"weight", "scale", "bias"}, "mxfp4": {"weight", "scale", "bias"}}


def _implied_encoding(dtype: DType) -> Encoding:
    """A slab record's encoding when no manifest names one: ggml block types
    carry their own scales; anything else is plain values."""
    block_elems = int(getattr(dtype, "block_elems", 1))
    if block_elems > 1:
        return Encoding("ggml", dtype, (1, block_elems))
    return Encoding("plain", dtype)


def _per_expert_layer(
    layer: int, found: dict[str, dict[str, dict[int, TensorRecord]]], scheme: QuantScheme, source: str
) -> LayerPlan:
    if "gate" not in found and "up" in found and "down" in found:
        example = next(iter(found["up"]["weight"].values())).name if "weight" in found["up"] else "?"
        raise FormatError(
            f"{source}: MoE layer {layer} ({example!r}): experts without a gate projection (ReLU^2 experts, as "
            "Nemotron-H has) are not served: mmapstore's stacks are gated (gate, up, down)"
        )
    _require(found, ("gate", "up", "down"), layer, source)
    count = max(max(by_expert) for parts in found.values() for by_expert in parts.values()) + 1
    if count > MAX_EXPERTS:
        raise FormatError(f"{source}: MoE layer {layer}: expert id {count - 1} is over the {MAX_EXPERTS} limit")
    experts: dict[str, dict[str, tuple[TensorRecord, ...]]] = {}
    encodings: dict[str, Encoding] = {}
    packed: dict[str, dict[str, TensorRecord]] = {}
    for proj in ("gate", "up", "down"):
        parts = found[proj]
        if "weight" not in parts:
            example = next(iter(next(iter(parts.values())).values())).name
            raise FormatError(f"{source}: MoE layer {layer} {proj}: {example!r} has no weight beside it")
        records_of: dict[str, tuple[TensorRecord, ...]] = {}
        for part, by_expert in parts.items():
            if len(by_expert) != count:
                missing = [expert for expert in range(count) if expert not in by_expert][:8]
                raise FormatError(
                    f"{source}: MoE layer {layer} {proj} {part}: experts {missing} missing "
                    f"(found {len(by_expert)} of {count})"
                )
            records = tuple(by_expert[expert] for expert in range(count))
            head = records[0]
            _known(head, source)
            if part in ("weight", "scale"):  # g_idx, shape, global_scale: 1-D, checked with their packed weight
                _rank(head, 2, source)
            # every record like the head: then its dtype and rank checks hold for all
            head_shape, head_dtype = head.shape, head.dtype
            for record in records:
                if record.shape != head_shape or (record.dtype is not head_dtype and record.dtype != head_dtype):
                    raise FormatError(
                        f"{source}: tensor {record.name!r}: {record.dtype.code} {list(record.shape)} differs from "
                        f"{head.name!r}: {head.dtype.code} {list(head.shape)}"
                    )
            records_of[part] = records
        weight = records_of["weight"][0]
        experts[proj] = records_of
        if packed_weight(weight):
            packed[proj] = {part: records[0] for part, records in records_of.items()}
            continue
        extra = sorted(set(records_of) - ({"weight", "scale"} if scheme.fp8 else {"weight"}))
        if extra:
            raise FormatError(
                f"{source}: tensor {records_of[extra[0]][0].name!r} sits beside the unpacked weight {weight.name!r}; "
                f"a {extra[0]} part belongs to a packed weight: refusing rather than dropping it"
            )
        encodings[proj] = _per_expert_encoding(weight, records_of.get("scale"), scheme, source)
    if packed:
        if len(packed) != 3:
            plain = [proj for proj in ("gate", "up", "down") if proj not in packed]
            raise FormatError(
                f"{source}: MoE layer {layer}: {sorted(packed)} are packed but {plain} are not "
                f"({experts[plain[0]]['weight'][0].name!r}); mixed experts are not served"
            )
        encodings, logical, orientation = packed_layer(packed, scheme, source)
        return LayerPlan(layer, "per_expert", experts, {}, encodings, orientation, logical=logical)
    return LayerPlan(layer, "per_expert", experts, {}, encodings, "nk")


def _gguf_fused_layer(
    layer: int, fused: dict[str, TensorRecord], rest: dict[str, dict[str, TensorRecord]], source: str
) -> LayerPlan:
    """GGUF ``ffn_gate_up_exps`` (``[E, 2I, H]``, gate rows first) beside ``ffn_down_exps``."""
    if set(rest) != {"down"}:
        raise FormatError(
            f"{source}: MoE layer {layer} has ffn_gate_up_exps and also {sorted(set(rest) - {'down'}) or 'no'} "
            "separate gate/up stacks; expected exactly ffn_gate_up_exps and ffn_down_exps"
        )
    if "weight" not in fused:
        raise FormatError(f"{source}: MoE layer {layer}: blk.{layer}.ffn_gate_up_exps.bias has no weight beside it")
    found = {"gate_up": fused, "down": rest["down"]}
    for parts in found.values():
        for record in parts.values():
            _known(record, source)
        _rank(parts["weight"], 3, source)
    gate_up, down = found["gate_up"]["weight"], found["down"]["weight"]
    experts, ffn2, hidden = gate_up.shape
    if ffn2 % 2 or down.shape != (experts, hidden, ffn2 // 2):
        raise FormatError(
            f"{source}: {gate_up.name!r} {list(gate_up.shape)} and {down.name!r} {list(down.shape)} are not "
            "[E, 2I, H] and [E, H, I]"
        )
    _bias_shapes(found, experts, ffn2, hidden, source)
    encodings = {proj: _implied_encoding(found[proj]["weight"].dtype) for proj in ("gate_up", "down")}
    return LayerPlan(layer, "fused_concatenated", {}, found, encodings, "nk", ("gate_up", "down"))


def _leftover_slab(slab: dict[int, dict[str, dict[str, TensorRecord]]], source: str) -> list[LayerPlan]:
    if slab:
        layer = min(slab)
        raise FormatError(f"{source}: MoE layer {layer} has separate gate/up stacks while others are fused")
    return []


def _per_expert_encoding(
    weight: TensorRecord, scales: tuple[TensorRecord, ...] | None, scheme: QuantScheme, source: str
) -> Encoding:
    """FP8 block when the checkpoint declares it and the weight is FP8 with a
    scale beside it; plain for an unquantized module (``modules_to_not_convert``
    and ``ignore`` lists leave those in bf16); refused in between."""
    if not scheme.fp8:
        return _implied_encoding(weight.dtype)
    if weight.dtype.code == "F8_E4M3":
        if scales is None:
            raise FormatError(
                f"{source}: tensor {weight.name!r} is F8_E4M3 under quant_method {scheme.method!r} but has no "
                f"{scheme.scale_suffix} beside it; refusing to serve FP8 codes as weights"
            )
        scale = scales[0]
        _dtype(scale, ("F32", "BF16"), source, f"{scheme.scale_suffix}")
        _shape(
            scale,
            _fp8_grid(weight.shape, scheme.block),
            source,
            f"{scheme.block[0]}x{scheme.block[1]} block scale grid of {list(weight.shape)}",
        )
        return Encoding("fp8_block", weight.dtype, scheme.block)
    if scales is not None:
        raise FormatError(
            f"{source}: tensor {scales[0].name!r} scales a {weight.dtype.code} weight; FP8 block scales belong "
            "to F8_E4M3 weights"
        )
    if weight.dtype.code.startswith("F8"):
        raise FormatError(
            f"{source}: tensor {weight.name!r}: {weight.dtype.code} under quant_method {scheme.method!r} is not served"
        )
    return Encoding("plain", weight.dtype)


def _fused_layout(
    config: Mapping[str, Any] | None, source: str, fused: Mapping[int, Mapping[str, Mapping[str, TensorRecord]]]
) -> str:
    """Interleaved (GPT-OSS) or concatenated (Llama-4, Qwen3-VL-MoE) gate/up, from
    ``config.json``'s model_type: the two share names and shapes, so a guess
    from the name would silently swap gate and up rows."""
    kind = model_type(config)
    for candidate in (kind, model_type(text_config(config))):
        if candidate in _INTERLEAVED_MODELS:
            return "fused_interleaved"
        if candidate in _CONCATENATED_MODELS:
            return "fused_concatenated"
    example = next(iter(next(iter(next(iter(fused.values())).values())).values())).name
    raise FormatError(
        f"{source}: fused expert stack {example!r} with model_type {kind!r}: cannot tell whether gate and up are "
        "interleaved (gpt_oss) or concatenated (llama4, qwen3_vl_moe); config.json with a known model_type is needed"
    )


def _fused_orientation(
    gate_up: tuple[int, ...], down: tuple[int, ...], name: str, config: Mapping[str, Any] | None, source: str
) -> str:
    """``"kn"`` for ``gate_up [E, H, 2I]``, ``"nk"`` for ``[E, 2I, H]``, decided by
    the shapes (``[E, 3]`` logical, blocks unpacked) against ``hidden_size``;
    refused when both readings fit or neither does."""
    hidden = _config_int(config, "hidden_size")
    _, first, second = gate_up
    either = model_type(config) in _EITHER_ORIENTATION_MODELS or (
        model_type(text_config(config)) in _EITHER_ORIENTATION_MODELS
    )
    if hidden is None:
        if either:
            raise FormatError(
                f"{source}: tensor {name!r} {list(gate_up)}: config.json has no hidden_size, "
                "so the orientation of the fused stack cannot be decided"
            )
        return "kn"
    fits_kn = first == hidden and second % 2 == 0 and down[1:] == (second // 2, hidden)
    fits_nk = either and second == hidden and first % 2 == 0 and down[1:] == (hidden, first // 2)
    if fits_kn and fits_nk:
        raise FormatError(
            f"{source}: tensor {name!r} {list(gate_up)} with hidden_size {hidden}: both "
            "[E, H, 2I] and [E, 2I, H] fit; refusing to guess the orientation"
        )
    if fits_kn:
        return "kn"
    if fits_nk:
        return "nk"
    expected = f"[E, {hidden}, 2I] and down_proj [E, I, {hidden}]" + (
        f" (or [E, 2I, {hidden}] and [E, {hidden}, I])" if either else ""
    )
    raise FormatError(
        f"{source}: fused stacks {name!r} {list(gate_up)} and down_proj {list(down)} "
        f"do not fit hidden_size {hidden}: expected gate_up_proj {expected}"
    )


def _fused_layer(
    layer: int,
    found: dict[str, dict[str, TensorRecord]],
    layout: str,
    scheme: QuantScheme,
    config: Mapping[str, Any] | None,
    source: str,
) -> LayerPlan:
    _require(found, ("gate_up", "down"), layer, source)
    for proj in ("gate_up", "down"):
        if "weight" not in found[proj]:
            part = next(iter(found[proj].values()))
            raise FormatError(f"{source}: MoE layer {layer}: {part.name!r} has no {proj}_proj weight beside it")
        for record in found[proj].values():
            _known(record, source)
    if scheme.mxfp4:
        return _mxfp4_layer(layer, found, layout, config, source)
    gate_up, down = found["gate_up"]["weight"], found["down"]["weight"]
    _rank(gate_up, 3, source)
    _rank(down, 3, source)
    orientation = _fused_orientation(gate_up.shape, down.shape, gate_up.name, config, source)
    experts = gate_up.shape[0]
    ffn2 = gate_up.shape[2] if orientation == "kn" else gate_up.shape[1]
    hidden = down.shape[2] if orientation == "kn" else down.shape[1]
    _bias_shapes(found, experts, ffn2, hidden, source)
    encodings = {proj: Encoding("plain", found[proj]["weight"].dtype) for proj in ("gate_up", "down")}
    return LayerPlan(layer, layout, {}, found, encodings, orientation, ("gate_up", "down"))


def _bias_shapes(
    found: Mapping[str, Mapping[str, TensorRecord]], experts: int, ffn2: int, hidden: int, source: str
) -> None:
    for proj, out in (("gate_up", ffn2), ("down", hidden)):
        bias = found[proj].get("bias")
        if bias is not None:
            _shape(bias, (experts, out), source, f"{proj}_proj bias [E, out]")


def _mxfp4_layer(
    layer: int, found: dict[str, dict[str, TensorRecord]], layout: str, config: Mapping[str, Any] | None, source: str
) -> LayerPlan:
    """GPT-OSS MXFP4: ``_blocks`` U8 ``[E, out, in/32, 16]``, ``_scales`` U8
    (E8M0) ``[E, out, in/32]``, native ``[out, in]``."""
    for proj in ("gate_up", "down"):
        parts = found[proj]
        blocks, scales = parts["weight"], parts.get("scale")
        if not blocks.name.endswith("_blocks") or scales is None:
            raise FormatError(
                f"{source}: tensor {blocks.name!r}: quant_method 'mxfp4' needs {proj}_proj_blocks and "
                f"{proj}_proj_scales"
            )
        _rank(blocks, 4, source)
        _dtype(blocks, ("U8",), source, "MXFP4 blocks")
        _dtype(scales, ("U8", "F8_E8M0"), source, "MXFP4 scales")
        if blocks.shape[3] != 16:
            raise FormatError(f"{source}: tensor {blocks.name!r}: last axis must be 16 bytes (32 E2M1 values)")
        _shape(scales, blocks.shape[:3], source, "one E8M0 scale per 32 values")
    gate_up, down = found["gate_up"]["weight"].shape, found["down"]["weight"].shape
    # logical [E, out, in] of each stack
    gate_up_logical = (gate_up[0], gate_up[1], gate_up[2] * 32)
    down_logical = (down[0], down[1], down[2] * 32)
    orientation = _fused_orientation(
        (gate_up[0], gate_up_logical[2], gate_up_logical[1]),
        (down[0], down_logical[2], down_logical[1]),
        found["gate_up"]["weight"].name,
        config,
        source,
    )
    if orientation != "kn":  # as [E, in, out] it must read [E, H, 2I]
        raise FormatError(f"{source}: MXFP4 stacks in an unexpected orientation")
    _bias_shapes(found, gate_up[0], gate_up[1], down[1], source)
    encodings = {proj: Encoding("mxfp4", found[proj]["weight"].dtype, (1, 32)) for proj in ("gate_up", "down")}
    return LayerPlan(layer, layout, {}, found, encodings, "nk", ("gate_up", "down"))


def _mark_mtp(plans: list[LayerPlan], config: Mapping[str, Any] | None) -> list[LayerPlan]:
    """DeepSeek-V3's next-token-prediction module sits at layer index
    ``num_hidden_layers`` and beyond (``num_nextn_predict_layers`` of them):
    marked, so it is reachable but never counted as a decoding layer."""
    extra = _config_int(config, "num_nextn_predict_layers")
    decoding = _config_int(config, "num_hidden_layers")
    if not extra or decoding is None:
        return plans
    return [replace(plan, mtp=plan.layer_index >= decoding) for plan in plans]


def _linear_layer(
    layer: int, found: dict[str, dict[str, TensorRecord]], config: Mapping[str, Any] | None, source: str
) -> LayerPlan:
    """GraniteMoE / JetMoE: ``input_linear [E, 2I, H]`` (gate rows, then up rows)
    and ``output_linear [E, H, I]``, both ``[out, in]`` per expert."""
    kind = model_type(config)
    if kind not in _LINEAR_FUSED_MODELS:
        raise FormatError(
            f"{source}: fused input_linear/output_linear stacks with model_type {kind!r}: only "
            f"{sorted(_LINEAR_FUSED_MODELS)} are known to put gate rows first; refusing to guess"
        )
    _require(found, ("gate_up", "down"), layer, source)
    gate_up, down = found["gate_up"]["weight"], found["down"]["weight"]
    for record in (gate_up, down):
        _known(record, source)
        _rank(record, 3, source)
    hidden = _config_int(config, "hidden_size")
    experts, ffn2, width = gate_up.shape
    if (hidden is not None and width != hidden) or ffn2 % 2 or down.shape != (experts, width, ffn2 // 2):
        raise FormatError(
            f"{source}: {gate_up.name!r} {list(gate_up.shape)} and {down.name!r} {list(down.shape)} are not "
            f"input_linear [E, 2I, H] and output_linear [E, H, I] (hidden_size {hidden})"
        )
    encodings = {proj: Encoding("plain", found[proj]["weight"].dtype) for proj in ("gate_up", "down")}
    return LayerPlan(layer, "fused_concatenated", {}, found, encodings, "nk", ("gate_up", "down"))


def _dbrx_layer(
    layer: int, found: dict[str, dict[str, TensorRecord]], config: Mapping[str, Any] | None, source: str
) -> LayerPlan:
    """DBRX folds the experts into the first axis: ``[E*I, H]``; w1/v1 slabs
    are ``[out, in]``, w2 slabs ``[in, out]``."""
    _require(found, ("gate", "up", "down"), layer, source)
    ffn_config = (config or {}).get("ffn_config")
    experts = ffn_config.get("moe_num_experts") if isinstance(ffn_config, Mapping) else None
    if type(experts) is not int or not 0 < experts <= MAX_EXPERTS:
        raise FormatError(
            f"{source}: DBRX expert stacks need config.json ffn_config.moe_num_experts, found {experts!r:.40}"
        )
    shape = found["gate"]["weight"].shape
    for proj in ("gate", "up", "down"):
        record = found[proj]["weight"]
        _known(record, source)
        _rank(record, 2, source)
        if record.shape != shape or shape[0] % experts:
            raise FormatError(
                f"{source}: DBRX tensor {record.name!r} {list(record.shape)}: expected [E*I, H] with E = {experts}, "
                f"like {found['gate']['weight'].name!r} {list(shape)}"
            )
    hidden = _config_int(config, "d_model", "hidden_size")
    if hidden is not None and shape[1] != hidden:
        raise FormatError(
            f"{source}: DBRX tensor {found['gate']['weight'].name!r}: second axis {shape[1]} is not d_model {hidden}"
        )
    encodings = {proj: Encoding("plain", found[proj]["weight"].dtype) for proj in ("gate", "up", "down")}
    return LayerPlan(layer, "dbrx", {}, found, encodings, "nk", orientations={"down": "kn"}, num_experts=experts)

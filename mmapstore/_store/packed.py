"""Packed 4-bit expert stacks: which tensors are their parts, and their logical shapes.

compressed-tensors (``weight_packed``, ``weight_scale``, ``weight_zero_point``,
``weight_g_idx``, ``weight_global_scale``, ``weight_shape``), AWQ and GPTQ
(``qweight``, ``scales``, ``qzeros``, ``g_idx``) pack codes along one axis, so
the packed shape does not say the logical one.  The axis that is *not* packed
does, and a gated expert's projections pin each other down: gate and up map
``H -> I`` and down ``I -> H``, so the input width of gate and up is the
output width of down and the other way round.  Reading ``weight_shape`` at
open would touch one page per expert and projection; it is a part instead,
checked against these shapes when an expert is dequantized.

Every part is checked against the shapes and dtypes its format writes; a part
the format does not have, or a required one missing, is a
:class:`~mmapstore._errors.FormatError` naming the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

from .._errors import FormatError
from .._geometry import Encoding, EncodingKind
from ..formats._records import TensorRecord
from .schemes import PackedKind, QuantScheme

__all__ = ["KN_KINDS", "packed_layer", "packed_part", "packed_slab_layer", "packed_weight"]

# Per-expert tensor suffix -> part, by family of formats.
_CT_PARTS = {
    "weight_packed": "weight",
    "weight_scale": "scale",
    "weight_zero_point": "zero",
    "weight_g_idx": "g_idx",
    "weight_global_scale": "global_scale",
    "weight_shape": "shape",
}
_AUTO_PARTS = {"qweight": "weight", "scales": "scale", "qzeros": "zero", "g_idx": "g_idx"}
_CT_KINDS = ("int4_group", "nvfp4", "mxfp4_packed")
KN_KINDS = ("awq", "gptq")
"""Packed kinds stored ``[in, out]``; the compressed-tensors kinds are ``[out, in]``."""
_FLOATS = ("BF16", "F16", "F32")
_PROJECTIONS = ("gate", "up", "down")


def packed_part(suffix: str, scheme: QuantScheme) -> str | None:
    """The part a per-expert tensor suffix names under ``scheme``, or None when
    the scheme declares no packed format that writes it."""
    if any(packed.kind in _CT_KINDS for packed in scheme.packed):
        return _CT_PARTS.get(suffix)
    if any(packed.kind in KN_KINDS for packed in scheme.packed):
        return _AUTO_PARTS.get(suffix)
    return None


def packed_weight(record: TensorRecord) -> bool:
    """True for a packed weight tensor (``weight_packed`` or ``qweight``)."""
    return record.name.endswith((".weight_packed", ".qweight"))


def _ceil(value: int, by: int) -> int:
    return -(-value // by)


def _expected(kind: str, out: int, inp: int, group: int) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], bool]]:
    """part -> (slab shape, dtypes, required) of one expert ``[out, in]`` of ``kind``."""
    groups = _ceil(inp, group)
    if kind == "int4_group":
        return {
            "weight": ((out, _ceil(inp, 8)), ("I32",), True),
            "scale": ((out, groups), _FLOATS, True),
            "zero": ((_ceil(out, 8), groups), ("I32",), False),  # packed along out (compressed-tensors)
            "g_idx": ((inp,), ("I32",), False),
            "shape": ((2,), ("I64", "I32"), False),
        }
    if kind == "nvfp4":
        return {
            "weight": ((out, inp // 2), ("U8",), True),
            "scale": ((out, _ceil(inp, 16)), ("F8_E4M3",), True),
            "global_scale": ((1,), ("F32",), True),
        }
    if kind == "mxfp4_packed":
        return {
            "weight": ((out, inp // 2), ("U8",), True),
            "scale": ((out, inp // 32), ("U8", "F8_E8M0"), True),
        }
    if kind == "awq":
        return {
            "weight": ((inp, _ceil(out, 8)), ("I32",), True),
            "scale": ((groups, out), _FLOATS, True),
            "zero": ((groups, _ceil(out, 8)), ("I32",), True),
        }
    return {  # gptq
        "weight": ((_ceil(inp, 8), out), ("I32",), True),
        "scale": ((groups, out), _FLOATS, True),
        "zero": ((groups, _ceil(out, 8)), ("I32",), True),
        "g_idx": ((inp,), ("I32",), False),
    }


def _out_width(kind: str, parts: Mapping[str, TensorRecord], lead: int, source: str) -> int:
    """The output width of one projection, from an axis that is not packed."""
    record = parts["scale"] if kind == "awq" else parts["weight"]
    if len(record.shape) != lead + 2:
        raise FormatError(
            f"{source}: tensor {record.name!r}: {kind} expects {lead + 2}-D, found shape {list(record.shape)}"
        )
    return record.shape[lead + 1] if kind in KN_KINDS else record.shape[lead]


def _check_parts(
    kind: str, parts: Mapping[str, TensorRecord], out: int, inp: int, group: int, lead: tuple[int, ...], source: str
) -> None:
    weight = parts["weight"]
    if kind in ("nvfp4", "mxfp4_packed") and inp % (2 if kind == "nvfp4" else 32):
        raise FormatError(
            f"{source}: tensor {weight.name!r}: {kind} needs an input width divisible by "
            f"{2 if kind == 'nvfp4' else 32}, found {inp}"
        )
    expected = _expected(kind, out, inp, group)
    for part, record in parts.items():
        if part not in expected:
            raise FormatError(
                f"{source}: tensor {record.name!r}: a {part!r} part does not belong to a {kind} expert "
                f"(parts are {sorted(expected)}); refusing rather than dropping it"
            )
        shape, codes, _ = expected[part]
        if record.dtype.code not in codes:
            raise FormatError(
                f"{source}: tensor {record.name!r}: {kind} {part} must be {' or '.join(codes)}, found {record.dtype.code}"
            )
        if record.shape != (*lead, *shape):
            raise FormatError(
                f"{source}: tensor {record.name!r}: {kind} {part} of a [{out}, {inp}] (out, in) expert with group "
                f"{group}: expected shape {[*lead, *shape]}, found {list(record.shape)}"
            )
    missing = [part for part, (_, _, required) in expected.items() if required and part not in parts]
    if missing:
        raise FormatError(f"{source}: tensor {weight.name!r} is {kind} but has no {'/'.join(missing)} beside it")


def _logical(
    kinds: Mapping[str, str], found: Mapping[str, Mapping[str, TensorRecord]], lead: int, source: str
) -> dict[str, tuple[int, int]]:
    """``proj -> (in, out)``: each projection's output width from its unpacked
    axis, its input width from the projection it feeds or is fed by."""
    outs = {proj: _out_width(kinds[proj], found[proj], lead, source) for proj in _PROJECTIONS}
    if outs["gate"] != outs["up"]:
        raise FormatError(
            f"{source}: {found['gate']['weight'].name!r} and {found['up']['weight'].name!r}: gate has {outs['gate']} "
            f"outputs, up {outs['up']}"
        )
    return {
        "gate": (outs["down"], outs["gate"]),
        "up": (outs["down"], outs["up"]),
        "down": (outs["gate"], outs["down"]),
    }


def _ct_kind(parts: Mapping[str, TensorRecord], source: str) -> PackedKind:
    """compressed-tensors kind of one projection, from the weight and scale dtypes."""
    weight, scale = parts["weight"], parts.get("scale")
    if weight.dtype.code == "I32":
        return "int4_group"
    if weight.dtype.code == "U8" and scale is not None and scale.dtype.code == "F8_E4M3":
        return "nvfp4"
    if weight.dtype.code == "U8" and scale is not None and scale.dtype.code in ("U8", "F8_E8M0"):
        return "mxfp4_packed"
    found = f"{weight.dtype.code} with {scale.dtype.code if scale is not None else 'no'} weight_scale"
    raise FormatError(
        f"{source}: tensor {weight.name!r}: weight_packed {found} is no compressed-tensors packed format mmapstore "
        "serves (I32 pack-quantized, U8 with F8_E4M3 scales NVFP4, U8 with E8M0 scales MXFP4)"
    )


def packed_layer(
    found: Mapping[str, Mapping[str, TensorRecord]], scheme: QuantScheme, source: str
) -> tuple[dict[str, Encoding], dict[str, tuple[int, int]], str]:
    """Encodings, logical ``(k, n)`` and native orientation of a per-expert
    layer whose gate, up and down are packed (``found[proj][part]`` is expert
    0's record: the others were checked to match it).

    Raises
    ------
    FormatError
        The config declares no scheme of the tensors' kind, or a part is
        missing, extra, or of the wrong dtype or shape.
    """
    kinds: dict[str, PackedKind] = {}
    for proj in _PROJECTIONS:
        parts = found[proj]
        kind: PackedKind
        if parts["weight"].name.endswith(".qweight"):
            kind = next(packed.kind for packed in scheme.packed if packed.kind in KN_KINDS)
        else:
            kind = _ct_kind(parts, source)
        if scheme.packed_of(kind) is None:
            raise FormatError(
                f"{source}: tensor {parts['weight'].name!r} is {kind} but quant_method {scheme.method!r} declares no "
                "such group; refusing rather than guessing its group size"
            )
        kinds[proj] = kind
    logical = _logical(kinds, found, 0, source)
    encodings: dict[str, Encoding] = {}
    for proj in _PROJECTIONS:
        packed = scheme.packed_of(kinds[proj])
        assert packed is not None
        inp, out = logical[proj]
        group = packed.group_size or inp
        if not packed.symmetric and "zero" not in found[proj]:
            raise FormatError(
                f"{source}: tensor {found[proj]['weight'].name!r}: asymmetric {packed.kind} needs its "
                "zero points beside it"
            )
        _check_parts(packed.kind, found[proj], out, inp, group, (), source)
        encodings[proj] = _encoding(packed.kind, found[proj]["weight"], group)
    orientations = {"kn" if kind in KN_KINDS else "nk" for kind in kinds.values()}
    if len(orientations) != 1:
        raise FormatError(f"{source}: MoE layer mixes AWQ/GPTQ and compressed-tensors experts: {kinds}")
    return encodings, logical, orientations.pop()


def packed_slab_layer(
    found: Mapping[str, Mapping[str, TensorRecord]], encodings: Mapping[str, Encoding], orientation: str, source: str
) -> dict[str, tuple[int, int]]:
    """Logical ``(k, n)`` of a slab store's packed stacks (``[E, ...]`` parts,
    as ``convert`` keeps them), every part checked against its encoding."""
    kinds = {proj: encodings[proj].kind for proj in _PROJECTIONS}
    for proj, kind in kinds.items():
        want = "kn" if kind in KN_KINDS else "nk"
        if not encodings[proj].packed or orientation != want:
            raise FormatError(
                f"{source}: stack blk.L.ffn_{proj}_exps is {encodings[proj].describe()} in orientation "
                f"{orientation!r}; packed stacks need every projection packed, in orientation {want!r}"
            )
    experts = found["gate"]["weight"].shape[0]
    logical = _logical(kinds, found, 1, source)
    for proj in _PROJECTIONS:
        inp, out = logical[proj]
        block = encodings[proj].block
        _check_parts(
            kinds[proj], found[proj], out, inp, block[0] if kinds[proj] in KN_KINDS else block[1], (experts,), source
        )
    return logical


def _encoding(kind: EncodingKind, weight: TensorRecord, group: int) -> Encoding:
    return Encoding(kind, weight.dtype, (group, 1) if kind in KN_KINDS else (1, group))

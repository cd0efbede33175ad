"""Which quantization a checkpoint declares, and whether mmapstore serves it.

``config.json``'s ``quantization_config`` is read before any expert tensor is
claimed: a method the library does not serve faithfully is refused by name,
so encoded values are never handed out as weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .._errors import FormatError

__all__ = ["PackedScheme", "QuantScheme", "model_type", "quant_scheme", "text_config"]

PackedKind = Literal["int4_group", "nvfp4", "mxfp4_packed", "awq", "gptq"]

# compressed-tensors CompressionFormat values (compressed_tensors/config/base.py).
_CT_PACKED_FORMATS: dict[str, PackedKind] = {
    "pack-quantized": "int4_group",
    "nvfp4-pack-quantized": "nvfp4",
    "mxfp4-pack-quantized": "mxfp4_packed",
}
_CT_FORMATS_SERVED = ("float-quantized", "mixed-precision", *_CT_PACKED_FORMATS)


@dataclass(frozen=True, slots=True)
class PackedScheme:
    """A packed 4-bit weight scheme a checkpoint declares.

    ``kind`` is the encoding kind its expert stacks get; ``group_size`` the
    elements per scale along the input axis (None: one scale per output row,
    compressed-tensors' ``channel`` strategy or AWQ/GPTQ ``group_size: -1``);
    ``symmetric`` says whether compressed-tensors wrote no zero points.
    """

    kind: PackedKind
    group_size: int | None
    symmetric: bool = True


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """What quantized expert tensors of a checkpoint look like.

    ``method`` is ``quant_method`` (None: unquantized).  ``scale_suffix`` names
    the per-expert FP8 scale tensor (``weight_scale_inv`` for DeepSeek's own
    format, ``weight_scale`` for compressed-tensors); ``block`` is the FP8
    scale tile (out, in).  ``packed`` lists the packed 4-bit schemes
    (compressed-tensors ``*pack-quantized``, AWQ, GPTQ), at most one per kind.
    """

    method: str | None
    scale_suffix: str | None = None
    block: tuple[int, int] = (128, 128)
    packed: tuple[PackedScheme, ...] = ()

    @property
    def fp8(self) -> bool:
        return self.scale_suffix is not None

    @property
    def mxfp4(self) -> bool:
        return self.method == "mxfp4"

    def packed_of(self, kind: str) -> PackedScheme | None:
        for scheme in self.packed:
            if scheme.kind == kind:
                return scheme
        return None


def text_config(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    nested = (config or {}).get("text_config")
    return nested if isinstance(nested, Mapping) else {}


def model_type(config: Mapping[str, Any] | None) -> str:
    return str((config or {}).get("model_type", ""))


def _quantization_config(config: Mapping[str, Any] | None) -> object:
    for holder in (config or {}, text_config(config)):
        if "quantization_config" in holder:
            return holder["quantization_config"]
    return None


def quant_scheme(config: Mapping[str, Any] | None, *, source: str) -> QuantScheme:
    """The scheme ``config`` declares; :class:`FormatError` for one not served.

    Served: no quantization; ``fp8`` with ``weight_block_size`` (DeepSeek-V3/R1,
    Kimi-K2, Qwen3-FP8, MiniMax-M2); ``compressed-tensors`` ``float-quantized``
    with an 8-bit float block strategy, ``pack-quantized`` INT4 (group or
    channel, symmetric or not: Kimi-K2-Thinking), ``nvfp4-pack-quantized`` and
    ``mxfp4-pack-quantized`` weight-only; ``mxfp4`` (GPT-OSS); ``awq`` 4-bit
    GEMM; ``gptq`` 4-bit v1.  Other variants are refused by name.
    """
    quant = _quantization_config(config)
    if quant is None:
        return QuantScheme(None)
    if not isinstance(quant, Mapping):
        raise FormatError(f"{source}: config.json quantization_config must be an object, found {quant!r:.60}")
    method = str(quant.get("quant_method", ""))
    if method == "fp8":
        block = _block(quant.get("weight_block_size"), source, "weight_block_size")
        fmt = quant.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise FormatError(f"{source}: fp8 quantization_config fmt {fmt!r:.20} is not served (only e4m3)")
        return QuantScheme(method, "weight_scale_inv", block)
    if method == "compressed-tensors":
        return _compressed_tensors(quant, source)
    if method == "mxfp4":
        return QuantScheme(method)
    if method == "awq":
        return QuantScheme(method, packed=(_awq(quant, source),))
    if method == "gptq":
        return QuantScheme(method, packed=(_gptq(quant, source),))
    raise FormatError(
        f"{source}: config.json quantization_config.quant_method {method!r:.40} is not served by mmapstore; "
        "refusing rather than serving encoded values as weights"
    )


def _block(value: object, source: str, what: str) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2 or any(type(item) is not int or item <= 0 for item in value):
        raise FormatError(
            f"{source}: quantization_config {what} must be [rows, cols] of positive ints, found {value!r:.40} "
            "(per-tensor or per-channel FP8 is not served)"
        )
    return value[0], value[1]


def _refuse(source: str, what: str) -> FormatError:
    return FormatError(
        f"{source}: {what} is not served by mmapstore; refusing rather than serving encoded values as weights"
    )


def _group_size(value: object, source: str, method: str) -> int | None:
    """AWQ/GPTQ ``group_size``: a positive int, or -1 for one group per row."""
    if value == -1:
        return None
    if type(value) is not int or value <= 0:
        raise FormatError(
            f"{source}: quant_method {method!r} group_size must be a positive int or -1, found {value!r:.40}"
        )
    return value


def _awq(quant: Mapping[str, Any], source: str) -> PackedScheme:
    """AutoAWQ GEMM (``version: gemm``), 4 bits, with zero points."""
    version = str(quant.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse(source, f"quant_method 'awq' version {version!r:.20} (only 'gemm' packing)")
    if quant.get("bits") != 4:
        raise _refuse(source, f"quant_method 'awq' bits {quant.get('bits')!r:.20} (only 4)")
    if quant.get("zero_point", True) is not True:
        raise _refuse(source, "quant_method 'awq' zero_point false (only AWQ with zero points)")
    return PackedScheme("awq", _group_size(quant.get("group_size"), source, "awq"), symmetric=False)


def _gptq(quant: Mapping[str, Any], source: str) -> PackedScheme:
    """GPTQ v1 checkpoints (``checkpoint_format: gptq``), 4 bits."""
    fmt = str(quant.get("checkpoint_format", quant.get("format", "gptq"))).lower()
    if fmt != "gptq":
        raise _refuse(source, f"quant_method 'gptq' checkpoint_format {fmt!r:.20} (only 'gptq', v1 zero points)")
    if quant.get("bits") != 4:
        raise _refuse(source, f"quant_method 'gptq' bits {quant.get('bits')!r:.20} (only 4)")
    return PackedScheme("gptq", _group_size(quant.get("group_size"), source, "gptq"), symmetric=False)


def _compressed_tensors(quant: Mapping[str, Any], source: str) -> QuantScheme:
    """compressed-tensors: FP8 block groups and packed 4-bit weight-only groups,
    each group's ``format`` falling back to the top-level one."""
    fmt = quant.get("format")
    groups = quant.get("config_groups")
    if fmt not in _CT_FORMATS_SERVED or not isinstance(groups, Mapping) or not groups:
        raise FormatError(
            f"{source}: quant_method 'compressed-tensors' format {fmt!r:.40} is not served by mmapstore (served: "
            f"{', '.join(_CT_FORMATS_SERVED)}); refusing rather than serving encoded values as weights"
        )
    status = quant.get("quantization_status", "compressed")
    if status != "compressed":
        raise _refuse(source, f"compressed-tensors quantization_status {status!r:.20} (only 'compressed' checkpoints)")
    blocks = set()
    packed: dict[str, PackedScheme] = {}
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, Mapping) else None
        if not isinstance(weights, Mapping):
            raise FormatError(f"{source}: compressed-tensors config group {name!r:.40} has no weights scheme")
        group_format = group.get("format") or fmt
        if group_format in _CT_PACKED_FORMATS:
            scheme = _ct_packed(name, group, weights, _CT_PACKED_FORMATS[group_format], source)
            if packed.setdefault(scheme.kind, scheme) != scheme:
                raise _refuse(
                    source,
                    f"compressed-tensors groups with different {group_format} schemes ({packed[scheme.kind]} and "
                    f"{scheme}; which one covers the experts depends on targets)",
                )
            continue
        if weights.get("num_bits") != 8 or weights.get("type") != "float" or weights.get("strategy") != "block":
            raise FormatError(
                f"{source}: compressed-tensors group {name!r:.40} (format {group_format!r:.30}): weights "
                f"{dict(weights)!r:.120} are not FP8 block-quantized nor packed 4-bit; refusing rather than serving "
                "encoded values as weights"
            )
        blocks.add(_block(weights.get("block_structure"), source, "block_structure"))
    if len(blocks) > 1:
        raise FormatError(f"{source}: compressed-tensors groups use different block structures {sorted(blocks)}")
    if blocks:
        return QuantScheme("compressed-tensors", "weight_scale", blocks.pop(), tuple(packed.values()))
    return QuantScheme("compressed-tensors", packed=tuple(packed.values()))


def _ct_packed(
    name: str, group: Mapping[str, Any], weights: Mapping[str, Any], kind: PackedKind, source: str
) -> PackedScheme:
    """One compressed-tensors group of a packed format: weight-only 4-bit
    (W4A16, NVFP4A16, MXFP4A16) with the group layout its compressor writes."""
    what = f"compressed-tensors group {name!r:.40} ({kind})"
    if group.get("input_activations") or group.get("output_activations"):
        raise _refuse(source, f"{what} with quantized activations (only weight-only A16 schemes)")
    bits, number_type, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    group_size = weights.get("group_size")
    symmetric = weights.get("symmetric", True)
    if bits != 4:
        raise _refuse(source, f"{what} num_bits {bits!r:.20} (only 4)")
    if kind == "int4_group":
        if number_type != "int" or strategy not in ("group", "channel"):
            raise _refuse(
                source,
                f"{what} weights type {number_type!r:.20} strategy {strategy!r:.20} "
                "(only int with group or channel strategy)",
            )
        if strategy == "channel":
            return PackedScheme(kind, None, symmetric is True)
        if type(group_size) is not int or group_size <= 0:
            raise FormatError(f"{source}: {what}: group_size must be a positive int, found {group_size!r:.40}")
        return PackedScheme(kind, group_size, symmetric is True)
    want = 16 if kind == "nvfp4" else 32
    if number_type != "float" or group_size != want or symmetric is not True:
        raise _refuse(
            source,
            f"{what} weights type {number_type!r:.20} group_size {group_size!r:.20} symmetric "
            f"{symmetric!r:.10} (only symmetric float with group_size {want})",
        )
    return PackedScheme(kind, want)

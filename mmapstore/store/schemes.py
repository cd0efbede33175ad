"""Which quantization a checkpoint declares, and whether mmapstore serves it.

``config.json``'s ``quantization_config`` is read before any expert tensor is
claimed: a method the library does not serve faithfully is refused by name,
so encoded values are never handed out as weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError

__all__ = ["QuantScheme", "model_type", "quant_scheme", "text_config"]


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """What quantized expert tensors of a checkpoint look like.

    ``method`` is ``quant_method`` (None: unquantized).  ``scale_suffix`` names
    the per-expert FP8 scale tensor (``weight_scale_inv`` for DeepSeek's own
    format, ``weight_scale`` for compressed-tensors); ``block`` is the FP8
    scale tile (out, in).
    """

    method: str | None
    scale_suffix: str | None = None
    block: tuple[int, int] = (128, 128)

    @property
    def fp8(self) -> bool:
        return self.scale_suffix is not None

    @property
    def mxfp4(self) -> bool:
        return self.method == "mxfp4"


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
    with an 8-bit float block strategy; ``mxfp4`` (GPT-OSS).
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
    raise FormatError(
        f"{source}: config.json quantization_config.quant_method {method!r:.40} is not served by mmapstore; "
        "refusing rather than serving encoded values as weights"
    )


def _block(value: object, source: str, what: str) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or any(type(item) is not int or item <= 0 for item in value)
    ):
        raise FormatError(
            f"{source}: quantization_config {what} must be [rows, cols] of positive ints, found {value!r:.40} "
            "(per-tensor or per-channel FP8 is not served)"
        )
    return value[0], value[1]


def _compressed_tensors(quant: Mapping[str, Any], source: str) -> QuantScheme:
    fmt = quant.get("format")
    groups = quant.get("config_groups")
    if fmt != "float-quantized" or not isinstance(groups, Mapping) or not groups:
        raise FormatError(
            f"{source}: quant_method 'compressed-tensors' format {fmt!r:.40} is not served by mmapstore (only float-quantized "
            "FP8 block); refusing rather than serving encoded values as weights"
        )
    blocks = set()
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, Mapping) else None
        if not isinstance(weights, Mapping):
            raise FormatError(f"{source}: compressed-tensors config group {name!r:.40} has no weights scheme")
        if weights.get("num_bits") != 8 or weights.get("type") != "float" or weights.get("strategy") != "block":
            raise FormatError(
                f"{source}: compressed-tensors group {name!r:.40}: weights {dict(weights)!r:.120} are not FP8 "
                "block-quantized; refusing rather than serving encoded values as weights"
            )
        blocks.add(_block(weights.get("block_structure"), source, "block_structure"))
    if len(blocks) != 1:
        raise FormatError(f"{source}: compressed-tensors groups use different block structures {sorted(blocks)}")
    return QuantScheme("compressed-tensors", "weight_scale", blocks.pop())

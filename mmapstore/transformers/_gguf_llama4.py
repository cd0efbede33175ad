"""Llama-4 GGUF files (llama.cpp's ``llama4`` architecture).

transformers builds no model from a ``llama4`` GGUF file.  llama.cpp's
converter (``Llama4Model``) writes the text model's tensors under llama.cpp's
names, Q and K unpermuted, the experts' ``gate_up_proj`` transposed and split
into ``ffn_gate_exps``/``ffn_up_exps``; this module reads such a file back
into a ``Llama4TextConfig``:

- ``expert_feed_forward_length`` is the expert width, ``feed_forward_length``
  the dense layers' (``intermediate_size_mlp``), ``interleave_moe_layer_step``
  which layers have experts;
- what llama.cpp fixes rather than reads: chunked attention of 8192 with a
  layer without RoPE every fourth (attention temperature 0.1 above 8192
  positions), unless ``attention.sliding_window`` is 0 (every layer full
  attention with RoPE); Q/K norms except with 128 experts (Maverick);
- Llama-3 RoPE scaling is not metadata but a ``rope_freqs.weight`` tensor of
  per-frequency divisors.  Its ``factor``, ``low_freq_factor``,
  ``high_freq_factor`` and original context are recovered from those values
  (the divisors depend on them only through three numbers, so one choice
  that reproduces every divisor is exact) and checked by recomputing the
  divisors; divisors of any other shape become ``longrope`` factors with no
  attention scaling, which is how llama.cpp applies them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .._errors import FormatError
from ..formats import TensorRecord
from ..formats._records import read_exact
from ._gguf_meta import ArchMetadata

__all__ = ["ARCHITECTURE", "llama4_config", "rope_from_freqs"]

ARCHITECTURE = "llama4"
ROPE_FREQS = "rope_freqs.weight"


def llama4_config(
    path: str, metadata: dict[str, object], tensors: Mapping[str, TensorRecord], transformers: Any
) -> Any:
    """A ``Llama4TextConfig`` from a ``llama4`` GGUF file's metadata and its ``rope_freqs`` tensor.

    Raises
    ------
    FormatError
        A size the model needs is missing or not a positive integer, or
        ``rope_freqs.weight`` is not float32 of one divisor per frequency.
    """
    meta = ArchMetadata(path, ARCHITECTURE, metadata)
    common = meta.common(eps=1e-5, rope_theta=5e5)
    layers, experts = common["num_hidden_layers"], meta.integer("expert_count", minimum=1)
    head_dim = meta.integer("attention.key_length", common["hidden_size"] // common["num_attention_heads"], minimum=1)
    rotary = meta.integer("rope.dimension_count", head_dim, minimum=2)
    value_dim = meta.integer("attention.value_length", head_dim, minimum=1)
    if rotary != head_dim or head_dim % 2 or value_dim != head_dim:  # llama.cpp asserts the same
        raise FormatError(
            f"{path}: {ARCHITECTURE} needs rope.dimension_count = attention.key_length = attention.value_length "
            f"(even), found {rotary}, {head_dim}, {value_dim}"
        )
    theta = float(common["rope_parameters"]["rope_theta"])  # type: ignore[arg-type]
    record = tensors.get(ROPE_FREQS)
    if record is not None:
        common["rope_parameters"] = rope_from_freqs(_freqs(record, rotary), theta, rotary, common)
    chunked = meta.get("attention.sliding_window") != 0  # llama.cpp: 0 means no chunks and RoPE everywhere
    return transformers.Llama4TextConfig(
        **common,
        intermediate_size=meta.integer("expert_feed_forward_length", minimum=1),
        intermediate_size_mlp=meta.integer("feed_forward_length", minimum=1),
        num_local_experts=experts,
        interleave_moe_layer_step=meta.integer("interleave_moe_layer_step", minimum=1),
        head_dim=head_dim,
        use_qk_norm=experts != 128,
        attention_chunk_size=8192 if chunked else None,
        no_rope_layers=[int((layer + 1) % 4 != 0) if chunked else 1 for layer in range(layers)],
        attn_temperature_tuning=chunked,
        floor_scale=8192,
        attn_scale=0.1,
    )


def _freqs(record: TensorRecord, rotary: int) -> npt.NDArray[np.float32]:
    if record.dtype.code != "F32" or record.shape != (rotary // 2,):
        raise FormatError(
            f"{record.path}: tensor {ROPE_FREQS!r} must be F32 of shape ({rotary // 2},), "
            f"found {record.dtype.code} {record.shape}"
        )
    fd = os.open(record.path, os.O_RDONLY)
    try:
        raw = read_exact(fd, record.nbytes, record.offset, path=record.path, what=f"tensor {ROPE_FREQS!r}")
    finally:
        os.close(fd)
    values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise FormatError(f"{record.path}: tensor {ROPE_FREQS!r} holds divisors that are not positive and finite")
    return values


def rope_from_freqs(
    freqs: npt.NDArray[np.float32], theta: float, dim: int, common: Mapping[str, object]
) -> dict[str, object]:
    """transformers' RoPE parameters for llama.cpp's per-frequency divisors ``freqs`` (frequency
    ``i`` is ``theta ** (-2i / dim) / freqs[i]``): ``default`` where all are 1, ``llama3`` where
    they follow its curve, else ``longrope`` with these divisors and no attention scaling."""
    if (freqs == 1).all():
        return {"rope_type": "default", "rope_theta": theta}
    llama3 = _llama3(freqs.astype(np.float64), theta, dim)
    if llama3 is not None:
        return {"rope_type": "llama3", "rope_theta": theta} | llama3
    divisors = [float(value) for value in freqs]
    context = int(common["max_position_embeddings"])  # type: ignore[call-overload]
    return {"rope_type": "longrope", "rope_theta": theta, "short_factor": divisors, "long_factor": divisors,
            "attention_factor": 1.0, "original_max_position_embeddings": context}  # fmt: skip


def _wavelengths(theta: float, dim: int) -> npt.NDArray[np.float64]:
    inverse = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return np.asarray(2 * math.pi / inverse, dtype=np.float64)


def llama3_divisors(theta: float, dim: int, factor: float, low: float, high: float, old: float) -> Any:
    """The divisors llama.cpp's converter writes for Llama-3 scaling (its formula, in float64)."""
    wavelength = _wavelengths(theta, dim)
    with np.errstate(divide="ignore", invalid="ignore"):  # low == high: no band, the formula is never used
        smooth = (old / wavelength - low) / (high - low)
        medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < old / high, 1.0, np.where(wavelength > old / low, factor, medium))


def _llama3(freqs: npt.NDArray[np.float64], theta: float, dim: int) -> dict[str, object] | None:
    """Llama-3 parameters that reproduce ``freqs`` to float32 precision, or None.

    In the band between the two thresholds a divisor ``r`` gives
    ``s = (1/r - 1/factor) / (1 - 1/factor) = u / wavelength - v`` with
    ``u = old / (high - low)`` and ``v = low / (high - low)``: two
    numbers, fitted from the band, then any ``old`` gives ``low`` and
    ``high``; the one nearest ``u / v`` that is an integer is taken, and
    ``low``/``high`` are rounded where that changes no divisor.
    """
    wavelength = _wavelengths(theta, dim)
    factor = float(freqs.max())
    if factor <= 1:
        return None
    ones, full = np.isclose(freqs, 1.0, rtol=1e-6), np.isclose(freqs, factor, rtol=1e-6)
    band = ~(ones | full)
    if band.sum() >= 2:
        s = (1 / freqs[band] - 1 / factor) / (1 - 1 / factor)
        (u, v), *_ = np.linalg.lstsq(np.stack([1 / wavelength[band], -np.ones(int(band.sum()))], 1), s, rcond=None)
        if u <= 0 or v <= 0:
            return None
        old = float(max(1, round(u / v)))
        low, span = v * old / u, old / u
    elif band.sum() == 0 and full.any():  # a step (Llama-4 Scout's low = high = 1): one threshold in between
        below = float(wavelength[ones].max()) if ones.any() else float(wavelength.min()) / 2
        above = float(wavelength[full].min())
        power = 2.0 ** math.ceil(math.log2(below))  # the original context is a power of two where one fits
        old = power if power < above and power > below else float(math.floor(math.sqrt(below * above)))
        if not below < old < above:
            return None
        low, span = 1.0, 0.0
    else:
        return None
    for low_try, high_try in ((round(low, 3), round(low + span, 3)), (low, low + span)):
        if low_try <= high_try and np.allclose(
            llama3_divisors(theta, dim, factor, low_try, high_try, old), freqs, rtol=2e-6, atol=0
        ):
            return {"factor": factor, "low_freq_factor": float(low_try), "high_freq_factor": float(high_try),
                    "original_max_position_embeddings": int(old)}  # fmt: skip
    return None

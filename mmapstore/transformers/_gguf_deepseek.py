"""DeepSeek-V3 and Kimi-K2 GGUF files (llama.cpp's ``deepseek2`` architecture).

transformers builds no model from a ``deepseek2`` GGUF file, so this module
reads what llama.cpp's converter (``DeepseekV2Model`` in
``convert_hf_to_gguf.py``) writes back into a ``DeepseekV3Config`` and the
model's weights:

- MLA is written as MQA with one key/value head (``head_count_kv = 1``,
  ``key_length = kv_lora_rank + rope``, ``value_length = kv_lora_rank``);
  the per-head sizes are ``key_length_mla`` (``nope + rope``) and
  ``value_length_mla`` (older files: ``key_length``/``value_length``);
- ``kv_b_proj [heads * (nope + v), kv_lora_rank]`` is written split, as
  ``attn_k_b [heads, kv_lora_rank, nope]`` (each head's key part,
  transposed) and ``attn_v_b [heads, v, kv_lora_rank]``; older files hold
  ``attn_kv_b`` whole.  Both are read back;
- the router's score-correction bias is ``exp_probs_b.bias``;
- routing scale, top-k normalization and expert groups are
  ``expert_weights_scale``, ``expert_weights_norm``,
  ``expert_group_count``/``expert_group_used_count`` (a file without them
  routes without group limits, as llama.cpp routes it); YaRN scaling is
  ``rope.scaling.*`` with ``yarn_log_multiplier = 0.1 * mscale_all_dim`` and
  the betas where written (Kimi-K2's are 1 and 1);
- ``block_count`` counts ``nextn_predict_layers`` multi-token-prediction
  blocks too (GLM-4.7-Flash): the model has the rest.

Softmax routing (``expert_gating_func = 1``, or no such key and no
``exp_probs_b``: DeepSeek-V2 files, as llama.cpp reads them) is refused:
transformers' DeepSeek-V3 model routes with sigmoid scores.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import numpy as np
import numpy.typing as npt

from .._errors import FormatError, UnsupportedModelError
from ._gguf_meta import ArchMetadata, name_map

__all__ = ["ARCHITECTURE", "deepseek_config", "deepseek_names", "join_kv_b"]

_log = logging.getLogger(__name__)

ARCHITECTURE = "deepseek2"
_GATING_SOFTMAX, _GATING_SIGMOID = 1, 2


def deepseek_config(path: str, metadata: dict[str, object], tensors: Collection[str], transformers: Any) -> Any:
    """A ``DeepseekV3Config`` from a ``deepseek2`` GGUF file's metadata (and which tensors it holds).

    Raises
    ------
    UnsupportedModelError
        Softmax routing (a DeepSeek-V2 file).
    FormatError
        A size the model needs is missing or not an integer.
    """
    meta = ArchMetadata(path, ARCHITECTURE, metadata)
    # llama.cpp reads a file without the key as softmax (DeepSeek-V2/V2.5 files), unless it has the
    # score-correction bias only sigmoid routing uses (DeepSeek-V3 files always carry both).
    has_bias = any(name.endswith(".exp_probs_b.bias") for name in tensors)
    gating = meta.integer("expert_gating_func", _GATING_SIGMOID if has_bias else _GATING_SOFTMAX)
    if gating != _GATING_SIGMOID:
        raise UnsupportedModelError(
            f"{path}: {ARCHITECTURE}.expert_gating_func is {gating} (softmax routing, DeepSeek-V2); transformers' "
            "DeepSeek-V3 model routes with sigmoid scores"
        )
    heads, rope = meta.integer("attention.head_count", minimum=1), meta.integer("rope.dimension_count", minimum=1)
    key = meta.integer(
        "attention.key_length_mla" if meta.has("attention.key_length_mla") else "attention.key_length", minimum=1
    )
    value = meta.integer(
        "attention.value_length_mla" if meta.has("attention.value_length_mla") else "attention.value_length",
        minimum=1,
    )
    if key <= rope:
        raise FormatError(f"{path}: {ARCHITECTURE} key length {key} leaves no room beside {rope} RoPE dimensions")
    q_lora = meta.integer("attention.q_lora_rank", 0)
    rope_parameters: dict[str, object] = {"rope_type": "default", "rope_theta": meta.number("rope.freq_base", 1e4)}
    if meta.get("rope.scaling.type") == "yarn":
        rope_parameters |= {
            "rope_type": "yarn",
            "factor": meta.number("rope.scaling.factor", 1.0),
            "original_max_position_embeddings": meta.integer("rope.scaling.original_context_length"),
            # written as 0.1f * mscale_all_dim; llama.cpp divides back in float32, exactly
            "mscale_all_dim": float(np.float32(meta.number("rope.scaling.yarn_log_multiplier", 0.0)) / np.float32(0.1)),
            "mscale": 1.0,
            "beta_fast": meta.number("rope.scaling.yarn_beta_fast", 32.0),  # Kimi-K2 writes 1.0
            "beta_slow": meta.number("rope.scaling.yarn_beta_slow", 1.0),
        }
    experts = meta.integer("expert_count", minimum=1)
    if not meta.has("expert_group_count") and experts >= 64:
        _log.warning(
            "%s: no %s.expert_group_count: experts are chosen without group limits, as llama.cpp chooses them "
            "for this file (DeepSeek-V3 itself limits the top-k to 4 of 8 groups)",
            path,
            ARCHITECTURE,
        )
    common = meta.common(eps=1e-6, rope_theta=1e4)
    common["rope_parameters"] = rope_parameters
    common["num_key_value_heads"] = heads  # MLA: the GGUF's one "head" is the compressed latent
    return transformers.DeepseekV3Config(
        **common,
        intermediate_size=meta.integer("feed_forward_length", minimum=1),
        moe_intermediate_size=meta.integer("expert_feed_forward_length", minimum=1),
        n_shared_experts=meta.integer("expert_shared_count", 0),
        n_routed_experts=experts,
        routed_scaling_factor=meta.number("expert_weights_scale", 1.0),
        norm_topk_prob=bool(meta.get("expert_weights_norm", False)),
        n_group=meta.integer("expert_group_count", 1),
        topk_group=meta.integer("expert_group_used_count", 1),
        kv_lora_rank=meta.integer("attention.kv_lora_rank", minimum=1),
        q_lora_rank=q_lora if q_lora > 0 else None,
        qk_rope_head_dim=rope,
        qk_nope_head_dim=key - rope,
        v_head_dim=value,
        first_k_dense_replace=meta.integer("leading_dense_block_count", 0),
    )


def deepseek_names(model: Any, tensors: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``GGUF tensor -> model key`` for a DeepSeek-V3 model, and each ``attn_k_b``
    tensor's ``attn_v_b`` partner (their join is ``kv_b_proj``)."""
    names = name_map(model, ARCHITECTURE, router_bias=True)
    pairs: dict[str, str] = {}
    for layer in range(int(model.config.num_hidden_layers)):
        k_b, v_b = f"blk.{layer}.attn_k_b.weight", f"blk.{layer}.attn_v_b.weight"
        if f"blk.{layer}.attn_kv_b.weight" not in tensors and k_b in tensors and v_b in tensors:
            names[k_b] = f"model.layers.{layer}.self_attn.kv_b_proj.weight"
            pairs[k_b] = v_b
    return names, pairs


def join_kv_b(path: str, k_b: npt.NDArray[np.float32], v_b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``kv_b_proj [heads * (nope + v), kv_lora_rank]`` from ``k_b [heads, kv_lora_rank, nope]``
    and ``v_b [heads, v, kv_lora_rank]`` (the inverse of llama.cpp's split)."""
    if k_b.ndim != 3 or v_b.ndim != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
        raise FormatError(f"{path}: attn_k_b {list(k_b.shape)} and attn_v_b {list(v_b.shape)} do not pair up")
    joined = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)  # [heads, nope + v, kv_lora_rank]
    return np.ascontiguousarray(joined.reshape(-1, k_b.shape[1]))

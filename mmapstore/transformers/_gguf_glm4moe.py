"""GLM-4.5 / GLM-4.6 GGUF files (llama.cpp's ``glm4moe`` architecture).

transformers builds no model from a ``glm4moe`` GGUF file.  This module
reads what llama.cpp's converter (``Glm4MoeModel``) writes back into a
``Glm4MoeConfig`` and the model's weights:

- ``block_count`` counts the multi-token-prediction layers too
  (``nextn_predict_layers``): the model has ``block_count - nextn``; the
  extra blocks (their experts included) are not served;
- ``rope.dimension_count`` is ``head_dim * partial_rotary_factor``;
- attention biases and Q/K norms are present as tensors (``attn_q.bias``,
  ``attn_q_norm``), not as metadata: the config follows the tensors;
- sigmoid routing with ``exp_probs_b.bias``, ``expert_weights_scale``,
  ``expert_weights_norm``, shared experts, leading dense layers.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ._gguf_meta import ArchMetadata, name_map

__all__ = ["ARCHITECTURE", "glm4moe_config", "glm4moe_names"]

ARCHITECTURE = "glm4moe"


def glm4moe_config(path: str, metadata: dict[str, object], tensors: Collection[str], transformers: Any) -> Any:
    """A ``Glm4MoeConfig`` from a ``glm4moe`` GGUF file's metadata (and which tensors it holds).

    Raises
    ------
    FormatError
        A size the model needs is missing or not a number.
    """
    meta = ArchMetadata(path, ARCHITECTURE, metadata)
    common = meta.common(eps=1e-5, rope_theta=1e4)
    head_dim = meta.integer("attention.key_length", common["hidden_size"] // common["num_attention_heads"], minimum=1)
    common["rope_parameters"] |= {
        "partial_rotary_factor": meta.integer("rope.dimension_count", head_dim // 2) / head_dim
    }
    return transformers.Glm4MoeConfig(
        **common,
        intermediate_size=meta.integer("feed_forward_length", minimum=1),
        moe_intermediate_size=meta.integer("expert_feed_forward_length", minimum=1),
        head_dim=head_dim,
        n_routed_experts=meta.integer("expert_count", minimum=1),
        n_shared_experts=meta.integer("expert_shared_count", 0),
        first_k_dense_replace=meta.integer("leading_dense_block_count", 0),
        routed_scaling_factor=meta.number("expert_weights_scale", 1.0),
        norm_topk_prob=bool(meta.get("expert_weights_norm", False)),
        n_group=meta.integer("expert_group_count", 1),
        topk_group=meta.integer("expert_group_used_count", 1),
        attention_bias="blk.0.attn_q.bias" in tensors,
        use_qk_norm="blk.0.attn_q_norm.weight" in tensors,
    )


def glm4moe_names(model: Any, tensors: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``GGUF tensor -> model key`` for a GLM-4.5 model (the experts are the store's), and no tensors to join."""
    return name_map(model, ARCHITECTURE, router_bias=True), {}

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

from typing import Any

from ._gguf_meta import ArchMetadata

__all__ = ["ARCHITECTURE", "glm4moe_config", "glm4moe_names"]

ARCHITECTURE = "glm4moe"


def glm4moe_config(path: str, metadata: dict[str, object], tensors: set[str], transformers: Any) -> Any:
    """A ``Glm4MoeConfig`` from a ``glm4moe`` GGUF file's metadata (and which tensors it holds).

    Raises
    ------
    FormatError
        A size the model needs is missing or not a number.
    """
    meta = ArchMetadata(path, ARCHITECTURE, metadata)
    heads, hidden = meta.integer("attention.head_count", minimum=1), meta.integer("embedding_length", minimum=1)
    head_dim = meta.integer("attention.key_length", hidden // heads, minimum=1)
    rope = meta.integer("rope.dimension_count", head_dim // 2)
    return transformers.Glm4MoeConfig(
        vocab_size=meta.vocab_size(),
        hidden_size=hidden,
        intermediate_size=meta.integer("feed_forward_length", minimum=1),
        moe_intermediate_size=meta.integer("expert_feed_forward_length", minimum=1),
        num_hidden_layers=meta.integer("block_count", minimum=1) - meta.integer("nextn_predict_layers", 0),
        num_attention_heads=heads,
        num_key_value_heads=meta.integer("attention.head_count_kv", minimum=1),
        head_dim=head_dim,
        n_routed_experts=meta.integer("expert_count", minimum=1),
        num_experts_per_tok=meta.integer("expert_used_count", minimum=1),
        n_shared_experts=meta.integer("expert_shared_count", 0),
        first_k_dense_replace=meta.integer("leading_dense_block_count", 0),
        routed_scaling_factor=meta.number("expert_weights_scale", 1.0),
        norm_topk_prob=bool(meta.get("expert_weights_norm", False)),
        n_group=meta.integer("expert_group_count", 1),
        topk_group=meta.integer("expert_group_used_count", 1),
        rms_norm_eps=meta.number("attention.layer_norm_rms_epsilon", 1e-5),
        max_position_embeddings=meta.integer("context_length", minimum=1),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": meta.number("rope.freq_base", 10000.0),
            "partial_rotary_factor": rope / head_dim,
        },
        attention_bias="blk.0.attn_q.bias" in tensors,
        use_qk_norm="blk.0.attn_q_norm.weight" in tensors,
        **meta.special_tokens(),
    )


def glm4moe_names(model: Any, tensors: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``GGUF tensor -> model key`` for a GLM-4.5 model (the experts are the store's), and no
    tensors to join."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    names: dict[str, str] = get_gguf_hf_weights_map(model, TensorProcessor(), model_type=ARCHITECTURE)
    for layer in range(int(model.config.num_hidden_layers)):
        names[f"blk.{layer}.exp_probs_b.bias"] = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
    return names, {}

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

from .._errors import FormatError

__all__ = ["ARCHITECTURE", "glm4moe_config", "glm4moe_names"]

ARCHITECTURE = "glm4moe"


def _number(metadata: dict[str, object], key: str, path: str, default: float | None = None) -> float:
    value = metadata.get(f"{ARCHITECTURE}.{key}", default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise FormatError(f"{path}: {ARCHITECTURE}.{key} must be a number, found {value!r}")
    return value


def _int(metadata: dict[str, object], key: str, path: str, default: int | None = None) -> int:
    value = _number(metadata, key, path, default)
    if not isinstance(value, int):
        raise FormatError(f"{path}: {ARCHITECTURE}.{key} must be an integer, found {value!r}")
    return value


def glm4moe_config(path: str, metadata: dict[str, object], tensors: set[str], transformers: Any) -> Any:
    """A ``Glm4MoeConfig`` from a ``glm4moe`` GGUF file's metadata (and which tensors it holds).

    Raises
    ------
    FormatError
        A size the model needs is missing or not a number.
    """
    heads = _int(metadata, "attention.head_count", path)
    hidden = _int(metadata, "embedding_length", path)
    head_dim = _int(metadata, "attention.key_length", path, hidden // heads)
    rope = _int(metadata, "rope.dimension_count", path, head_dim // 2)
    nextn = _int(metadata, "nextn_predict_layers", path, 0)
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = metadata.get(f"{ARCHITECTURE}.vocab_size", len(tokens) if isinstance(tokens, list) else None)
    return transformers.Glm4MoeConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_int(metadata, "feed_forward_length", path),
        moe_intermediate_size=_int(metadata, "expert_feed_forward_length", path),
        num_hidden_layers=_int(metadata, "block_count", path) - nextn,
        num_attention_heads=heads,
        num_key_value_heads=_int(metadata, "attention.head_count_kv", path),
        head_dim=head_dim,
        n_routed_experts=_int(metadata, "expert_count", path),
        num_experts_per_tok=_int(metadata, "expert_used_count", path),
        n_shared_experts=_int(metadata, "expert_shared_count", path, 0),
        first_k_dense_replace=_int(metadata, "leading_dense_block_count", path, 0),
        routed_scaling_factor=float(_number(metadata, "expert_weights_scale", path, 1.0)),
        norm_topk_prob=bool(metadata.get(f"{ARCHITECTURE}.expert_weights_norm", False)),
        n_group=_int(metadata, "expert_group_count", path, 1),
        topk_group=_int(metadata, "expert_group_used_count", path, 1),
        rms_norm_eps=float(_number(metadata, "attention.layer_norm_rms_epsilon", path, 1e-5)),
        max_position_embeddings=_int(metadata, "context_length", path),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(_number(metadata, "rope.freq_base", path, 10000.0)),
            "partial_rotary_factor": rope / head_dim,
        },
        attention_bias="blk.0.attn_q.bias" in tensors,
        use_qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
    )


def glm4moe_names(model: Any, tensors: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``GGUF tensor -> model key`` for a GLM-4.5 model (the experts are the store's), and no
    tensors to join."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    names: dict[str, str] = get_gguf_hf_weights_map(model, TensorProcessor(), model_type=ARCHITECTURE)
    for layer in range(int(model.config.num_hidden_layers)):
        names[f"blk.{layer}.exp_probs_b.bias"] = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
    return names, {}

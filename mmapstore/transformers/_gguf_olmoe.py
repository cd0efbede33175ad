"""OLMoE GGUF files (llama.cpp's ``olmoe`` architecture).

transformers builds no model from an ``olmoe`` GGUF file.  llama.cpp's
converter (``OlmoeModel``) writes the Hugging Face tensors under llama.cpp's
names, unpermuted, with the experts merged per projection; this module reads
the metadata back into an ``OlmoeConfig``: ``feed_forward_length`` is the
expert width, ``expert_count``/``expert_used_count`` the routing (OLMoE
does not renormalize its top-k weights).
"""

from __future__ import annotations

from typing import Any

from ._gguf_meta import ArchMetadata

__all__ = ["ARCHITECTURE", "olmoe_config", "olmoe_names"]

ARCHITECTURE = "olmoe"


def olmoe_config(path: str, metadata: dict[str, object], tensors: set[str], transformers: Any) -> Any:
    """An ``OlmoeConfig`` from an ``olmoe`` GGUF file's metadata.

    Raises
    ------
    FormatError
        A size the model needs is missing or not a positive integer.
    """
    meta = ArchMetadata(path, ARCHITECTURE, metadata)
    heads = meta.integer("attention.head_count", minimum=1)
    return transformers.OlmoeConfig(
        vocab_size=meta.vocab_size(),
        hidden_size=meta.integer("embedding_length", minimum=1),
        intermediate_size=meta.integer("feed_forward_length", minimum=1),
        num_hidden_layers=meta.integer("block_count", minimum=1),
        num_attention_heads=heads,
        num_key_value_heads=meta.integer("attention.head_count_kv", heads, minimum=1),
        num_experts=meta.integer("expert_count", minimum=1),
        num_experts_per_tok=meta.integer("expert_used_count", minimum=1),
        rms_norm_eps=meta.number("attention.layer_norm_rms_epsilon", 1e-5),
        max_position_embeddings=meta.integer("context_length", minimum=1),
        rope_parameters={"rope_type": "default", "rope_theta": meta.number("rope.freq_base", 1e4)},
        norm_topk_prob=False,
        **meta.special_tokens(),
    )


def olmoe_names(model: Any, tensors: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``GGUF tensor -> model key`` for an OLMoE model (the experts are the store's), and no tensors to join."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    names: dict[str, str] = get_gguf_hf_weights_map(model, TensorProcessor(), model_type=ARCHITECTURE)
    return names, {}

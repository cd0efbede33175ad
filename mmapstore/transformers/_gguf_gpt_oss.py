"""GPT-OSS GGUF files (llama.cpp's ``gpt-oss`` architecture).

transformers' own GGUF reading of GPT-OSS fails on the files llama.cpp
writes: its config code cannot parse the ``rope.scaling.*`` fields, and its
tensor processor expects ``ffn_*_projs`` names the converter never writes.
This module reads what llama.cpp's converter (``GptOssModel``) writes back
into a ``GptOssConfig`` and the model's weights:

- the config from the metadata: ``attention.key_length`` is the head size,
  ``expert_feed_forward_length`` the expert width, ``sliding_window``,
  YaRN scaling in ``rope.scaling.*`` (the betas where written, else
  GPT-OSS's 32 and 1);
- ``self_attn.sinks`` is written as ``attn_sinks.weight``;
- the experts (``ffn_{gate,up,down}_exps``, MXFP4 or plain, with biases) are
  the store's, served by the pools, so they never pass here.
"""

from __future__ import annotations

from typing import Any

from .._errors import FormatError

__all__ = ["ARCHITECTURE", "gpt_oss_config", "gpt_oss_names"]

ARCHITECTURE = "gpt-oss"


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


def gpt_oss_config(path: str, metadata: dict[str, object], tensors: set[str], transformers: Any) -> Any:
    """A ``GptOssConfig`` from a ``gpt-oss`` GGUF file's metadata.

    Raises
    ------
    FormatError
        A size the model needs is missing or not a number.
    """
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = metadata.get(f"{ARCHITECTURE}.vocab_size", len(tokens) if isinstance(tokens, list) else None)
    rope_parameters: dict[str, object] = {
        "rope_type": "default",
        "rope_theta": _number(metadata, "rope.freq_base", path, 150000.0),
    }
    if metadata.get(f"{ARCHITECTURE}.rope.scaling.type") == "yarn":
        rope_parameters |= {
            "rope_type": "yarn",
            "factor": float(_number(metadata, "rope.scaling.factor", path)),
            "original_max_position_embeddings": _int(metadata, "rope.scaling.original_context_length", path),
            "beta_fast": float(_number(metadata, "rope.scaling.yarn_beta_fast", path, 32.0)),
            "beta_slow": float(_number(metadata, "rope.scaling.yarn_beta_slow", path, 1.0)),
            "truncate": False,
        }
    return transformers.GptOssConfig(
        vocab_size=vocab,
        hidden_size=_int(metadata, "embedding_length", path),
        intermediate_size=_int(metadata, "expert_feed_forward_length", path),
        num_hidden_layers=_int(metadata, "block_count", path),
        num_attention_heads=_int(metadata, "attention.head_count", path),
        num_key_value_heads=_int(metadata, "attention.head_count_kv", path),
        head_dim=_int(metadata, "attention.key_length", path),
        num_local_experts=_int(metadata, "expert_count", path),
        num_experts_per_tok=_int(metadata, "expert_used_count", path),
        sliding_window=_int(metadata, "attention.sliding_window", path, 128),
        rms_norm_eps=float(_number(metadata, "attention.layer_norm_rms_epsilon", path, 1e-5)),
        max_position_embeddings=_int(metadata, "context_length", path),
        rope_parameters=rope_parameters,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
    )


def gpt_oss_names(model: Any, tensors: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``GGUF tensor -> model key`` for a GPT-OSS model (the experts are the store's), and no
    tensors to join."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    names: dict[str, str] = get_gguf_hf_weights_map(model, TensorProcessor(), model_type=ARCHITECTURE)
    for layer in range(int(model.config.num_hidden_layers)):
        names.pop(f"blk.{layer}.attn_sinks", None)  # the converter appends ".weight"
        names[f"blk.{layer}.attn_sinks.weight"] = f"model.layers.{layer}.self_attn.sinks"
    return names, {}

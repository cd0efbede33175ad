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

from collections.abc import Collection
from typing import Any

from ._gguf_meta import ArchMetadata, name_map

__all__ = ["ARCHITECTURE", "gpt_oss_config", "gpt_oss_names"]

ARCHITECTURE = "gpt-oss"


def gpt_oss_config(path: str, metadata: dict[str, object], tensors: Collection[str], transformers: Any) -> Any:
    """A ``GptOssConfig`` from a ``gpt-oss`` GGUF file's metadata.

    Raises
    ------
    FormatError
        A size the model needs is missing or not a number.
    """
    meta = ArchMetadata(path, ARCHITECTURE, metadata)
    common = meta.common(eps=1e-5, rope_theta=150000.0)
    if meta.get("rope.scaling.type") == "yarn":
        common["rope_parameters"] |= {
            "rope_type": "yarn",
            "factor": meta.number("rope.scaling.factor"),
            "original_max_position_embeddings": meta.integer("rope.scaling.original_context_length"),
            "beta_fast": meta.number("rope.scaling.yarn_beta_fast", 32.0),
            "beta_slow": meta.number("rope.scaling.yarn_beta_slow", 1.0),
            "truncate": False,
        }
    return transformers.GptOssConfig(
        **common,
        intermediate_size=meta.integer("expert_feed_forward_length", minimum=1),
        head_dim=meta.integer("attention.key_length", minimum=1),
        num_local_experts=meta.integer("expert_count", minimum=1),
        sliding_window=meta.integer("attention.sliding_window", 128),
    )


def gpt_oss_names(model: Any, tensors: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``GGUF tensor -> model key`` for a GPT-OSS model (the experts are the store's), and no tensors to join."""
    names = name_map(model, ARCHITECTURE)
    for layer in range(int(model.config.num_hidden_layers)):
        names.pop(f"blk.{layer}.attn_sinks", None)  # the converter appends ".weight"
        names[f"blk.{layer}.attn_sinks.weight"] = f"model.layers.{layer}.self_attn.sinks"
    return names, {}

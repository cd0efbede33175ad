"""Mixtral GGUF files (llama.cpp's ``llama`` architecture with experts).

llama.cpp writes Mixtral under the ``llama`` architecture, with
``llama.expert_count``; transformers reads a ``llama`` GGUF as a dense
``LlamaForCausalLM``, which has no place for the experts.  This module reads
such a file as a ``MixtralConfig``, with transformers' own Llama tensor
processor for the rest (the converter permutes the Q and K rows for
llama.cpp's RoPE; the processor undoes it):

- ``feed_forward_length`` is the expert width, ``rope.dimension_count`` the
  head size, ``expert_count``/``expert_used_count`` the routing;
- the experts are ``ffn_{gate,up,down}_exps`` (or one tensor per expert in
  older files), served by the pools.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from ._gguf_meta import ArchMetadata

__all__ = ["ARCHITECTURE", "is_mixtral", "mixtral_config", "mixtral_names", "mixtral_process"]

ARCHITECTURE = "llama"


def is_mixtral(metadata: dict[str, object]) -> bool:
    """Whether a ``llama`` file has experts (``llama.expert_count`` above 0)."""
    count = metadata.get(f"{ARCHITECTURE}.expert_count")
    return isinstance(count, int) and not isinstance(count, bool) and count > 0


def mixtral_config(path: str, metadata: dict[str, object], tensors: set[str], transformers: Any) -> Any:
    """A ``MixtralConfig`` from a ``llama`` GGUF file with experts.

    Raises
    ------
    FormatError
        A size the model needs is missing or not a positive integer.
    """
    meta = ArchMetadata(path, ARCHITECTURE, metadata)
    heads, hidden = meta.integer("attention.head_count", minimum=1), meta.integer("embedding_length", minimum=1)
    return transformers.MixtralConfig(
        vocab_size=meta.vocab_size(),
        hidden_size=hidden,
        intermediate_size=meta.integer("feed_forward_length", minimum=1),
        num_hidden_layers=meta.integer("block_count", minimum=1),
        num_attention_heads=heads,
        num_key_value_heads=meta.integer("attention.head_count_kv", heads, minimum=1),
        head_dim=meta.integer("rope.dimension_count", hidden // heads, minimum=1),
        num_local_experts=meta.integer("expert_count", minimum=1),
        num_experts_per_tok=meta.integer("expert_used_count", minimum=1),
        rms_norm_eps=meta.number("attention.layer_norm_rms_epsilon", 1e-5),
        max_position_embeddings=meta.integer("context_length", minimum=1),
        rope_parameters={"rope_type": "default", "rope_theta": meta.number("rope.freq_base", 1e6)},
        sliding_window=None,
        **meta.special_tokens(),
    )


def mixtral_names(model: Any, tensors: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``GGUF tensor -> model key`` for a Mixtral model (the experts are the store's), and no tensors to join."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    names: dict[str, str] = get_gguf_hf_weights_map(model, TensorProcessor(), model_type=ARCHITECTURE)
    return names, {}


def mixtral_process(
    model: Any,
) -> Callable[[npt.NDArray[np.float32], str], tuple[npt.NDArray[np.float32], str | None]]:
    """transformers' Llama tensor processor (it undoes the converter's Q/K row permutation)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    config = model.config
    processor = LlamaTensorProcessor(
        config={"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    )

    def process(values: npt.NDArray[np.float32], name: str) -> tuple[npt.NDArray[np.float32], str | None]:
        result = processor.process(values, name)
        return np.asarray(result.weights, dtype=np.float32), result.name

    return process

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

from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import numpy.typing as npt

from ._gguf_meta import ArchMetadata

__all__ = ["ARCHITECTURE", "is_mixtral", "mixtral_config", "mixtral_process"]

ARCHITECTURE = "llama"


def is_mixtral(metadata: dict[str, object]) -> bool:
    """Whether a ``llama`` file has experts (``llama.expert_count`` above 0)."""
    count = metadata.get(f"{ARCHITECTURE}.expert_count")
    return isinstance(count, int) and not isinstance(count, bool) and count > 0


def mixtral_config(path: str, metadata: dict[str, object], tensors: Collection[str], transformers: Any) -> Any:
    """A ``MixtralConfig`` from a ``llama`` GGUF file with experts.

    Raises
    ------
    FormatError
        A size the model needs is missing or not a positive integer.
    """
    meta = ArchMetadata(path, ARCHITECTURE, metadata)
    common = meta.common(eps=1e-5, rope_theta=1e6)
    return transformers.MixtralConfig(
        **common,
        intermediate_size=meta.integer("feed_forward_length", minimum=1),
        head_dim=meta.integer(
            "rope.dimension_count", common["hidden_size"] // common["num_attention_heads"], minimum=1
        ),
        num_local_experts=meta.integer("expert_count", minimum=1),
        sliding_window=None,
    )


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

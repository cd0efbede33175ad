"""OLMoE GGUF files (llama.cpp's ``olmoe`` architecture).

transformers builds no model from an ``olmoe`` GGUF file.  llama.cpp's
converter (``OlmoeModel``) writes the Hugging Face tensors under llama.cpp's
names, unpermuted, with the experts merged per projection; this module reads
the metadata back into an ``OlmoeConfig``: ``feed_forward_length`` is the
expert width, ``expert_count``/``expert_used_count`` the routing (OLMoE
does not renormalize its top-k weights).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ._gguf_meta import ArchMetadata

__all__ = ["ARCHITECTURE", "olmoe_config"]

ARCHITECTURE = "olmoe"


def olmoe_config(path: str, metadata: dict[str, object], tensors: Collection[str], transformers: Any) -> Any:
    """An ``OlmoeConfig`` from an ``olmoe`` GGUF file's metadata.

    Raises
    ------
    FormatError
        A size the model needs is missing or not a positive integer.
    """
    meta = ArchMetadata(path, ARCHITECTURE, metadata)
    return transformers.OlmoeConfig(
        **meta.common(eps=1e-5, rope_theta=1e4),
        intermediate_size=meta.integer("feed_forward_length", minimum=1),
        num_experts=meta.integer("expert_count", minimum=1),
        norm_topk_prob=False,
    )

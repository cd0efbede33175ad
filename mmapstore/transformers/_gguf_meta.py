"""Typed reads of one architecture's GGUF metadata (``{arch}.{key}``), and
the name map, for the architectures the runtime reads without transformers'
GGUF loader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from .._errors import FormatError

__all__ = ["ArchMetadata", "CommonFields", "name_map", "plain_names"]


class CommonFields(TypedDict):
    """The config fields :meth:`ArchMetadata.common` reads."""

    vocab_size: int | None
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts_per_tok: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_parameters: dict[str, object]
    bos_token_id: object
    eos_token_id: object


@dataclass(frozen=True, slots=True)
class ArchMetadata:
    """The metadata of the GGUF file ``path`` under the key prefix ``architecture``."""

    path: str
    architecture: str
    metadata: dict[str, object]

    def get(self, key: str, default: object = None) -> object:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def has(self, key: str) -> bool:
        return f"{self.architecture}.{key}" in self.metadata

    def number(self, key: str, default: float | None = None) -> float:
        """``{arch}.{key}`` as a float; ``default`` where absent.

        Raises
        ------
        FormatError
            Absent with no default, or not a number.
        """
        value = self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise FormatError(f"{self.path}: {self.architecture}.{key} must be a number, found {value!r}")
        return float(value)

    def integer(self, key: str, default: int | None = None, *, minimum: int = 0) -> int:
        """``{arch}.{key}`` as an integer of at least ``minimum``; ``default`` where absent
        (:class:`FormatError` where absent with no default, or not such an integer)."""
        value = self.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise FormatError(
                f"{self.path}: {self.architecture}.{key} must be an integer of at least {minimum}, found {value!r}"
            )
        return value

    def vocab_size(self) -> int | None:
        """``{arch}.vocab_size``, else the length of the token list (what llama.cpp writes), else None."""
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        value = self.get("vocab_size", len(tokens) if isinstance(tokens, list) else None)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def common(self, *, eps: float, rope_theta: float) -> CommonFields:
        """The config fields every architecture read here takes the same way
        (``block_count`` less ``nextn_predict_layers``: multi-token-prediction
        blocks are not the model's), as keyword arguments."""
        heads = self.integer("attention.head_count", minimum=1)
        return {
            "vocab_size": self.vocab_size(),
            "hidden_size": self.integer("embedding_length", minimum=1),
            "num_hidden_layers": self.integer("block_count", minimum=1) - self.integer("nextn_predict_layers", 0),
            "num_attention_heads": heads,
            "num_key_value_heads": self.integer("attention.head_count_kv", heads, minimum=1),
            "num_experts_per_tok": self.integer("expert_used_count", minimum=1),
            "rms_norm_eps": self.number("attention.layer_norm_rms_epsilon", eps),
            "max_position_embeddings": self.integer("context_length", minimum=1),
            "rope_parameters": {"rope_type": "default", "rope_theta": self.number("rope.freq_base", rope_theta)},
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id"),
        }


def name_map(model: Any, architecture: str, *, router_bias: bool = False) -> dict[str, str]:
    """``GGUF tensor -> model key`` by gguf-py's names for ``architecture``
    (transformers' ``get_gguf_hf_weights_map``); with ``router_bias``, each
    layer's ``exp_probs_b.bias`` as its router's ``e_score_correction_bias``."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    names: dict[str, str] = get_gguf_hf_weights_map(model, TensorProcessor(), model_type=architecture)
    if router_bias:
        for layer in range(int(model.config.num_hidden_layers)):
            names[f"blk.{layer}.exp_probs_b.bias"] = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
    return names


def plain_names(architecture: str) -> Any:
    """The names function of an architecture whose tensors map one to one (no pairs to join)."""

    def names(model: Any, tensors: set[str]) -> tuple[dict[str, str], dict[str, str]]:
        return name_map(model, architecture), {}

    return names

"""Tensor lists of the MoE families that ``synth`` writes, with real names and configs.

Each family function returns ``(config, tensors)``: ``config`` uses the
family's real ``config.json`` keys; ``tensors`` is an ordered list of
``(name, shape)`` in ``nn.Linear`` ``[out, in]`` convention unless the family
stores otherwise (GPT-OSS and Llama-4 fused experts are ``[in, out]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["FAMILIES", "FamilyShape", "family_tensors"]


@dataclass(frozen=True, slots=True)
class FamilyShape:
    layers: int = 2
    experts: int = 8
    hidden: int = 64
    ffn: int = 32
    top_k: int = 2
    vocab: int = 128
    heads: int = 4


Tensors = list[tuple[str, tuple[int, ...]]]


def _attention(prefix: str, shape: FamilyShape) -> Tensors:
    h = shape.hidden
    kv = max(1, shape.heads // 2) * (h // shape.heads)
    return [
        (f"{prefix}.input_layernorm.weight", (h,)),
        (f"{prefix}.self_attn.q_proj.weight", (h, h)),
        (f"{prefix}.self_attn.k_proj.weight", (kv, h)),
        (f"{prefix}.self_attn.v_proj.weight", (kv, h)),
        (f"{prefix}.self_attn.o_proj.weight", (h, h)),
        (f"{prefix}.post_attention_layernorm.weight", (h,)),
    ]


def _experts(prefix: str, shape: FamilyShape, names: tuple[str, str, str]) -> Tensors:
    gate, up, down = names
    tensors: Tensors = []
    for expert in range(shape.experts):
        tensors += [
            (f"{prefix}.experts.{expert}.{gate}.weight", (shape.ffn, shape.hidden)),
            (f"{prefix}.experts.{expert}.{up}.weight", (shape.ffn, shape.hidden)),
            (f"{prefix}.experts.{expert}.{down}.weight", (shape.hidden, shape.ffn)),
        ]
    return tensors


def _dense(prefix: str, hidden: int, ffn: int) -> Tensors:
    return [
        (f"{prefix}.gate_proj.weight", (ffn, hidden)),
        (f"{prefix}.up_proj.weight", (ffn, hidden)),
        (f"{prefix}.down_proj.weight", (hidden, ffn)),
    ]


def _model(shape: FamilyShape, layer_fn: Callable[[int, str], Tensors]) -> Tensors:
    tensors: Tensors = [("model.embed_tokens.weight", (shape.vocab, shape.hidden))]
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        tensors += _attention(prefix, shape) + layer_fn(layer, prefix)
    tensors += [("model.norm.weight", (shape.hidden,)), ("lm_head.weight", (shape.vocab, shape.hidden))]
    return tensors


def _base_config(model_type: str, shape: FamilyShape) -> dict[str, Any]:
    return {
        "architectures": [],
        "model_type": model_type,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": max(1, shape.heads // 2),
        "vocab_size": shape.vocab,
        "num_experts_per_tok": shape.top_k,
        "torch_dtype": "bfloat16",
    }


def mixtral(shape: FamilyShape) -> tuple[dict[str, Any], Tensors]:
    config = _base_config("mixtral", shape) | {
        "architectures": ["MixtralForCausalLM"],
        "intermediate_size": shape.ffn,
        "num_local_experts": shape.experts,
    }

    def layer(_: int, prefix: str) -> Tensors:
        block = f"{prefix}.block_sparse_moe"
        return [(f"{block}.gate.weight", (shape.experts, shape.hidden))] + _experts(block, shape, ("w1", "w3", "w2"))

    return config, _model(shape, layer)


_PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")


def qwen2_moe(shape: FamilyShape) -> tuple[dict[str, Any], Tensors]:
    config = _base_config("qwen2_moe", shape) | {
        "architectures": ["Qwen2MoeForCausalLM"],
        "num_experts": shape.experts,
        "moe_intermediate_size": shape.ffn,
        "shared_expert_intermediate_size": 2 * shape.ffn,
        "intermediate_size": 2 * shape.ffn,
    }

    def layer(_: int, prefix: str) -> Tensors:
        mlp = f"{prefix}.mlp"
        return (
            [(f"{mlp}.gate.weight", (shape.experts, shape.hidden))]
            + _experts(mlp, shape, _PROJ_NAMES)
            + _dense(f"{mlp}.shared_expert", shape.hidden, 2 * shape.ffn)
            + [(f"{mlp}.shared_expert_gate.weight", (1, shape.hidden))]
        )

    return config, _model(shape, layer)


def _routed(model_type: str, architecture: str) -> Callable[[FamilyShape], tuple[dict[str, Any], Tensors]]:
    def family(shape: FamilyShape) -> tuple[dict[str, Any], Tensors]:
        config = _base_config(model_type, shape) | {
            "architectures": [architecture],
            "num_experts": shape.experts,
            "moe_intermediate_size": shape.ffn,
            "intermediate_size": shape.ffn,
        }

        def layer(_: int, prefix: str) -> Tensors:
            mlp = f"{prefix}.mlp"
            return [(f"{mlp}.gate.weight", (shape.experts, shape.hidden))] + _experts(mlp, shape, _PROJ_NAMES)

        return config, _model(shape, layer)

    return family


def deepseek_v3(shape: FamilyShape) -> tuple[dict[str, Any], Tensors]:
    dense_ffn = 2 * shape.ffn
    config = _base_config("deepseek_v3", shape) | {
        "architectures": ["DeepseekV3ForCausalLM"],
        "n_routed_experts": shape.experts,
        "n_shared_experts": 1,
        "moe_intermediate_size": shape.ffn,
        "intermediate_size": dense_ffn,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
    }

    def layer(index: int, prefix: str) -> Tensors:
        mlp = f"{prefix}.mlp"
        if index < config["first_k_dense_replace"]:
            return _dense(mlp, shape.hidden, dense_ffn)
        return (
            [
                (f"{mlp}.gate.weight", (shape.experts, shape.hidden)),
                (f"{mlp}.gate.e_score_correction_bias", (shape.experts,)),
            ]
            + _experts(mlp, shape, _PROJ_NAMES)
            + _dense(f"{mlp}.shared_experts", shape.hidden, shape.ffn)
        )

    return config, _model(shape, layer)


def gpt_oss(shape: FamilyShape) -> tuple[dict[str, Any], Tensors]:
    config = _base_config("gpt_oss", shape) | {
        "architectures": ["GptOssForCausalLM"],
        "num_local_experts": shape.experts,
        "experts_per_token": shape.top_k,
        "intermediate_size": shape.ffn,
    }

    def layer(_: int, prefix: str) -> Tensors:
        mlp = f"{prefix}.mlp"
        e, h, f = shape.experts, shape.hidden, shape.ffn
        return [
            (f"{mlp}.router.weight", (e, h)),
            (f"{mlp}.router.bias", (e,)),
            (f"{mlp}.experts.gate_up_proj", (e, h, 2 * f)),
            (f"{mlp}.experts.gate_up_proj_bias", (e, 2 * f)),
            (f"{mlp}.experts.down_proj", (e, f, h)),
            (f"{mlp}.experts.down_proj_bias", (e, h)),
        ]

    return config, _model(shape, layer)


def llama4(shape: FamilyShape) -> tuple[dict[str, Any], Tensors]:
    config = _base_config("llama4_text", shape) | {
        "architectures": ["Llama4ForCausalLM"],
        "num_local_experts": shape.experts,
        "intermediate_size": shape.ffn,
        "intermediate_size_mlp": 2 * shape.ffn,
        "interleave_moe_layer_step": 1,
    }

    def layer(_: int, prefix: str) -> Tensors:
        ff = f"{prefix}.feed_forward"
        e, h, f = shape.experts, shape.hidden, shape.ffn
        return [
            (f"{ff}.router.weight", (e, h)),
            (f"{ff}.experts.gate_up_proj", (e, h, 2 * f)),
            (f"{ff}.experts.down_proj", (e, f, h)),
        ] + _dense(f"{ff}.shared_expert", h, f)

    return config, _model(shape, layer)


FAMILIES: dict[str, Callable[[FamilyShape], tuple[dict[str, Any], Tensors]]] = {
    "deepseek_v3": deepseek_v3,
    "gpt_oss": gpt_oss,
    "llada2_moe": _routed("llada2_moe", "LLaDA2MoeModelLM"),
    "llama4": llama4,
    "mixtral": mixtral,
    "olmoe": _routed("olmoe", "OlmoeForCausalLM"),
    "qwen2_moe": qwen2_moe,
    "qwen3_moe": _routed("qwen3_moe", "Qwen3MoeForCausalLM"),
}


def family_tensors(family: str, shape: FamilyShape) -> tuple[dict[str, Any], Tensors]:
    """Config and ordered tensor list of ``family`` at ``shape``."""
    builder = FAMILIES.get(family)
    if builder is None:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    return builder(shape)

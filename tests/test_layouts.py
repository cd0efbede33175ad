"""MoE layouts beyond the per-expert and GPT-OSS/Llama-4 ones: GraniteMoE/JetMoE,
DBRX, DeepSeek-V4 native names, DeepSeek MTP layers, gateless experts; and the
same checkpoints as transformers' save_pretrained writes them."""

from __future__ import annotations

import os

import numpy as np
import pytest
from builders import write_checkpoint

from mmapstore import FormatError, convert, open_store

E, H, I = 4, 16, 8


def random(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize(("model_type", "block"), [("granitemoe", "block_sparse_moe"), ("jetmoe", "mlp")])
def test_granite_and_jetmoe_input_output_linear(tmp_path, model_type, block):
    fused, out = random((E, 2 * I, H), 1), random((E, H, I), 2)
    tensors = {
        f"model.layers.0.{block}.input_linear.weight": fused,
        f"model.layers.0.{block}.output_linear.weight": out,
        f"model.layers.0.{block}.router.layer.weight": random((E, H), 3),
    }
    if model_type == "jetmoe":  # attention experts are not routed FFN experts: left alone
        tensors["model.layers.0.self_attention.experts.input_linear.weight"] = random((E, 4, H), 4)
    path = write_checkpoint(tmp_path, tensors, {"model_type": model_type, "hidden_size": H})
    with open_store(path) as store:
        layer = store.layer(0)
        assert (layer.gate.k, layer.gate.n, layer.down.k, layer.down.n) == (H, I, I, H)
        for expert in range(E):
            np.testing.assert_array_equal(layer.gate.expert(expert), fused[expert, :I].T)  # gate rows first
            np.testing.assert_array_equal(layer.up.expert(expert), fused[expert, I:].T)
            np.testing.assert_array_equal(layer.down.expert(expert), out[expert].T)


def test_input_linear_with_unknown_model_type_is_refused(tmp_path):
    tensors = {
        "model.layers.0.block_sparse_moe.input_linear.weight": random((E, 2 * I, H)),
        "model.layers.0.block_sparse_moe.output_linear.weight": random((E, H, I)),
    }
    with pytest.raises(FormatError, match="refusing to guess"):
        open_store(write_checkpoint(tmp_path, tensors, {"model_type": "mystery", "hidden_size": H}))


def test_dbrx_experts_folded_into_the_first_axis(tmp_path):
    w1, v1, w2 = random((E * I, H), 1), random((E * I, H), 2), random((E * I, H), 3)
    prefix = "transformer.blocks.0.ffn.experts.mlp"
    tensors = {
        f"{prefix}.w1": w1,
        f"{prefix}.v1": v1,
        f"{prefix}.w2": w2,
        "transformer.blocks.0.ffn.router.layer.weight": random((E, H), 4),
    }
    config = {"model_type": "dbrx", "d_model": H, "ffn_config": {"moe_num_experts": E, "ffn_hidden_size": I}}
    with open_store(write_checkpoint(tmp_path, tensors, config)) as store:
        assert store.layout == "dbrx"
        layer = store.layer(0)
        for expert in range(E):
            rows = slice(expert * I, (expert + 1) * I)
            np.testing.assert_array_equal(layer.gate.expert(expert), w1[rows].T)  # [out, in] per expert
            np.testing.assert_array_equal(layer.up.expert(expert), v1[rows].T)
            np.testing.assert_array_equal(layer.down.expert(expert), w2[rows])  # [in, out] per expert
        assert (layer.down.k, layer.down.n) == (I, H)
    del config["ffn_config"]
    with pytest.raises(FormatError, match="moe_num_experts"):
        open_store(write_checkpoint(tmp_path, tensors, config))


def test_deepseek_v4_native_names(tmp_path):
    tensors = {
        f"layers.{layer}.ffn.experts.{e}.{w}.weight": random(shape, e)
        for layer in (0, 1)
        for e in range(E)
        for w, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I)))
    }
    with open_store(write_checkpoint(tmp_path, tensors, {"model_type": "deepseek_v4"})) as store:
        assert store.layer_indices == [0, 1]
        np.testing.assert_array_equal(store.layer(1).up.expert(2), tensors["layers.1.ffn.experts.2.w3.weight"].T)


def test_deepseek_mtp_layer_is_reachable_but_not_a_decoding_layer(tmp_path):
    tensors = {
        f"model.layers.{layer}.mlp.experts.{e}.{p}.weight": random(shape, e)
        for layer in (1, 2)
        for e in range(E)
        for p, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))
    }
    config = {"model_type": "deepseek_v3", "num_hidden_layers": 2, "num_nextn_predict_layers": 1}
    path = write_checkpoint(tmp_path / "src", tensors, config)
    with open_store(path) as store:
        assert store.layer_indices == [1] and store.num_layers == 1
        assert [layer.layer_index for layer in store.mtp_layers] == [2]
        assert store.layer(2).mtp and not store.layer(1).mtp
        np.testing.assert_array_equal(
            store.layer(2).gate.expert(0), tensors["model.layers.2.mlp.experts.0.gate_proj.weight"].T
        )
    converted = convert(path, tmp_path / "dst")
    with open_store(converted.path) as store:  # the MTP layer travels, still marked
        assert store.layer_indices == [1] and [layer.layer_index for layer in store.mtp_layers] == [2]


def test_gateless_relu2_experts_are_refused_by_name(tmp_path):
    tensors = {
        f"backbone.layers.0.mixer.experts.{e}.{p}.weight": random(shape, e)
        for e in range(E)
        for p, shape in (("up_proj", (I, H)), ("down_proj", (H, I)))
    }
    with pytest.raises(FormatError, match="without a gate projection"):
        open_store(write_checkpoint(tmp_path, tensors, {"model_type": "nemotron_h"}))


# -- the same layouts as transformers writes them ------------------------------


def _save_pretrained(tmp_path, config_class: str, model_class: str, **config):
    torch = pytest.importorskip("torch", reason="save_pretrained fixtures need torch")
    transformers = pytest.importorskip("transformers", reason="save_pretrained fixtures need transformers")
    if not hasattr(transformers, config_class) or not hasattr(transformers, model_class):
        pytest.skip(f"this transformers has no {model_class}")
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    model.save_pretrained(tmp_path)
    from safetensors.numpy import load_file

    arrays = {}
    for name in os.listdir(tmp_path):
        if name.endswith(".safetensors"):
            arrays.update(load_file(os.path.join(tmp_path, name)))
    return arrays


SMALL = {"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64}


def _check_against_state(store, arrays, gate_up_name, down_name, *, gate_first: bool, layout: str):
    """gate/up/down of every expert against the saved [E, 2I, H]-or-[E, H, 2I] tensors."""
    for layer in store.layers:
        fused = arrays[gate_up_name.format(layer=layer.layer_index)]
        down = arrays[down_name.format(layer=layer.layer_index)]
        for expert in range(layer.num_experts):
            kn = fused[expert] if layout == "kn" else fused[expert].T  # [H, 2I]
            width = kn.shape[1] // 2
            gate, up = (kn[:, :width], kn[:, width:]) if gate_first else (kn[:, 0::2], kn[:, 1::2])
            np.testing.assert_array_equal(layer.gate.expert(expert), gate)
            np.testing.assert_array_equal(layer.up.expert(expert), up)
            np.testing.assert_array_equal(layer.down.expert(expert), down[expert] if layout == "kn" else down[expert].T)


def test_granitemoe_save_pretrained(tmp_path):
    arrays = _save_pretrained(
        tmp_path,
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        hidden_size=H,
        intermediate_size=I,
        num_local_experts=E,
        num_experts_per_tok=2,
        **SMALL,
    )
    with open_store(tmp_path) as store:
        assert store.num_layers == 2
        _check_against_state(
            store,
            arrays,
            "model.layers.{layer}.block_sparse_moe.input_linear.weight",
            "model.layers.{layer}.block_sparse_moe.output_linear.weight",
            gate_first=True,
            layout="nk",
        )


def test_qwen3_vl_moe_save_pretrained(tmp_path):
    pytest.importorskip("transformers", reason="save_pretrained fixtures need transformers")
    text = {
        "hidden_size": H,
        "moe_intermediate_size": I,
        "num_experts": E,
        "num_experts_per_tok": 2,
        "intermediate_size": 2 * H,
        "head_dim": 8,
        "decoder_sparse_step": 1,
        **SMALL,
    }
    arrays = _save_pretrained(
        tmp_path,
        "Qwen3VLMoeConfig",
        "Qwen3VLMoeForConditionalGeneration",
        text_config=text,
        vision_config={"depth": 1, "hidden_size": 16, "num_heads": 2, "out_hidden_size": H, "intermediate_size": 16},
    )
    name = next(key for key in arrays if key.endswith("layers.0.mlp.experts.gate_up_proj"))
    prefix = name[: -len("0.mlp.experts.gate_up_proj")]
    # transformers saves [E, 2I, H] and [E, H, I]; with H == 2I only down_proj tells them apart
    layout = "kn" if arrays[prefix + "0.mlp.experts.down_proj"].shape[1] == I else "nk"
    with open_store(tmp_path) as store:
        assert store.layout == "fused_concatenated"
        _check_against_state(
            store,
            arrays,
            prefix + "{layer}.mlp.experts.gate_up_proj",
            prefix + "{layer}.mlp.experts.down_proj",
            gate_first=True,
            layout=layout,
        )


def test_gpt_oss_save_pretrained(tmp_path):
    arrays = _save_pretrained(
        tmp_path,
        "GptOssConfig",
        "GptOssForCausalLM",
        hidden_size=H,
        intermediate_size=I,
        num_local_experts=E,
        num_experts_per_tok=2,
        head_dim=8,
        **SMALL,
    )
    name = "model.layers.{layer}.mlp.experts.gate_up_proj"
    layout = "kn" if arrays["model.layers.0.mlp.experts.down_proj"].shape[1] == I else "nk"
    with open_store(tmp_path) as store:
        assert store.layout == "fused_interleaved"
        _check_against_state(
            store, arrays, name, "model.layers.{layer}.mlp.experts.down_proj", gate_first=False, layout=layout
        )
        bias = arrays["model.layers.0.mlp.experts.gate_up_proj_bias"]
        np.testing.assert_array_equal(store.layer(0).up.part("bias", 1), bias[1, 1::2])


def test_dbrx_save_pretrained(tmp_path):
    arrays = _save_pretrained(
        tmp_path,
        "DbrxConfig",
        "DbrxForCausalLM",
        d_model=H,
        n_heads=2,
        n_layers=2,
        vocab_size=64,
        max_seq_len=32,
        attn_config={"kv_n_heads": 1, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": I, "moe_num_experts": E, "moe_top_k": 2},
    )
    with open_store(tmp_path) as store:
        assert store.layout == "dbrx" and store.num_layers == 2
        w1 = next(value for key, value in arrays.items() if key.endswith("blocks.1.ffn.experts.mlp.w1"))
        np.testing.assert_array_equal(store.layer(1).gate.expert(3), w1[3 * I : 4 * I].T)

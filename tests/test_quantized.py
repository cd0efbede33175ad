"""FP8 block and MXFP4 checkpoints: every part reachable, values by the reference
formula, refreshes move every part, convert keeps or dequantizes them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from builders import assert_convert_keeps_or_dequantizes, write_bytes, write_checkpoint

import mmapstore
from mmapstore import ArraySink, FormatError, SinkError, SlabService, convert, open_store, verify

E, H, I = 3, 160, 200  # not multiples of 128: partial scale blocks on both axes
FP8_CONFIG = {
    "model_type": "deepseek_v3",
    "hidden_size": H,
    "moe_intermediate_size": I,
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    },
}
CT_CONFIG = {
    "model_type": "qwen3_moe",
    "hidden_size": H,
    "quantization_config": {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]},
            }
        },
    },
}


def save(directory, tensors: dict[str, np.ndarray], config: dict) -> str:
    """Through the real safetensors library, as the format's own scripts save."""
    return write_checkpoint(directory, tensors, config, via="library")


def fp8_checkpoint(scale_suffix: str = "weight_scale_inv", scale_dtype=np.float32, seed: int = 0):
    """Per-expert FP8 weights ``[out, in]`` and their 128x128 scale grids, with DeepSeek-V3's names."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((4, H)).astype(ml_dtypes.bfloat16),
        "model.layers.0.mlp.gate.weight": np.zeros((E, H), ml_dtypes.bfloat16),
    }
    for expert in range(E):
        for proj, (out, inp) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            prefix = f"model.layers.0.mlp.experts.{expert}.{proj}"
            tensors[f"{prefix}.weight"] = rng.uniform(-448, 448, (out, inp)).astype(ml_dtypes.float8_e4m3fn)
            grid = (-(-out // 128), -(-inp // 128))
            tensors[f"{prefix}.{scale_suffix}"] = rng.uniform(1e-4, 1e-2, grid).astype(scale_dtype)
    return tensors


def fp8_reference(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Element by element: w[i, j] * s[i // 128, j // 128], in float64."""
    out = np.empty(weight.shape, np.float64)
    codes = weight.astype(np.float64)
    scales = scale.astype(np.float64)
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            out[i, j] = codes[i, j] * scales[i // 128, j // 128]
    return out


PROJS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@pytest.mark.parametrize(
    ("suffix", "scale_dtype", "config"),
    [("weight_scale_inv", np.float32, FP8_CONFIG), ("weight_scale", ml_dtypes.bfloat16, CT_CONFIG)],
)
def test_fp8_block_parts_and_values(tmp_path, suffix, scale_dtype, config):
    tensors = fp8_checkpoint(suffix, scale_dtype)
    with open_store(save(tmp_path, tensors, config)) as store:
        layer = store.layer(0)
        for proj, stack in layer.stacks:
            assert stack.encoding.kind == "fp8_block" and stack.encoding.encoded
            assert set(stack.parts) == {"weight", "scale"}
            for expert in (0, E - 1):
                prefix = f"model.layers.0.mlp.experts.{expert}.{PROJS[proj]}"
                weight, scale = tensors[f"{prefix}.weight"], tensors[f"{prefix}.{suffix}"]
                # the weight part stays the encoded codes, zero-copy; the scale part is reachable
                np.testing.assert_array_equal(stack.expert(expert), weight.T)
                assert stack.expert(expert).dtype == ml_dtypes.float8_e4m3fn
                np.testing.assert_array_equal(stack.part("scale", expert), scale)
                values = stack.dequantize(expert)
                assert values.shape == (stack.k, stack.n)
                np.testing.assert_allclose(values, fp8_reference(weight, scale).T, rtol=1e-6)
            assert stack.slab_nbytes == weight.nbytes + scale.nbytes
        assert layer.expert_nbytes == sum(
            tensors[f"model.layers.0.mlp.experts.0.{name}.{part}"].nbytes
            for name in PROJS.values()
            for part in ("weight", suffix)
        )


def test_fp8_refresh_moves_codes_and_scales_together(tmp_path):
    tensors = fp8_checkpoint()
    with open_store(save(tmp_path, tensors, FP8_CONFIG)) as store:
        service = SlabService(store, 1)
        result = service.step([np.array([2, 2, 2])])
        assert result.refreshed and [update.new_expert for update in result.updates] == [2]
        sink = service.sink
        assert isinstance(sink, ArraySink)
        for proj, name in PROJS.items():
            prefix = f"model.layers.0.mlp.experts.2.{name}"
            np.testing.assert_array_equal(sink.arrays[f"blk.0.ffn_{proj}_exps.weight"][0], tensors[f"{prefix}.weight"])
            np.testing.assert_array_equal(
                sink.arrays[f"blk.0.ffn_{proj}_exps.scale"][0], tensors[f"{prefix}.weight_scale_inv"]
            )
        assert result.nbytes == store.layer(0).expert_nbytes


def test_encoded_slabs_cannot_be_cast_into_a_float_pool(tmp_path):
    with open_store(save(tmp_path, fp8_checkpoint(), FP8_CONFIG)) as store:
        with pytest.raises(SinkError, match="encoded"):
            ArraySink.for_store(store, 1, dtype=np.float32)
        with pytest.raises(SinkError, match="encoded"):
            ArraySink.for_store(store, 1, orientation="kn")


def test_fp8_convert_keeps_codes_and_scales_or_dequantizes(tmp_path):
    tensors = fp8_checkpoint()
    manifest = assert_convert_keeps_or_dequantizes(save(tmp_path / "src", tensors, FP8_CONFIG), tmp_path, E)
    assert manifest["encodings"]["blk.0.ffn_gate_exps"]["kind"] == "fp8_block"
    assert "blk.0.ffn_gate_exps.scale" in manifest["tensors"]
    with open_store(tmp_path / "kept") as store:
        assert all(stack.dtype == ml_dtypes.float8_e4m3fn for _, stack in store.layer(0).stacks)


def test_fp8_weight_without_scale_is_refused(tmp_path):
    tensors = fp8_checkpoint()
    del tensors["model.layers.0.mlp.experts.1.up_proj.weight_scale_inv"]
    with pytest.raises(FormatError, match=r"experts \[1\] missing"):
        open_store(save(tmp_path / "one", tensors, FP8_CONFIG))
    tensors = {name: array for name, array in fp8_checkpoint().items() if "scale" not in name}
    with pytest.raises(FormatError, match="no weight_scale_inv beside it"):
        open_store(save(tmp_path / "all", tensors, FP8_CONFIG))


def test_fp8_wrong_scale_grid_is_refused(tmp_path):
    tensors = fp8_checkpoint()
    for name in list(tensors):
        if name.endswith("weight_scale_inv"):
            tensors[name] = np.ones((1, 1), np.float32)
    with pytest.raises(FormatError, match="scale grid"):
        open_store(save(tmp_path, tensors, FP8_CONFIG))


def test_unconverted_bf16_experts_under_an_fp8_config_are_plain(tmp_path):
    """modules_to_not_convert leaves some experts in bf16: they have no scale and are values."""
    rng = np.random.default_rng(3)
    tensors = {
        f"model.layers.0.mlp.experts.{e}.{p}.weight": rng.standard_normal(s).astype(ml_dtypes.bfloat16)
        for e in range(E)
        for p, s in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))
    }
    config = FP8_CONFIG | {
        "quantization_config": FP8_CONFIG["quantization_config"]
        | {"modules_to_not_convert": ["model.layers.0.mlp.experts"]}
    }
    with open_store(save(tmp_path, tensors, config)) as store:
        stack = store.layer(0).gate
        assert stack.encoding.kind == "plain"
        np.testing.assert_array_equal(stack.expert(1), tensors["model.layers.0.mlp.experts.1.gate_proj.weight"].T)


@pytest.mark.parametrize("block", [None, [128], "128x128"])
def test_fp8_without_a_block_size_is_refused(tmp_path, block):
    config = FP8_CONFIG | {"quantization_config": {"quant_method": "fp8", "weight_block_size": block}}
    with pytest.raises(FormatError, match="weight_block_size"):
        open_store(save(tmp_path, fp8_checkpoint(), config))


# -- MXFP4 (GPT-OSS) -----------------------------------------------------------

MX_E, MX_H, MX_I = 3, 64, 32
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def mxfp4_checkpoint(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mlp = "model.layers.0.mlp"
    return {
        f"{mlp}.router.weight": rng.standard_normal((MX_E, MX_H)).astype(ml_dtypes.bfloat16),
        f"{mlp}.experts.gate_up_proj_blocks": rng.integers(0, 256, (MX_E, 2 * MX_I, MX_H // 32, 16), dtype=np.uint8),
        f"{mlp}.experts.gate_up_proj_scales": rng.integers(118, 132, (MX_E, 2 * MX_I, MX_H // 32), dtype=np.uint8),
        f"{mlp}.experts.gate_up_proj_bias": rng.standard_normal((MX_E, 2 * MX_I)).astype(np.float32),
        f"{mlp}.experts.down_proj_blocks": rng.integers(0, 256, (MX_E, MX_H, MX_I // 32, 16), dtype=np.uint8),
        f"{mlp}.experts.down_proj_scales": rng.integers(118, 132, (MX_E, MX_H, MX_I // 32), dtype=np.uint8),
        f"{mlp}.experts.down_proj_bias": rng.standard_normal((MX_E, MX_H)).astype(np.float32),
    }


MX_CONFIG = {
    "model_type": "gpt_oss",
    "hidden_size": MX_H,
    "intermediate_size": MX_I,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]},
}


def mxfp4_reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Element by element: byte j of block b holds elements 32b + 2j (low nibble) and 32b + 2j + 1."""
    rows, groups, _ = blocks.shape
    out = np.empty((rows, groups * 32), np.float64)
    for row in range(rows):
        for group in range(groups):
            scale = 2.0 ** (int(scales[row, group]) - 127)
            for byte in range(16):
                value = int(blocks[row, group, byte])
                out[row, group * 32 + 2 * byte] = E2M1[value & 0xF] * scale
                out[row, group * 32 + 2 * byte + 1] = E2M1[value >> 4] * scale
    return out


def test_mxfp4_gpt_oss_parts_values_and_deinterleaving(tmp_path):
    tensors = mxfp4_checkpoint()
    mlp = "model.layers.0.mlp.experts"
    with open_store(save(tmp_path, tensors, MX_CONFIG)) as store:
        layer = store.layer(0)
        assert store.layout == "fused_interleaved"
        for expert in range(MX_E):
            fused = mxfp4_reference(
                tensors[f"{mlp}.gate_up_proj_blocks"][expert], tensors[f"{mlp}.gate_up_proj_scales"][expert]
            )  # [2I, H]
            # gate = even rows of the 2I axis, up = odd rows; [k, n] = [H, I]
            np.testing.assert_array_equal(layer.gate.dequantize(expert), fused[0::2].T.astype(np.float32))
            np.testing.assert_array_equal(layer.up.dequantize(expert), fused[1::2].T.astype(np.float32))
            down = mxfp4_reference(
                tensors[f"{mlp}.down_proj_blocks"][expert], tensors[f"{mlp}.down_proj_scales"][expert]
            )
            np.testing.assert_array_equal(layer.down.dequantize(expert), down.T.astype(np.float32))
            np.testing.assert_array_equal(
                layer.gate.part("bias", expert), tensors[f"{mlp}.gate_up_proj_bias"][expert, 0::2]
            )
            np.testing.assert_array_equal(
                layer.up.part("scale", expert), tensors[f"{mlp}.gate_up_proj_scales"][expert, 1::2]
            )
            np.testing.assert_array_equal(layer.up.expert(expert), tensors[f"{mlp}.gate_up_proj_blocks"][expert, 1::2])
        assert (layer.gate.k, layer.gate.n, layer.down.k, layer.down.n) == (MX_H, MX_I, MX_I, MX_H)
        assert all(stack.encoding.kind == "mxfp4" for _, stack in layer.stacks)


def test_mxfp4_matches_transformers_dequantizer(tmp_path):
    torch = pytest.importorskip("torch", reason="transformers' MXFP4 dequantizer needs torch")
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4", reason="needs transformers")
    tensors = mxfp4_checkpoint(seed=5)
    mlp = "model.layers.0.mlp.experts"
    blocks = torch.from_numpy(tensors[f"{mlp}.gate_up_proj_blocks"].copy())
    scales = torch.from_numpy(tensors[f"{mlp}.gate_up_proj_scales"].copy())
    # transformers returns [E, H, 2I] float32 (the layout GptOssExperts uses); gate = [..., ::2]
    want = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).numpy()
    with open_store(save(tmp_path, tensors, MX_CONFIG)) as store:
        for expert in range(MX_E):
            np.testing.assert_array_equal(store.layer(0).gate.dequantize(expert), want[expert][:, 0::2])
            np.testing.assert_array_equal(store.layer(0).up.dequantize(expert), want[expert][:, 1::2])


def test_mxfp4_convert_keeps_blocks_or_dequantizes(tmp_path):
    tensors = mxfp4_checkpoint()
    src = save(tmp_path / "src", tensors, MX_CONFIG)
    kept = convert(src, tmp_path / "kept")
    with open_store(src) as source, open_store(kept.path) as store:
        for proj, stack in store.layer(0).stacks:
            original = getattr(source.layer(0), proj)
            assert stack.encoding.kind == "mxfp4" and set(stack.parts) == {"weight", "scale", "bias"}
            for expert in range(MX_E):
                np.testing.assert_array_equal(stack.dequantize(expert), original.dequantize(expert))
                np.testing.assert_array_equal(stack.part("bias", expert), original.part("bias", expert))
    assert verify(kept.path).ok
    dense = convert(src, tmp_path / "f32", dtype="f32")
    with open_store(src) as source, open_store(dense.path) as store:
        for proj, stack in store.layer(0).stacks:
            assert stack.encoding.kind == "plain" and set(stack.parts) == {"weight", "bias"}
            for expert in range(MX_E):
                np.testing.assert_array_equal(stack.expert(expert), getattr(source.layer(0), proj).dequantize(expert))


def test_mxfp4_blocks_without_the_mxfp4_config_are_refused(tmp_path):
    config = {key: value for key, value in MX_CONFIG.items() if key != "quantization_config"}
    with pytest.raises(FormatError, match="MXFP4"):
        open_store(save(tmp_path, mxfp4_checkpoint(), config))


def test_mxfp4_missing_scales_are_refused(tmp_path):
    tensors = mxfp4_checkpoint()
    del tensors["model.layers.0.mlp.experts.down_proj_scales"]
    with pytest.raises(FormatError, match="down_proj_scales"):
        open_store(save(tmp_path, tensors, MX_CONFIG))


def test_slab_store_scale_without_an_encoding_is_refused(tmp_path):
    """A slab store whose manifest lost its encodings must not serve codes as values."""
    src = save(tmp_path / "src", fp8_checkpoint(), FP8_CONFIG)
    kept = convert(src, tmp_path / "kept").path
    manifest_path = os.path.join(kept, "mmapstore.json")
    manifest = json.loads(Path(manifest_path).read_text())
    manifest["encodings"] = {}
    write_bytes(manifest_path, json.dumps(manifest).encode())
    with pytest.raises(mmapstore.FormatError, match="manifest must name its encoding"):
        open_store(kept)

"""Every tensor under an experts block is claimed or refused by name: encoded
values are never served as weights, and a fused split is never guessed."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from builders import write_bytes, write_checkpoint

from mmapstore import FormatError, open_store
from mmapstore.cli import main

E, H, I = 4, 16, 8  # experts, hidden, expert width


def per_expert(dtype=np.float32, suffixes=("weight",), extra: dict | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.zeros((8, H), np.float32)}
    for expert in range(E):
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            prefix = f"model.layers.0.mlp.experts.{expert}.{proj}"
            for suffix in suffixes:
                if suffix == "weight":
                    tensors[f"{prefix}.weight"] = rng.standard_normal(shape).astype(dtype)
                else:
                    tensors[f"{prefix}.{suffix}"] = np.ones((1, 1), np.float32)
    tensors.update(extra or {})
    return tensors


def refused(path: str, *needles: str, capsys=None) -> None:
    with pytest.raises(FormatError) as info:
        open_store(path)
    for needle in needles:
        assert needle in str(info.value)


def test_fp8_scales_without_a_quantization_config_are_refused_everywhere(tmp_path, capsys):
    """Raw FP8 codes beside weight_scale_inv are never served or converted as weights
    when the checkpoint does not say how they are quantized."""
    tensors = per_expert(ml_dtypes.float8_e4m3fn, ("weight", "weight_scale_inv"))
    path = write_checkpoint(tmp_path / "fp8", tensors, {"model_type": "deepseek_v3", "hidden_size": H})
    refused(path, "weight_scale_inv", "FP8")
    for argv in (
        ["convert", path, str(tmp_path / "out"), "--dtype", "bf16", "--quiet"],
        ["inspect", path],
        ["verify", path],
    ):
        assert main(argv) == 1, argv
        out, err = capsys.readouterr()
        assert "weight_scale_inv" in out + err and "Traceback" not in out + err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    ("suffix", "fmt"),
    [
        ("weight_scale", "compressed-tensors"),
        ("weight_packed", "compressed-tensors"),
        ("qweight", "AWQ/GPTQ"),
        ("qzeros", "AWQ/GPTQ"),
        ("scales", "AWQ/GPTQ"),
        ("weight_global_scale", "NVFP4"),
        ("lora_A", "no expert layout"),
    ],
)
def test_unclaimed_expert_tensors_are_refused_by_name(tmp_path, suffix, fmt):
    path = write_checkpoint(tmp_path, per_expert(suffixes=("weight", suffix)), {"model_type": "qwen3_moe"})
    refused(path, suffix, fmt)


# awq, gptq and compressed-tensors are served (tests/test_packed.py), but not from a config
# that does not say their bits, packing or format: those are refused rather than guessed.
@pytest.mark.parametrize("method", ["bitsandbytes", "gptq", "awq", "compressed-tensors", "modelopt", "hqq"])
def test_unserved_quantization_config_is_refused(tmp_path, method):
    config = {"model_type": "qwen3_moe", "quantization_config": {"quant_method": method}}
    path = write_checkpoint(tmp_path, per_expert(), config)
    refused(path, repr(method))


def test_gpt_oss_mxfp4_is_refused_by_format(tmp_path):
    mlp = "model.layers.0.mlp.experts"
    tensors = {
        f"{mlp}.gate_up_proj_blocks": np.zeros((E, 2 * I, H // 32 or 1, 16), np.uint8),
        f"{mlp}.gate_up_proj_scales": np.zeros((E, 2 * I, 1), np.uint8),
        f"{mlp}.down_proj_blocks": np.zeros((E, H, 1, 16), np.uint8),
        f"{mlp}.down_proj_scales": np.zeros((E, H, 1), np.uint8),
    }
    path = write_checkpoint(tmp_path, tensors, {"model_type": "gpt_oss", "hidden_size": H})
    refused(path, "MXFP4")


@pytest.mark.parametrize("bad", ["01", "\u0661", "+1", "1_0"])
def test_non_canonical_numbers_are_refused(tmp_path, bad):
    """`experts.01` (or an Arabic-Indic one) must not land on expert 1's key."""
    extra = {f"model.layers.0.mlp.experts.{bad}.gate_proj.weight": np.zeros((I, H), np.float32)}
    path = write_checkpoint(tmp_path, per_expert(extra=extra), {"model_type": "qwen3_moe"})
    refused(path, f"experts.{bad}.gate_proj")


def test_non_canonical_layer_numbers_are_refused(tmp_path):
    tensors = per_expert()
    tensors["model.layers.00.mlp.experts.0.gate_proj.weight"] = np.zeros((I, H), np.float32)
    path = write_checkpoint(tmp_path, tensors, {"model_type": "qwen3_moe"})
    refused(path, "layers.00")


def test_duplicate_projection_names_are_refused(tmp_path):
    extra = {"model.layers.0.mlp.experts.0.w1.weight": np.zeros((I, H), np.float32)}
    path = write_checkpoint(tmp_path, per_expert(extra=extra), {"model_type": "qwen3_moe"})
    refused(path, "same expert projection")


def test_huge_expert_id_is_refused_by_arithmetic(tmp_path):
    extra = {"model.layers.0.mlp.experts.999999999.gate_proj.weight": np.zeros((I, H), np.float32)}
    path = write_checkpoint(tmp_path, per_expert(extra=extra), {"model_type": "qwen3_moe"})
    refused(path, "over the")


def _qwen3_vl(orientation: str, hidden: int, width: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    prefix = "model.language_model.layers.0.mlp.experts"
    if orientation == "kn":  # as published: [E, H, 2I], [E, I, H]
        gate_up, down = (E, hidden, 2 * width), (E, width, hidden)
    else:  # as transformers saves it: [E, 2I, H], [E, H, I]
        gate_up, down = (E, 2 * width, hidden), (E, hidden, width)
    return {
        f"{prefix}.gate_up_proj": rng.standard_normal(gate_up).astype(np.float32),
        f"{prefix}.down_proj": rng.standard_normal(down).astype(np.float32),
    }


@pytest.mark.parametrize("orientation", ["kn", "nk"])
def test_qwen3_vl_moe_is_concatenated_in_both_orientations(tmp_path, orientation):
    tensors = _qwen3_vl(orientation, H, I)
    config = {"model_type": "qwen3_vl_moe", "text_config": {"model_type": "qwen3_vl_moe_text", "hidden_size": H}}
    path = write_checkpoint(tmp_path, tensors, config)
    fused = tensors["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    down = tensors["model.language_model.layers.0.mlp.experts.down_proj"]
    with open_store(path) as store:
        assert store.layout == "fused_concatenated"
        layer = store.layer(0)
        for expert in range(E):
            kn = fused[expert] if orientation == "kn" else fused[expert].T  # [H, 2I]
            np.testing.assert_array_equal(layer.gate.expert(expert), kn[:, :I])
            np.testing.assert_array_equal(layer.up.expert(expert), kn[:, I:])
            np.testing.assert_array_equal(
                layer.down.expert(expert), down[expert] if orientation == "kn" else down[expert].T
            )
        assert (layer.gate.k, layer.gate.n) == (H, I)


@pytest.mark.parametrize("orientation", ["kn", "nk"])
def test_qwen3_vl_moe_square_gate_up_is_decided_by_down_proj(tmp_path, orientation):
    """H == 2I makes gate_up square, so its shape alone cannot tell [E, H, 2I] from
    [E, 2I, H]; down_proj ([E, I, H] against [E, H, I]) can, and decides."""
    tensors = _qwen3_vl(orientation, 2 * I, I)
    config = {"model_type": "qwen3_vl_moe", "text_config": {"hidden_size": 2 * I}}
    fused = tensors["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    with open_store(write_checkpoint(tmp_path, tensors, config)) as store:
        kn = fused[1] if orientation == "kn" else fused[1].T
        np.testing.assert_array_equal(store.layer(0).up.expert(1), kn[:, I:])
        assert store.layer(0).gate.native_orientation == orientation


def test_qwen3_vl_moe_without_hidden_size_is_refused(tmp_path):
    refused(write_checkpoint(tmp_path, _qwen3_vl("kn", H, I), {"model_type": "qwen3_vl_moe"}), "hidden_size")


def test_fused_stack_that_does_not_fit_hidden_size_is_refused(tmp_path):
    refused(
        write_checkpoint(tmp_path, _qwen3_vl("kn", H, I), {"model_type": "llama4_text", "hidden_size": H + 2}),
        "do not fit hidden_size",
    )


def test_gguf_file_is_recognised_as_gguf(tmp_path):
    """A GGUF magic routes to the GGUF reader (not read as a safetensors length)."""
    from mmapstore.formats import read_checkpoint

    empty = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)
    path = write_bytes(tmp_path / "model.gguf", empty)
    assert read_checkpoint(path).kind == "gguf"
    refused(path, "no MoE expert tensors")
    directory = tmp_path / "dir"
    directory.mkdir()
    write_bytes(directory / "model.gguf", empty)
    assert read_checkpoint(str(directory)).kind == "gguf"
    # a GGUF file misnamed .safetensors is still read as GGUF, never as a huge header length
    assert read_checkpoint(write_bytes(tmp_path / "model.safetensors", empty)).kind == "gguf"


def test_unknown_dtype_is_refused_only_where_an_expert_needs_it(tmp_path):
    """An F8_E8M0 or unknown-code tensor beside the experts does not make the checkpoint unopenable."""
    path = write_checkpoint(tmp_path, per_expert(), {"model_type": "qwen3_moe"})
    with open(os.path.join(path, "model.safetensors"), "rb") as handle:
        data = handle.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    end = max(entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__")
    header["model.norm.weight"] = {"dtype": "F4", "shape": [2, 2], "data_offsets": [end, end + 2]}
    header["model.scales"] = {"dtype": "F8_E8M0", "shape": [2], "data_offsets": [end + 2, end + 4]}
    text = json.dumps(header).encode()
    write_bytes(
        os.path.join(path, "model.safetensors"), struct.pack("<Q", len(text)) + text + body + bytes([1, 2, 127, 128])
    )
    with open_store(path) as store:
        np.testing.assert_array_equal(store.view("model.scales").astype(np.float32), [1.0, 2.0])
        with pytest.raises(FormatError, match="'F4'"):
            store.view("model.norm.weight")
    # the same unknown code on an expert weight is refused by name
    header["model.layers.0.mlp.experts.0.gate_proj.weight"]["dtype"] = "F4"
    text = json.dumps(header).encode()
    write_bytes(
        os.path.join(path, "model.safetensors"), struct.pack("<Q", len(text)) + text + body + bytes([1, 2, 127, 128])
    )
    refused(path, "experts.0.gate_proj.weight", "'F4'")

"""Packed 4-bit experts: compressed-tensors W4A16 / NVFP4 / MXFP4, AWQ GEMM and
GPTQ v1.  Every part reachable, values by each format's own reference
(compressed-tensors' compressors where installed, AWQ/GPTQ by their packing
definitions, checked element by element), refreshes move every part, convert
keeps or dequantizes them, unsupported variants refused by name."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from builders import assert_convert_keeps_or_dequantizes, write_checkpoint

from mmapstore import ArraySink, FormatError, SlabService, open_store

E, H, I = 3, 96, 64  # experts, hidden, expert width: H and I multiples of 32, three and two groups of 32
PROJS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
SHAPES = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}  # (out, in), nn.Linear
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds column AWQ_ORDER[i] of its 8


def save(directory, tensors: dict[str, np.ndarray], config: dict) -> str:
    """Through the real safetensors library, as the format's own scripts save."""
    return write_checkpoint(directory, tensors, config, via="library")


def base_config(quant: dict, model_type: str = "qwen3_moe") -> dict:
    return {
        "model_type": model_type,
        "hidden_size": H,
        "moe_intermediate_size": I,
        "num_experts": E,
        "quantization_config": quant,
    }


def ct_quant(fmt: str, weights: dict) -> dict:
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "input_activations": None,
                "output_activations": None,
                "weights": weights,
            }
        },
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.gate$"],
        "kv_cache_scheme": None,
    }


def int_weights(group_size: int | None, symmetric: bool) -> dict:
    return {
        "num_bits": 4,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group" if group_size else "channel",
        "group_size": group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "block_structure": None,
        "observer_kwargs": {},
    }


NVFP4_WEIGHTS = {
    "num_bits": 4,
    "type": "float",
    "symmetric": True,
    "strategy": "tensor_group",
    "group_size": 16,
    "dynamic": False,
    "scale_dtype": "torch.float8_e4m3fn",
}
MXFP4_WEIGHTS = {
    "num_bits": 4,
    "type": "float",
    "symmetric": True,
    "strategy": "group",
    "group_size": 32,
    "dynamic": False,
    "scale_dtype": "torch.uint8",
}

# Kimi-K2-Thinking as published: compressed-tensors INT4, symmetric, group 32, DeepSeek-V3 names, layer 0 dense.
KIMI_CONFIG = {
    "model_type": "kimi_k2",
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": H,
    "moe_intermediate_size": I,
    "n_routed_experts": E,
    "first_k_dense_replace": 1,
    "num_hidden_layers": 2,
    "quantization_config": ct_quant("pack-quantized", int_weights(32, True)),
}


# -- compressed-tensors fixtures, written by its own compressors ------------------


def _numpy(tensor) -> np.ndarray:
    import torch

    views = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
    }
    if tensor.dtype in views:
        carrier, dtype = views[tensor.dtype]
        return tensor.contiguous().view(carrier).numpy().view(dtype)
    return tensor.contiguous().numpy()


def ct_checkpoint(kind: str, group_size: int | None = 32, symmetric: bool = True, seed: int = 0, layer: int = 0):
    """Per-expert tensors compressed by compressed-tensors' own compressor, and
    its own decompression of each (the oracle, bf16 ``[out, in]``)."""
    torch = pytest.importorskip("torch", reason="compressed-tensors needs torch")
    pytest.importorskip("compressed_tensors", reason="compressed-tensors writes and reads the reference fixtures")
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    generator = torch.Generator().manual_seed(seed)
    if kind == "int4":
        weights = int_weights(group_size, symmetric)
        compressor, fmt = PackedQuantizationCompressor, "pack-quantized"
    elif kind == "nvfp4":
        weights, compressor, fmt = NVFP4_WEIGHTS, NVFP4PackedCompressor, "nvfp4-pack-quantized"
    else:
        weights, compressor, fmt = MXFP4_WEIGHTS, MXFP4PackedCompressor, "mxfp4-pack-quantized"
    args = {key: value for key, value in weights.items() if key not in ("scale_dtype",)}
    if kind != "int4":
        args["scale_dtype"] = torch.float8_e4m3fn if kind == "nvfp4" else torch.uint8
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": np.zeros((8, H), ml_dtypes.bfloat16),
        f"model.layers.{layer}.mlp.gate.weight": np.zeros((E, H), ml_dtypes.bfloat16),
        f"model.layers.{layer}.mlp.shared_experts.gate_proj.weight": np.zeros((I, H), ml_dtypes.bfloat16),
    }
    reference: dict[tuple[int, str], np.ndarray] = {}
    for expert in range(E):
        for proj, (out, inp) in SHAPES.items():
            weight = (torch.randn(out, inp, generator=generator) * 0.05).to(torch.bfloat16)
            state = {"weight": weight}
            if kind == "int4":
                groups = inp // group_size if group_size else 1
                state["weight_scale"] = (torch.rand(out, groups, generator=generator) * 0.02 + 0.002).to(torch.bfloat16)
                if not symmetric:
                    state["weight_zero_point"] = torch.randint(
                        -8, 8, (out, groups), generator=generator, dtype=torch.int8
                    )
            elif kind == "nvfp4":
                global_scale = torch.tensor([448.0 * 6.0 / 0.2], dtype=torch.float32)
                local = torch.rand(out, inp // 16, generator=generator) * 0.03 + 0.01
                state["weight_scale"] = local * global_scale
                state["weight_global_scale"] = global_scale
            else:
                state["weight_scale"] = 2.0 ** torch.randint(-9, -4, (out, inp // 32), generator=generator).float()
            compressed = compressor.compress(state, scheme)
            prefix = f"model.layers.{layer}.mlp.experts.{expert}.{proj}"
            for name, tensor in compressed.items():
                tensors[f"{prefix}.{name}"] = _numpy(tensor)
            decompressed = compressor.decompress(dict(compressed), scheme)["weight"]
            reference[expert, proj] = _numpy(decompressed.to(torch.bfloat16))
    quant = ct_quant(fmt, weights)
    return tensors, quant, reference


def ct_int4_oracle(packed, scale, zero, g_idx, out: int, inp: int, group: int) -> np.ndarray:
    """Element by element from the pack-quantized definition: code j of row i is
    bits 4(j % 8) of word j // 8, stored as q + 8; zero points packed the same
    way down the rows."""
    values = np.empty((out, inp), np.float64)
    for i in range(out):
        for j in range(inp):
            q = ((int(packed[i, j // 8]) & 0xFFFFFFFF) >> (4 * (j % 8)) & 0xF) - 8
            column_group = int(g_idx[j]) if g_idx is not None else j // group
            z = 0 if zero is None else ((int(zero[i // 8, column_group]) & 0xFFFFFFFF) >> (4 * (i % 8)) & 0xF) - 8
            values[i, j] = (q - z) * float(scale[i, column_group])
    return values


def fp4_oracle(packed, scale, global_scale, out: int, inp: int, group: int, mx: bool) -> np.ndarray:
    """Byte j // 2 holds element j in its low nibble when j is even; NVFP4 scales
    by ``scale / global_scale`` in float32, MXFP4 by ``2**(e8m0 - 127)``."""
    values = np.empty((out, inp), np.float32)
    for i in range(out):
        for j in range(inp):
            byte = int(packed[i, j // 2])
            code = byte & 0xF if j % 2 == 0 else byte >> 4
            if mx:
                factor = np.float32(2.0 ** (int(scale.view(np.uint8)[i, j // group]) - 127))
            else:
                factor = np.float32(scale[i, j // group]) / np.float32(global_scale[0])
            values[i, j] = np.float32(E2M1[code]) * factor
    return values


@pytest.mark.parametrize(
    ("kind", "group_size", "symmetric"),
    [
        ("int4", 32, True),
        ("int4", 32, False),
        ("int4", None, True),
        ("int4", None, False),
        ("nvfp4", 16, True),
        ("mxfp4", 32, True),
    ],
)
def test_compressed_tensors_parts_and_values(tmp_path, kind, group_size, symmetric):
    tensors, quant, reference = ct_checkpoint(kind, group_size, symmetric)
    with open_store(save(tmp_path, tensors, base_config(quant))) as store:
        layer = store.layer(0)
        for proj, stack in layer.stacks:
            name = PROJS[proj]
            out, inp = SHAPES[name]
            assert (stack.k, stack.n) == (inp, out) and stack.encoding.packed and stack.native_orientation == "nk"
            want_parts = {
                "int4": {"weight", "scale", "shape"} | ({"zero"} if not symmetric else set()),
                "nvfp4": {"weight", "scale", "global_scale"},
                "mxfp4": {"weight", "scale"},
            }[kind]
            assert set(stack.parts) == want_parts
            for expert in (0, E - 1):
                prefix = f"model.layers.0.mlp.experts.{expert}.{name}"
                suffix = {
                    "weight": "weight_packed",
                    "scale": "weight_scale",
                    "zero": "weight_zero_point",
                    "shape": "weight_shape",
                    "global_scale": "weight_global_scale",
                }
                for part in stack.parts:
                    view = stack.part(part, expert)
                    assert not view.flags.writeable
                    np.testing.assert_array_equal(view, tensors[f"{prefix}.{suffix[part]}"])
                np.testing.assert_array_equal(stack.expert(expert), tensors[f"{prefix}.weight_packed"])
                values = stack.dequantize(expert)
                assert values.shape == (inp, out) and values.dtype == np.float32
                # compressed-tensors' own decompression, in its bf16 output
                np.testing.assert_array_equal(values.T.astype(ml_dtypes.bfloat16), reference[expert, name])
                if kind == "int4":
                    want = ct_int4_oracle(
                        tensors[f"{prefix}.weight_packed"],
                        tensors[f"{prefix}.weight_scale"],
                        tensors.get(f"{prefix}.weight_zero_point"),
                        None,
                        out,
                        inp,
                        group_size or inp,
                    )
                else:
                    want = fp4_oracle(
                        tensors[f"{prefix}.weight_packed"],
                        tensors[f"{prefix}.weight_scale"],
                        tensors.get(f"{prefix}.weight_global_scale"),
                        out,
                        inp,
                        group_size,
                        kind == "mxfp4",
                    )
                np.testing.assert_array_equal(values.T, want.astype(np.float32))
            assert stack.slab_nbytes == sum(
                tensors[f"model.layers.0.mlp.experts.0.{name}.{suffix[part]}"].nbytes for part in stack.parts
            )


def test_kimi_k2_thinking_int4_group_32(tmp_path):
    """Kimi-K2-Thinking's experts: compressed-tensors INT4 group 32 with DeepSeek-V3 names; the dense
    layer 0 and the unquantized shared experts are not expert stacks."""
    tensors, _, reference = ct_checkpoint("int4", 32, True, seed=3, layer=1)
    tensors["model.layers.0.mlp.gate_proj.weight"] = np.zeros((4 * I, H), ml_dtypes.bfloat16)
    with open_store(save(tmp_path, tensors, KIMI_CONFIG)) as store:
        assert store.layer_indices == [1] and store.layout == "per_expert"
        layer = store.layer(1)
        assert layer.gate.encoding.kind == "int4_group" and layer.gate.encoding.block == (1, 32)
        assert (layer.down.k, layer.down.n) == (I, H)
        for proj, stack in layer.stacks:
            for expert in range(E):
                np.testing.assert_array_equal(
                    stack.dequantize(expert).T.astype(ml_dtypes.bfloat16), reference[expert, PROJS[proj]]
                )
            np.testing.assert_array_equal(stack.part("shape", 1), list(SHAPES[PROJS[proj]]))


def test_compressed_tensors_g_idx_maps_columns_to_groups(tmp_path):
    """Activation-ordered checkpoints carry weight_g_idx: column j uses group g_idx[j]."""
    tensors, quant, _ = ct_checkpoint("int4", 32, False, seed=1)
    rng = np.random.default_rng(1)
    for expert in range(E):
        for name, (_, inp) in SHAPES.items():
            tensors[f"model.layers.0.mlp.experts.{expert}.{name}.weight_g_idx"] = rng.permutation(
                np.arange(inp, dtype=np.int32) // 32
            ).astype(np.int32)
    with open_store(save(tmp_path, tensors, base_config(quant))) as store:
        for proj, stack in store.layer(0).stacks:
            name = PROJS[proj]
            out, inp = SHAPES[name]
            assert "g_idx" in stack.parts
            prefix = f"model.layers.0.mlp.experts.2.{name}"
            want = ct_int4_oracle(
                tensors[f"{prefix}.weight_packed"],
                tensors[f"{prefix}.weight_scale"],
                tensors[f"{prefix}.weight_zero_point"],
                tensors[f"{prefix}.weight_g_idx"],
                out,
                inp,
                32,
            )
            np.testing.assert_array_equal(stack.dequantize(2).T, want.astype(np.float32))


def test_weight_shape_that_disagrees_is_refused_on_use(tmp_path):
    tensors, quant, _ = ct_checkpoint("int4", 32, True)
    tensors["model.layers.0.mlp.experts.1.up_proj.weight_shape"] = np.array([I, H + 8], np.int64)
    with open_store(save(tmp_path, tensors, base_config(quant))) as store:
        store.layer(0).up.dequantize(0)
        with pytest.raises(FormatError, match="weight_shape"):
            store.layer(0).up.dequantize(1)


# -- AWQ and GPTQ: packed here by their definitions --------------------------------


def awq_pack(codes: np.ndarray) -> np.ndarray:
    """AutoAWQ GEMM packing along the last axis: nibble i of word c is column 8c + AWQ_ORDER[i]."""
    rows, cols = codes.shape
    words = np.zeros((rows, cols // 8), np.uint32)
    for row in range(rows):
        for word in range(cols // 8):
            for nibble in range(8):
                words[row, word] |= np.uint32(int(codes[row, word * 8 + AWQ_ORDER[nibble]]) << (4 * nibble))
    return words.view(np.int32)


def gptq_pack_rows(codes: np.ndarray) -> np.ndarray:
    """GPTQ qweight: word r of column c holds rows 8r..8r+7, row 8r+i at bits 4i."""
    rows, cols = codes.shape
    words = np.zeros((rows // 8, cols), np.uint32)
    for row in range(rows):
        words[row // 8] |= codes[row].astype(np.uint32) << np.uint32(4 * (row % 8))
    return words.view(np.int32)


def gptq_pack_cols(codes: np.ndarray) -> np.ndarray:
    """GPTQ qzeros: word c of a row holds columns 8c..8c+7, column 8c+i at bits 4i."""
    return np.ascontiguousarray(gptq_pack_rows(np.ascontiguousarray(codes.T).astype(np.uint32)).T)


def auto_checkpoint(method: str, group: int = 32, act_order: bool = False, seed: int = 0):
    """AWQ or GPTQ experts (``[in, out]``) from known codes, zeros and scales, and
    the values the format defines: ``(q - z) * s`` with ``z``, ``s`` of row i's group."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.zeros((8, H), np.float16)}
    expected: dict[tuple[int, str], np.ndarray] = {}
    for expert in range(E):
        for name, (out, inp) in SHAPES.items():
            groups = inp // group
            codes = rng.integers(0, 16, (inp, out))
            zeros = rng.integers(1 if method == "gptq" else 0, 15 if method == "gptq" else 16, (groups, out))
            scales = rng.uniform(1e-3, 2e-2, (groups, out)).astype(np.float16)
            row_group = np.arange(inp) // group
            if act_order:
                row_group = rng.permutation(row_group)
            prefix = f"model.layers.0.mlp.experts.{expert}.{name}"
            if method == "awq":
                tensors[f"{prefix}.qweight"] = awq_pack(codes)
                tensors[f"{prefix}.qzeros"] = awq_pack(zeros)
            else:
                tensors[f"{prefix}.qweight"] = gptq_pack_rows(codes)
                tensors[f"{prefix}.qzeros"] = gptq_pack_cols(zeros - 1)  # v1 stores zero - 1
                tensors[f"{prefix}.g_idx"] = row_group.astype(np.int32)
            tensors[f"{prefix}.scales"] = scales
            want = np.empty((inp, out), np.float64)
            for i in range(inp):
                for j in range(out):
                    want[i, j] = (int(codes[i, j]) - int(zeros[row_group[i], j])) * float(scales[row_group[i], j])
            expected[expert, name] = want
    if method == "awq":
        quant = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True}
    else:
        quant = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group,
            "desc_act": act_order,
            "sym": False,
            "checkpoint_format": "gptq",
            "true_sequential": True,
            "damp_percent": 0.01,
        }
    return tensors, base_config(quant), expected


@pytest.mark.parametrize(("method", "act_order"), [("awq", False), ("gptq", False), ("gptq", True)])
def test_awq_and_gptq_parts_and_values(tmp_path, method, act_order):
    tensors, config, expected = auto_checkpoint(method, act_order=act_order)
    with open_store(save(tmp_path, tensors, config)) as store:
        for proj, stack in store.layer(0).stacks:
            name = PROJS[proj]
            out, inp = SHAPES[name]
            assert stack.encoding.kind == method and stack.native_orientation == "kn"
            assert (stack.k, stack.n) == (inp, out) and stack.encoding.block == (32, 1)
            assert set(stack.parts) == {"weight", "scale", "zero"} | ({"g_idx"} if method == "gptq" else set())
            suffix = {"weight": "qweight", "scale": "scales", "zero": "qzeros", "g_idx": "g_idx"}
            for expert in range(E):
                prefix = f"model.layers.0.mlp.experts.{expert}.{name}"
                for part in stack.parts:
                    np.testing.assert_array_equal(stack.part(part, expert), tensors[f"{prefix}.{suffix[part]}"])
                values = stack.dequantize(expert)
                np.testing.assert_array_equal(values, expected[expert, name].astype(np.float32))
                # the formats' own kernels compute in fp16: the same values, rounded once
                np.testing.assert_array_equal(values.astype(np.float16), expected[expert, name].astype(np.float16))


def test_gptq_zero_point_zero_is_refused_on_use(tmp_path):
    """v1 stores zero - 1: a zero point of 0 is the nibble 15 that GPTQ's readers disagree on."""
    tensors, config, _ = auto_checkpoint("gptq")
    name = "model.layers.0.mlp.experts.1.down_proj.qzeros"
    tensors[name] = tensors[name] | np.int32(0xF)
    with open_store(save(tmp_path, tensors, config)) as store, pytest.raises(FormatError, match="nibble 15"):
        store.layer(0).down.dequantize(1)


def test_gptq_g_idx_out_of_range_is_refused(tmp_path):
    tensors, config, _ = auto_checkpoint("gptq")
    tensors["model.layers.0.mlp.experts.0.gate_proj.g_idx"][5] = 99
    with open_store(save(tmp_path, tensors, config)) as store, pytest.raises(FormatError, match="g_idx"):
        store.layer(0).gate.dequantize(0)


# -- refreshes and conversion move every part ---------------------------------------


def _checkpoint(kind: str, tmp_path) -> str:
    if kind in ("awq", "gptq"):
        tensors, config, _ = auto_checkpoint(kind, act_order=kind == "gptq")
    else:
        base = "int4" if kind.startswith("int4") else kind
        tensors, quant, _ = ct_checkpoint(base, 16 if kind == "nvfp4" else 32, kind != "int4_asym")
        config = base_config(quant)
    return save(tmp_path / "src", tensors, config)


KINDS = ["int4", "int4_asym", "nvfp4", "mxfp4", "awq", "gptq"]


@pytest.mark.parametrize("kind", KINDS)
def test_refresh_moves_every_part(tmp_path, kind):
    if kind not in ("awq", "gptq"):
        pytest.importorskip("compressed_tensors", reason="compressed-tensors writes the fixture")
    with open_store(_checkpoint(kind, tmp_path)) as store:
        service = SlabService(store, 1)
        result = service.step([np.array([2, 2, 2])])
        assert [update.new_expert for update in result.updates] == [2]
        sink = service.sink
        assert isinstance(sink, ArraySink)
        for proj, stack in store.layer(0).stacks:
            for part in stack.parts:
                np.testing.assert_array_equal(sink.arrays[f"blk.0.ffn_{proj}_exps.{part}"][0], stack.part(part, 2))
        assert result.nbytes == store.layer(0).expert_nbytes


@pytest.mark.parametrize("kind", KINDS)
def test_convert_keeps_every_part_or_dequantizes(tmp_path, kind):
    if kind not in ("awq", "gptq"):
        pytest.importorskip("compressed_tensors", reason="compressed-tensors writes the fixture")
    assert_convert_keeps_or_dequantizes(_checkpoint(kind, tmp_path), tmp_path, E)


# -- refusals, by name --------------------------------------------------------------


@pytest.mark.parametrize(
    ("quant", "needle"),
    [
        ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "'gemv'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "exllama"}, "'exllama'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "marlin"}, "'marlin'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv_fast"}, "'gemv_fast'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": False}, "zero_point"),
        ({"quant_method": "awq", "bits": 8, "group_size": 32}, "bits 8"),
        ({"quant_method": "gptq", "bits": 8, "group_size": 32}, "bits 8"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "bits 3"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}, "'gptq_v2'"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, "'marlin'"),
        (ct_quant("marlin-24", int_weights(32, True)), "'marlin-24'"),
        (ct_quant("int-quantized", int_weights(32, True)), "'int-quantized'"),
        (ct_quant("pack-quantized", int_weights(32, True) | {"num_bits": 8}), "num_bits 8"),
        (ct_quant("nvfp4-pack-quantized", NVFP4_WEIGHTS | {"symmetric": False}), "symmetric"),
        (ct_quant("pack-quantized", int_weights(32, True)) | {"quantization_status": "frozen"}, "'frozen'"),
    ],
)
def test_unserved_packed_variants_are_refused_by_name(tmp_path, quant, needle):
    tensors, _, _ = auto_checkpoint("awq")
    with pytest.raises(FormatError, match="not served") as info:
        open_store(save(tmp_path, tensors, base_config(quant)))
    assert needle in str(info.value)


def test_w4a8_activation_quantization_is_refused(tmp_path):
    quant = ct_quant("pack-quantized", int_weights(32, True))
    quant["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8,
        "type": "int",
        "strategy": "token",
        "dynamic": True,
    }
    tensors, _, _ = auto_checkpoint("awq")
    with pytest.raises(FormatError, match="quantized activations"):
        open_store(save(tmp_path, tensors, base_config(quant)))


def test_nvfp4_tensors_under_a_w4a16_config_are_refused(tmp_path):
    tensors, _, _ = ct_checkpoint("nvfp4", 16)
    quant = ct_quant("pack-quantized", int_weights(32, True))
    with pytest.raises(FormatError, match="nvfp4 but quant_method 'compressed-tensors' declares no such group"):
        open_store(save(tmp_path, tensors, base_config(quant)))


@pytest.mark.parametrize(
    ("drop", "needle"), [("weight_scale", "no scale beside it"), ("weight_zero_point", "zero points")]
)
def test_missing_packed_parts_are_refused(tmp_path, drop, needle):
    tensors, quant, _ = ct_checkpoint("int4", 32, False)
    for name in [name for name in tensors if name.endswith(f".{drop}")]:
        del tensors[name]
    with pytest.raises(FormatError, match=needle):
        open_store(save(tmp_path, tensors, base_config(quant)))


def test_wrong_group_size_is_refused(tmp_path):
    tensors, _, _ = ct_checkpoint("int4", 32, True)
    quant = ct_quant("pack-quantized", int_weights(16, True))
    with pytest.raises(FormatError, match=r"weight_scale.*expected shape"):
        open_store(save(tmp_path, tensors, base_config(quant)))


def test_packed_and_plain_projections_in_one_layer_are_refused(tmp_path):
    tensors, config, _ = auto_checkpoint("gptq")
    for expert in range(E):
        prefix = f"model.layers.0.mlp.experts.{expert}.down_proj"
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            del tensors[f"{prefix}.{suffix}"]
        tensors[f"{prefix}.weight"] = np.zeros((H, I), np.float16)
    with pytest.raises(FormatError, match="are packed but"):
        open_store(save(tmp_path, tensors, config))


def test_packed_part_beside_a_plain_weight_is_refused(tmp_path):
    """An unquantized (ignored) expert has no zero points: a stray one is refused, not dropped."""
    tensors, config, _ = auto_checkpoint("awq")
    tensors = {name: array for name, array in tensors.items() if ".experts." not in name}
    for expert in range(E):
        for name, shape in SHAPES.items():
            tensors[f"model.layers.0.mlp.experts.{expert}.{name}.weight"] = np.zeros(shape, np.float16)
        tensors[f"model.layers.0.mlp.experts.{expert}.up_proj.qzeros"] = np.zeros((3, I // 8), np.int32)
    with pytest.raises(FormatError, match=r"up_proj\.qzeros.*beside the unpacked weight"):
        open_store(save(tmp_path, tensors, config))


def test_unquantized_experts_under_an_awq_config_are_plain(tmp_path):
    """modules_to_not_convert leaves some experts in fp16: no packed parts, plain values."""
    _, config, _ = auto_checkpoint("awq")
    tensors = {
        f"model.layers.0.mlp.experts.{e}.{name}.weight": np.full(shape, e, np.float16)
        for e in range(E)
        for name, shape in SHAPES.items()
    }
    with open_store(save(tmp_path, tensors, config)) as store:
        assert store.layer(0).gate.encoding.kind == "plain"
        np.testing.assert_array_equal(store.layer(0).gate.expert(2), np.full((H, I), 2, np.float16))


def test_e8m0_scales_are_read_as_exponent_bits():
    """An F8_E8M0 scale tensor holds the same bytes as a U8 one: 2**(byte - 127), never its value cast to int."""
    from mmapstore.dequant import dequantize_mxfp4

    blocks = np.full((2, 1, 16), 0x22, np.uint8)  # every element 1.0
    codes = np.array([[120], [130]], np.uint8)
    as_u8 = dequantize_mxfp4(blocks, codes, 32)
    as_e8m0 = dequantize_mxfp4(blocks, codes.view(ml_dtypes.float8_e8m0fnu), 32)
    np.testing.assert_array_equal(as_u8[:, 0], [2.0**-7, 2.0**3])
    np.testing.assert_array_equal(as_e8m0, as_u8)

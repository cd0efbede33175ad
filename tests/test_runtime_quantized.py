"""The transformers runtime over quantized experts: a GPT-OSS checkpoint whose
experts are MXFP4 (as OpenAI ships it) runs with its experts dequantized on
their way into the pools, equal to the stock model given the same values."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the transformers runtime needs torch (the dev extra installs it)")
transformers = pytest.importorskip("transformers", reason="the transformers runtime needs transformers 5")
if not hasattr(transformers, "integrations") or not hasattr(
    __import__("transformers.integrations.moe", fromlist=["ExpertsInterface"]), "ExpertsInterface"
):
    pytest.skip("transformers without the experts interface (needs 5.x)", allow_module_level=True)

from safetensors.torch import load_file, save_file  # noqa: E402

from mmapstore._errors import UnsupportedModelError  # noqa: E402
from mmapstore.transformers import load_model  # noqa: E402

EXPERTS = 8
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def config() -> object:
    return transformers.GptOssConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
        intermediate_size=32, num_local_experts=EXPERTS, num_experts_per_tok=2, head_dim=16,
    )  # fmt: skip


def mxfp4_encode(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[R, C]`` float32 rows -> OCP MXFP4 blocks ``[R, C/32, 16]`` (low nibble
    first) and E8M0 scales ``[R, C/32]``: per 32 values the smallest power of
    two that brings them within E2M1's range, each value rounded to the nearest code."""
    count, cols = rows.shape
    groups = rows.reshape(count, cols // 32, 32)
    peak = np.abs(groups).max(axis=-1)
    exponent = np.where(peak > 0, np.ceil(np.log2(np.maximum(peak, 1e-30) / 6.0)), -127).astype(np.int32)
    exponent = np.clip(exponent, -127, 127)
    scaled = groups / np.ldexp(np.float32(1.0), exponent)[..., None]
    codes = np.abs(np.abs(scaled)[..., None] - E2M1[:8]).argmin(axis=-1) + 8 * (scaled < 0)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exponent + 127).astype(np.uint8)


def mxfp4_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    codes = np.stack((blocks & 0x0F, blocks >> 4), axis=-1).reshape(*blocks.shape[:-1], 32)
    values = E2M1[codes] * np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``mxfp4``: a GPT-OSS checkpoint with MXFP4 experts (blocks, scales, bf16
    biases, ``quant_method: mxfp4``); ``reference``: the same model in float32
    with the experts' dequantized values, saved with ``save_pretrained``."""
    root = tmp_path_factory.mktemp("quantized")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(), dtype=torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            experts.gate_up_proj.normal_(0.0, 0.2)
            experts.down_proj.normal_(0.0, 0.2)
            prefix = f"model.layers.{index}.mlp.experts"
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(experts, name)  # [E, in, out]
                rows = weight.transpose(1, 2).numpy()  # [E, out, in]: what the MXFP4 tensors hold
                encoded = [mxfp4_encode(rows[expert]) for expert in range(EXPERTS)]
                blocks = np.stack([blocks for blocks, _ in encoded])
                scales = np.stack([scales for _, scales in encoded])
                tensors[f"{prefix}.{name}_blocks"] = torch.from_numpy(np.ascontiguousarray(blocks))
                tensors[f"{prefix}.{name}_scales"] = torch.from_numpy(np.ascontiguousarray(scales))
                weight.copy_(torch.from_numpy(mxfp4_decode(blocks, scales)).transpose(1, 2))
            for name in ("gate_up_proj_bias", "down_proj_bias"):
                bias = getattr(experts, name)
                bias.normal_(0.0, 0.2)
                bias.copy_(bias.to(torch.bfloat16).float())  # bf16 biases, as shipped
                tensors[f"{prefix}.{name}"] = bias.to(torch.bfloat16).clone()
    reference = str(root / "reference")
    model.save_pretrained(reference)
    quantized = str(root / "mxfp4")
    os.makedirs(quantized)
    plain = load_file(os.path.join(reference, "model.safetensors"))
    for key, value in plain.items():
        if ".mlp.experts." not in key:
            tensors[key] = value
    save_file(tensors, os.path.join(quantized, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(reference, "config.json")) as handle:
        saved = json.load(handle)
    saved["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    with open(os.path.join(quantized, "config.json"), "w") as handle:
        json.dump(saved, handle)
    for name in ("generation_config.json",):
        if os.path.exists(os.path.join(reference, name)):
            shutil.copy(os.path.join(reference, name), quantized)
    return {"mxfp4": quantized, "reference": reference, "tensors": tensors}


def test_fixture_is_what_transformers_reads_as_mxfp4(checkpoints):
    """Our encoder's blocks, dequantized by transformers' own MXFP4 code, are the reference weights."""
    convert = pytest.importorskip("transformers.integrations.mxfp4").convert_moe_packed_tensors
    tensors = checkpoints["tensors"]
    reference = load_file(os.path.join(checkpoints["reference"], "model.safetensors"))
    for name in ("gate_up_proj", "down_proj"):
        prefix = f"model.layers.1.mlp.experts.{name}"
        theirs = convert(tensors[f"{prefix}_blocks"], tensors[f"{prefix}_scales"], dtype=torch.float32)
        assert torch.equal(theirs, reference[prefix])


def prompt(seed: int = 0):
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("capacity", [1, 3, EXPERTS])
def test_mxfp4_experts_equal_the_stock_model_on_their_values(checkpoints, capacity):
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["reference"], dtype=torch.float32)
    reference.eval()
    ids = prompt()
    with torch.no_grad():
        expected = reference(ids).logits
        tokens = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                    pad_token_id=0)  # fmt: skip
    for on_miss in ("fetch", "cpu"):
        with load_model(checkpoints["mxfp4"], capacity=capacity, on_miss=on_miss, dtype=torch.float32) as loaded:
            with torch.no_grad():
                got = loaded.model(ids).logits
                generated = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                                  do_sample=False, pad_token_id=0)  # fmt: skip
            stats = loaded.stats()
            if on_miss == "fetch":
                assert_slots_hold_the_values(loaded, reference)
        if on_miss == "fetch":
            assert torch.equal(got, expected)  # the stock kernel, on the same values
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(generated, tokens)
        if capacity < EXPERTS and on_miss == "fetch":
            assert stats.copied_nbytes > 0  # experts were dequantized into slots during the run


def assert_slots_hold_the_values(loaded, reference) -> None:
    """Every resident slot holds its expert's dequantized values (and bf16 biases)."""
    for runtime in loaded.layers:
        experts = reference.model.layers[runtime.experts.layer_index].mlp.experts
        for expert, slot in enumerate(runtime.slot_map.tolist()):
            if slot >= 0:
                assert torch.equal(runtime.gate_up[slot], experts.gate_up_proj[expert])
                assert torch.equal(runtime.down[slot], experts.down_proj[expert])
                assert torch.equal(runtime.gate_up_bias[slot], experts.gate_up_proj_bias[expert])


def test_encoded_bytes_go_through_the_device_copier_and_dequantize_after_it(checkpoints):
    """With a copier (always on CUDA; here a CPU one, to run everywhere) an MXFP4
    slab moves as its encoded bytes and scales, a seventh of the float32 pool bytes."""
    from builders import cpu_copier

    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["reference"], dtype=torch.float32)
    ids = prompt(seed=5)
    with torch.no_grad():
        tokens = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                    pad_token_id=0)  # fmt: skip
    with (
        load_model(checkpoints["mxfp4"], capacity=2, on_miss="fetch", dtype=torch.float32) as loaded,
        cpu_copier(loaded) as copier,
    ):
        with torch.no_grad():
            generated = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                              do_sample=False, pad_token_id=0)  # fmt: skip
        assert_slots_hold_the_values(loaded, reference)
        copied = loaded.stats().copied_nbytes
    assert torch.equal(generated, tokens)
    moved = sum(copier.stats.nbytes.values())
    # MXFP4 (4.25 bits a value) and bf16 biases for f32 pools: about a seventh (7.7 here); the gate and up
    # halves of one fused slab share one copy of its blocks, else about a fifth crosses (4.6).
    assert copied / 9 < moved < copied / 6


def test_a_quantized_weight_outside_the_experts_is_refused_by_name(checkpoints, tmp_path):
    path = str(tmp_path / "fp8_attention")
    shutil.copytree(checkpoints["mxfp4"], path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match=r"q_proj\.weight.*quantized"):
        load_model(path, capacity=2, dtype=torch.float32)
    # A non-expert weight stored in a packed layout of its own (GPTQ's qweight) is missing as a plain weight.
    tensors[name + "_packed"] = tensors.pop(name).view(torch.uint8)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match=r"q_proj\.weight.*quant_method 'mxfp4'"):
        load_model(path, capacity=2, dtype=torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mxfp4_experts_dequantized_on_the_gpu_equal_the_stock_model(checkpoints):
    """On CUDA only the blocks and scales cross to the device, which dequantizes them into the slots."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["reference"], dtype=torch.float32)
    reference = reference.to("cuda").eval()
    ids = prompt(seed=1).to("cuda")
    with torch.no_grad():
        expected = reference(ids).logits
    for capacity in (2, EXPERTS):
        with load_model(checkpoints["mxfp4"], capacity=capacity, device="cuda", dtype=torch.float32) as loaded:
            with torch.no_grad():
                got = loaded.model(ids).logits
            assert_slots_hold_the_values(loaded, reference)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def qwen3_moe_reference(root, *, seed: int, hidden: int, width: int) -> tuple[str, dict[str, torch.Tensor]]:
    """A random float32 Qwen3-MoE saved with ``save_pretrained`` under ``root/reference``
    (experts spread apart), and its tensors, for a quantized copy to be made from."""
    config = transformers.Qwen3MoeConfig(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
        moe_intermediate_size=width, intermediate_size=48, num_experts=EXPERTS, num_experts_per_tok=2,
        head_dim=hidden // 4,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "experts" in name:
                parameter.normal_(0.0, 0.2)
    reference = str(root / "reference")
    model.save_pretrained(reference)
    return reference, load_file(os.path.join(reference, "model.safetensors"))


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    """``fp8``: a Qwen3-MoE checkpoint whose experts (only) are FP8 with 128x128
    block scales (``weight_scale_inv``, ``quant_method: fp8``, as DeepSeek and
    Qwen ship FP8); ``reference``: float32 with the dequantized values."""
    root = tmp_path_factory.mktemp("fp8")
    reference, tensors = qwen3_moe_reference(root, seed=1, hidden=32, width=16)
    for name in [name for name in tensors if ".mlp.experts." in name]:
        weight = tensors[name]  # [out, in], one 128x128 block
        scale = weight.abs().max() / 448.0
        codes = (weight / scale).to(torch.float8_e4m3fn)
        tensors[name] = codes
        tensors[name + "_scale_inv"] = scale.reshape(1, 1).to(torch.float32)
    fp8 = str(root / "fp8")
    os.makedirs(fp8)
    save_file(tensors, os.path.join(fp8, "model.safetensors"), metadata={"format": "pt"})
    for name, value in tensors.items():
        if name.endswith("_scale_inv"):
            weight = name[: -len("_scale_inv")]
            tensors[weight] = tensors[weight].to(torch.float32) * value
    reference_tensors = {name: value for name, value in tensors.items() if not name.endswith("_scale_inv")}
    save_file(reference_tensors, os.path.join(reference, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(reference, "config.json")) as handle:
        saved = json.load(handle)
    saved["quantization_config"] = {
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
    }
    with open(os.path.join(fp8, "config.json"), "w") as handle:
        json.dump(saved, handle)
    return {"fp8": fp8, "reference": reference}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])  # fmt: skip
def test_fp8_block_experts_equal_the_stock_model_on_their_values(fp8_checkpoints, device):
    reference = transformers.AutoModelForCausalLM.from_pretrained(fp8_checkpoints["reference"], dtype=torch.float32)
    reference = reference.to(device).eval()
    ids = prompt(seed=2).to(device)
    with torch.no_grad():
        expected = reference(ids).logits
    with load_model(fp8_checkpoints["fp8"], capacity=3, on_miss="fetch", device=device, dtype=torch.float32) as loaded:
        with torch.no_grad():
            got = loaded.model(ids).logits
        assert loaded.stats().copied_nbytes > 0
    if device == "cpu":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fp8_block_experts_cross_the_copier_encoded(fp8_checkpoints):
    """Through the device path's copier (a CPU one here), FP8 experts move as their codes and scales, a
    quarter of the float32 pool bytes, and are dequantized after the copy: the same logits."""
    from builders import cpu_copier

    ids = prompt(seed=2)
    reference = transformers.AutoModelForCausalLM.from_pretrained(fp8_checkpoints["reference"], dtype=torch.float32)
    with torch.no_grad():
        expected = reference(ids).logits
    with (
        load_model(fp8_checkpoints["fp8"], capacity=3, on_miss="fetch", dtype=torch.float32) as loaded,
        cpu_copier(loaded) as copier,
    ):
        with torch.no_grad():
            assert torch.equal(loaded.model(ids).logits, expected)
        copied = loaded.stats().copied_nbytes
    moved = sum(copier.stats.nbytes.values())
    assert copied > 0 and copied / 5 < moved < copied / 3  # 1-byte codes for 4-byte slots, and the scales


@pytest.fixture(scope="module")
def int4_checkpoints(tmp_path_factory):
    """``int4``: a Qwen3-MoE checkpoint whose experts (only) are compressed-tensors
    W4A16, INT4 in groups of 32 (Kimi-K2-Thinking's scheme), packed by
    compressed-tensors' own compressor; ``reference``: float32 with the values
    mmapstore's store dequantizes them to."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors packs the INT4 fixture")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from mmapstore import open_store

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    root = tmp_path_factory.mktemp("int4")
    reference, tensors = qwen3_moe_reference(root, seed=2, hidden=64, width=32)  # groups of 32 along both
    for name in [name for name in tensors if ".mlp.experts." in name]:
        weight = tensors.pop(name)  # [out, in]
        groups = weight.reshape(weight.shape[0], -1, 32)
        scale = (groups.abs().amax(-1) / 7.0).to(torch.bfloat16)
        compressed = PackedQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
        for suffix, tensor in compressed.items():
            tensors[f"{name[: -len('.weight')]}.{suffix}"] = tensor.contiguous()
    int4 = str(root / "int4")
    os.makedirs(int4)
    save_file(tensors, os.path.join(int4, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(reference, "config.json")) as handle:
        saved = json.load(handle)
    saved["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$"],
    }  # fmt: skip
    with open(os.path.join(int4, "config.json"), "w") as handle:
        json.dump(saved, handle)
    plain = load_file(os.path.join(reference, "model.safetensors"))
    with open_store(int4) as store:
        for index in store.layer_indices:
            for proj, stack in store.layer(index).stacks:
                assert stack.encoding.kind == "int4_group"
                for expert in range(EXPERTS):
                    name = f"model.layers.{index}.mlp.experts.{expert}.{proj}_proj.weight"
                    plain[name] = torch.from_numpy(stack.dequantize(expert, np.float32).T.copy())
    save_file(plain, os.path.join(reference, "model.safetensors"), metadata={"format": "pt"})
    return {"int4": int4, "reference": reference}


def test_int4_group_experts_equal_the_stock_model_on_their_values(int4_checkpoints):
    reference = transformers.AutoModelForCausalLM.from_pretrained(int4_checkpoints["reference"], dtype=torch.float32)
    reference.eval()
    ids = prompt(seed=3)
    with torch.no_grad():
        expected = reference(ids).logits
    with load_model(int4_checkpoints["int4"], capacity=3, on_miss="fetch", dtype=torch.float32) as loaded:
        with torch.no_grad():
            got = loaded.model(ids).logits
        assert loaded.stats().copied_nbytes > 0
    assert torch.equal(got, expected)

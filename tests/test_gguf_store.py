"""GGUF checkpoints opened as expert stores: every ggml type served as one
contiguous byte slab per expert, dequantized exactly as gguf-py does, refreshed
and converted with their encoding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmapstore import SlabService, convert, open_store, verify

gguf = pytest.importorskip("gguf", reason="gguf-py writes the GGUF files and dequantizes the oracle values")
Q = gguf.GGMLQuantizationType

E, H, I = 4, 256, 512  # K-quants need rows of 256


def quantized(rng: np.random.Generator, qtype, shape: tuple[int, ...]) -> np.ndarray:
    """Bytes of ``qtype`` for ``shape``: quantized by gguf-py where it can, random
    blocks with finite f16 scales for the K-quants it cannot quantize."""
    if qtype in (Q.F32, Q.F16):
        return rng.standard_normal(shape).astype(np.float32 if qtype == Q.F32 else np.float16)
    if qtype in (Q.Q4_K, Q.Q6_K):
        elems, block = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (*shape[:-1], shape[-1] // elems, block), dtype=np.uint8)
        for start in {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}[qtype]:
            raw[..., start : start + 2] = (
                rng.uniform(-1, 1, raw.shape[:-1]).astype(np.float16)[..., None].view(np.uint8)
            )
        return raw.reshape(*shape[:-1], -1)
    return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype)


def write_gguf(
    path, types: dict[str, object], *, fused: bool = False, biases: bool = False, legacy: bool = False, layers: int = 1
) -> dict[str, tuple[np.ndarray, object]]:
    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    writer.add_block_count(layers)
    writer.add_expert_count(E)
    written: dict[str, tuple[np.ndarray, object]] = {}

    def add(name: str, array: np.ndarray, qtype) -> None:
        writer.add_tensor(name, array, raw_dtype=qtype if array.dtype == np.uint8 else None)
        written[name] = (array, qtype)

    for layer in range(layers):
        add(f"blk.{layer}.ffn_gate_inp.weight", rng.standard_normal((E, H)).astype(np.float32), Q.F32)
        add(f"blk.{layer}.ffn_gate_shexp.weight", rng.standard_normal((I, H)).astype(np.float32), Q.F32)
        if legacy:
            for expert in range(E):
                for proj, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
                    add(f"blk.{layer}.ffn_{proj}.{expert}.weight", quantized(rng, types[proj], shape), types[proj])
            continue
        if fused:
            add(f"blk.{layer}.ffn_gate_up_exps.weight", quantized(rng, types["gate"], (E, 2 * I, H)), types["gate"])
        else:
            for proj in ("gate", "up"):
                add(f"blk.{layer}.ffn_{proj}_exps.weight", quantized(rng, types[proj], (E, I, H)), types[proj])
        add(f"blk.{layer}.ffn_down_exps.weight", quantized(rng, types["down"], (E, H, I)), types["down"])
        if biases:
            for proj, out in (("gate", I), ("up", I), ("down", H)):
                add(f"blk.{layer}.ffn_{proj}_exps.bias", rng.standard_normal((E, out)).astype(np.float32), Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def oracle(written: dict[str, tuple[np.ndarray, object]], name: str, out: int, inp: int) -> np.ndarray:
    """gguf-py's dequantization of the whole tensor, ``[E, out, in]``."""
    array, qtype = written[name]
    if array.dtype != np.uint8:
        return array.astype(np.float32).reshape(-1, out, inp)
    return gguf.quants.dequantize(array, qtype).reshape(-1, out, inp).astype(np.float32)


TYPE_SETS = [
    {"gate": Q.Q4_K, "up": Q.Q8_0, "down": Q.Q6_K},
    {"gate": Q.Q4_0, "up": Q.Q5_1, "down": Q.Q8_0},
    {"gate": Q.F16, "up": Q.F32, "down": Q.F16},
    {"gate": Q.MXFP4, "up": Q.MXFP4, "down": Q.MXFP4},
]


@pytest.mark.parametrize("types", TYPE_SETS, ids=lambda types: "-".join(t.name for t in types.values()))
def test_gguf_experts_are_byte_slabs_that_dequantize_alone(tmp_path, types):
    path = tmp_path / "model.gguf"
    written = write_gguf(path, types)
    with open_store(path) as store:
        assert store.kind == "gguf" and store.layout == "slab" and store.layer_indices == [0]
        layer = store.layer(0)
        for proj, stack in layer.stacks:
            out, inp = (I, H) if proj != "down" else (H, I)
            name = f"blk.0.ffn_{proj}_exps.weight"
            qtype = types[proj]
            assert (stack.k, stack.n, stack.native_orientation) == (inp, out, "nk")
            assert stack.encoding.kind == ("plain" if qtype in (Q.F16, Q.F32) else "ggml")
            want = oracle(written, name, out, inp)
            raw = written[name][0]
            for expert in range(E):
                slab = stack.native(expert)
                # one contiguous range per expert, the bytes gguf-py wrote for that expert
                np.testing.assert_array_equal(
                    np.asarray(slab).reshape(-1).view(np.uint8), raw.reshape(E, -1).view(np.uint8)[expert]
                )
                np.testing.assert_array_equal(stack.dequantize(expert), want[expert].T)


def test_gguf_fused_gate_up_and_biases(tmp_path):
    path = tmp_path / "fused.gguf"
    written = write_gguf(path, {"gate": Q.Q8_0, "down": Q.Q8_0}, fused=True)
    with open_store(path) as store:
        layer = store.layer(0)
        fused = oracle(written, "blk.0.ffn_gate_up_exps.weight", 2 * I, H)
        for expert in range(E):
            np.testing.assert_array_equal(layer.gate.dequantize(expert), fused[expert, :I].T)  # gate rows first
            np.testing.assert_array_equal(layer.up.dequantize(expert), fused[expert, I:].T)
    path = tmp_path / "biased.gguf"
    written = write_gguf(path, {"gate": Q.Q8_0, "up": Q.Q8_0, "down": Q.Q8_0}, biases=True)
    with open_store(path) as store:
        for proj, stack in store.layer(0).stacks:
            assert set(stack.parts) == {"weight", "bias"}
            np.testing.assert_array_equal(stack.part("bias", 2), written[f"blk.0.ffn_{proj}_exps.bias"][0][2])


def test_gguf_legacy_per_expert_names(tmp_path):
    path = tmp_path / "legacy.gguf"
    written = write_gguf(path, {"gate": Q.Q8_0, "up": Q.Q4_0, "down": Q.Q8_0}, legacy=True)
    with open_store(path) as store:
        assert store.layout == "per_expert"
        stack = store.layer(0).up
        want = oracle(written, "blk.0.ffn_up.3.weight", I, H)[0]
        np.testing.assert_array_equal(stack.dequantize(3), want.T)


def test_gguf_refresh_moves_the_encoded_slabs(tmp_path):
    path = tmp_path / "model.gguf"
    written = write_gguf(path, TYPE_SETS[0], layers=2)
    with open_store(path) as store:
        service = SlabService(store, 2)
        service.step([np.array([3, 3, 1]), np.array([2, 2])])
        buffers = service.sink.arrays  # type: ignore[attr-defined]
        pool = service.pools[0]
        slot = pool.slot_of(3)
        assert slot is not None
        raw = written["blk.0.ffn_gate_exps.weight"][0].reshape(E, I, -1)
        np.testing.assert_array_equal(buffers["blk.0.ffn_gate_exps.weight"][slot], raw[3])


def test_gguf_convert_keeps_ggml_blocks_or_dequantizes(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, TYPE_SETS[0])
    kept = convert(path, tmp_path / "kept")
    assert verify(kept.path).ok
    manifest = json.loads((tmp_path / "kept" / "mmapstore.json").read_text())
    assert manifest["orientation"] == "nk" and manifest["encodings"]["blk.0.ffn_gate_exps"]["kind"] == "ggml"
    dense = convert(path, tmp_path / "f32", dtype="f32")
    with open_store(path) as source, open_store(kept.path) as store, open_store(dense.path) as values:
        for (_, stack), (_, kept_stack), (_, value_stack) in zip(
            source.layer(0).stacks, store.layer(0).stacks, values.layer(0).stacks, strict=True
        ):
            assert kept_stack.encoding.kind == "ggml" and kept_stack.encoding.dtype.code == stack.encoding.dtype.code
            for expert in range(E):
                np.testing.assert_array_equal(kept_stack.native(expert), stack.native(expert))
                np.testing.assert_array_equal(value_stack.expert(expert), stack.dequantize(expert))


def test_gguf_without_experts_says_so(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "dense.gguf"), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(Exception, match="no MoE expert tensors"):
        open_store(tmp_path / "dense.gguf")


@pytest.mark.parametrize("types", TYPE_SETS, ids=lambda types: "-".join(t.name for t in types.values()))
def test_any_tensor_is_its_whole_encoded_bytes_or_its_decoded_values(tmp_path, types):
    """``store.view`` of a block-quantized tensor is every byte of it, ``[..., row bytes]`` uint8 (never bytes in
    the values' shape); ``store.values`` decodes it as gguf-py does."""
    path = tmp_path / "model.gguf"
    written = write_gguf(path, types)
    with open_store(path) as store:
        for name, (array, qtype) in written.items():
            view = store.view(name)
            assert view.nbytes == array.nbytes == store.checkpoint.tensors[name].nbytes
            np.testing.assert_array_equal(view.reshape(-1).view(np.uint8), array.reshape(-1).view(np.uint8))
            want = array.astype(np.float32) if array.dtype != np.uint8 else gguf.quants.dequantize(array, qtype)
            got = store.values(name)
            assert got.dtype == np.float32 and got.shape == want.shape == store.checkpoint.tensors[name].shape
            np.testing.assert_array_equal(got, want)
        assert store.values("blk.0.ffn_gate_inp.weight", np.float16).dtype == np.float16

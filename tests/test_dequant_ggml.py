"""ggml block types: the dtype table, block byte sizes, and the numpy dequantizers against gguf-py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mmapstore import FormatError, UnsupportedEncodingError
from mmapstore._dtypes import DTYPE_CODES, GGML_BLOCK_CODES, GGML_TYPES, code_of, dtype_from_code
from mmapstore.dequant import DEQUANTIZABLE, can_dequantize, dequantize_ggml
from mmapstore.dequant import _ggml as ggml_module
from mmapstore.formats import read_safetensors_header
from mmapstore.formats._records import shape_nbytes

gguf = pytest.importorskip("gguf", reason="gguf-py's tables and dequantizers are the oracle")
Q = gguf.GGMLQuantizationType

BLOCK_CODES = sorted(DEQUANTIZABLE - {"F32", "F16", "BF16", "F64"})
# Byte offsets of each block's f16 scales: random bytes there could be inf/NaN,
# which would make the comparison say little.
F16_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "IQ4_NL": (0,),
    "IQ4_XS": (0,),
    "TQ1_0": (52,),
    "TQ2_0": (64,),
    "NVFP4": (),
    "MXFP4": (),
}


def random_blocks(rng: np.random.Generator, code: str, rows_shape: tuple[int, ...], blocks_per_row: int) -> np.ndarray:
    dtype = GGML_BLOCK_CODES[code]
    raw = rng.integers(0, 256, (*rows_shape, blocks_per_row, dtype.block_nbytes), dtype=np.uint8)
    for start in F16_FIELDS[code]:
        scales = rng.uniform(-2, 2, raw.shape[:-1]).astype(np.float16)
        raw[..., start : start + 2] = scales[..., None].view(np.uint8)
    if code == "MXFP4":  # E8M0 scales that keep 12 * scale a finite float32
        raw[..., 0] = rng.integers(0, 250, raw.shape[:-1])
    return raw.reshape(*rows_shape, blocks_per_row * dtype.block_nbytes)


def bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def test_table_matches_gguf_py():
    assert {int(qtype) for qtype in Q} == set(GGML_TYPES)
    for qtype in Q:
        entry = GGML_TYPES[int(qtype)]
        assert entry.code == qtype.name
        assert (entry.block_elems, entry.block_nbytes) == gguf.GGML_QUANT_SIZES[qtype]
        assert entry.is_block == (entry.block_elems > 1)
        if entry.is_block:
            assert entry.numpy == np.uint8 and GGML_BLOCK_CODES[entry.code] is entry
        else:
            assert DTYPE_CODES[entry.code] is entry


def test_block_codes_stay_out_of_safetensors(tmp_path):
    assert code_of(np.uint8) == "U8"  # uint8 block entries do not take over the reverse map
    assert dtype_from_code("Q4_K", block_ok=True) is GGML_BLOCK_CODES["Q4_K"]
    with pytest.raises(FormatError, match="ggml block type"):
        dtype_from_code("Q4_K")
    assert all(entry.known for entry in GGML_TYPES.values())
    # In a safetensors header "Q4_K" is only an unknown code: opaque bytes,
    # never the ggml block type (no block arithmetic, never served as values).
    header = b'{"w":{"dtype":"Q4_K","shape":[1,256],"data_offsets":[0,144]}}'
    path = tmp_path / "q.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(144))
    (record,) = read_safetensors_header(str(path)).tensors
    assert record.dtype.code == "Q4_K" and not record.dtype.known and not record.dtype.is_block
    assert record.dtype != GGML_BLOCK_CODES["Q4_K"]


def test_shape_nbytes_for_block_types():
    q4_k, q8_0, mxfp4 = (GGML_BLOCK_CODES[code] for code in ("Q4_K", "Q8_0", "MXFP4"))
    assert shape_nbytes((8, 3, 512), q4_k) == 8 * 3 * 2 * 144
    assert shape_nbytes((2, 64), q8_0) == 2 * 2 * 34
    assert shape_nbytes((32, 2880, 2880), mxfp4) == 32 * 2880 * 90 * 17
    # Python integers: a hostile shape cannot wrap around.
    assert shape_nbytes((2**40, 2**40, 256), q4_k) == 2**80 * 144
    with pytest.raises(FormatError, match=r"f\.gguf: tensor 'w': last dimension 100 of Q8_0 must be a multiple"):
        shape_nbytes((4, 100), q8_0, path="f.gguf", tensor="w")
    with pytest.raises(FormatError, match="scalar"):
        shape_nbytes((), q8_0, path="f.gguf", tensor="w")
    assert shape_nbytes((3, 5), DTYPE_CODES["BF16"]) == 30
    assert q4_k.row_nbytes(512) == 288 and DTYPE_CODES["F32"].row_nbytes(3) == 12


@pytest.mark.parametrize("code", BLOCK_CODES)
def test_random_blocks_bit_identical_to_gguf_py(code):
    rng = np.random.default_rng(BLOCK_CODES.index(code))
    dtype = GGML_BLOCK_CODES[code]
    raw = random_blocks(rng, code, (3, 5), 2)  # [E, out, row bytes]
    n = 2 * dtype.block_elems
    ours = dequantize_ggml(dtype, raw, n)
    reference = gguf.quants.dequantize(raw, Q[code])
    assert ours.shape == reference.shape == (3, 5, n) and ours.dtype == np.float32
    assert np.isfinite(ours).all()
    np.testing.assert_array_equal(bits(ours), bits(reference))
    # One expert's rows alone decode to the same values.
    np.testing.assert_array_equal(bits(dequantize_ggml(dtype, raw[1], n)), bits(reference[1]))


# The types gguf-py can quantize (it has no K-quant or IQ quantizers).
@pytest.mark.parametrize(
    "qtype",
    [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.MXFP4, Q.TQ1_0, Q.TQ2_0, Q.BF16, Q.F16],
    ids=lambda qtype: qtype.name,
)
def test_quantized_weights_round_trip(qtype):
    rng = np.random.default_rng(int(qtype))
    weights = rng.standard_normal((4, 8, 256)).astype(np.float32)
    if qtype in (Q.TQ1_0, Q.TQ2_0):
        weights = np.sign(weights) * 0.5  # ternary values are what TQ1_0 and TQ2_0 hold exactly
    raw = gguf.quants.quantize(weights, qtype)
    raw = raw.view(np.uint8).reshape(4, 8, -1)
    ours = dequantize_ggml(GGML_TYPES[int(qtype)], raw, 256)
    reference = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(bits(ours), bits(reference))
    # And the values are the weights, to the precision of the encoding.
    tolerance = {
        Q.Q4_0: 0.3,
        Q.Q4_1: 0.3,
        Q.Q5_0: 0.15,
        Q.Q5_1: 0.15,
        Q.Q8_0: 0.02,
        Q.MXFP4: 0.6,
        Q.TQ1_0: 0.0,
        Q.TQ2_0: 0.0,
        Q.BF16: 0.01,
        Q.F16: 0.002,
    }[qtype]
    np.testing.assert_allclose(ours, weights, atol=tolerance * np.abs(weights).max())


def test_known_values_without_the_oracle():
    # Q8_0: d = 0.5, q = -16..15
    block = np.zeros(34, np.uint8)
    block[:2] = np.array([0.5], np.float16).view(np.uint8)
    block[2:] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    np.testing.assert_array_equal(
        dequantize_ggml(GGML_BLOCK_CODES["Q8_0"], block[None], 32)[0], np.arange(-16, 16) * 0.5
    )
    # MXFP4: E8M0 127 is a scale of 1, so the values are the OCP E2M1 table;
    # low nibbles are values 0-15, high nibbles 16-31.
    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    block = np.zeros(17, np.uint8)
    block[0] = 127
    block[1:] = np.arange(16, dtype=np.uint8) | (np.arange(15, -1, -1, dtype=np.uint8) << 4)
    values = dequantize_ggml(GGML_BLOCK_CODES["MXFP4"], block[None], 32)[0]
    np.testing.assert_array_equal(values, np.concatenate([e2m1, e2m1[::-1]]))
    block[0] = 130  # 2**3
    np.testing.assert_array_equal(dequantize_ggml(GGML_BLOCK_CODES["MXFP4"], block[None], 32)[0][:16], e2m1 * 8)
    block[0] = 255  # 2**128 overflows float32: inf, as in ggml, and no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = dequantize_ggml(GGML_BLOCK_CODES["MXFP4"], block[None], 32)[0]
    assert values[0] == 0 and np.isinf(values[7]) and values[7] > 0
    # Q4_0: d = 2, nibble 8 is zero, 15 is 7
    block = np.zeros(18, np.uint8)
    block[:2] = np.array([2.0], np.float16).view(np.uint8)
    block[2:] = 0xF8
    np.testing.assert_array_equal(
        dequantize_ggml(GGML_BLOCK_CODES["Q4_0"], block[None], 32)[0], [0.0] * 16 + [14.0] * 16
    )


def test_plain_types():
    rng = np.random.default_rng(3)
    values = rng.standard_normal((3, 7)).astype(np.float32)
    for code, encoded in (("F32", values), ("F16", values.astype(np.float16)), ("F64", values.astype(np.float64))):
        raw = encoded.view(np.uint8)
        np.testing.assert_array_equal(dequantize_ggml(DTYPE_CODES[code], raw, 7), encoded.astype(np.float32))
    bf16 = gguf.quants.quantize(values, Q.BF16)
    np.testing.assert_array_equal(
        bits(dequantize_ggml(DTYPE_CODES["BF16"], bf16.view(np.uint8), 7)), bits(gguf.quants.dequantize(bf16, Q.BF16))
    )


def test_chunks_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(4)
    raw = random_blocks(rng, "Q4_K", (5, 3), 2)
    whole = dequantize_ggml(GGML_BLOCK_CODES["Q4_K"], raw, 512)
    monkeypatch.setattr(ggml_module, "_CHUNK_ELEMS", 3 * 256)  # 3 blocks per chunk: a ragged last chunk
    np.testing.assert_array_equal(dequantize_ggml(GGML_BLOCK_CODES["Q4_K"], raw, 512), whole)


def test_read_only_memory_map(tmp_path):
    rng = np.random.default_rng(5)
    raw = random_blocks(rng, "Q6_K", (4,), 1)
    path = tmp_path / "slab.bin"
    path.write_bytes(raw.tobytes())
    mapped = np.memmap(path, np.uint8, mode="r", shape=raw.shape)
    np.testing.assert_array_equal(
        dequantize_ggml(GGML_BLOCK_CODES["Q6_K"], mapped, 256), dequantize_ggml(GGML_BLOCK_CODES["Q6_K"], raw, 256)
    )


@pytest.mark.parametrize("code", ["IQ2_XXS", "IQ1_M", "Q8_K", "Q8_1", "Q1_0", "I32"])
def test_unsupported_types_are_refused_by_name(code):
    dtype = GGML_BLOCK_CODES.get(code) or DTYPE_CODES[code]
    assert not can_dequantize(dtype)
    raw = np.zeros((2, dtype.row_nbytes(dtype.block_elems * 2)), np.uint8)
    with pytest.raises(
        UnsupportedEncodingError, match=f"f.gguf: tensor 'w': cannot dequantize ggml type {code}"
    ) as info:
        dequantize_ggml(dtype, raw, dtype.block_elems * 2, where="f.gguf: tensor 'w'")
    assert isinstance(info.value, FormatError) and isinstance(info.value, ValueError)


def test_bad_rows_are_refused():
    q8_0 = GGML_BLOCK_CODES["Q8_0"]
    assert can_dequantize(q8_0)
    with pytest.raises(FormatError, match="need 68 bytes per row, found 34"):
        dequantize_ggml(q8_0, np.zeros((2, 34), np.uint8), 64)
    with pytest.raises(FormatError, match="positive multiple of 32"):
        dequantize_ggml(q8_0, np.zeros((2, 34), np.uint8), 33)
    with pytest.raises(FormatError, match="uint8"):
        dequantize_ggml(q8_0, np.zeros((2, 34), np.int8), 32)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _cuda(), reason="needs a CUDA device"))]
DEVICE_CODES = ["MXFP4", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("code", DEVICE_CODES)
def test_device_kernels_bit_identical_to_the_numpy_reference(code, device):
    """The torch kernels that decode GGUF experts after their bytes reach the device."""
    torch = pytest.importorskip("torch", reason="the device kernels are torch")
    from mmapstore.gpu._dequant import GGML_DEVICE_TYPES
    from mmapstore.gpu._dequant import dequantize_ggml as on_device

    assert set(DEVICE_CODES) == GGML_DEVICE_TYPES

    rng = np.random.default_rng(100 + BLOCK_CODES.index(code))
    dtype = GGML_BLOCK_CODES[code]
    raw = random_blocks(rng, code, (3, 5), 2)
    if code == "MXFP4":  # E8M0 scales 0 and 1 take ggml's subnormal branch: 30 blocks, scales 0..29
        raw.reshape(-1, 17)[:, 0] = np.arange(30, dtype=np.uint8)
    n = 2 * dtype.block_elems
    ours = on_device(code, torch.from_numpy(raw).to(device), n).cpu().numpy()
    assert ours.shape == (3, 5, n) and ours.dtype == np.float32
    np.testing.assert_array_equal(bits(ours), bits(dequantize_ggml(dtype, raw, n)))
    with pytest.raises(FormatError, match="do not hold"):
        on_device(code, torch.from_numpy(raw[..., :-1]).to(device), n)
    if code == "MXFP4":  # its table reaches the device once: a host-to-device copy per slab waits for the stream
        from mmapstore.gpu._dequant import _table

        made = _table.cache_info().misses
        on_device(code, torch.from_numpy(raw).to(device), n)
        assert _table.cache_info().misses == made

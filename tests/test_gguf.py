"""GGUF header reader: files from gguf-py's writer, split sets, a hostile catalogue, mutation fuzz."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf_builders import (
    ARRAY,
    BOOL,
    F32,
    GGML_F16,
    GGML_F32,
    GGML_Q4_K,
    GGML_Q8_0,
    I32,
    STRING,
    U8,
    U32,
    U64,
    GGUFBytes,
    array,
    kv,
    kv_scalar,
    moe_gguf,
    scalar,
    string,
    tensor_info,
)

from mmapstore import FormatError
from mmapstore.dequant import dequantize_ggml
from mmapstore.formats import _gguf_cursor as gguf_cursor
from mmapstore.formats import is_gguf, read_gguf_files, read_gguf_header
from mmapstore.formats._records import MAX_TENSORS

gguf = pytest.importorskip("gguf", reason="gguf-py writes the reference files and dequantizes the oracle values")
Q = gguf.GGMLQuantizationType

PROJS = ("gate", "up", "down")


def write(path, data: bytes) -> str:
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


def raw_k_quant(rng: np.random.Generator, qtype, shape: tuple[int, ...]) -> np.ndarray:
    """Random K-quant blocks (gguf-py cannot quantize these) with finite f16 scales."""
    elems, block = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (*shape[:-1], shape[-1] // elems, block), dtype=np.uint8)
    scale_bytes = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for start in scale_bytes:
        raw[..., start : start + 2] = rng.uniform(-1, 1, raw.shape[:-1]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(*shape[:-1], -1)


def write_moe(
    path, experts: int = 4, hidden: int = 512, ffn: int = 256, types=None, alignment: int | None = None, **writer_kwargs
) -> dict[str, tuple[np.ndarray, object]]:
    """An MoE-shaped file written by gguf-py; returns {name: (raw array as written, ggml type)}."""
    rng = np.random.default_rng(0)
    types = types or {"gate": Q.Q4_K, "up": Q.Q8_0, "down": Q.Q6_K}
    writer = gguf.GGUFWriter(str(path), "qwen2moe", **writer_kwargs)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_block_count(1)
    writer.add_expert_count(experts)
    written = {}
    for proj in PROJS:
        out_dim, in_dim = (ffn, hidden) if proj != "down" else (hidden, ffn)
        qtype = types[proj]
        name = f"blk.0.ffn_{proj}_exps.weight"
        if qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
            raw = raw_k_quant(rng, qtype, (experts, out_dim, in_dim))
        else:
            raw = gguf.quants.quantize(rng.standard_normal((experts, out_dim, in_dim)).astype(np.float32), qtype)
        writer.add_tensor(name, raw, raw_dtype=qtype)
        written[name] = (raw, qtype)
    norm = rng.standard_normal(hidden).astype(np.float32)
    writer.add_tensor("blk.0.ffn_norm.weight", norm)
    written["blk.0.ffn_norm.weight"] = (norm, Q.F32)
    router = rng.standard_normal((experts, hidden)).astype(np.float16)
    writer.add_tensor("blk.0.ffn_gate_inp.weight", router)
    written["blk.0.ffn_gate_inp.weight"] = (router, Q.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def file_bytes(path: str, offset: int, nbytes: int) -> np.ndarray:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return np.frombuffer(handle.read(nbytes), np.uint8)


# --- files from gguf-py ------------------------------------------------------------------------------------------


def test_records_match_gguf_py_reader(tmp_path):
    path = str(tmp_path / "moe.gguf")
    write_moe(path)
    header = read_gguf_header(path)
    reference = gguf.GGUFReader(path)
    assert header.version == 3 and header.alignment == 32 and header.file_nbytes == os.path.getsize(path)
    assert header.data_offset == reference.data_offset
    assert [record.name for record in header.tensors] == [tensor.name for tensor in reference.tensors]
    for record, tensor in zip(header.tensors, reference.tensors, strict=True):
        assert record.path == path
        assert record.dtype.code == tensor.tensor_type.name
        assert record.shape == tuple(int(dim) for dim in reversed(tensor.shape))  # numpy order
        assert record.offset == tensor.data_offset
        assert record.nbytes == tensor.n_bytes
    shapes = {record.name: record.shape for record in header.tensors}
    assert shapes["blk.0.ffn_gate_exps.weight"] == (4, 256, 512)  # [E, out, in]
    assert shapes["blk.0.ffn_down_exps.weight"] == (4, 512, 256)
    assert header.metadata["general.architecture"] == "qwen2moe"
    assert header.metadata["qwen2moe.expert_count"] == 4


@pytest.mark.parametrize(
    "types",
    [
        {"gate": Q.Q4_K, "up": Q.Q8_0, "down": Q.Q6_K},
        {"gate": Q.Q2_K, "up": Q.Q3_K, "down": Q.Q5_K},
        {"gate": Q.Q4_0, "up": Q.Q4_1, "down": Q.MXFP4},
        {"gate": Q.Q5_0, "up": Q.Q5_1, "down": Q.BF16},
    ],
    ids=lambda types: "-".join(qtype.name for qtype in types.values()),
)
def test_each_expert_is_one_contiguous_range_that_dequantizes_alone(tmp_path, types):
    path = str(tmp_path / "moe.gguf")
    written = write_moe(path, types=types)
    header = read_gguf_header(path)
    for record in header.tensors:
        raw, qtype = written[record.name]
        stored = file_bytes(path, record.offset, record.nbytes)
        np.testing.assert_array_equal(stored, raw.reshape(-1).view(np.uint8))
        if "_exps." not in record.name:
            continue
        experts, out_dim, in_dim = record.shape
        whole = gguf.quants.dequantize(stored.reshape(experts, out_dim, -1), qtype)
        slab_nbytes = record.nbytes // experts
        assert slab_nbytes == out_dim * record.dtype.row_nbytes(in_dim)
        for expert in range(experts):
            # The expert's bytes alone, read from where the record says it lies.
            slab = file_bytes(path, record.offset + expert * slab_nbytes, slab_nbytes).reshape(out_dim, -1)
            ours = dequantize_ggml(record.dtype, slab, in_dim)
            # Bit-identical: the kernels do gguf-py's float32 operations in its order.
            np.testing.assert_array_equal(ours.view(np.uint32), whole[expert].view(np.uint32))


def test_metadata_values_match_gguf_py(tmp_path):
    path = str(tmp_path / "meta.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("u8", 255)
    writer.add_int8("i8", -128)
    writer.add_uint16("u16", 65535)
    writer.add_int16("i16", -32768)
    writer.add_uint32("u32", 2**32 - 1)
    writer.add_int32("i32", -(2**31))
    writer.add_uint64("u64", 2**64 - 1)
    writer.add_int64("i64", -(2**63))
    writer.add_float32("f32", 0.25)
    writer.add_float64("f64", 1e300)
    writer.add_bool("yes", True)
    writer.add_bool("no", False)
    writer.add_string("text", "héllo ✓")
    writer.add_array("tokens", ["a", "", "ünï", "<0x0A>"] * 1000)
    writer.add_array("scores", [0.5, -1.0])
    writer.add_array("flags", [True, False, True])
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_tensor("w", np.arange(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata = read_gguf_header(path).metadata
    assert metadata["u8"] == 255 and metadata["i8"] == -128 and metadata["u16"] == 65535 and metadata["i16"] == -32768
    assert metadata["u32"] == 2**32 - 1 and metadata["i32"] == -(2**31)
    assert metadata["u64"] == 2**64 - 1 and metadata["i64"] == -(2**63)
    assert metadata["f32"] == 0.25 and metadata["f64"] == 1e300
    assert metadata["yes"] is True and metadata["no"] is False
    assert metadata["text"] == "héllo ✓"
    assert metadata["tokens"] == ["a", "", "ünï", "<0x0A>"] * 1000
    assert metadata["scores"] == [0.5, -1.0] and metadata["flags"] == [True, False, True]
    assert metadata["nested"] == [[1, 2], [3]]
    reference = gguf.GGUFReader(path)
    assert set(metadata) == {field for field in reference.fields if not field.startswith("GGUF.")}


def test_custom_alignment(tmp_path):
    path = str(tmp_path / "aligned.gguf")
    write_moe(path, alignment=4096)
    header = read_gguf_header(path)
    assert header.alignment == 4096 and header.metadata["general.alignment"] == 4096
    assert header.data_offset % 4096 == 0
    assert all(record.offset % 4096 == 0 for record in header.tensors)
    assert header.data_offset == gguf.GGUFReader(path).data_offset


def test_header_only_is_read_from_a_huge_sparse_file(tmp_path):
    # A 16 GiB experts tensor over a hole: the header parses without reading it.
    layout = GGUFBytes(infos=[tensor_info("blk.0.ffn_up_exps.weight", (4096, 4096, 256), GGML_F32, 0)])
    path = write(tmp_path / "sparse.gguf", layout.pack())
    header_nbytes = os.path.getsize(path)
    os.truncate(path, header_nbytes + 4096 * 4096 * 256 * 4)
    (record,) = read_gguf_header(path).tensors
    assert record.shape == (256, 4096, 4096) and record.nbytes == 2**34
    assert record.offset == header_nbytes


def test_is_gguf(tmp_path):
    path = write(tmp_path / "a.gguf", moe_gguf().pack())
    assert is_gguf(path)
    assert not is_gguf(write(tmp_path / "x.safetensors", struct.pack("<Q", 2) + b"{}"))
    assert not is_gguf(tmp_path / "missing.gguf")
    assert not is_gguf(tmp_path)
    assert is_gguf(write(tmp_path / "be.gguf", b"FUGG" + b"\x00" * 60))  # so the reader can name it
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    assert not is_gguf(fifo)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        read_gguf_header(fifo)
    with pytest.raises(FormatError, match="GGUF file does not exist"):
        read_gguf_header(tmp_path / "missing.gguf")


# --- split sets --------------------------------------------------------------------------------------------------


def write_split(tmp_path, max_tensors: int = 2) -> list[str]:
    write_moe(tmp_path / "model.gguf", split_max_tensors=max_tensors)
    return sorted(str(path) for path in tmp_path.glob("model-*.gguf"))


def test_split_set_found_from_any_part_or_the_directory(tmp_path):
    parts = write_split(tmp_path)
    assert [os.path.basename(part) for part in parts] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for entry in (*parts, str(tmp_path)):
        headers = read_gguf_files(entry)
        assert [header.path for header in headers] == parts
    names = [record.name for header in read_gguf_files(parts[0]) for record in header.tensors]
    assert names == [
        "blk.0.ffn_gate_exps.weight",
        "blk.0.ffn_up_exps.weight",
        "blk.0.ffn_down_exps.weight",
        "blk.0.ffn_norm.weight",
        "blk.0.ffn_gate_inp.weight",
    ]
    assert all(record.path == header.path for header in read_gguf_files(parts[1]) for record in header.tensors)


def test_single_file_and_directory_of_one(tmp_path):
    path = write(tmp_path / "one.gguf", moe_gguf().pack())
    assert [header.path for header in read_gguf_files(path)] == [path]
    assert [header.path for header in read_gguf_files(tmp_path)] == [path]


def test_split_missing_part(tmp_path):
    parts = write_split(tmp_path)
    os.remove(parts[1])
    with pytest.raises(FormatError, match="part 2 of 3 is missing") as info:
        read_gguf_files(parts[0])
    assert parts[0] in str(info.value)


def test_split_extra_part(tmp_path):
    parts = write_split(tmp_path)
    extra = write(tmp_path / "model-00004-of-00003.gguf", Path(parts[2]).read_bytes())
    with pytest.raises(FormatError, match="extra part"):
        read_gguf_files(parts[0])
    os.remove(extra)
    write(tmp_path / "model-00001-of-00002.gguf", Path(parts[0]).read_bytes())
    with pytest.raises(FormatError, match="extra part"):
        read_gguf_files(parts[2])


def test_split_names_disagree_with_keys(tmp_path):
    parts = write_split(tmp_path)
    # Swap two parts' contents: their split.no no longer matches their names.
    first, second = Path(parts[0]).read_bytes(), Path(parts[1]).read_bytes()
    write(parts[0], second)
    write(parts[1], first)
    with pytest.raises(FormatError, match=r"split\.no is 1, expected 0") as info:
        read_gguf_files(parts[0])
    assert parts[0] in str(info.value)


def split_part(number: int, count: int, tensors: list[tuple[str, tuple[int, ...], int]], total: int) -> bytes:
    kvs = [
        kv_scalar("split.no", 2, number),
        kv_scalar("split.count", 2, count),
        kv_scalar("split.tensors.count", I32, total),
    ]
    return moe_gguf(tensors, kvs).pack()


def test_split_refusals_on_hand_built_parts(tmp_path):
    a = [("a", (32,), GGML_F32)]
    b = [("b", (32,), GGML_F32)]
    first = write(tmp_path / "m-00001-of-00002.gguf", split_part(0, 2, a, 2))
    write(tmp_path / "m-00002-of-00002.gguf", split_part(1, 2, a, 2))
    with pytest.raises(FormatError, match="tensor 'a' is also in"):
        read_gguf_files(first)
    write(tmp_path / "m-00002-of-00002.gguf", split_part(1, 2, b, 3))
    with pytest.raises(FormatError, match=r"split\.tensors\.count is 3, the 2 parts hold 2"):
        read_gguf_files(first)
    write(tmp_path / "m-00002-of-00002.gguf", split_part(1, 3, b, 2))
    with pytest.raises(FormatError, match=r"split\.count is 3, the file names say 2"):
        read_gguf_files(first)
    write(tmp_path / "m-00002-of-00002.gguf", split_part(1, 2, b, 2))
    assert [len(header.tensors) for header in read_gguf_files(first)] == [1, 1]
    lone = write(tmp_path / "lone.gguf", split_part(0, 2, a, 2))
    with pytest.raises(FormatError, match="other parts cannot be found"):
        read_gguf_files(lone)
    write(tmp_path / "other.gguf", moe_gguf().pack())
    with pytest.raises(FormatError, match="not one split set"):
        read_gguf_files(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"no \.gguf file"):
        read_gguf_files(tmp_path / "empty")


# --- hostile catalogue -------------------------------------------------------------------------------------------


def with_kv(*pairs: bytes) -> GGUFBytes:
    return moe_gguf(kvs=list(pairs))


def with_info(info: bytes, data: bytes = b"\x00" * 256) -> GGUFBytes:
    return GGUFBytes(kvs=[kv_scalar("general.architecture", STRING, "llama")], infos=[info], data=data)


def spoiled(**fields) -> GGUFBytes:
    layout = moe_gguf()
    for key, value in fields.items():
        setattr(layout, key, value)
    return layout


F32_INFO = tensor_info("w", (32,), GGML_F32, 0)

HOSTILE: dict[str, tuple[bytes, str]] = {
    "empty file": (b"", "truncated while reading magic"),
    "bad magic": (b"GGML" + moe_gguf().pack()[4:], "not a GGUF file"),
    "big-endian magic": (b"FUGG" + moe_gguf().pack()[4:], "big-endian"),
    "big-endian version": (spoiled(version=0x03000000).pack(), "big-endian"),
    "version 1": (spoiled(version=1).pack(), "version 1 is not supported"),
    "version 4": (spoiled(version=4).pack(), "version 4 is not supported"),
    "tensor count 2**63": (spoiled(tensor_count=2**63).pack(), f"over the {MAX_TENSORS} limit"),
    "tensor count lies": (spoiled(tensor_count=1000).pack(), "need at least"),
    "tensor count one too many": (spoiled(tensor_count=4).pack(), "tensor #3"),
    "kv count 2**64-1": (spoiled(kv_count=2**64 - 1).pack(), "key-value pairs, over"),
    "kv count lies": (spoiled(kv_count=100).pack(), "need at least"),
    "kv count one too many": (spoiled(kv_count=2).pack(), "key #1|tensor #0"),
    "huge string length": (with_kv(kv("s", STRING, struct.pack("<Q", 2**64 - 1))).pack(), "over the"),
    "string past end": (with_kv(kv("s", STRING, struct.pack("<Q", 10**6) + b"abc")).pack(), "remain in the file"),
    "huge key length": (with_kv(struct.pack("<Q", 2**40) + b"k").pack(), "over the 4096 byte limit"),
    "empty key": (with_kv(kv_scalar("", U8, 1)).pack(), "is empty"),
    "huge array length": (with_kv(kv("a", ARRAY, struct.pack("<IQ", U8, 2**62))).pack(), "over the"),
    "array past end": (with_kv(kv("a", ARRAY, struct.pack("<IQ", U64, 10**6))).pack(), "remain in the file"),
    "array of strings past end": (with_kv(kv("a", ARRAY, struct.pack("<IQ", STRING, 10**5))).pack(), "remain"),
    "unknown array element type": (with_kv(kv("a", ARRAY, struct.pack("<IQ", 13, 1))).pack(), "element type 13"),
    "nested too deep": (
        with_kv(kv("a", ARRAY, array(ARRAY, [(ARRAY, [(ARRAY, [(ARRAY, [(ARRAY, [(U8, [1])])])])])]))).pack(),
        "nested deeper",
    ),
    "unknown value type": (with_kv(kv("x", 13, b"\x00" * 8)).pack(), "unknown value type 13"),
    "bool of 2": (with_kv(kv("b", BOOL, b"\x02")).pack(), "expected 0 or 1"),
    "bool array with 7": (with_kv(kv("b", ARRAY, struct.pack("<IQ", BOOL, 2) + b"\x01\x07")).pack(), "is 7"),
    "bad UTF-8 key": (with_kv(kv_scalar(b"\xff\xfe", U8, 1)).pack(), "not valid UTF-8"),
    "bad UTF-8 value": (with_kv(kv("s", STRING, string(b"ok\xc3"))).pack(), "not valid UTF-8"),
    "bad UTF-8 in string array": (
        with_kv(kv("t", ARRAY, struct.pack("<IQ", STRING, 2) + string("a") + string(b"\x80"))).pack(),
        r"key 't'\[1\].*not valid UTF-8",
    ),
    "duplicate key": (with_kv(kv_scalar("k", U8, 1), kv_scalar("k", U8, 2)).pack(), "duplicate key 'k'"),
    "alignment 48": (with_kv(kv_scalar("general.alignment", U32, 48)).pack(), "not a power of two"),
    "alignment 0": (with_kv(kv_scalar("general.alignment", U32, 0)).pack(), "not a power of two"),
    "alignment as u64": (with_kv(kv_scalar("general.alignment", U64, 64)).pack(), "expected a UINT32"),
    "alignment as string": (with_kv(kv_scalar("general.alignment", STRING, "32")).pack(), "expected a UINT32"),
    "offset not aligned": (
        with_info(tensor_info("w", (32,), GGML_F32, 4)).pack(),
        "not a multiple of the alignment 32",
    ),
    "offset past end": (with_info(tensor_info("w", (32,), GGML_F32, 2**40)).pack(), "past the end"),
    "offset 2**64-32": (with_info(tensor_info("w", (32,), GGML_F32, 2**64 - 32)).pack(), "past the end"),
    "tensor runs past end": (with_info(tensor_info("w", (1000,), GGML_F32, 0)).pack(), "past the end"),
    "overlap": (
        GGUFBytes(
            infos=[tensor_info("a", (32,), GGML_F32, 0), tensor_info("b", (32,), GGML_F32, 96)], data=b"\x00" * 256
        ).pack(),
        "overlap tensor 'a'",
    ),
    "unknown ggml type 4": (with_info(tensor_info("w", (32,), 4, 0)).pack(), "unknown ggml type 4"),
    "unknown ggml type 2**32-1": (with_info(tensor_info("w", (32,), 2**32 - 1, 0)).pack(), "unknown ggml type"),
    "n_dims 0": (with_info(tensor_info("w", (), GGML_F32, 0)).pack(), "n_dims is 0"),
    "n_dims 5": (with_info(tensor_info("w", (1, 1, 1, 1, 32), GGML_F32, 0)).pack(), "n_dims is 5"),
    "n_dims 2**32-1": (with_info(string("w") + struct.pack("<I", 2**32 - 1)).pack(), "n_dims is 4294967295"),
    "dim 0": (with_info(tensor_info("w", (32, 0), GGML_F32, 0)).pack(), r"ne\[1\] is 0"),
    "dims overflow int64": (with_info(tensor_info("w", (2**32, 2**32, 2), GGML_F32, 0)).pack(), "2\\*\\*63"),
    "dim 2**64-1": (with_info(tensor_info("w", (2**64 - 1,), GGML_F32, 0)).pack(), "2\\*\\*63"),
    "row not whole Q8_0 blocks": (
        with_info(tensor_info("w", (33, 2), GGML_Q8_0, 0)).pack(),
        "multiple of its 32-value block",
    ),
    "row not whole Q4_K blocks": (
        with_info(tensor_info("w", (32, 2), GGML_Q4_K, 0)).pack(),
        "multiple of its 256-value block",
    ),
    "duplicate tensor name": (
        GGUFBytes(infos=[F32_INFO, F32_INFO], data=b"\x00" * 256).pack(),
        "duplicate tensor name 'w'",
    ),
    "empty tensor name": (with_info(tensor_info("", (32,), GGML_F32, 0)).pack(), "name at offset .* is empty"),
    "bad UTF-8 tensor name": (with_info(tensor_info(b"w\xff", (32,), GGML_F32, 0)).pack(), "not valid UTF-8"),
    "truncated in tensor info": (with_info(F32_INFO).header()[:-3], "truncated while reading tensor 'w' offset"),
    "truncated data": (moe_gguf().pack()[:-1], "past the end"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_catalogue(tmp_path, case):
    data, message = HOSTILE[case]
    path = write(tmp_path / "hostile.gguf", data)
    with pytest.raises(FormatError, match=message) as info:
        read_gguf_header(path)
    assert path in str(info.value)
    assert not isinstance(info.value, (KeyError, IndexError))


def test_every_truncation_is_refused(tmp_path):
    data = moe_gguf(
        kvs=[
            kv("tokens", ARRAY, array(STRING, ["a", "", "def"])),
            kv_scalar("empty", STRING, ""),
            kv("none", ARRAY, array(U64, [])),
            kv("scores", ARRAY, array(F32, [0.5, 1.5])),
            kv("nested", ARRAY, array(ARRAY, [(U8, [1, 2])])),
        ]
    ).pack()
    path = write(tmp_path / "full.gguf", data)
    header = read_gguf_header(path)
    assert len(header.tensors) == 3 and header.metadata["tokens"] == ["a", "", "def"] and header.metadata["empty"] == ""
    assert header.metadata["none"] == [] and header.metadata["nested"] == [[1, 2]]
    for size in range(len(data)):
        write(path, data[:size])
        with pytest.raises(FormatError) as info:
            read_gguf_header(path)
        assert path in str(info.value)


def test_header_cap_is_enforced(tmp_path, monkeypatch):
    data = moe_gguf(kvs=[kv("tokens", ARRAY, array(STRING, ["x" * 100] * 100))]).pack()
    path = write(tmp_path / "big.gguf", data)
    assert read_gguf_header(path).metadata["tokens"] == ["x" * 100] * 100
    monkeypatch.setattr(gguf_cursor, "MAX_HEADER_NBYTES", 2048)
    with pytest.raises(FormatError, match="2048 byte limit"):
        read_gguf_header(path)


def test_metadata_element_cap(tmp_path, monkeypatch):
    path = write(
        tmp_path / "many.gguf", with_kv(kv("a", ARRAY, array(U8, [1] * 50)), kv("b", ARRAY, array(U8, [1] * 50))).pack()
    )
    monkeypatch.setattr(gguf_cursor, "MAX_METADATA_ELEMS", 80)
    with pytest.raises(FormatError, match="over 80 elements in all"):
        read_gguf_header(path)


def test_string_array_decoded_across_read_windows(tmp_path):
    tokens = [f"token-{index}-" + "é" * (index % 17) for index in range(30_000)]
    path = write(tmp_path / "vocab.gguf", with_kv(kv("tokens", ARRAY, array(STRING, tokens))).pack())
    assert read_gguf_header(path).metadata["tokens"] == tokens


def mutation_fuzz(tmp_path, rounds: int, seed: int) -> None:
    base = moe_gguf(
        kvs=[
            kv("tokens", ARRAY, array(STRING, ["a", "bc"])),
            kv_scalar("n", I32, 7),
            kv("flags", ARRAY, array(BOOL, [1, 0])),
        ]
    ).pack()
    rng = random.Random(seed)
    path = str(tmp_path / "fuzz.gguf")
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(rounds):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            kind = rng.random()
            if not data:
                break
            if kind < 0.6 or len(data) <= 8:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind < 0.8:
                position = rng.randrange(len(data) - 8)
                data[position : position + 8] = struct.pack(
                    "<Q", rng.choice([0, 1, 2**31, 2**63, 2**64 - 1, len(data)])
                )
            else:
                del data[rng.randrange(len(data)) :]
        write(path, bytes(data))
        try:
            read_gguf_header(path)
            outcomes["ok"] += 1
        except FormatError as exc:
            assert path in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > rounds // 2


def test_mutation_fuzz_quick(tmp_path):
    mutation_fuzz(tmp_path, 400, seed=1)


@pytest.mark.slow
def test_mutation_fuzz_long(tmp_path):
    mutation_fuzz(tmp_path, 20_000, seed=2)


def test_scalar_helper_round_trip():
    # The builder itself: a u32 packs as 4 little-endian bytes (guards the catalogue above).
    assert scalar(U32, 32) == b"\x20\x00\x00\x00" and string("ab") == b"\x02" + b"\x00" * 7 + b"ab"
    assert GGML_F16 == Q.F16 and GGML_Q8_0 == Q.Q8_0 and GGML_Q4_K == Q.Q4_K

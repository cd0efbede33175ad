"""convert at disk speed: orientations, checksums, kernel copies, the transpose
kernel and the pipeline's bookkeeping (issue 15)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from builders import SMALL_FAMILIES, write_checkpoint
from test_layouts import random
from test_quantized import FP8_CONFIG, MX_CONFIG, fp8_checkpoint, mxfp4_checkpoint, save

import mmapstore._convert_pipeline as convert_pipeline
import mmapstore._preadcopy as preadcopy
from mmapstore import ConvertError, FormatError, convert, open_store, verify
from mmapstore._checksum import HEX_DIGITS
from mmapstore._preadcopy import copy_range
from mmapstore._transpose import transpose_into

FAMILIES = SMALL_FAMILIES


def _parts(store):
    """Every stack's parts of every expert, in [k, n] orientation where a weight has one."""
    values = {}
    for layer in store.layers:
        for proj, stack in layer.stacks:
            for expert in range(stack.num_experts):
                values[(layer.layer_index, proj, expert, "weight")] = stack.expert(expert)
                if "bias" in stack.parts:
                    values[(layer.layer_index, proj, expert, "bias")] = stack.part("bias", expert)
    return values


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["keep", "f32"])
def test_both_orientations_give_identical_values(small_sources, tmp_path, family, dtype):
    native = convert(small_sources[family], tmp_path / "native", dtype=dtype, shard_nbytes=20_000)
    kn = convert(small_sources[family], tmp_path / "kn", dtype=dtype, orientation="kn", shard_nbytes=20_000)
    with open_store(small_sources[family]) as source, open_store(native.path) as a, open_store(kn.path) as b:
        want = _parts(source)
        for store in (a, b):
            got = _parts(store)
            assert got.keys() == want.keys()
            for key, value in want.items():
                expected = value if dtype == "keep" else value.astype(np.float32)
                assert got[key].dtype == expected.dtype
                np.testing.assert_array_equal(got[key], expected, err_msg=str(key))
        assert {stack.native_orientation for layer in b.layers for _, stack in layer.stacks} == {"kn"}
        native_orientations = {stack.native_orientation for layer in source.layers for _, stack in layer.stacks}
        assert {stack.native_orientation for layer in a.layers for _, stack in layer.stacks} == native_orientations
    for result, orientation in ((native, native_orientations.pop()), (kn, "kn")):
        manifest = json.loads(Path(result.path, "mmapstore.json").read_text())
        assert manifest["orientation"] == orientation
        assert manifest["options"]["orientation"] == ("native" if result is native else "kn")
        assert verify(result.path).ok


def test_native_slabs_are_the_source_bytes(small_sources, tmp_path):
    """Mixtral's [out, in] slabs pass through unchanged (copied by the kernel)."""
    result = convert(small_sources["mixtral"], tmp_path / "out")
    with open_store(small_sources["mixtral"]) as source, open_store(result.path) as store:
        for a, b in zip(source.layers, store.layers, strict=True):
            for (_, original), (_, converted) in zip(a.stacks, b.stacks, strict=True):
                assert converted.native_orientation == original.native_orientation == "nk"
                for expert in range(original.num_experts):
                    assert converted.native(expert).tobytes() == original.native(expert).tobytes()


def test_the_same_conversion_gives_the_same_bytes(small_sources, tmp_path):
    for orientation in ("native", "kn"):
        first = convert(
            small_sources["gpt_oss"], tmp_path / f"{orientation}1", orientation=orientation, shard_nbytes=20_000
        )
        second = convert(
            small_sources["gpt_oss"], tmp_path / f"{orientation}2", orientation=orientation, shard_nbytes=20_000
        )
        assert [os.path.basename(f) for f in first.files] == [os.path.basename(f) for f in second.files]
        for a, b in zip(first.files, second.files, strict=True):
            assert Path(a).read_bytes() == Path(b).read_bytes()


@pytest.mark.parametrize("orientation", ["native", "kn"])
def test_fp8_blocks_in_either_orientation(tmp_path, orientation):
    src = save(tmp_path / "src", fp8_checkpoint(), FP8_CONFIG)
    kept = convert(src, tmp_path / "kept", orientation=orientation)
    with open_store(src) as source, open_store(kept.path) as store:
        for proj, stack in store.layer(0).stacks:
            original = getattr(source.layer(0), proj)
            assert stack.encoding.kind == "fp8_block"
            assert stack.native_orientation == ("kn" if orientation == "kn" else original.native_orientation)
            for expert in range(stack.num_experts):
                np.testing.assert_array_equal(stack.expert(expert), original.expert(expert))
                np.testing.assert_array_equal(stack.dequantize(expert), original.dequantize(expert))
    assert verify(kept.path).ok


def test_kn_is_refused_for_blocks_that_cannot_be_transposed_unless_dequantized(tmp_path):
    src = save(tmp_path / "src", mxfp4_checkpoint(), MX_CONFIG)
    with pytest.raises(ConvertError, match="cannot be transposed"):
        convert(src, tmp_path / "kn", orientation="kn")
    assert not (tmp_path / "kn").exists()
    dense = convert(src, tmp_path / "f32", orientation="kn", dtype="f32")
    with open_store(src) as source, open_store(dense.path) as store:
        for proj, stack in store.layer(0).stacks:
            assert stack.native_orientation == "kn"
            for expert in range(stack.num_experts):
                np.testing.assert_array_equal(stack.expert(expert), getattr(source.layer(0), proj).dequantize(expert))


def test_native_orientation_of_mixed_stacks_transposes_the_fewer_bytes(tmp_path):
    """DBRX stores gate/up [out, in] and down [in, out]: the store takes the
    orientation of most bytes ([out, in]) and transposes down."""
    experts, hidden, ffn = 4, 16, 8
    prefix = "transformer.blocks.0.ffn.experts.mlp"
    tensors = {
        f"{prefix}.{name}": random((experts * ffn, hidden), seed) for seed, name in enumerate(("w1", "v1", "w2"))
    }
    config = {
        "model_type": "dbrx",
        "d_model": hidden,
        "ffn_config": {"moe_num_experts": experts, "ffn_hidden_size": ffn},
    }
    src = write_checkpoint(tmp_path / "src", tensors, config)
    result = convert(src, tmp_path / "out")
    with open_store(src) as source, open_store(result.path) as store:
        assert {stack.native_orientation for _, stack in store.layer(0).stacks} == {"nk"}
        for proj, stack in store.layer(0).stacks:
            for expert in range(experts):
                np.testing.assert_array_equal(stack.expert(expert), getattr(source.layer(0), proj).expert(expert))


def _flip_a_byte(store_path: str, tensor: str, at: int = 5) -> None:
    with open_store(store_path) as store:
        stack = store.layers[1].up
        span = stack.part_span("weight", 2)
        target, offset = span.mapped.path, span.offset + at
    with open(target, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("checksum", ["xxh3_128", "blake3", "sha256", "sha256 (no algorithm named)"])
def test_verify_catches_a_flipped_bit_with_each_checksum(small_sources, tmp_path, checksum):
    algorithm = checksum.split()[0]
    if algorithm == "blake3":
        pytest.importorskip("blake3", reason="blake3 checksums need the blake3 package")
    result = convert(small_sources["mixtral"], tmp_path / "out", checksum=algorithm, shard_nbytes=20_000)
    manifest_path = os.path.join(result.path, "mmapstore.json")
    manifest = json.loads(Path(manifest_path).read_text())
    assert manifest["checksum"] == algorithm
    assert all(len(entry[algorithm]) == HEX_DIGITS[algorithm] for entry in manifest["tensors"].values())
    if checksum != algorithm:  # a store as written before algorithms were named: sha256 per tensor only
        del manifest["checksum"], manifest["options"]["checksum"]
        with open(manifest_path, "w") as handle:
            json.dump(manifest, handle)
    assert verify(result.path).ok
    _flip_a_byte(result.path, "blk.1.ffn_up_exps.weight")
    report = verify(result.path)
    assert [(problem.tensor, problem.message.split()[:2]) for problem in report.problems] == [
        ("blk.1.ffn_up_exps.weight", [algorithm, "mismatch:"])
    ]


def test_a_manifest_naming_an_unknown_checksum_is_a_problem_not_a_pass(small_sources, tmp_path):
    result = convert(small_sources["mixtral"], tmp_path / "out")
    manifest_path = os.path.join(result.path, "mmapstore.json")
    manifest = json.loads(Path(manifest_path).read_text())
    manifest["checksum"] = "crc32"
    for entry in manifest["tensors"].values():
        del entry["xxh3_128"]
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)
    report = verify(result.path)
    assert not report.ok and "crc32" in report.problems[0].message


def test_malformed_digests_are_format_errors(small_sources, tmp_path):
    result = convert(small_sources["mixtral"], tmp_path / "out")
    manifest_path = os.path.join(result.path, "mmapstore.json")
    manifest = json.loads(Path(manifest_path).read_text())
    next(iter(manifest["tensors"].values()))["xxh3_128"] = "00" * 32  # a blake3-sized digest under xxh3_128
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)
    with pytest.raises(FormatError, match="xxh3_128 must be 32 lowercase hex digits"):
        open_store(result.path)


@pytest.mark.parametrize("window", [0, 4096, 64 << 20])
def test_progress_counts_exactly_the_planned_bytes(small_sources, tmp_path, monkeypatch, window):
    """Bytes are counted once each, as the disk takes them: within the
    write-behind window, or at each shard's fsync."""
    monkeypatch.setattr(convert_pipeline, "WRITE_BEHIND_NBYTES", window)
    planned, counted = [], []
    result = convert(
        small_sources["gpt_oss"],
        tmp_path / "out",
        dtype="f32",
        shard_nbytes=20_000,
        progress=counted.append,
        on_plan=planned.append,
    )
    assert planned == [result.nbytes] and sum(counted) == result.nbytes and len(counted) >= len(result.files) > 1


def test_unknown_orientation_or_checksum_is_refused(small_sources, tmp_path):
    with pytest.raises(ConvertError, match="orientation"):
        convert(small_sources["mixtral"], tmp_path / "a", orientation="nk")
    with pytest.raises(ConvertError, match="checksum"):
        convert(small_sources["mixtral"], tmp_path / "b", checksum="md5")
    assert not os.listdir(tmp_path)


# -- copy_range: the kernel copy keeps the pread guarantee ---------------------------------


def test_copy_range_copies_exactly_and_a_short_source_is_a_format_error(tmp_path):
    source, destination = tmp_path / "src", tmp_path / "dst"
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    source.write_bytes(data)
    src_fd = os.open(source, os.O_RDONLY)
    dst_fd = os.open(destination, os.O_RDWR | os.O_CREAT)
    try:
        copy_range(src_fd, 1000, dst_fd, 4096, 2 << 20, path=str(source))
        assert destination.read_bytes()[4096:] == data[1000 : 1000 + (2 << 20)]
        os.truncate(source, 1 << 20)  # the source shrinks: a short copy, never a fault
        with pytest.raises(FormatError, match="shrank"):
            copy_range(src_fd, 1000, dst_fd, 0, 2 << 20, path=str(source))
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def test_copy_range_falls_back_where_the_kernel_cannot_copy(tmp_path, monkeypatch):
    def unsupported(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(preadcopy.os, "copy_file_range", unsupported)
    monkeypatch.setattr(preadcopy, "_BOUNCE_NBYTES", 1000)
    source, destination = tmp_path / "src", tmp_path / "dst"
    data = bytes(range(256)) * 40
    source.write_bytes(data)
    src_fd = os.open(source, os.O_RDONLY)
    dst_fd = os.open(destination, os.O_RDWR | os.O_CREAT)
    try:
        copy_range(src_fd, 7, dst_fd, 3, 5000, path=str(source))
        assert destination.read_bytes() == b"\0" * 3 + data[7:5007]
        with pytest.raises(FormatError, match="shrank|truncated"):
            copy_range(src_fd, 9000, dst_fd, 0, 2000, path=str(source))
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def test_a_conversion_whose_kernel_copy_is_unsupported_still_converts(small_sources, tmp_path, monkeypatch):
    def unsupported(*args):
        raise OSError(errno.ENOSYS, "no copy_file_range")

    monkeypatch.setattr(preadcopy.os, "copy_file_range", unsupported)
    result = convert(small_sources["mixtral"], tmp_path / "out")
    with open_store(small_sources["mixtral"]) as source, open_store(result.path) as store:
        assert _parts(source).keys() == _parts(store).keys()
        for key, value in _parts(source).items():
            np.testing.assert_array_equal(_parts(store)[key], value)
    assert verify(result.path).ok


# -- the transpose kernel ------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [np.uint8, ml_dtypes.float8_e4m3fn, np.float16, ml_dtypes.bfloat16, np.float32, np.int32, np.float64]
)
@pytest.mark.parametrize("shape", [(64, 96), (7, 5), (13, 64), (130, 3), (1, 9), (9, 1), (0, 4), (1000, 24)])
def test_transpose_into_matches_numpy(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    rows, cols = shape
    wide = rng.integers(0, 120, (rows, cols + 7)).astype(dtype)
    for source in (wide[:, :cols].copy(), wide[:, 3 : 3 + cols]):  # C-ordered, and a column band
        destination = np.full((cols, rows), 77, dtype=dtype)
        transpose_into(destination, source)
        assert destination.tobytes() == np.ascontiguousarray(source.T).tobytes()


def test_transpose_into_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="cast first"):
        transpose_into(np.empty((3, 2), np.float32), np.empty((2, 3), np.float16))
    with pytest.raises(ValueError, match="is not source"):
        transpose_into(np.empty((2, 3), np.float32), np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        transpose_into(np.empty((3, 2), np.float32), np.empty((3, 2), np.float32).T)


def test_the_command_line_takes_orientation_and_checksum(small_sources, tmp_path, capsys):
    from mmapstore.cli import main

    dst = tmp_path / "out"
    argv = ["convert", small_sources["mixtral"], str(dst), "--orientation", "kn", "--checksum", "sha256", "--quiet"]
    assert main(argv) == 0
    manifest = json.loads(Path(dst, "mmapstore.json").read_text())
    assert (manifest["orientation"], manifest["checksum"]) == ("kn", "sha256")
    assert main(argv) == 0 and "already holds" in capsys.readouterr().out
    assert main(["convert", small_sources["mixtral"], str(dst), "--quiet"]) == 1  # another conversion: needs --force
    assert main(["verify", str(dst)]) == 0

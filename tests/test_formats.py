"""Header validation, the hostile catalogue, golden writer bytes, raw manifests, indexes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from builders import header_bytes, pack_safetensors, write_bytes

from mmapstore import FormatError, open_store
from mmapstore._dtypes import DTYPE_CODES, dtype_from_code
from mmapstore.formats import SafetensorsWriter, TensorSpec, read_checkpoint, read_safetensors_header

F32 = dtype_from_code("F32")


def moe_tensors(experts: int = 2) -> dict[str, np.ndarray]:
    tensors = {}
    for proj, shape in (("gate", (2, 3, 4)), ("up", (2, 3, 4)), ("down", (2, 4, 3))):
        tensors[f"blk.0.ffn_{proj}_exps.weight"] = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return tensors


def good_header() -> dict:
    return {
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [16, 20]},
    }


def file_with(tmp_path, header: dict, data_nbytes: int = 20, name: str = "x.safetensors") -> str:
    return write_bytes(tmp_path / name, header_bytes(header) + b"\x00" * data_nbytes)


def test_reads_library_file_and_library_reads_ours(tmp_path):
    tensors = moe_tensors()
    safetensors.numpy.save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"k": "v"})
    header = read_safetensors_header(str(tmp_path / "lib.safetensors"))
    assert header.metadata == {"k": "v"}
    assert {record.name for record in header.tensors} == set(tensors)
    specs = [TensorSpec(name, F32, array.shape) for name, array in tensors.items()]
    ours = str(tmp_path / "ours.safetensors")
    with SafetensorsWriter(ours, specs, {"k": "v"}, align=4096) as writer:
        for name, array in tensors.items():
            writer.write_tensor(name, [array[:1], array[1:]])
    loaded = safetensors.numpy.load_file(ours)
    for name, array in tensors.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert writer.offsets[name] % 4096 == 0
    with open_store(ours) as store:
        np.testing.assert_array_equal(store.layers[0].down.expert(1), tensors["blk.0.ffn_down_exps.weight"][1])


def test_writer_golden_bytes(tmp_path):
    path = str(tmp_path / "g.safetensors")
    with SafetensorsWriter(path, [TensorSpec("w", F32, (2,))], {"a": "b"}) as writer:
        writer.append(np.array([1.0, -2.0], dtype=np.float32))
    body = b'{"__metadata__":{"a":"b"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    body += b" " * (-(8 + len(body)) % 8)
    golden = struct.pack("<Q", len(body)) + body + struct.pack("<2f", 1.0, -2.0)
    with open(path, "rb") as handle:
        assert handle.read() == golden


def test_writer_is_deterministic_and_refuses_short_or_long_tensors(tmp_path):
    specs = [TensorSpec("a", F32, (3,)), TensorSpec("b", F32, (1,))]
    outputs = []
    for index in range(2):
        path = str(tmp_path / f"{index}.safetensors")
        with SafetensorsWriter(path, specs, align=64) as writer:
            writer.append(np.ones(3, np.float32))
            writer.append(np.zeros(1, np.float32))
        outputs.append(Path(path).read_bytes())
    assert outputs[0] == outputs[1]
    writer = SafetensorsWriter(str(tmp_path / "short.safetensors"), specs)
    writer.append(np.ones(2, np.float32))
    with pytest.raises(ValueError, match="closed before tensor 'a'"):
        writer.close()
    writer = SafetensorsWriter(str(tmp_path / "long.safetensors"), specs)
    with pytest.raises(ValueError, match="holds 12"):
        writer.append(np.ones(4, np.float32))
    writer.abort()


def test_every_dtype_code_round_trips(tmp_path):
    tensors = {code.lower(): np.zeros((2, 3), dtype=entry.numpy) for code, entry in DTYPE_CODES.items()}
    path = write_bytes(tmp_path / "d.safetensors", pack_safetensors(tensors))
    header = read_safetensors_header(path)
    assert {record.name: record.dtype.code for record in header.tensors} == {k.lower(): k for k in DTYPE_CODES}


# -- the hostile catalogue: every entry raises FormatError naming the file ----------------


def _mutate(**changes):
    header = good_header()
    for key, value in changes.items():
        name, field = key.split("__")
        header[name][field] = value
    return header


HOSTILE_HEADERS = {
    "overlap": _mutate(b__data_offsets=[12, 16]) | {"a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}},
    "hole": {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]},
    },
    "out_of_bounds": _mutate(b__data_offsets=[16, 24], b__shape=[8]),
    "size_mismatch": _mutate(a__shape=[2, 3]),
    "malformed_dtype": _mutate(a__dtype="f128; x"),
    "dtype_not_string": _mutate(a__dtype=4),
    "negative_shape": _mutate(a__shape=[-2, -2]),
    "shape_bool": _mutate(b__shape=[True, 4]),
    "shape_float": _mutate(a__shape=[2.0, 2]),
    "offsets_reversed": _mutate(a__data_offsets=[16, 0]),
    "offsets_three": _mutate(a__data_offsets=[0, 8, 16]),
    "offsets_string": _mutate(a__data_offsets="0-16"),
    "missing_offsets": {"a": {"dtype": "F32", "shape": [2, 2]}},
    "entry_not_object": {"a": [1, 2, 3]},
    "metadata_not_strings": good_header() | {"__metadata__": {"k": 1}},
    "metadata_not_object": good_header() | {"__metadata__": "x"},
    "huge_shape": _mutate(a__shape=[2**40, 2**40]),
    "too_many_dims": _mutate(a__shape=[1] * 64, a__dtype="U8", a__data_offsets=[0, 1]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_headers(tmp_path, case):
    path = file_with(tmp_path, HOSTILE_HEADERS[case])
    with pytest.raises(FormatError) as info:
        read_safetensors_header(path)
    assert path in str(info.value)


def _framed(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def raw_cases(tmp_path) -> dict[str, bytes]:
    good = pack_safetensors(moe_tensors())
    length = struct.unpack("<Q", good[:8])[0]
    return {
        "empty": b"",
        "short_length": b"\x01\x02\x03",
        "truncated_header": good[: 8 + length // 2],
        "truncated_data": good[:-5],
        "trailing_bytes": good + b"\x00" * 3,
        "length_past_end": struct.pack("<Q", 10_000) + good[8:],
        "length_enormous": struct.pack("<Q", 2**63) + good[8:],
        "not_json": struct.pack("<Q", 9) + b"not json!",
        "json_array": struct.pack("<Q", 2) + b"[]",
        "json_string": struct.pack("<Q", 4) + b'"ab"',
        "not_utf8": struct.pack("<Q", 4) + b"\xff\xfe{}",
        "duplicate_key": _framed(
            b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
        ),
        "deep_nesting": struct.pack("<Q", 200_002) + b"[" * 100_001 + b"]" * 100_001,
        "huge_int": _framed(('{"a":{"dtype":"U8","shape":[' + "9" * 5000 + '],"data_offsets":[0,1]}}').encode()),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "short_length",
        "truncated_header",
        "truncated_data",
        "trailing_bytes",
        "length_past_end",
        "length_enormous",
        "not_json",
        "json_array",
        "json_string",
        "not_utf8",
        "duplicate_key",
        "deep_nesting",
        "huge_int",
    ],
)
def test_hostile_files(tmp_path, case):
    path = write_bytes(tmp_path / f"{case}.safetensors", raw_cases(tmp_path)[case])
    with pytest.raises(FormatError) as info:
        open_store(path)
    assert path in str(info.value)


def test_duplicate_keys_are_named(tmp_path):
    path = write_bytes(tmp_path / "d.safetensors", raw_cases(tmp_path)["duplicate_key"])
    with pytest.raises(FormatError, match="duplicate key 'a'"):
        read_safetensors_header(path)


def test_error_names_the_tensor(tmp_path):
    path = file_with(tmp_path, _mutate(b__shape=[5]))
    with pytest.raises(FormatError, match=r"tensor 'b'.*needs 5 bytes.*hold 4"):
        read_safetensors_header(path)


def test_missing_path_and_non_checkpoint(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        open_store(tmp_path / "absent")
    with pytest.raises(FormatError, match="no mmapstore.json"):
        open_store(tmp_path)
    write_bytes(tmp_path / "dense.safetensors", pack_safetensors({"w": np.zeros(2, np.float32)}))
    with pytest.raises(FormatError, match="no MoE expert tensors"):
        open_store(tmp_path)


# -- sharded index ---------------------------------------------------------------------


def write_index(tmp_path, weight_map) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_index_naming_a_missing_file(tmp_path):
    write_index(tmp_path, {"blk.0.ffn_gate_exps.weight": "nope.safetensors"})
    with pytest.raises(FormatError, match="does not exist"):
        open_store(tmp_path)


def test_index_naming_a_file_without_the_tensor(tmp_path):
    write_bytes(tmp_path / "a.safetensors", pack_safetensors(moe_tensors()))
    write_index(tmp_path, {"blk.0.ffn_gate_exps.weight": "a.safetensors", "missing": "a.safetensors"})
    with pytest.raises(FormatError, match="'missing' is mapped to 'a.safetensors'"):
        open_store(tmp_path)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_paths_escaping_the_directory(tmp_path, target):
    store = tmp_path / "store"
    store.mkdir()
    write_bytes(tmp_path / "outside.safetensors", pack_safetensors(moe_tensors()))
    write_index(store, {"blk.0.ffn_gate_exps.weight": target})
    with pytest.raises(FormatError, match="absolute|escapes|outside"):
        open_store(store)


def test_index_symlink_leading_outside(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    write_bytes(tmp_path / "outside.safetensors", pack_safetensors(moe_tensors()))
    os.symlink(tmp_path / "outside.safetensors", store / "link.safetensors")
    write_index(store, {name: "link.safetensors" for name in moe_tensors()})
    with pytest.raises(FormatError, match="outside"):
        open_store(store)


def test_index_weight_map_not_an_object(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    with pytest.raises(FormatError, match="weight_map"):
        open_store(tmp_path)


# -- raw slab stores ---------------------------------------------------------------------


def write_raw(tmp_path, tensors=None, **overrides) -> str:
    tensors = tensors or moe_tensors()
    blob = b""
    entries = {}
    for name, array in tensors.items():
        entries[name] = {"file": "slabs.bin", "dtype": "F32", "shape": list(array.shape), "offset": len(blob)}
        blob += array.tobytes()
    write_bytes(tmp_path / "slabs.bin", blob)
    manifest = {"format": "mmapstore.slab_store", "format_version": 1, "storage": "raw", "tensors": entries}
    for name, change in overrides.items():
        manifest["tensors"][name].update(change)
    (tmp_path / "mmapstore.json").write_text(json.dumps(manifest))
    return str(tmp_path)


def test_raw_store_reads_values(tmp_path):
    tensors = moe_tensors()
    with open_store(write_raw(tmp_path)) as store:
        assert store.kind == "slab_store"
        np.testing.assert_array_equal(store.layers[0].up.expert(1), tensors["blk.0.ffn_up_exps.weight"][1])


@pytest.mark.parametrize(
    "change, match",
    [
        ({"file": "../slabs.bin"}, "escapes"),
        ({"file": "/etc/hostname"}, "absolute"),
        ({"file": "absent.bin"}, "does not exist"),
        ({"offset": 10_000}, "past the end"),
        ({"offset": -1}, "non-negative"),
        ({"dtype": "X9"}, "unknown dtype"),
        ({"shape": [2, -3, 4]}, "non-negative"),
        ({"offset": 8}, "overlap"),
        ({"file": 7}, "non-empty string"),
    ],
)
def test_hostile_raw_manifests(tmp_path, change, match):
    path = write_raw(tmp_path, None, **{"blk.0.ffn_up_exps.weight": change})
    with pytest.raises(FormatError, match=match) as info:
        open_store(path)
    assert "mmapstore.json" in str(info.value)


def test_raw_symlink_escaping_is_refused(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\x00" * 4096)
    store = tmp_path / "store"
    store.mkdir()
    write_raw(store)
    os.symlink(outside, store / "link.bin")
    manifest = json.loads((store / "mmapstore.json").read_text())
    manifest["tensors"]["blk.0.ffn_gate_exps.weight"]["file"] = "link.bin"
    (store / "mmapstore.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="outside"):
        open_store(store)


@pytest.mark.parametrize(
    "manifest, match",
    [
        ({"format": "other"}, "'format'"),
        ({"format": "mmapstore.slab_store", "format_version": 99, "storage": "raw", "tensors": {}}, "format_version"),
        ({"format": "mmapstore.slab_store", "format_version": 1, "storage": "tape", "tensors": {}}, "storage"),
        ({"format": "mmapstore.slab_store", "format_version": 1, "storage": "raw", "tensors": []}, "tensors"),
    ],
)
def test_bad_manifest_top_level(tmp_path, manifest, match):
    (tmp_path / "mmapstore.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=match):
        read_checkpoint(tmp_path)


def test_mixed_layouts_are_refused(tmp_path):
    tensors = moe_tensors()
    tensors["model.layers.0.mlp.experts.0.gate_proj.weight"] = np.zeros((4, 3), np.float32)
    write_bytes(tmp_path / "m.safetensors", pack_safetensors(tensors))
    with pytest.raises(FormatError, match="mixed expert layouts"):
        open_store(tmp_path / "m.safetensors")


def test_missing_expert_and_mismatched_shapes(tmp_path):
    tensors = {}
    for expert in (0, 2):
        for proj, shape in (("gate_proj", (4, 3)), ("up_proj", (4, 3)), ("down_proj", (3, 4))):
            tensors[f"model.layers.0.mlp.experts.{expert}.{proj}.weight"] = np.zeros(shape, np.float32)
    write_bytes(tmp_path / "a.safetensors", pack_safetensors(tensors))
    with pytest.raises(FormatError, match=r"experts \[1\] missing"):
        open_store(tmp_path / "a.safetensors")
    bad = moe_tensors()
    bad["blk.0.ffn_down_exps.weight"] = np.zeros((2, 5, 3), np.float32)
    write_bytes(tmp_path / "b.safetensors", pack_safetensors(bad))
    with pytest.raises(FormatError, match="down"):
        open_store(tmp_path / "b.safetensors")

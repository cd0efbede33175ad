"""convert --layout expert-major: one contiguous record per expert, values as
the stacked layout, zero-copy strided views, refreshes that read each
expert once, verify and hostile manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from builders import SMALL_FAMILIES
from test_convert_pipeline import _parts
from test_quantized import FP8_CONFIG, fp8_checkpoint, save

from mmapstore import (
    ArraySink,
    ConvertError,
    DictSink,
    ExpertPool,
    FormatError,
    apply,
    convert,
    geometries_of,
    open_store,
    plan_full_push,
    plan_refresh,
    verify,
)
from mmapstore._mapping import PAGE_NBYTES
from mmapstore.cli import main
from mmapstore.io import ColdReader, ReaderConfig, ScatterRequest, aligned_empty
from mmapstore.testing import synth_checkpoint

FAMILIES = SMALL_FAMILIES


def _records(path: str) -> dict[str, dict[str, object]]:
    manifest = json.loads(Path(path, "mmapstore.json").read_text())
    assert manifest["layout"] == "expert-major" and manifest["format_version"] == 2
    records: dict[str, dict[str, object]] = manifest["records"]
    return records


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["keep", "f32"])
@pytest.mark.parametrize("storage", ["safetensors", "raw"])
def test_values_are_those_of_the_stacked_layout(small_sources, tmp_path, family, dtype, storage):
    stacked = convert(small_sources[family], tmp_path / "slab", dtype=dtype, storage=storage, shard_nbytes=20_000)
    major = convert(
        small_sources[family],
        tmp_path / "major",
        dtype=dtype,
        storage=storage,
        layout="expert-major",
        shard_nbytes=20_000,
    )
    with open_store(stacked.path) as a, open_store(major.path) as b:
        want, got = _parts(a), _parts(b)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key].dtype == value.dtype
            np.testing.assert_array_equal(got[key], value, err_msg=str(key))
        for layer in b.layers:
            stacks = [stack for _, stack in layer.stacks]
            record_nbytes = {geometry.stride for stack in stacks for geometry in stack.parts.values()}
            assert len(record_nbytes) == 1 and record_nbytes.pop() % PAGE_NBYTES == 0
            assert min(int(g.offsets[0]) for stack in stacks for g in stack.parts.values()) % PAGE_NBYTES == 0
            for stack in stacks:
                for geometry in stack.parts.values():
                    assert geometry.extent == geometry.slab_nbytes  # a part's bytes, not the record's
                    assert geometry.offsets[0] % 64 == 0
                view = stack.expert(1)
                assert not view.flags.writeable and not view.flags.owndata  # zero-copy
        assert len(_records(major.path)) == len(b.layers)
    assert verify(major.path).ok


def test_one_expert_is_one_contiguous_record(small_sources, tmp_path):
    result = convert(small_sources["mixtral"], tmp_path / "major", layout="expert-major")
    with open_store(result.path) as store:
        for layer in store.layers:
            spans = sorted(
                (span.offset, span.nbytes)
                for _, stack in layer.stacks
                for span in (stack.part_span(part, 2) for part in stack.parts)
            )
            first, last = spans[0][0], spans[-1][0] + spans[-1][1]
            record = store.view(f"blk.{layer.layer_index}.ffn_exps.records")
            assert record.shape[0] == 4 and last - first <= record.shape[1]
            # every part of expert 2 lies in row 2 of the record tensor
            assert store.mapped_files()[0].offset_of(record[2]) == first


def test_fp8_source_keeps_codes_and_scales_in_the_record(tmp_path):
    src = save(tmp_path / "src", fp8_checkpoint(), FP8_CONFIG)
    stacked = convert(src, tmp_path / "slab")
    major = convert(src, tmp_path / "major", layout="expert-major")
    with open_store(stacked.path) as a, open_store(major.path) as b:
        for proj, stack in b.layer(0).stacks:
            other = getattr(a.layer(0), proj)
            assert stack.encoding == other.encoding and stack.encoding.kind == "fp8_block"
            assert set(stack.parts) == set(other.parts) == {"weight", "scale"}
            for expert in range(stack.num_experts):
                np.testing.assert_array_equal(stack.expert(expert), other.expert(expert))
                np.testing.assert_array_equal(stack.part("scale", expert), other.part("scale", expert))
                np.testing.assert_array_equal(stack.dequantize(expert), other.dequantize(expert))
    parts = _records(major.path)["blk.0.ffn_exps.records"]["parts"]
    assert isinstance(parts, dict) and "blk.0.ffn_gate_exps.scale" in parts
    assert verify(major.path).ok


def test_verify_catches_a_flipped_byte_in_a_record(small_sources, tmp_path):
    result = convert(small_sources["deepseek_v3"], tmp_path / "major", layout="expert-major")
    assert verify(result.path).ok
    with open_store(result.path) as store:
        layer = store.layers[-1]
        span = layer.up.part_span("weight", 2)
        target, offset = span.mapped.path, span.offset + 5
    with open(target, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))
    report = verify(result.path)
    assert [problem.tensor for problem in report.problems] == [f"blk.{layer.layer_index}.ffn_exps.records"]


class _CountingReader(ColdReader):
    """A reader that counts the requests submitted to it."""

    def __init__(self) -> None:
        super().__init__(ReaderConfig(queue_depth=2))
        self.requests = 0

    def submit(self, requests, *, residency=True):  # type: ignore[no-untyped-def]
        requests = list(requests)
        self.requests += len(requests)
        return super().submit(requests, residency=residency)

    def submit_scatter(self, requests):  # type: ignore[no-untyped-def]
        self.requests += len(requests)
        return super().submit_scatter(requests)


@pytest.mark.parametrize("read", ["auto", "map", "reader"])
def test_refreshes_read_each_expert_once_and_deliver_the_stacked_values(small_sources, tmp_path, read):
    stacked = convert(small_sources["gpt_oss"], tmp_path / "slab", dtype="f32")
    major = convert(small_sources["gpt_oss"], tmp_path / "major", dtype="f32", layout="expert-major")
    captured = [np.array([3, 2, 3, 2]), np.array([0, 1, 3, 3, 3])]
    delivered = []
    for path in (stacked.path, major.path):
        with open_store(path) as store, _CountingReader() as reader:
            geometry = geometries_of(store)
            pools = [ExpertPool(4, 2), ExpertPool(4, 2)]
            plan = plan_refresh(geometry, pools, captured, 0)
            assert plan is not None
            arrays = {
                name: np.full((2, *geometry_.slab_shape), np.nan, dtype=geometry_.dtype.numpy)
                for name, geometry_ in zip(plan.table.params, plan.table.geometries, strict=True)
            }
            apply(plan, DictSink(arrays, read=read, reader=reader), store.byte_source(), pools=pools)
            delivered.append(arrays)
            promoted = len(plan.update_new)
            assert promoted == 3
            if read == "reader" and path == major.path:
                # every part of a promoted expert in one request (adjacent experts share one)
                runs = plan.table.rows * len(geometry.layers) // len(geometry.parts)  # a row per part per run
                assert reader.requests == runs <= promoted
            elif read == "reader":
                assert reader.requests == plan.table.rows
    for name, values in delivered[0].items():
        np.testing.assert_array_equal(delivered[1][name], values, err_msg=name)


def test_a_full_push_of_an_expert_major_store_is_exact(small_sources, tmp_path):
    major = convert(small_sources["llama4"], tmp_path / "major", layout="expert-major")
    with open_store(major.path) as store, ColdReader() as reader:
        plan = plan_full_push(geometries_of(store))
        arrays = {
            name: np.zeros((geometry.num_experts, *geometry.slab_shape), dtype=geometry.dtype.numpy)
            for name, geometry in zip(plan.table.params, plan.table.geometries, strict=True)
        }
        apply(plan, DictSink(arrays, read="reader", reader=reader), store.byte_source())
        assert len(plan.table.reads) == len(store.layers)  # each layer is one range
        for layer in store.layers:
            for proj, stack in layer.stacks:
                pushed = arrays[f"blk.{layer.layer_index}.ffn_{proj}_exps.weight"]
                for expert in range(stack.num_experts):
                    np.testing.assert_array_equal(pushed[expert], stack.native(expert))


def test_the_command_line_takes_the_layout(small_sources, tmp_path, capsys):
    dst = tmp_path / "major"
    assert main(["convert", small_sources["mixtral"], str(dst), "--layout", "expert-major", "--quiet"]) == 0
    assert set(_records(str(dst))) == {"blk.0.ffn_exps.records", "blk.1.ffn_exps.records"}
    assert main(["verify", str(dst)]) == 0


def _rewrite(path: str, change) -> None:  # type: ignore[no-untyped-def]
    manifest_path = os.path.join(path, "mmapstore.json")
    manifest = json.loads(Path(manifest_path).read_text())
    change(manifest)
    Path(manifest_path).write_text(json.dumps(manifest))


def _part(manifest):  # type: ignore[no-untyped-def]
    return manifest["records"]["blk.0.ffn_exps.records"]["parts"]["blk.0.ffn_up_exps.weight"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("records"), "non-empty 'records'"),
        (lambda m: m.update(format_version=1), "needs format_version 2"),
        (lambda m: m.update(layout="tiles"), "'layout' must be"),
        (lambda m: _part(m).update(offset=_part(m)["offset"] + 10**9), "does not fit"),
        (lambda m: _part(m).update(offset=0), "overlap"),
        (lambda m: _part(m).update(shape=[5, *_part(m)["shape"][1:]]), "must start with"),
        (lambda m: m["records"].update({"blk.9.ffn_exps.records": {"parts": {}}}), "no such tensor"),
    ],
)
def test_hostile_records_are_refused(small_sources, tmp_path, change, message):
    result = convert(small_sources["mixtral"], tmp_path / "major", layout="expert-major")
    _rewrite(result.path, change)
    with pytest.raises(FormatError, match=message):
        open_store(result.path).close()


def test_a_scatter_read_fills_each_destination_and_refuses_a_short_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, size=5 * PAGE_NBYTES, dtype=np.uint8)
    path = tmp_path / "file.bin"
    path.write_bytes(data.tobytes())
    aligned = [aligned_empty(PAGE_NBYTES), aligned_empty(2 * PAGE_NBYTES)]
    odd = [np.empty(100, dtype=np.uint8), np.empty(5000, dtype=np.uint8)]
    with ColdReader() as reader:
        for destinations, offset in ((aligned, PAGE_NBYTES), (odd, 7)):
            result = reader.submit_scatter([ScatterRequest(str(path), offset, tuple(destinations))]).wait()
            assert result.nbytes == sum(d.nbytes for d in destinations) and result.requests == 1
            np.testing.assert_array_equal(np.concatenate(destinations), data[offset : offset + result.nbytes])
        with pytest.raises(FormatError, match="shrank"):
            reader.submit_scatter([ScatterRequest(str(path), 3 * PAGE_NBYTES, tuple(aligned))]).wait()


def test_aligned_records_land_in_their_slots_with_one_direct_read_each(tmp_path):
    src = synth_checkpoint(tmp_path / "src", "mixtral", layers=1, experts=8, hidden=64, ffn=32, dtype="bf16").path
    major = convert(src, tmp_path / "major", layout="expert-major")
    with open_store(major.path) as store, _CountingReader() as reader:
        geometry = geometries_of(store)
        assert {part.stride for part in geometry.parts} == {3 * PAGE_NBYTES}  # three 4 KiB slabs, no padding
        pools = [ExpertPool(8, 4)]
        plan = plan_refresh(geometry, pools, [np.array([7, 5, 7, 5, 1])], 0)
        assert plan is not None
        sink = ArraySink.for_geometries(geometry, 4, read="reader", reader=reader)
        result = apply(plan, sink, store.byte_source(), pools=pools)
        assert reader.requests == plan.table.rows // 3 <= 3  # a request per run of promoted experts
        assert result.nbytes_from("direct") + result.nbytes_from("buffered") == plan.nbytes
        for proj, stack in store.layer(0).stacks:
            for slot, expert in zip(plan.update_slot.tolist(), plan.update_new.tolist(), strict=True):
                np.testing.assert_array_equal(sink.arrays[f"blk.0.ffn_{proj}_exps.weight"][slot], stack.native(expert))


def test_a_repeated_conversion_is_skipped_and_an_expert_major_store_converts_back(small_sources, tmp_path):
    major = convert(small_sources["gpt_oss"], tmp_path / "major", layout="expert-major")
    assert convert(small_sources["gpt_oss"], tmp_path / "major", layout="expert-major").skipped
    with pytest.raises(ConvertError, match="exists"):
        convert(small_sources["gpt_oss"], tmp_path / "major")  # another layout is another conversion
    back = convert(major.path, tmp_path / "back")
    with open_store(small_sources["gpt_oss"]) as source, open_store(back.path) as store:
        want, got = _parts(source), _parts(store)
        assert got.keys() == want.keys()
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=str(key))

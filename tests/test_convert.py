"""convert: round trips, atomic publish, locking, crash safety, bounded memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from mmapstore import ConvertError, convert, open_store, verify
from mmapstore.testing import synth_checkpoint

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss", "llama4"]
DTYPES = {"keep": None, "f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {
        family: synth_checkpoint(
            root / family,
            family,
            layers=2,
            experts=4,
            hidden=24,
            ffn=16,
            dtype="f32" if family == "olmoe" else "bf16",
            shard_nbytes=40_000,
        ).path
        for family in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("storage", ["safetensors", "raw"])
@pytest.mark.parametrize("orientation", ["native", "kn"])
def test_round_trip(sources, tmp_path, family, dtype, storage, orientation):
    result = convert(
        sources[family], tmp_path / "out", storage=storage, dtype=dtype, orientation=orientation, shard_nbytes=8_000
    )
    assert not result.skipped and len(result.files) > 1
    with open_store(sources[family]) as src, open_store(result.path) as dst:
        assert dst.layout == "slab" and dst.layer_indices == src.layer_indices
        for a, b in zip(src.layers, dst.layers, strict=True):
            for (_, source), (_, converted) in zip(a.stacks, b.stacks, strict=True):
                want = DTYPES[dtype] or source.dtype
                assert converted.dtype == np.dtype(want)
                wanted = source.native_orientation if orientation == "native" else "kn"
                assert converted.is_stacked and converted.native_orientation == wanted
                assert (
                    converted.part_span("weight", 0).mapped.offset_of(converted.native(0)) % 4096 == 0
                )  # page-aligned
                for expert in range(source.num_experts):
                    np.testing.assert_array_equal(converted.expert(expert), source.expert(expert).astype(want))
    if storage == "safetensors":
        for file in result.files:
            loaded = safetensors.numpy.load_file(file)
            for name, array in loaded.items():
                if not name.startswith("__pad__"):
                    with open_store(result.path) as dst:
                        np.testing.assert_array_equal(array, dst.view(name))
    assert verify(result.path).ok
    manifest = json.loads(Path(result.path, "mmapstore.json").read_text())
    assert (
        manifest["source"]["config"]["model_type"]
        == json.loads(Path(sources[family], "config.json").read_text())["model_type"]
    )
    assert manifest["checksum"] == "xxh3_128"
    assert all(len(entry["xxh3_128"]) == 32 for entry in manifest["tensors"].values())


def test_existing_destination_needs_force_unless_it_is_this_conversion(sources, tmp_path):
    dst = tmp_path / "out"
    convert(sources["mixtral"], dst)
    assert convert(sources["mixtral"], dst).skipped
    with pytest.raises(ConvertError, match="already exists"):
        convert(sources["mixtral"], dst, dtype="f32")
    assert not convert(sources["mixtral"], dst, dtype="f32", force=True).skipped
    with open_store(dst) as store:
        assert store.layers[0].gate.dtype == np.float32
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]  # no temporary files survive


def test_layer_range(sources, tmp_path):
    result = convert(sources["mixtral"], tmp_path / "one", layers="1-1")
    with open_store(result.path) as store:
        assert store.layer_indices == [1]
    with pytest.raises(ConvertError, match="no MoE layer"):
        convert(sources["mixtral"], tmp_path / "none", layers="5-9")


def test_verify_catches_a_flipped_byte_and_a_truncated_file(sources, tmp_path):
    result = convert(sources["mixtral"], tmp_path / "out", shard_nbytes=8_000)
    with open_store(result.path) as store:
        stack = store.layers[1].up
        span = stack.part_span("weight", 2)
        target, offset = span.mapped.path, span.offset + 5
    with open(target, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    report = verify(result.path)
    assert not report.ok
    assert [(p.file, p.tensor) for p in report.problems] == [(target, "blk.1.ffn_up_exps.weight")]
    victim = result.files[0]
    with open(victim, "r+b") as handle:
        handle.truncate(os.path.getsize(victim) - 100)
    report = verify(result.path)
    damaged = {(p.file, p.tensor) for p in report.problems}
    assert (target, "blk.1.ffn_up_exps.weight") in damaged
    assert any(p.file == victim and "truncated" in p.message for p in report.problems)


def _run_convert(src: str, dst: str, *extra: str) -> subprocess.Popen[bytes]:
    code = "import sys; from mmapstore.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, "convert", src, dst, "--quiet", *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_racing_converters_end_with_one_valid_store(sources, tmp_path):
    dst = str(tmp_path / "out")
    procs = [_run_convert(sources["deepseek_v3"], dst) for _ in range(3)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    assert sum(b"already holds" in out for out, _ in outputs) == 2
    assert verify(dst).ok
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]


@pytest.fixture(scope="module")
def medium_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium")
    return synth_checkpoint(root / "m", "mixtral", layers=4, experts=8, hidden=512, ffn=1024).path


# The child parks itself at a chosen point and says so; the test kills it
# there, so the kill never races a convert that already finished.
_PARK = """
import os, sys, time
from mmapstore import _publish
from mmapstore.cli import main
from mmapstore.formats._slabfile import SlabFileWriter

point, ready = sys.argv[1], sys.argv[2]

def park():
    open(ready, "w").close()
    time.sleep(600)

if point == "publish":  # every file written, the staging directory not yet renamed
    _publish.fsync_tree = lambda root: park()
else:  # a few slabs written, the rest not
    calls = [0]
    for name in ("write", "copy"):
        original = getattr(SlabFileWriter, name)
        def wrapped(self, *args, _original=original, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                park()
            return _original(self, *args, **kwargs)
        setattr(SlabFileWriter, name, wrapped)
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("point", ["write", "publish"])
def test_sigkill_mid_convert_leaves_no_destination_and_rerun_succeeds(medium_source, tmp_path, point):
    work = tmp_path / "work"
    work.mkdir()
    dst, ready = work / "out", tmp_path / "ready"
    args = [sys.executable, "-c", _PARK, point, str(ready), "convert", medium_source, str(dst), "--quiet"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not dst.exists()
    assert any(name.startswith(".out.partial-") for name in os.listdir(work))  # it was mid-way
    rerun = _run_convert(medium_source, str(dst))
    rerun.communicate(timeout=120)
    assert rerun.returncode == 0
    assert verify(str(dst)).ok
    assert sorted(os.listdir(work)) == [".out.lock", "out"]  # the leftovers were cleaned up


def test_peak_memory_is_bounded_by_a_few_slabs(medium_source, tmp_path):
    script = f"""
from mmapstore import open_store
from mmapstore import convert
def rss(field="VmRSS"):
    # VmHWM belongs to this process image; ru_maxrss would carry the forking
    # parent's peak across exec.
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
with open_store({medium_source!r}) as store:
    slab = store.layers[0].gate.slab_nbytes
    total = sum(l.gate.nbytes * 3 for l in store.layers)
base = rss()
convert({medium_source!r}, {str(tmp_path / "out")!r}, dtype="f32")
peak = rss("VmHWM")
print(slab, total, base, peak)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, check=True, text=True)
    slab, total, base, peak = map(int, out.stdout.split())
    bound = 8 * slab * 2  # a few slabs (f32 staging is twice the bf16 source)
    assert total > 4 * bound  # the checkpoint is several times the bound
    assert peak - base < bound, (peak - base, bound)


def test_manifest_round_trips_through_its_json(tmp_path):
    from mmapstore.formats import MANIFEST_NAME, Manifest

    src = synth_checkpoint(tmp_path / "src", "qwen3_moe", layers=1, experts=4, hidden=8, ffn=4).path
    dst = convert(src, tmp_path / "store", storage="raw").path
    written = json.loads(Path(dst, MANIFEST_NAME).read_text())
    manifest = Manifest.from_json(written, path=MANIFEST_NAME)
    assert manifest.to_json() == written
    assert manifest.storage == "raw" and manifest.source is not None and manifest.source.path == os.path.abspath(src)
    assert all(entry.checksums and entry.checksums[0][0] == "xxh3_128" for entry in manifest.tensors.values())


@pytest.mark.parametrize(
    "change, match",
    [
        ({"source": ["not", "an", "object"]}, "'source' must be an object"),
        ({"source": {"path": 7, "kind": "sharded", "layout": "stacked", "fingerprint": []}}, "source 'path'"),
        ({"options": "fast"}, "'options' must be an object"),
        ({"files": [1, 2]}, "'files'"),
        ({"encodings": {"blk.0.ffn_up_exps": {"kind": "zip", "dtype": "F8_E4M3"}}}, "kind 'zip'"),
        ({"layout": 3}, "'layout' must be one of"),
        ({"layout": {}}, "'layout' must be one of"),  # unhashable: found by the long directory fuzz
        ({"layout": ["slab"]}, "'layout' must be one of"),
        ({"storage": {}}, "'storage' must be one of"),
        ({"orientation": {}}, "'orientation' must be"),
    ],
)
def test_malformed_manifest_fields_are_format_errors(tmp_path, change, match):
    from mmapstore import FormatError
    from mmapstore.formats import Manifest

    obj = {"format": "mmapstore.slab_store", "format_version": 1, "storage": "raw", "tensors": {}, **change}
    with pytest.raises(FormatError, match=match):
        Manifest.from_json(obj, path="mmapstore.json")

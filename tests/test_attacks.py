"""Each promise of the Guarantees table, attacked the way issue reports broke it.

Races run for a bounded time (a few seconds each); ``--run-slow`` runs them longer.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from builders import header_bytes, pack_safetensors, write_bytes

import mmapstore.formats._safetensors as st_format
from mmapstore import (
    CapturedIdsError,
    ConvertError,
    ExpertIndexError,
    FileChangedError,
    FormatError,
    OptionError,
    convert,
    geometries_of,
    open_store,
    plan_refresh,
    plan_resident,
)
from mmapstore._mapping import MADV_POPULATE_READ, PAGE_NBYTES, MappedFile
from mmapstore._pool import ExpertPool, RefreshPolicy, count_hits
from mmapstore._preadcopy import pread_into
from mmapstore._publish import clean_partials, locked, staged_dir
from mmapstore._report import describe, verify
from mmapstore._store.layouts import MAX_EXPERTS
from mmapstore.cli import main
from mmapstore.formats import read_checkpoint
from mmapstore.formats._records import MAX_MANIFEST_NBYTES
from mmapstore.testing import synth_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = "import sys; from mmapstore.cli import main; sys.exit(main(sys.argv[1:]))"


def per_expert_file(experts: int = 2, offset: float = 0.0) -> bytes:
    tensors = {}
    for expert in range(experts):
        for proj, shape in (("gate_proj", (4, 3)), ("up_proj", (4, 3)), ("down_proj", (3, 4))):
            name = f"model.layers.0.mlp.experts.{expert}.{proj}.weight"
            tensors[name] = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + expert + offset
    return pack_safetensors(tensors, {"format": "pt"})


def slab_file(experts: int, k: int, n: int, dtype: str = "F32") -> bytes:
    """A slab-layout header over zero bytes (any claimed shape, hand-packed)."""
    itemsize = {"F32": 4, "U8": 1}[dtype]
    header, position = {}, 0
    for proj, shape in (("gate", [experts, k, n]), ("up", [experts, k, n]), ("down", [experts, n, k])):
        nbytes = int(np.prod(shape, dtype=object)) * itemsize
        header[f"blk.0.ffn_{proj}_exps.weight"] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [position, position + nbytes],
        }
        position += nbytes
    return header_bytes(header) + b"\x00" * position


def finishes(function, timeout: float = 20.0) -> BaseException | None:
    """Run ``function`` on a daemon thread; fail if it does not return (a hang)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            function()
            outcome.append(None)
        except BaseException as exc:  # the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"{function} did not return within {timeout} s"
    return outcome[0]


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("attack")
    return synth_checkpoint(root / "src", "qwen3_moe", layers=2, experts=4, hidden=32, ffn=16).path


# -- 1. opening a store while convert --force replaces it -------------------------------------


def race_open_against_reconversion(source: str, dst: str, seconds: float) -> tuple[int, int]:
    convert(source, dst)
    with open_store(source) as src:
        expected = {np.dtype(np.float32): src.layers[1].down.expert(3).astype(np.float32)}
        expected[src.layers[1].down.dtype] = src.layers[1].down.expert(3).copy()
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\nfrom mmapstore._convert import convert\n"
                "end = time.monotonic() + float(sys.argv[3]); n = 0\n"
                "while time.monotonic() < end:\n"
                "    convert(sys.argv[1], sys.argv[2], force=True, dtype=('f32', 'keep')[n % 2]); n += 1\n"
                "print(n)\n"
            ),
            source,
            dst,
            str(seconds),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    opens = 0
    try:
        while writer.poll() is None:
            with open_store(dst) as store:
                stack = store.layers[1].down
                np.testing.assert_array_equal(stack.expert(3), expected[stack.dtype])
            opens += 1
    finally:
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    return opens, int(out)


def test_open_while_convert_force_replaces_the_store(small_source, tmp_path):
    opens, conversions = race_open_against_reconversion(small_source, str(tmp_path / "store"), 3.0)
    assert opens > 0 and conversions > 1


@pytest.mark.slow
def test_open_while_convert_force_replaces_the_store_long(small_source, tmp_path):
    opens, conversions = race_open_against_reconversion(small_source, str(tmp_path / "store"), 60.0)
    assert opens > 1000 and conversions > 100


# -- 2. a shard replaced by write-then-rename after open_store --------------------------------


def test_a_replaced_shard_is_never_read_in_place_of_the_validated_one(tmp_path):
    path = write_bytes(tmp_path / "model.safetensors", per_expert_file())
    with open_store(tmp_path) as store:
        before = [store.layers[0].gate.expert(e).copy() for e in range(2)]
        # a re-download: a new file with other values, renamed over the old name
        replacement = write_bytes(tmp_path / "new.tmp", per_expert_file(offset=100.0))
        os.rename(replacement, path)
        for expert in range(2):
            np.testing.assert_array_equal(store.layers[0].gate.expert(expert), before[expert])
    with open_store(tmp_path) as fresh:  # a new open sees the new file
        np.testing.assert_array_equal(fresh.layers[0].gate.expert(0), before[0] + 100.0)


def test_mapping_checks_the_identity_that_was_validated(tmp_path):
    path = write_bytes(tmp_path / "model.safetensors", per_expert_file())
    checkpoint = read_checkpoint(path)
    identity = checkpoint.identities[path]
    os.rename(write_bytes(tmp_path / "x.tmp", per_expert_file(offset=1.0)), path)
    with pytest.raises(FileChangedError, match="replaced"):
        MappedFile(path, 0, identity)


# -- 3. convert onto its own source ------------------------------------------------------------


def test_convert_refuses_its_source_or_an_ancestor_of_it(small_source, tmp_path):
    copy = shutil.copytree(small_source, tmp_path / "ckpt")
    before = sorted(os.listdir(copy))
    for dst in (copy, tmp_path, os.path.join(copy, ".")):
        with pytest.raises(ConvertError, match="source"):
            convert(copy, dst, force=True)
    single = os.path.join(copy, "model-00001-of-00001.safetensors")
    with pytest.raises(ConvertError, match="source"):
        convert(single, single, force=True)
    os.symlink(copy, tmp_path / "alias")
    with pytest.raises(ConvertError, match="source"):
        convert(copy, tmp_path / "alias", force=True)
    assert sorted(os.listdir(copy)) == before and verify(str(copy)).ok
    code = main(["convert", str(copy), str(copy), "--force", "--quiet"])
    assert code == 1 and sorted(os.listdir(copy)) == before


# -- 5. a pool sized for another model -------------------------------------------------------


def test_pool_sized_for_another_layer_is_refused_before_planning(tmp_path):
    write_bytes(tmp_path / "m.safetensors", per_expert_file(experts=4))
    with open_store(tmp_path) as store:
        pools = [ExpertPool(8, 2, RefreshPolicy.every_forward())]
        with pytest.raises(CapturedIdsError, match="has 4 experts, its pool was made for 8"):
            plan_refresh(geometries_of(store), pools, [np.array([[6, 7]])], step=0)
        with pytest.raises(CapturedIdsError, match="made for 8"):
            plan_resident(geometries_of(store), pools)
        assert pools[0].resident_experts().tolist() == [0, 1]  # nothing committed


# -- 6. a rotted destination is not "already converted" ---------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "header", "manifest"])
def test_rotted_destination_is_not_skipped(small_source, tmp_path, damage):
    dst = convert(small_source, tmp_path / "store").path
    shard = os.path.join(dst, "experts-00001-of-00001.safetensors")
    if damage == "truncate":
        os.truncate(shard, os.path.getsize(shard) - 1)
    elif damage == "header":
        with open(shard, "r+b") as handle:
            handle.seek(12)
            handle.write(b"\xff")
    else:
        manifest_path = os.path.join(dst, "mmapstore.json")
        manifest = json.loads(Path(manifest_path).read_text())
        manifest["source"] = ["not", "an", "object"]
        manifest["tensors"] = 7
        Path(manifest_path).write_text(json.dumps(manifest))
    with pytest.raises(ConvertError, match="already exists"):
        convert(small_source, dst)
    assert not convert(small_source, dst, force=True).skipped
    assert verify(dst).ok and convert(small_source, dst).skipped


# -- 7. verify validates exactly as open_store, and builds no view outside its mapping -----------


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"offset": -64}, "offset"),
        ({"offset": "0"}, "offset"),
        ({"offset": 0, "nbytes": 96.0}, "nbytes"),
        ({"offset": 2**62}, "past the end"),
        ({"shape": [2, 3, -4]}, "shape"),
    ],
)
def test_verify_refuses_hostile_raw_manifests_like_open_store(tmp_path, entry, message):
    (tmp_path / "slabs.bin").write_bytes(b"\x00" * 4096)
    tensor = {"file": "slabs.bin", "dtype": "F32", "shape": [2, 3, 4], "offset": 0, **entry}
    manifest = {
        "format": "mmapstore.slab_store",
        "format_version": 1,
        "storage": "raw",
        "tensors": {"blk.0.ffn_gate_exps.weight": tensor},
    }
    (tmp_path / "mmapstore.json").write_text(json.dumps(manifest))
    # in a child process: a segfault must show as a signal, not kill the test run
    result = subprocess.run(
        [sys.executable, "-c", CLI, "verify", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert message in result.stdout and "Traceback" not in result.stderr
    with pytest.raises(FormatError, match=message):
        open_store(tmp_path)


def test_no_view_outside_the_mapping(tmp_path):
    path = write_bytes(tmp_path / "d.bin", bytes(range(256)) * 16)
    with MappedFile(path) as mapped:
        for offset, shape, strides in ((-8, (2,), None), (4090, (8,), None), (0, (2, 2), (4096, 1)), (8, (3,), (-16,))):
            with pytest.raises(FormatError, match="outside"):
                mapped.view(offset, np.dtype(np.uint8), shape, strides)
        assert mapped.view(4096, np.dtype(np.uint8), (0,)).size == 0


# -- 8. FIFOs and other non-regular files --------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["mmapstore.json", "model.safetensors.index.json", "config.json", "model-00001-of-00001.safetensors"]
)
def test_fifo_named_like_a_store_file_is_refused_without_hanging(small_source, tmp_path, name):
    victim = shutil.copytree(small_source, tmp_path / "ckpt")
    if name == "mmapstore.json":
        victim = convert(small_source, tmp_path / "store").path
    target = os.path.join(victim, name)
    if os.path.exists(target):
        os.unlink(target)
    os.mkfifo(target)
    for entry in (
        lambda: open_store(victim),
        lambda: describe(victim),
        lambda: read_checkpoint(victim),
        lambda: convert(victim, tmp_path / "out", force=True),
    ):
        error = finishes(entry)
        assert isinstance(error, FormatError) and "FIFO" in str(error), error
    report = None

    def run_verify() -> None:
        nonlocal report
        report = verify(victim)

    assert finishes(run_verify) is None
    assert report is not None and not report.ok and "FIFO" in report.problems[0].message


def test_fifo_as_destination_manifest_does_not_hang_convert(small_source, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    os.mkfifo(dst / "mmapstore.json")
    error = finishes(lambda: convert(small_source, dst))
    assert isinstance(error, ConvertError) and "already exists" in str(error)
    assert finishes(lambda: convert(small_source, dst, force=True)) is None
    assert verify(str(dst)).ok


def test_a_fifo_given_as_the_checkpoint_path_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe.safetensors")
    error = finishes(lambda: open_store(tmp_path / "pipe.safetensors"))
    assert isinstance(error, FormatError)


# -- 9. claims refused by arithmetic before anything is allocated --------------------------------


def test_header_of_too_many_tensors_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(st_format, "MAX_TENSORS", 3)

    def must_not_decode(*args, **kwargs):
        raise AssertionError("the header was decoded")

    monkeypatch.setattr(st_format, "parse_json_object", must_not_decode)
    tensors = {f"t{i}": np.zeros(1, np.uint8) for i in range(4)}
    with pytest.raises(FormatError, match="describes 4 tensors, over the 3 limit"):
        open_store(write_bytes(tmp_path / "many.safetensors", pack_safetensors(tensors)))


def test_oversized_manifest_is_refused_without_reading_it(tmp_path):
    with open(tmp_path / "mmapstore.json", "wb") as handle:
        handle.truncate(MAX_MANIFEST_NBYTES + 1)  # sparse: no disk, and never read
    with pytest.raises(FormatError, match="over the .* byte limit"):
        open_store(tmp_path)


# -- 10. zero and huge dimensions ------------------------------------------------------------


@pytest.mark.parametrize(
    "experts, k, n, message",
    [
        (0, 4, 3, "0 experts|no expert data"),
        (2, 0, 3, "empty slabs|no expert data"),
        (2, 4, 0, "empty slabs|no expert data"),
        (10**12, 0, 5, "experts|no expert data"),
        (MAX_EXPERTS + 1, 1, 1, f"{MAX_EXPERTS + 1} experts"),
    ],
)
def test_empty_or_absurd_stacks_are_refused_at_open(tmp_path, experts, k, n, message):
    path = write_bytes(tmp_path / "s.safetensors", slab_file(experts, k, n, dtype="U8"))
    with pytest.raises(FormatError, match=message):
        open_store(path)


def test_zero_byte_tensor_with_a_huge_dimension_is_refused(tmp_path):
    header = {"blk.0.ffn_gate_exps.weight": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}
    with pytest.raises(FormatError, match="multiplying past"):
        open_store(write_bytes(tmp_path / "z.safetensors", header_bytes(header)))


# -- 11. files that shrink under a running convert, verify or refresh -----------------------------


def test_pread_into_fills_exactly_or_names_the_file(tmp_path):
    path = write_bytes(tmp_path / "d.bin", bytes(range(200)))
    destination = np.zeros(50, np.uint8)
    with MappedFile(path) as mapped:
        pread_into(mapped, 100, destination)
        assert destination.tolist() == list(range(100, 150))
        os.truncate(path, 120)
        with pytest.raises(FormatError, match=r"d\.bin: file ends before byte 150.*shrank"):
            pread_into(mapped, 100, destination)
    fd = os.open(path, os.O_RDONLY)
    try:
        view = memoryview(bytearray(10))
        pread_into(fd, 0, view, path=path)
        assert bytes(view) == bytes(range(10))
        with pytest.raises(ValueError):
            pread_into(fd, 0, np.zeros((4, 4), np.uint8)[:, :2], path=path)
    finally:
        os.close(fd)


def test_populate_read_past_a_shrunk_end_is_a_typed_error(tmp_path):
    path = write_bytes(tmp_path / "d.bin", b"\x01" * (8 * PAGE_NBYTES))
    with MappedFile(path) as mapped:
        try:
            mapped.advise(0, PAGE_NBYTES, MADV_POPULATE_READ)
        except OSError as exc:
            pytest.skip(f"MADV_POPULATE_READ unsupported here ({exc})")
        os.truncate(path, PAGE_NBYTES)
        with pytest.raises(FormatError, match="shrank"):
            mapped.advise(0, 8 * PAGE_NBYTES, MADV_POPULATE_READ)


def truncation_trials(command: list[str], victim: str, trials: int) -> dict[str, int]:
    """Run ``command`` and truncate ``victim`` to a third at moments spread
    evenly over the command's run time (measured first; the file is restored
    between trials).  The command must finish (0) or refuse with one typed
    line (1): never die of SIGBUS, never print a traceback."""
    original = Path(victim).read_bytes()

    def launch() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", CLI, *command], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    start = time.monotonic()
    first = launch()
    first.communicate(timeout=120)
    assert first.returncode == 0
    duration = time.monotonic() - start
    outcomes = {"finished": 0, "refused": 0}
    for trial in range(trials):
        write_bytes(victim, original)
        process = launch()
        time.sleep(duration * (trial + 0.5) / trials)
        os.truncate(victim, len(original) // 3)
        out, err = process.communicate(timeout=120)
        assert process.returncode in (0, 1), (trial, process.returncode, err[-2000:])
        assert "Traceback" not in err, err[-2000:]
        outcomes["finished" if process.returncode == 0 else "refused"] += 1
    write_bytes(victim, original)
    return outcomes


@pytest.fixture(scope="module")
def medium_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("shrink")
    source = synth_checkpoint(root / "src", "mixtral", layers=2, experts=8, hidden=512, ffn=1024).path
    return source, convert(source, root / "store").path


TRUNCATIONS_QUICK, TRUNCATIONS_LONG = 8, 40


def convert_truncated(medium_store, tmp_path, trials: int) -> dict[str, int]:
    source, _ = medium_store
    victim = os.path.join(source, "model-00001-of-00001.safetensors")
    return truncation_trials(["convert", source, str(tmp_path / "out"), "--force", "--quiet"], victim, trials)


def verify_truncated(medium_store, trials: int) -> dict[str, int]:
    _, store = medium_store
    return truncation_trials(["verify", store], os.path.join(store, "experts-00001-of-00001.safetensors"), trials)


SHRINK_AT = """
import hashlib, os, sys
import xxhash
victim, after, keep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
count = [0]
def hooked(real):
    class Hooked:  # the file shrinks right after the after-th chunk is hashed (by any checksum)
        def __init__(self, *args):
            self.inner = real(*args)
        def update(self, data):
            self.inner.update(data)
            count[0] += 1
            if count[0] == after:
                os.truncate(victim, keep)
        def hexdigest(self):
            return self.inner.hexdigest()
    return Hooked
hashlib.sha256 = hooked(hashlib.sha256)
xxhash.xxh3_128 = hooked(xxhash.xxh3_128)
from mmapstore.cli import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.mark.parametrize("after", [1, 5])
@pytest.mark.parametrize("command", ["convert", "verify"])
def test_file_shrinking_at_a_deterministic_point_is_a_typed_error(medium_store, tmp_path, command, after):
    source, store = medium_store
    copy = shutil.copytree(source if command == "convert" else store, tmp_path / "victim")
    name = "model-00001-of-00001.safetensors" if command == "convert" else "experts-00001-of-00001.safetensors"
    victim = os.path.join(copy, name)
    argv = ["convert", str(copy), str(tmp_path / "out"), "--quiet"] if command == "convert" else ["verify", str(copy)]
    result = subprocess.run(
        [sys.executable, "-c", SHRINK_AT, victim, str(after), str(os.path.getsize(victim) // 3), *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert re.search("shrank|truncated", result.stdout + result.stderr)
    assert not os.path.exists(tmp_path / "out")


def test_source_truncated_under_a_running_convert(medium_store, tmp_path):
    assert convert_truncated(medium_store, tmp_path, TRUNCATIONS_QUICK)["refused"] > 0


def test_store_truncated_under_a_running_verify(medium_store):
    assert verify_truncated(medium_store, TRUNCATIONS_QUICK)["refused"] > 0


@pytest.mark.slow
def test_truncations_under_convert_and_verify_long(medium_store, tmp_path):
    convert_truncated(medium_store, tmp_path, TRUNCATIONS_LONG)
    verify_truncated(medium_store, TRUNCATIONS_LONG)


# -- 12. the Hugging Face hub cache layout ---------------------------------------------------


def hub_snapshot(root, source: str, repo: str = "models--org--moe") -> str:
    blobs = root / repo / "blobs"
    snapshot = root / repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in os.listdir(source):
        blob = blobs / f"sha-{len(os.listdir(blobs))}"
        shutil.copy(os.path.join(source, name), blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / name)
    return str(snapshot)


def test_hub_cache_snapshot_opens_and_converts(small_source, tmp_path):
    snapshot = hub_snapshot(tmp_path, small_source)
    with open_store(snapshot) as hub, open_store(small_source) as plain:
        assert hub.config == plain.config
        np.testing.assert_array_equal(hub.layers[1].up.expert(2), plain.layers[1].up.expert(2))
    assert verify(convert(snapshot, tmp_path / "out").path).ok
    with pytest.raises(ConvertError, match="source"):  # the repository holds the blobs
        convert(snapshot, tmp_path / "models--org--moe", force=True)


def test_hub_cache_links_only_into_the_same_repository(small_source, tmp_path):
    snapshot = hub_snapshot(tmp_path, small_source)
    other = hub_snapshot(tmp_path, small_source, repo="models--other--repo")
    shard = os.path.join(snapshot, "model-00001-of-00001.safetensors")
    os.unlink(shard)
    os.symlink(os.path.realpath(os.path.join(other, "model-00001-of-00001.safetensors")), shard)
    with pytest.raises(FormatError, match="outside"):
        open_store(snapshot)
    plain = shutil.copytree(small_source, tmp_path / "plain")  # not a snapshot: blobs/ is not special
    os.makedirs(tmp_path / "blobs")
    shutil.move(os.path.join(plain, "config.json"), tmp_path / "blobs" / "c")
    os.symlink(os.path.join("..", "blobs", "c"), os.path.join(plain, "config.json"))
    with pytest.raises(FormatError, match="outside"):
        open_store(plain)


# -- 13. untyped errors ----------------------------------------------------------------------


def test_lone_surrogate_file_names_are_format_errors(small_source, tmp_path):
    copy = shutil.copytree(small_source, tmp_path / "ckpt")
    index_path = os.path.join(copy, "model.safetensors.index.json")
    index = json.loads(Path(index_path).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "\ud800.safetensors"
    with open(index_path, "w") as handle:
        json.dump(index, handle)  # ensure_ascii keeps the lone surrogate as an escape
    with pytest.raises(FormatError, match="encoded"):
        open_store(copy)
    assert not verify(copy).ok


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory")
def test_unreadable_directory_is_a_format_error(small_source, tmp_path):
    copy = shutil.copytree(small_source, tmp_path / "ckpt")
    os.chmod(copy, 0)
    try:
        with pytest.raises(FormatError):
            open_store(copy)
    finally:
        os.chmod(copy, stat.S_IRWXU)


def test_ragged_captured_ids_and_wrong_hits_are_typed():
    with pytest.raises(CapturedIdsError, match="rectangular"):
        count_hits([[1, 2], [3]], 4)
    pool = ExpertPool(4, 2)
    for hits in (np.zeros(3, np.int64), np.zeros((4, 1), np.int64), np.zeros(4, np.float64), [[1], [2, 3]]):
        with pytest.raises(CapturedIdsError, match="hits"):
            pool.propose([2, 3], hits)
    assert pool.resident_experts().tolist() == [0, 1]


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_destination_is_one_line(small_source, tmp_path, capsys, monkeypatch, failure):
    convert_module = importlib.import_module("mmapstore._convert")

    def fail(*args, **kwargs):
        raise OSError(failure, os.strerror(failure))

    monkeypatch.setattr(convert_module, "_write", fail)
    code = main(["convert", small_source, str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and os.strerror(failure) in err, err
    assert sorted(os.listdir(tmp_path)) == [".out.lock"]  # nothing half-written survives


# -- 14. smaller holes -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "mmapstore.json"])
def test_json_files_are_not_read_through_links_leading_outside(small_source, tmp_path, name):
    victim = (
        convert(small_source, tmp_path / "store").path
        if name == "mmapstore.json"
        else shutil.copytree(small_source, tmp_path / "ckpt")
    )
    outside = tmp_path / "outside.json"
    shutil.move(os.path.join(victim, name), outside)
    os.symlink(outside, os.path.join(victim, name))
    with pytest.raises(FormatError, match="outside"):
        open_store(victim)
    with pytest.raises(FormatError, match="outside"):
        convert(victim, tmp_path / "out")


def test_cleaning_partials_spares_other_destinations(tmp_path):
    live = tmp_path / ".m.old-1.partial-123-0123abcd"  # the staging directory of a convert to m.old-1
    mine = tmp_path / ".m.partial-456-89abcdef"
    old = tmp_path / ".m.old-fedcba98"
    for path in (live, mine, old):
        path.mkdir()
    (tmp_path / ".m.old-1").mkdir()  # someone's real directory
    with locked(str(tmp_path / "m")):
        removed = clean_partials(str(tmp_path / "m"))
    assert sorted(removed) == sorted([str(mine), str(old)])
    assert live.exists() and (tmp_path / ".m.old-1").exists()


@pytest.mark.parametrize("kind", ["file", "symlink", "dangling"])
def test_force_over_a_file_or_symlink_leaves_no_temporary(small_source, tmp_path, kind):
    dst = tmp_path / "out"
    if kind == "file":
        dst.write_bytes(b"x")
    else:
        os.symlink(tmp_path / ("elsewhere" if kind == "dangling" else "."), dst)
    convert(small_source, dst, force=True)
    assert verify(str(dst)).ok and not os.path.islink(dst)
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]


def test_staged_dir_replacing_a_file_removes_it(tmp_path):
    dst = tmp_path / "d"
    dst.write_bytes(b"old")
    with locked(str(dst)), staged_dir(str(dst), replace=True) as staging:
        write_bytes(os.path.join(staging, "f"), b"new")
    assert sorted(os.listdir(tmp_path)) == [".d.lock", "d"] and (dst / "f").read_bytes() == b"new"


# -- issue 10: bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--capacity", "-1"],
        ["simulate", "--every", "0"],
        ["simulate", "--dtype", "foo"],
        ["simulate", "--steps", "x"],
        ["synth", "OUT", "--family", "mixtral", "--experts", "0"],
        ["synth", "OUT", "--family", "mixtral", "--layers", "0"],
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, argv):
    argv = [str(tmp_path / "o") if arg == "OUT" else arg for arg in argv]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2 and captured.err.count("\n") == 1 and captured.err.startswith("mmapstore "), captured.err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("option", ["layers", "experts", "hidden", "ffn"])
def test_synth_refuses_empty_models(tmp_path, option):
    with pytest.raises(OptionError, match=option):
        synth_checkpoint(tmp_path / "x", "mixtral", **{option: 0})
    assert not os.path.exists(tmp_path / "x")


def test_writer_writes_zero_size_tensors(tmp_path):
    import safetensors.numpy

    from mmapstore._dtypes import dtype_from_code
    from mmapstore.formats import SafetensorsWriter, TensorSpec

    f32 = dtype_from_code("F32")
    specs = [TensorSpec("a", f32, (2,)), TensorSpec("empty", f32, (0, 5)), TensorSpec("b", f32, (1,))]
    path = str(tmp_path / "z.safetensors")
    with SafetensorsWriter(path, specs, align=64) as writer:
        writer.write_tensor("a", [np.ones(2, np.float32)])
        writer.write_tensor("empty", [np.zeros((0, 5), np.float32)])
        writer.write_tensor("b", [np.full(1, 7, np.float32)])
    loaded = safetensors.numpy.load_file(path)
    assert loaded["empty"].shape == (0, 5) and loaded["b"].tolist() == [7.0]
    writer = SafetensorsWriter(str(tmp_path / "y.safetensors"), specs)
    with pytest.raises(ValueError, match="zero size"):
        writer.write_tensor("empty", [np.ones(1, np.float32)])
    writer.abort()


def test_expert_index_errors_stay_typed(tmp_path):
    write_bytes(tmp_path / "m.safetensors", per_expert_file())
    with open_store(tmp_path) as store, pytest.raises(ExpertIndexError):
        store.layers[0].gate.expert(2)


def test_sigbus_is_not_how_a_shrunk_refresh_ends(medium_store, tmp_path):
    """apply() checks sizes before copying; a file truncated between plan and apply is refused."""
    _, store_path = medium_store
    copy = shutil.copytree(store_path, tmp_path / "copy")
    from mmapstore._service import SlabService

    with open_store(copy) as store:
        service = SlabService(store, 2, RefreshPolicy.every_forward())
        shard = os.path.join(copy, "experts-00001-of-00001.safetensors")
        os.truncate(shard, os.path.getsize(shard) // 2)
        with pytest.raises(FormatError, match="shrank"):
            service.step([np.array([[6, 7]])] * store.num_layers)

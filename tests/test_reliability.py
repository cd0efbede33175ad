"""Hostile input, crashes, concurrency and files that change underneath.

Quick passes run by default; ``--run-slow`` runs the long ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from builders import pack_safetensors, write_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmapstore.formats._records as records
from mmapstore import (
    FormatError,
    RefreshPolicy,
    SlabService,
    convert,
    geometries_of,
    open_store,
    plan_full_push,
    verify,
)
from mmapstore.formats import read_safetensors_header
from mmapstore.testing import routing_trace, synth_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ_QUICK, FUZZ_LONG = 400, 100_000
DIR_FUZZ_QUICK, DIR_FUZZ_LONG = 150, 100_000
CRASH_QUICK = 20


def small_moe_file() -> bytes:
    tensors = {}
    for expert in range(2):
        for proj, shape in (("gate_proj", (4, 3)), ("up_proj", (4, 3)), ("down_proj", (3, 4))):
            name = f"model.layers.0.mlp.experts.{expert}.{proj}.weight"
            tensors[name] = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + expert
    return pack_safetensors(tensors, {"format": "pt"})


def check_opens_correctly_or_refuses(path: str) -> str:
    """The fuzzing oracle: FormatError, or values equal to what the safetensors library reads."""
    try:
        store = open_store(path)
    except FormatError:
        return "refused"
    with store:
        reference = safetensors.numpy.load_file(path)
        for layer in store.layers:
            for _, stack in layer.stacks:
                for expert in range(stack.num_experts):
                    name = stack.tensor_names[expert] if not stack.is_stacked else stack.tensor_names[0]
                    want = reference[name] if not stack.is_stacked else reference[name][expert]
                    np.testing.assert_array_equal(stack.native(expert), want)
    return "opened"


def mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["flip", "truncate", "extend", "splice", "header_flip", "length"])
    buffer = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(buffer))
            buffer[position] ^= 1 << rng.randrange(8)
    elif kind == "header_flip":
        header_nbytes = struct.unpack("<Q", data[:8])[0]
        position = 8 + rng.randrange(header_nbytes)
        buffer[position] = rng.randrange(256)
    elif kind == "truncate":
        del buffer[rng.randrange(len(buffer)) :]
    elif kind == "extend":
        buffer += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "splice":
        start = rng.randrange(len(buffer))
        length = rng.randint(1, 32)
        chunk = bytes(buffer[rng.randrange(len(buffer)) :][:length])
        buffer[start : start + length] = chunk
    else:
        buffer[:8] = struct.pack("<Q", rng.choice([0, 1, 2**63, 2**64 - 1, len(data), rng.randrange(4096)]))
    return bytes(buffer)


def run_mutation_fuzz(tmp_path, count: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    base = small_moe_file()
    outcomes = {"opened": 0, "refused": 0}
    for trial in range(count):
        path = write_bytes(tmp_path / f"m{trial % 4}.safetensors", mutate(base, rng))
        outcomes[check_opens_correctly_or_refuses(path)] += 1
    return outcomes


def test_mutation_fuzz_quick(tmp_path):
    outcomes = run_mutation_fuzz(tmp_path, FUZZ_QUICK, seed=1)
    assert outcomes["refused"] > 0 and outcomes["opened"] > 0  # both paths exercised


@pytest.mark.slow
def test_mutation_fuzz_long(tmp_path):
    outcomes = run_mutation_fuzz(tmp_path, FUZZ_LONG, seed=2)
    assert sum(outcomes.values()) == FUZZ_LONG


# -- directory-level fuzzing: open_store and verify over mutated indexes, manifests and shards --

HOSTILE_VALUES = [
    None,
    True,
    -1,
    -(2**63),
    2**64,
    1.5,
    "0",
    "",
    "..",
    "../x",
    "/etc/hostname",
    "\ud800",
    [],
    {},
    [0, -1],
    [2**62, 2**62],
    "x" * 300,
    10**12,
    "F32",
    "BF16",
    "raw",
    "safetensors",
]


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    buffer = bytearray(data)
    kind = rng.choice(["flip", "truncate", "extend", "splice"])
    if not buffer or kind == "extend":
        buffer += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "flip":
        for _ in range(rng.randint(1, 4)):
            buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del buffer[rng.randrange(len(buffer)) :]
    else:
        start, length = rng.randrange(len(buffer)), rng.randint(1, 16)
        buffer[start : start + length] = bytes(buffer[rng.randrange(len(buffer)) :][:length])
    return bytes(buffer)


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    """Replace, delete or add one value anywhere in a JSON document (or mangle its bytes)."""
    if rng.random() < 0.25:
        return mutate_bytes(data, rng)
    document = json.loads(data)
    places: list[tuple[object, object]] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                places.append((node, key))
                walk(value)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                places.append((node, index))
                walk(value)

    walk(document)
    container, key = rng.choice(places)
    action = rng.random()
    if action < 0.15 and isinstance(container, dict):
        del container[key]
    elif action < 0.25 and isinstance(container, dict):
        container[rng.choice(["file", "offset", "nbytes", "shape", "dtype", "x", "weight_map", "tensors"])] = (
            rng.choice(HOSTILE_VALUES)
        )
    elif action < 0.35 and isinstance(container[key], int) and not isinstance(container[key], bool):  # type: ignore[index]
        container[key] += rng.choice([-1, 1, 4096, -4096])  # type: ignore[index]
    else:
        container[key] = rng.choice(HOSTILE_VALUES)  # type: ignore[index]
    return json.dumps(document).encode()


def library_values(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as the ``safetensors`` library reads it.

    The library refuses a whole file for one dtype code it does not know;
    mmapstore keeps such a tensor as opaque bytes beside the experts (and
    refuses it only where its values are needed).  Only then are the values
    taken from the validated records instead.
    """
    try:
        return safetensors.numpy.load_file(path)
    except Exception:
        header = read_safetensors_header(path)
        assert any(not record.dtype.known for record in header.tensors), f"{path}: the library refuses it"
        with open(path, "rb") as handle:
            data = handle.read()
        return {
            record.name: np.frombuffer(
                data[record.offset : record.offset + record.nbytes], dtype=record.dtype.numpy
            ).reshape(record.shape)
            for record in header.tensors
            if record.dtype.known
        }


def check_directory_opens_correctly_or_refuses(path: str) -> str:
    """Oracle for a mutated directory: FormatError, or every expert slab equal to
    the bytes the record names (read by the safetensors library where it can)."""
    try:
        store = open_store(path)
    except FormatError:
        return "refused"
    with store:
        for layer in store.layers:
            for _, stack in layer.stacks:
                for expert in range(stack.num_experts):
                    name = stack.tensor_names[0] if stack.is_stacked else stack.tensor_names[expert]
                    record = store.tensors[name]
                    if record.path.endswith(".safetensors"):
                        want = library_values(record.path)[name]
                    else:
                        with open(record.path, "rb") as handle:
                            handle.seek(record.offset)
                            raw = handle.read(record.nbytes)
                        want = np.frombuffer(raw, dtype=record.dtype.numpy).reshape(record.shape)
                    np.testing.assert_array_equal(stack.native(expert), want[expert] if stack.is_stacked else want)
    return "opened"


def check_verify_reports_or_refuses(path: str) -> str:
    """Oracle for verify: always a report, never an exception; a clean report opens."""
    report = verify(path)
    if report.ok:
        open_store(path).close()
        return "opened"
    assert report.problems and all(isinstance(problem.message, str) for problem in report.problems)
    return "refused"


@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory):
    """Small valid checkpoints of each directory kind, as {file name: bytes}."""
    root = tmp_path_factory.mktemp("fuzzbase")
    source = synth_checkpoint(root / "sharded", "mixtral", layers=1, experts=2, hidden=8, ffn=4, shard_nbytes=200).path
    slab = convert(source, root / "slab", shard_nbytes=2000).path
    raw = convert(source, root / "raw", storage="raw", shard_nbytes=2000).path
    bases = {}
    for kind, directory in (("sharded", source), ("slab", slab), ("raw", raw)):
        bases[kind] = {name: Path(directory, name).read_bytes() for name in sorted(os.listdir(directory))}
    return bases


def run_directory_fuzz(
    tmp_path, bases: dict[str, dict[str, bytes]], kinds: list[str], count: int, seed: int, oracle
) -> dict[str, int]:
    rng = random.Random(seed)
    outcomes = {"opened": 0, "refused": 0}
    for kind in kinds:
        directory = tmp_path / kind
        directory.mkdir()
        for name, data in bases[kind].items():
            write_bytes(directory / name, data)
    for _ in range(count):
        kind = rng.choice(kinds)
        directory = tmp_path / kind
        name = rng.choice(sorted(bases[kind]))
        original = bases[kind][name]
        if name.endswith(".json"):
            mutated = mutate_json(original, rng)
        elif name.endswith(".safetensors"):
            mutated = mutate(original, rng)
        else:
            mutated = mutate_bytes(original, rng)
        write_bytes(directory / name, mutated)
        try:
            outcomes[oracle(str(directory))] += 1
        except Exception as exc:
            raise AssertionError(f"{kind}/{name} mutated to {mutated[:300]!r}: {type(exc).__name__}: {exc}") from exc
        finally:
            write_bytes(directory / name, original)
    return outcomes


@pytest.mark.parametrize(
    "oracle",
    [check_directory_opens_correctly_or_refuses, check_verify_reports_or_refuses],
    ids=["open_store", "verify"],
)
def test_directory_fuzz_quick(tmp_path, fuzz_bases, oracle):
    kinds = ["sharded", "slab", "raw"] if oracle is check_directory_opens_correctly_or_refuses else ["slab", "raw"]
    outcomes = run_directory_fuzz(tmp_path, fuzz_bases, kinds, DIR_FUZZ_QUICK, 11, oracle)
    assert outcomes["refused"] > 0 and outcomes["opened"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "oracle",
    [check_directory_opens_correctly_or_refuses, check_verify_reports_or_refuses],
    ids=["open_store", "verify"],
)
def test_directory_fuzz_long(tmp_path, fuzz_bases, oracle):
    kinds = ["sharded", "slab", "raw"] if oracle is check_directory_opens_correctly_or_refuses else ["slab", "raw"]
    outcomes = run_directory_fuzz(tmp_path, fuzz_bases, kinds, DIR_FUZZ_LONG, 12, oracle)
    assert sum(outcomes.values()) == DIR_FUZZ_LONG


def test_verify_fuzz_single_file_quick(tmp_path):
    rng = random.Random(5)
    base = small_moe_file()
    for trial in range(FUZZ_QUICK // 4):
        path = write_bytes(tmp_path / f"v{trial % 4}.safetensors", mutate(base, rng))
        check_verify_reports_or_refuses(path)


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "U8", "I64", "F8_E4M3"]), json_scalars),
        "shape": st.one_of(st.lists(st.integers(-2, 2**62), max_size=4), json_values),
        "data_offsets": st.one_of(st.lists(st.integers(-5, 2**63), min_size=2, max_size=2), json_values),
    }
)
headers = st.dictionaries(
    st.sampled_from(
        ["blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight", "__metadata__", "x"]
    ),
    st.one_of(entries, json_values),
    max_size=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, data_nbytes=st.integers(0, 256))
def test_hypothesis_headers_open_or_raise_format_error(tmp_path, header, data_nbytes):
    text = json.dumps(header).encode()
    path = write_bytes(tmp_path / "h.safetensors", struct.pack("<Q", len(text)) + text + b"\x01" * data_nbytes)
    try:
        with open_store(path) as store:
            for layer in store.layers:
                for _, stack in layer.stacks:
                    assert stack.expert(0).shape == (stack.k, stack.n)
    except FormatError:
        pass


manifest_entries = st.fixed_dictionaries(
    {
        "file": st.one_of(
            st.sampled_from(["slabs.bin", "../slabs.bin", "/etc/hostname", "sub/../slabs.bin", ""]), json_scalars
        ),
        "dtype": st.one_of(st.just("F32"), json_scalars),
        "shape": st.one_of(st.just([2, 3, 4]), st.lists(st.integers(-1, 8), max_size=3), json_values),
        "offset": st.one_of(st.integers(-1, 200), json_scalars),
    }
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entry=manifest_entries, version=st.one_of(st.just(1), json_scalars))
def test_hypothesis_raw_manifests(tmp_path, entry, version):
    (tmp_path / "slabs.bin").write_bytes(b"\x00" * 96)
    manifest = {
        "format": "mmapstore.slab_store",
        "format_version": version,
        "storage": "raw",
        "tensors": {"blk.0.ffn_gate_exps.weight": entry},
    }
    (tmp_path / "mmapstore.json").write_text(json.dumps(manifest))
    try:
        open_store(tmp_path).close()
    except FormatError:
        pass


def test_limits_refuse_huge_claims_without_allocating(tmp_path, monkeypatch):
    # a shape claiming 2**63 elements and a header length of 2**63 are refused by arithmetic
    text = json.dumps({"a": {"dtype": "F64", "shape": [2**31, 2**32], "data_offsets": [0, 8]}}).encode()
    path = write_bytes(tmp_path / "a.safetensors", struct.pack("<Q", len(text)) + text + b"\x00" * 8)
    with pytest.raises(FormatError, match="needs|multiplying past"):
        open_store(path)
    monkeypatch.setattr(records, "MAX_TENSORS", 3)
    import mmapstore.formats._safetensors as st_format

    monkeypatch.setattr(st_format, "MAX_TENSORS", 3)
    tensors = {f"t{i}": np.zeros(1, np.uint8) for i in range(4)}
    with pytest.raises(FormatError, match="over the 3 limit"):
        open_store(write_bytes(tmp_path / "many.safetensors", pack_safetensors(tensors)))


# -- files that change under a reader -------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    return synth_checkpoint(root / "src", "qwen3_moe", layers=2, experts=8, hidden=256, ffn=512).path


def test_reconversion_under_a_reader(source, tmp_path):
    dst = str(tmp_path / "store")
    convert(source, dst)
    with open_store(dst) as store:
        view = store.layers[0].gate.expert(3)
        old = view.copy()
        table = plan_full_push(geometries_of(store)).table  # every expert of layer 1's down stack, one view
        down = table.params.index(f"blk.{store.layers[1].layer_index}.ffn_down_exps.weight")
        held = store.byte_source().view(table, int(np.flatnonzero(table.param == down)[0]))
        assert held.shape[0] == 8
        held_copy = held.copy()
        cli = "import sys; from mmapstore.cli import main; sys.exit(main(sys.argv[1:]))"
        result = subprocess.run(
            [sys.executable, "-c", cli, "convert", source, dst, "--force", "--dtype", "f32", "--quiet"],
            cwd=REPO,
            capture_output=True,
        )
        assert result.returncode == 0, result.stderr
        np.testing.assert_array_equal(view, old)  # the old inode lives on under our views
        np.testing.assert_array_equal(held, held_copy)
    with open_store(dst) as fresh:
        assert fresh.layers[0].gate.dtype == np.float32
        np.testing.assert_array_equal(fresh.layers[0].gate.expert(3), old.astype(np.float32))


def test_truncated_published_file(source, tmp_path):
    dst = convert(source, tmp_path / "store").path
    shard = os.path.join(dst, "experts-00001-of-00001.safetensors")
    os.truncate(shard, os.path.getsize(shard) // 2)
    report = verify(dst)
    assert not report.ok and any("truncated" in p.message for p in report.problems)
    with pytest.raises(FormatError, match="truncated"):
        open_store(dst)


def test_the_library_never_writes_to_what_it_reads(source, tmp_path):
    dst = convert(source, tmp_path / "store").path
    files = sorted(os.path.join(root, name) for root in (source, dst) for name in os.listdir(root))

    def fingerprint() -> dict[str, tuple[str, int]]:
        return {f: (hashlib.sha256(Path(f).read_bytes()).hexdigest(), os.stat(f).st_mtime_ns) for f in files}

    before = fingerprint()
    for path in (source, dst):
        with open_store(path) as store:
            service = SlabService(store, 3, RefreshPolicy.every_forward())
            for captured in routing_trace(4, store.num_layers, 8, 2, 4):
                service.step(captured)
            with pytest.raises(ValueError):
                store.layers[0].up.expert(0)[0, 0] = 1
        verify(path)
    assert fingerprint() == before


# -- crash safety ---------------------------------------------------------------------------


def _convert_process(src: str, dst: str) -> subprocess.Popen[bytes]:
    cli = "import sys; from mmapstore.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", cli, "convert", src, dst, "--quiet", "--force", "--shard-size", "4M"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


# A converter that SIGKILLs itself at its N-th event: before and after every
# slab written or copied, file or directory fsynced, directory made, rename, exchange
# and removal.  N = 0 counts the events of a whole run (printed on stderr).
KILL_AT_EVENT = """
import os, shutil, signal, sys
import mmapstore.formats._safetensors as st_format
import mmapstore.formats._slabfile as slabfile
import mmapstore._publish as publish
from mmapstore.cli import main
kill_at, count = int(sys.argv[1]), [0]
def event():
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
def hook(owner, name):
    original = getattr(owner, name)
    def hooked(*args, **kwargs):
        event()
        result = original(*args, **kwargs)
        event()
        return result
    setattr(owner, name, hooked)
for owner, name in ((os, "fsync"), (os, "mkdir"), (os, "rename"), (os, "unlink"), (shutil, "rmtree"),
                    (publish, "_exchange"), (st_format.SafetensorsWriter, "append"),
                    (slabfile.SlabFileWriter, "write"), (slabfile.SlabFileWriter, "copy")):
    hook(owner, name)
code = main(sys.argv[2:])
print("events", count[0], file=sys.stderr)
sys.exit(code)
"""


def _killed_convert(src: str, dst: str, kill_at: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_AT_EVENT,
            str(kill_at),
            "convert",
            src,
            dst,
            "--quiet",
            "--force",
            "--shard-size",
            "4M",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_crash_trials(source: str, tmp_path, trials: int | None) -> int:
    """Kill a converter replacing a complete store at evenly spread events
    (every event when ``trials`` is None); return how many kills were made."""
    dst = str(tmp_path / "out")
    counted = _killed_convert(source, dst, 0)
    assert counted.returncode == 0, counted.stderr
    events = int(counted.stderr.split()[-1])
    points = (
        range(1, events + 1)
        if trials is None
        else sorted({1 + (events - 1) * i // (trials - 1) for i in range(trials)})
    )
    for kill_at in points:
        killed = _killed_convert(source, dst, kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, events, killed.stderr[-2000:])
        # DST is complete and intact (a complete store existed before the kill)
        assert os.path.isdir(dst) and verify(dst).ok, kill_at
    final = _convert_process(source, dst)
    final.communicate(timeout=120)
    assert final.returncode == 0
    assert verify(dst).ok
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]  # no temporary files survive
    return len(points)


def test_sigkill_at_deterministic_points(source, tmp_path):
    assert run_crash_trials(source, tmp_path, CRASH_QUICK) == CRASH_QUICK


@pytest.mark.slow
def test_sigkill_at_every_point_long(source, tmp_path):
    assert run_crash_trials(source, tmp_path, None) >= CRASH_QUICK


def test_sigkill_at_every_point_of_a_first_publish_leaves_nothing_or_a_whole_store(source, tmp_path):
    counted = _killed_convert(source, str(tmp_path / "probe"), 0)
    events = int(counted.stderr.split()[-1])
    for kill_at in sorted({1, 2, events // 2, events - 3, events - 2, events - 1, events}):
        dst = tmp_path / f"fresh{kill_at}"
        killed = _killed_convert(source, str(dst), kill_at)
        assert killed.returncode == -signal.SIGKILL
        assert not dst.exists() or verify(str(dst)).ok, kill_at


# -- concurrency -----------------------------------------------------------------------------


def test_many_processes_converting_at_once(source, tmp_path):
    dst = str(tmp_path / "out")
    cli = "import sys; from mmapstore.cli import main; sys.exit(main(sys.argv[1:]))"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", cli, "convert", source, dst, "--quiet"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(5)
    ]
    codes = [(process.communicate(timeout=180), process.returncode)[1] for process in processes]
    assert codes == [0] * 5
    assert verify(dst).ok
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]


def test_threads_reading_and_refreshing_one_store(source, tmp_path):
    dst = convert(source, tmp_path / "store").path
    errors: list[BaseException] = []
    with open_store(dst) as store:

        def worker(seed: int) -> None:
            try:
                service = SlabService(store, 3, RefreshPolicy.every_n_decode_steps(2))
                for captured in routing_trace(10, store.num_layers, 8, 2, 4, seed=seed):
                    service.step(captured)
                    for layer, pool in zip(store.layers, service.pools, strict=True):
                        for slot, expert in enumerate(pool.resident_experts()):
                            buffer = service.sink.arrays[f"blk.{layer.layer_index}.ffn_up_exps.weight"]
                            assert np.array_equal(buffer[slot], layer.up.native(int(expert)))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors


def test_processes_reading_and_refreshing_one_store(source, tmp_path):
    dst = convert(source, tmp_path / "store").path
    cli = "import sys; from mmapstore.cli import main; sys.exit(main(sys.argv[1:]))"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", cli, "simulate", dst, "--seed", str(seed), "--json", "--steps", "10"],
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        for seed in range(3)
    ]
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0 and json.loads(out)["verified"]


def test_stale_lock_from_a_killed_process_never_blocks(source, tmp_path):
    dst = str(tmp_path / "out")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from mmapstore._publish import locked\n"
                f"with locked({dst!r}):\n    print('held', flush=True); time.sleep(60)"
            ),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline().strip() == b"held"
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
    assert os.path.exists(os.path.join(tmp_path, ".out.lock"))  # the lock file stays behind...
    assert not convert(source, dst, lock_timeout=10).skipped  # ...and blocks nobody

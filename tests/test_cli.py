"""The mmapstore command: main([...]) output and exit codes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from builders import pack_safetensors, write_bytes

from mmapstore.cli import escape, main, parse_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_walk_through_synth_convert_inspect_verify(tmp_path, capsys):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    code, out, _ = run(capsys, "synth", src, "--family", "qwen3_moe", "--layers", "3", "--experts", "6")
    assert code == 0 and "qwen3_moe" in out
    code, out, _ = run(capsys, "convert", src, dst, "--dtype", "f32", "--quiet")
    assert code == 0 and "9 stacks" in out
    code, out, _ = run(capsys, "inspect", dst, "--json")
    info = json.loads(out)
    assert code == 0 and info["layout"] == "slab" and info["moe_layers"] == 3
    assert info["layers"][0]["stacks"]["gate"]["shape"] == [6, 64, 32]
    assert info["layers"][0]["stacks"]["down"]["dtype"] == "float32"
    assert info["expert_nbytes"] == 3 * 3 * 6 * 64 * 32 * 4  # layers x projections x [E, k, n] f32
    assert info["total_nbytes"] == sum(os.path.getsize(f["path"]) for f in info["files"])
    code, out, _ = run(capsys, "inspect", src)
    assert code == 0 and "per_expert" in out and "layer   2" in out
    code, out, _ = run(capsys, "verify", dst)
    assert code == 0 and out.startswith("ok:")
    code, out, _ = run(capsys, "convert", src, dst, "--dtype", "f32", "--quiet")
    assert code == 0 and "already holds" in out
    code, _, err = run(capsys, "convert", src, dst, "--quiet")
    assert code == 1 and "already exists" in err


def test_verify_reports_damage_with_exit_1(tmp_path, capsys):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    assert main(["synth", src, "--family", "mixtral", "--quiet"]) == 0
    assert main(["convert", src, dst, "--quiet"]) == 0
    capsys.readouterr()
    shard = os.path.join(dst, "experts-00001-of-00001.safetensors")
    with open(shard, "r+b") as handle:
        handle.seek(os.path.getsize(shard) - 10)
        handle.write(b"\x55")
    code, out, _ = run(capsys, "verify", dst, "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert [p["tensor"] for p in report["problems"]] == ["blk.1.ffn_down_exps.weight"]


def test_usage_and_input_errors(tmp_path, capsys):
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "synth", str(tmp_path / "x"), "--family", "nope")[0] == 2
    assert run(capsys, "convert")[0] == 2
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing"))
    assert code == 1 and "no such file" in err
    write_bytes(tmp_path / "bad.safetensors", b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    code, _, err = run(capsys, "verify", str(tmp_path / "bad.safetensors"))
    assert code == 1


def test_names_from_files_are_escaped(tmp_path, capsys):
    tensors = {}
    for expert in range(2):
        for proj, shape in (("gate_proj", (4, 3)), ("up_proj", (4, 3)), ("down_proj", (3, 4))):
            tensors[f"model.layers.0.mlp.experts.{expert}.{proj}.weight"] = np.zeros(shape, np.float32)
    tensors["\x1b]0;pwned\x07\x1b[2J"] = np.zeros(1, np.float32)
    path = write_bytes(tmp_path / "e.safetensors", pack_safetensors(tensors))
    code, out, _ = run(capsys, "inspect", path, "--json")
    assert code == 0 and json.loads(out)["num_tensors"] == 7
    # a header whose error message quotes a hostile name
    bad = {"\x1b[31mred": {"dtype": "F32", "shape": [1], "data_offsets": [0, 5]}}
    text = json.dumps(bad).encode()
    write_bytes(tmp_path / "h.safetensors", len(text).to_bytes(8, "little") + text + b"\x00" * 5)
    code, _, err = run(capsys, "inspect", str(tmp_path / "h.safetensors"))
    assert code == 1 and "\x1b" not in err and "\\x1b" in err
    assert escape("a\x1bb\u202ec\n") == "a\\x1bb\\u202ec\\x0a"


def test_simulate_runs_the_built_in_example(capsys):
    code, out, _ = run(capsys, "simulate", "--steps", "6")
    assert code == 0
    assert "synthesized a small mixtral checkpoint" in out
    assert "every resident slot matches the store: True" in out
    code, out, _ = run(capsys, "simulate", "--steps", "4", "--json", "--orientation", "kn", "--dtype", "float32")
    summary = json.loads(out)
    assert summary["verified"] and summary["stats"]["refreshes"] == 2


def test_simulate_read_cache_reader_and_budget(capsys):
    code, out, _ = run(capsys, "simulate", "--steps", "4", "--json", "--read", "reader", "--cache", "drop",
                       "--reader", "2,1MiB")  # fmt: skip
    summary = json.loads(out)
    assert code == 0 and summary["verified"]
    moved = summary["stats"]["source_nbytes"]
    assert moved and set(moved) <= {"direct", "bounced", "buffered"}  # read="reader": nothing from the mapping
    assert sum(moved.values()) == summary["stats"]["nbytes"]
    code, out, _ = run(capsys, "simulate", "--steps", "4", "--json", "--read", "map", "--budget", "3MiB")
    summary = json.loads(out)
    assert code == 0 and summary["verified"] and summary["capacity"] == 8  # 8 experts of 384 KiB fit 3 MiB
    assert set(summary["stats"]["source_nbytes"]) <= {"mapped"}
    for bad in ("0", "x", "4,lots"):
        code, _, err = run(capsys, "simulate", "--reader", bad)
        assert code == 2 and "--reader" in err
    code, _, err = run(capsys, "simulate", "--budget", "1MiB")
    assert code != 0 and "no pool slot" in err and "Traceback" not in err


def test_python_dash_m_and_sizes():
    result = subprocess.run([sys.executable, "-m", "mmapstore", "--version"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "mmapstore" in result.stdout
    assert parse_size("4GiB") == 4 << 30 and parse_size("512M") == 512 << 20 and parse_size("1000") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_sparse_synth_takes_no_disk(tmp_path, capsys):
    out = str(tmp_path / "huge")
    code, text, _ = run(
        capsys,
        "synth",
        out,
        "--family",
        "mixtral",
        "--layers",
        "4",
        "--experts",
        "8",
        "--hidden",
        "4096",
        "--ffn",
        "8192",
        "--sparse",
        "--shard-size",
        "2GiB",
    )
    assert code == 0 and "(sparse)" in text
    files = [os.path.join(out, name) for name in os.listdir(out) if name.endswith(".safetensors")]
    assert sum(os.path.getsize(f) for f in files) > 3e9
    assert sum(os.stat(f).st_blocks for f in files) * 512 < 16 << 20
    code, text, _ = run(capsys, "inspect", out, "--json")
    assert json.loads(text)["layers"][3]["stacks"]["up"]["shape"] == [8, 4096, 8192]

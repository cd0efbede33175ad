"""``mmapstore simulate --device``: the built-in example end to end in torch pools."""

from __future__ import annotations

import json
import sys

import pytest

from mmapstore.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("extra", [(), ("--orientation", "kn", "--dtype", "f32")])
def test_simulate_on_cpu_torch_pools(capsys, extra):
    pytest.importorskip("torch", reason="the torch extra is not installed")
    code, out, _ = run(capsys, "simulate", "--device", "cpu", "--steps", "6", "--json", *extra)
    summary = json.loads(out)
    assert code == 0 and summary["verified"] and summary["device"] == "cpu"
    assert summary["stats"]["refreshes"] == 3 and summary["stats"]["promotions"] > 0
    code, out, _ = run(capsys, "simulate", "--device", "cpu", "--steps", "4", *extra)
    assert code == 0 and "torch tensors on cpu" in out and "matches the store: True" in out


def test_simulate_device_usage_errors(capsys):
    code, _, err = run(capsys, "simulate", "--device", "gpu0")
    assert code == 2 and "not a device" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "simulate", "--device", "cpu", "--trace", "t.npz", "--experts", "8")
    assert code == 2 and "--device" in err


def test_simulate_device_without_torch(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    code, _, err = run(capsys, "simulate", "--device", "cpu")
    assert code == 1
    assert err.strip().splitlines() == [err.strip()] and "mmapstore[torch]" in err


def test_simulate_on_a_missing_cuda_device(capsys):
    torch = pytest.importorskip("torch", reason="the torch extra is not installed")
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    code, _, err = run(capsys, "simulate", "--device", device)
    assert code == 1 and "error:" in err and len(err.strip().splitlines()) == 1

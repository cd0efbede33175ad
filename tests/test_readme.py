"""The README's API tour runs as written, and type-checks under mypy --strict."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmapstore.testing import synth_checkpoint

REPO = Path(__file__).resolve().parent.parent

PRELUDE = """\
from __future__ import annotations

import numpy as np
import numpy.typing as npt

# What a runtime would capture: per step, per MoE layer, the router's Top-K ids.
_rng = np.random.default_rng(0)
router_topk_per_layer: list[list[npt.NDArray[np.int64]]] = [
    [_rng.integers(0, 8, size=(4, 2)) for _ in range(3)] for _ in range(6)
]
captured: list[npt.NDArray[np.int64]] = router_topk_per_layer[0]
"""


def tour_script(checkpoint: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## API tour", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2, "the API tour lost its code"
    return PRELUDE + "\n".join(blocks).replace('"/tmp/ckpt"', repr(checkpoint))


@pytest.fixture
def script(tmp_path: Path) -> Path:
    checkpoint = str(tmp_path / "ckpt")
    synth_checkpoint(checkpoint, family="mixtral", layers=3, experts=8, hidden=64, ffn=32)
    path = tmp_path / "tour.py"
    path.write_text(tour_script(checkpoint))
    return path


def test_readme_api_tour_runs(script: Path) -> None:
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "PoolUpdate(" in result.stdout and "WriteTable(" in result.stdout


def test_readme_api_tour_type_checks(script: Path) -> None:
    pytest.importorskip("mypy", reason="the dev extra installs mypy")
    env = {**os.environ, "MYPYPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(script.parent / ".mypy"),
            "--follow-imports=silent",
            str(script),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr

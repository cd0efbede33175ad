"""The ``gpu`` bench case is in the registry: a skipped row without a GPU,
the full set of figures (and nothing left registered) with one."""

from __future__ import annotations

import pytest

from mmapstore.bench import CASES, run_cases
from mmapstore.cli import main


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.skipif(_has_cuda(), reason="this machine has a GPU: the case really runs")
def test_gpu_case_without_a_gpu_is_one_skipped_row(capsys):
    assert "gpu" in CASES
    assert main(["bench", "--cases", "gpu", "--size", "64MiB", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| gpu ")]
    assert len(rows) == 1 and "skipped" in rows[0]


@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device")
def test_gpu_case_on_a_gpu_delivers_every_figure(tmp_path):
    figures = run_cases(["gpu"], size=64 << 20, repeat=1, scratch_root=str(tmp_path))
    cases = {figure.case for figure in figures}
    assert {"ceiling", "warm_refresh", "cold_host", "cold_refresh", "registration", "pinned", "close"} <= cases
    (close,) = [figure for figure in figures if figure.case == "close"]
    assert close.ours == [0.0]
    assert all(figure.baseline for figure in figures if figure.case in ("warm_refresh", "cold_refresh"))

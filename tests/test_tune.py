"""The tuner against TIDE's check, the policy verdicts, and the commands."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from mmapstore import load_trace, save_trace
from mmapstore._policies import TidePolicy
from mmapstore._replay import CostModel, ReplayGeometry, prepare, replay
from mmapstore._tune import compare_policies, fit, measure_cpu_cost, recommend
from mmapstore.cli import main
from mmapstore.testing import block_diffusion_trace, recency_trace, uniform_trace, zipf_trace

MIB = 1 << 20


@pytest.fixture(scope="module")
def diffusion():
    trace = block_diffusion_trace(6, 32, 4, 64, 8, tokens=128, cosine=0.985, skew=1.2, spread=0.5, seed=1)
    geometry = ReplayGeometry.uniform(4, 64, 8 * MIB)
    return trace, geometry, prepare(trace, geometry), CostModel(2e9, 2.25e-4)


def test_tuned_tau_beats_tau_one_and_the_median_random_tau(diffusion):
    """TIDE Table 2's check: on block diffusion at cosine ~0.985 the tuned tau
    beats tau=1 and the median random tau in modelled time."""
    trace, geometry, data, cost = diffusion
    rec = recommend(data, cost, budget_nbytes=4 * 24 * 8 * MIB)
    assert rec.capacity == (24,) * 4
    tuned = rec.replayed_common.seconds
    every_step = replay(data, geometry, TidePolicy(interval=1), rec.capacity, cost=cost).seconds
    taus = np.random.default_rng(0).integers(1, 32, size=15)
    random = statistics.median(
        replay(data, geometry, TidePolicy(interval=int(t)), rec.capacity, cost=cost).seconds for t in taus
    )
    assert 1 < rec.common_interval < 31
    assert tuned < every_step and tuned < random
    assert rec.replayed.seconds < every_step and rec.replayed.seconds < random
    assert abs(rec.model_error) < 0.3  # Eq. 7 with the fitted terms stays close to the replay


def test_budget_is_respected_and_spent():
    trace = zipf_trace(120, 3, 32, 4, tokens=4, seed=2)
    geometry = ReplayGeometry((32, 32, 32), (MIB, 2 * MIB, MIB))
    budget = 40 * MIB
    rec = recommend(prepare(trace, geometry), CostModel(1e9, 1e-3), budget_nbytes=budget, max_interval=8)
    used = sum(c * n for c, n in zip(rec.capacity, geometry.expert_nbytes, strict=True))
    assert used <= budget
    assert all(1 <= t <= 8 for t in rec.interval)


def test_fit_on_a_constant_trace():
    ids = np.tile(np.array([[[1, 2]]]), (10, 1, 1))
    from mmapstore._trace import Trace

    data = prepare(Trace.build(ids, np.arange(11)), ReplayGeometry.uniform(1, 8, 10))
    result = fit(data, [2, 4], max_interval=5)
    np.testing.assert_allclose(result.drift, 0.0)
    np.testing.assert_allclose(result.miss, 0.0)
    np.testing.assert_allclose(result.turnover, 0.0)
    one = fit(data, [1], max_interval=3)
    np.testing.assert_allclose(one.miss, 0.5)  # one of the two routed experts fits


@pytest.mark.parametrize(
    ("trace", "winner", "words"),
    [
        (recency_trace(400, 4, 64, 4, window=12, speed=0.25, seed=0), "lru", "recency wins"),
        (zipf_trace(400, 4, 64, 4, skew=1.2, seed=0), "lfu", "frequency wins"),
    ],
)
def test_the_report_says_which_kind_of_trace_it_is(trace, winner, words):
    data = prepare(trace, ReplayGeometry.uniform(4, 64, MIB))
    comparison = compare_policies(data, 16, CostModel(2e9, 2e-4))
    assert comparison.winner == winner
    assert words in comparison.verdict()
    assert comparison.best("belady").hit_rate >= comparison.best(winner).hit_rate


def test_near_uniform_routing_is_reported():
    data = prepare(uniform_trace(300, 2, 64, 4, seed=0), ReplayGeometry.uniform(2, 64, MIB))
    verdict = compare_policies(data, 16, CostModel(2e9, 2e-4)).verdict()
    assert "No policy beats leaving the pool alone" in verdict


def test_cpu_cost_is_measured_and_scales():
    small = measure_cpu_cost(1 * MIB, repeat=2)
    assert small > 0
    assert measure_cpu_cost(64 * MIB, repeat=2, max_params=1 << 18) > 0


def test_trace_and_tune_commands(tmp_path, capsys):
    out = tmp_path / "bd.npz"
    assert (
        main(
            [
                "trace",
                str(out),
                "--synth",
                "block-diffusion",
                "--steps",
                "48",
                "--blocks",
                "3",
                "--layers",
                "2",
                "--experts",
                "32",
                "--tokens",
                "32",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["steps"] == 48
    assert load_trace(out).num_layers == 2
    common = ["--trace", str(out), "--expert-size", "4MiB", "--io-bandwidth", "2GiB", "--cpu-cost", "2e-4"]
    assert main(["tune", *common, "--budget", "96MiB", "--max-interval", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sum(result["capacity"]) * 4 * MIB <= 96 * MIB and result["policy"] in ("tide", "lru", "lfu")
    assert main(["tune", *common]) == 0
    text = capsys.readouterr().out
    assert "Eq. 7 predicts" in text and ("wins" in text or "No policy" in text)
    assert main(["simulate", *common, "--capacity", "8"]) == 0
    assert "belady" in capsys.readouterr().out


def test_usage_and_input_errors(tmp_path, capsys):
    assert main(["tune"]) == 2  # --trace is required
    assert main(["trace", str(tmp_path / "x.npz"), "--llama-csv", str(tmp_path / "none.csv")]) == 2
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"junk")
    assert main(["tune", "--trace", str(bad), "--io-bandwidth", "1GiB", "--cpu-cost", "1e-4"]) == 1
    good = tmp_path / "t.npz"
    save_trace(zipf_trace(10, 2, 16, 2, seed=0), good)
    assert (
        main(["simulate", "--trace", str(good), "--experts", "8", "--io-bandwidth", "1GiB", "--cpu-cost", "1e-4"]) == 1
    )  # ids up to 15 do not fit 8 experts
    err = capsys.readouterr().err
    assert "the model has 8 experts" in err and "Traceback" not in err


def test_plots(tmp_path):
    pytest.importorskip("matplotlib", reason="figures need the [plot] extra")
    trace = tmp_path / "z.npz"
    save_trace(zipf_trace(40, 2, 16, 2, tokens=4, seed=0), trace)
    common = ["--trace", str(trace), "--io-bandwidth", "1GiB", "--cpu-cost", "1e-4", "--expert-size", "1MiB"]
    assert main(["tune", *common, "--max-interval", "6", "--plot", str(tmp_path / "tune.png")]) == 0
    assert main(["simulate", *common, "--plot", str(tmp_path / "sim.png")]) == 0
    for name in ("tune.png", "sim.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

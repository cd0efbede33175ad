"""The trace commands of ``mmapstore``: ``trace``, ``simulate --trace`` and ``tune``.

Kept apart from :mod:`mmapstore.cli`, which only wires the parsers.  Every
function returns the exit code; only this module and the CLI print.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from ._replay import CostModel, ReplayGeometry, ReplayInput, prepare
from ._trace import Trace, load_trace, save_trace
from .cli import escape, parse_size

__all__ = ["add_trace_arguments", "cmd_trace", "run_simulate_trace", "run_tune"]

SYNTH_KINDS = ("block-diffusion", "uniform", "zipf", "recency", "bursty")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def cmd_trace(args: argparse.Namespace) -> int:
    """Write a trace: synthetic (``--synth``) or imported."""
    from . import _trace_import as trace_import
    from . import _trace_synth as trace_synth

    if args.synth:
        shape = dict(layers=args.layers, experts=args.experts, top_k=args.top_k, tokens=args.tokens, seed=args.seed)
        makers = {
            "uniform": trace_synth.uniform_trace,
            "zipf": trace_synth.zipf_trace,
            "recency": trace_synth.recency_trace,
            "bursty": trace_synth.bursty_trace,
        }
        if args.synth == "block-diffusion":
            trace = trace_synth.block_diffusion_trace(
                args.blocks,
                args.steps // args.blocks,
                args.layers,
                args.experts,
                args.top_k,
                args.tokens,
                cosine=args.cosine,
                skew=1.2,
                spread=0.5,
                seed=args.seed,
            )
        else:
            trace = makers[args.synth](args.steps, **shape)
    elif args.llama_csv:
        if args.top_k is None:
            print("mmapstore trace: error: --llama-csv needs --top-k", file=sys.stderr)
            return 2
        trace = trace_import.from_llama_csv(args.llama_csv, args.top_k)
    else:
        array = np.load(args.array, allow_pickle=False)
        trace = trace_import.from_step_array(array, source=args.array)
    save_trace(trace, args.out)
    summary = {
        "path": args.out,
        "steps": trace.num_steps,
        "layers": trace.num_layers,
        "top_k": trace.top_k,
        "tokens": trace.num_rows,
        "source": trace.source,
    }
    if args.json:
        _print_json(summary)
    else:
        print(
            f"wrote {escape(args.out)}: {trace.num_steps} steps, {trace.num_layers} MoE layers, "
            f"{trace.num_rows} tokens x top-{trace.top_k} ({escape(trace.source)})"
        )
    return 0


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``simulate --trace`` and ``tune``."""
    parser.add_argument("--experts", type=int, help="experts per layer when no store is given")
    parser.add_argument("--expert-size", default="16MiB", help="bytes of one expert when no store is given")
    parser.add_argument("--io-bandwidth", help="promotion bandwidth per second, e.g. 2GiB (default: a quick probe)")
    parser.add_argument("--cpu-cost", type=float, help="CPU seconds per routed token per expert (default: measured)")
    parser.add_argument(
        "--clock",
        choices=["segment", "global"],
        default="segment",
        help="count refresh steps within each block (segment) or over the whole trace",
    )
    parser.add_argument("--plot", metavar="FILE.png", help="draw the figures (needs the [plot] extra)")


def _load(args: argparse.Namespace) -> tuple[Trace, ReplayGeometry, ReplayInput, CostModel, str]:

    trace = load_trace(args.trace)
    if args.path is not None:
        from ._store import open_store

        with open_store(args.path) as store:
            geometry = ReplayGeometry.from_store(store)
        where = f"store {escape(args.path)}"
    else:
        experts = args.experts if args.experts is not None else int(trace.max_expert().max()) + 1
        geometry = ReplayGeometry.uniform(trace.num_layers, experts, parse_size(args.expert_size))
        where = f"{experts} experts x {geometry.expert_nbytes[0] / 2**20:.1f} MiB per layer (no store)"
    data = prepare(trace, geometry)
    from ._tune import measure_cpu_cost, probe_io_bandwidth

    io = float(parse_size(args.io_bandwidth)) if args.io_bandwidth else probe_io_bandwidth()
    expert_nbytes = max(geometry.expert_nbytes)
    tokens = max(1, int(np.median(trace.tokens())) * trace.top_k // max(1, max(geometry.num_experts)))
    cpu = args.cpu_cost if args.cpu_cost is not None else measure_cpu_cost(expert_nbytes, tokens=tokens)
    source = (
        ("given" if args.io_bandwidth else "probed")
        + " I/O, "
        + ("given" if args.cpu_cost is not None else "measured")
        + " CPU"
    )
    return trace, geometry, data, CostModel(io, cpu, source), where


def _cost_line(cost: CostModel) -> str:
    return (
        f"machine: promotions {cost.io_bytes_per_s / 1e9:.2f} GB/s, CPU {cost.cpu_seconds_per_pair * 1e6:.1f} us "
        f"per routed token per expert ({cost.source})"
    )


def _table(comparison: Any) -> list[str]:
    lines = [f"  {'policy':<8}" + "".join(f"{'tau=' + str(t):>15}" for t in comparison.intervals)]
    for name, reports in comparison.reports.items():
        cells = "".join(f"{r.hit_rate:>7.1%} {r.seconds:>7.3g}" for r in reports)
        lines.append(f"  {name:<8}{cells}")
    lines.append("  (each cell: hit rate, modelled seconds = promotion I/O + CPU for misses)")
    return lines


def run_simulate_trace(args: argparse.Namespace) -> int:
    """``simulate --trace``: every policy over τ at ``--capacity``."""
    from ._tune import compare_policies

    trace, geometry, data, cost, where = _load(args)
    comparison = compare_policies(data, args.capacity, cost, clock=args.clock)
    if args.plot:
        from ._plots import plot_comparison

        plot_comparison(comparison, args.plot)
    if args.json:
        _print_json(
            {
                "trace": args.trace,
                "capacity": args.capacity,
                "cost": _cost_json(cost),
                "winner": comparison.winner,
                "verdict": comparison.verdict(),
                "reports": {name: [r.to_json() for r in reports] for name, reports in comparison.reports.items()},
            }
        )
        return 0
    print(
        f"trace {escape(args.trace)}: {trace.num_steps} steps, {trace.num_layers} MoE layers, top-{trace.top_k}; "
        f"{where}; capacity {args.capacity}"
    )
    print(_cost_line(cost))
    for line in _table(comparison):
        print(line)
    print(comparison.verdict())
    return 0


def run_tune(args: argparse.Namespace) -> int:
    """``tune``: recommend τ and capacity per layer, check by replay, compare policies."""
    from ._tune import compare_policies, recommend

    trace, geometry, data, cost, where = _load(args)
    budget = parse_size(args.budget) if args.budget else None
    rec = recommend(data, cost, budget_nbytes=budget, max_interval=args.max_interval, clock=args.clock)
    comparison = compare_policies(data, rec.capacity, cost, clock=args.clock)
    if args.plot:
        from ._plots import plot_tuning

        plot_tuning(rec, comparison, data, cost, args.plot)
    winner = comparison.best(comparison.winner)
    if args.json:
        _print_json(
            {
                "trace": args.trace,
                "cost": _cost_json(cost),
                "budget_nbytes": budget,
                "capacity": list(rec.capacity),
                "interval": list(rec.interval),
                "common_interval": rec.common_interval,
                "predicted_seconds": rec.predicted_seconds,
                "replayed": rec.replayed.to_json(),
                "replayed_common": rec.replayed_common.to_json(),
                "model_error": rec.model_error,
                "drift": rec.trace_fit.drift.tolist(),
                "capacities_fitted": list(rec.trace_fit.capacities),
                "policy": comparison.winner,
                "policy_report": winner.to_json(),
                "verdict": comparison.verdict(),
            }
        )
        return 0
    resident = sum(c * n for c, n in zip(rec.capacity, geometry.expert_nbytes, strict=True))
    print(
        f"trace {escape(args.trace)}: {trace.num_steps} steps, {trace.num_layers} MoE layers, top-{trace.top_k}; "
        f"{where}"
    )
    print(_cost_line(cost))
    print(
        f"budget: {'none' if budget is None else f'{budget / 2**30:.2f} GiB'}; recommended resident "
        f"{resident / 2**30:.2f} GiB"
    )
    print(f"  {'layer':>5} {'capacity':>8} {'tau':>4} {'drift d':>8} {'hit rate':>9} {'MB moved':>9} {'seconds':>8}")
    report = rec.replayed
    index = {c: i for i, c in enumerate(rec.trace_fit.capacities)}
    for layer in range(geometry.num_layers):
        moved = report.promotions[layer] * geometry.expert_nbytes[layer] / 1e6
        drift = rec.trace_fit.drift[index[rec.capacity[layer]], layer]
        seconds = report.layer_io_seconds[layer] + report.layer_cpu_seconds[layer]
        print(
            f"  {layer:>5} {rec.capacity[layer]:>8} {rec.interval[layer]:>4} {drift:>8.3f} "
            f"{report.layer_hit_rate[layer]:>9.1%} {moved:>9.1f} {seconds:>8.3g}"
        )
    print(
        f"Eq. 7 predicts {rec.predicted_seconds:.4g} s; replaying the recommendation gives {report.seconds:.4g} s "
        f"(model error {rec.model_error:+.1%}), hit rate {report.hit_rate:.1%}"
    )
    print(
        f"one tau for all layers (what SlabService runs): tau={rec.common_interval}, "
        f"{rec.replayed_common.seconds:.4g} s replayed"
    )
    for line in _table(comparison):
        print(line)
    print(f"best: {winner.policy} at the capacities above: {winner.hit_rate:.1%} hits, {winner.seconds:.4g} s modelled")
    print(comparison.verdict())
    return 0


def _cost_json(cost: CostModel) -> dict[str, Any]:
    return {
        "io_bytes_per_s": cost.io_bytes_per_s,
        "cpu_seconds_per_pair": cost.cpu_seconds_per_pair,
        "source": cost.source,
    }

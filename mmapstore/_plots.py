"""PNG figures for ``simulate --trace`` and ``tune`` (the ``[plot]`` extra).

matplotlib is imported here only, with the Agg backend; without it the
functions raise :class:`ImportError` naming the extra to install.
"""

from __future__ import annotations

from typing import Any

from ._replay import CostModel, ReplayInput
from ._tune import PolicyComparison, Recommendation

__all__ = ["plot_comparison", "plot_tuning"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'mmapstore[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_policies(axes: Any, comparison: PolicyComparison) -> None:
    hit_axis, time_axis = axes
    for name, reports in comparison.reports.items():
        style = "--" if name == "belady" else "-"
        label = "belady (clairvoyant bound)" if name == "belady" else name
        hit_axis.plot(comparison.intervals, [r.hit_rate for r in reports], style, marker="o", label=label)
        time_axis.plot(comparison.intervals, [r.seconds for r in reports], style, marker="o", label=label)
    hit_axis.set(xlabel="refresh interval tau (steps)", ylabel="hit rate", title="hit rate against tau")
    time_axis.set(
        xlabel="refresh interval tau (steps)", ylabel="modelled seconds (I/O + CPU)", title="modelled time against tau"
    )
    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.grid(True, alpha=0.3)
        axis.legend()


def plot_comparison(comparison: PolicyComparison, path: str) -> None:
    """Hit rate and modelled time against τ, one line per policy."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _draw_policies(axes, comparison)
    figure.suptitle(f"capacity {comparison.capacity[0]} per layer: {comparison.verdict()[:90]}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_tuning(
    rec: Recommendation, comparison: PolicyComparison, data: ReplayInput, cost: CostModel, path: str
) -> None:
    """Four panels: policies against τ (hit rate, time), Eq. 7 against
    capacity and τ (the model), and the fitted hit decay after a refresh."""
    from ._tune import model_seconds

    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    _draw_policies(axes[0], comparison)
    fit = rec.trace_fit
    taus = list(range(1, fit.max_interval + 1))
    model_axis, decay_axis = axes[1]
    for index, capacity in enumerate(fit.capacities):
        totals = [sum(part.sum() for part in model_seconds(data, fit, cost, index, tau)) for tau in taus]
        model_axis.plot(taus, totals, label=f"capacity {capacity}")
        decay_axis.plot(range(fit.max_interval), 1.0 - fit.miss[index].mean(axis=0), label=f"capacity {capacity}")
    model_axis.plot(
        [rec.common_interval], [rec.replayed_common.seconds], "k*", markersize=12, label="recommended, replayed"
    )
    model_axis.set(
        xlabel="refresh interval tau", ylabel="Eq. 7 seconds", title="the model: time against tau", yscale="log"
    )
    decay_axis.set(
        xlabel="steps since refresh",
        ylabel="hit rate of the refreshed target",
        title="hit-rate decay f (fitted from the trace)",
    )
    for axis in (model_axis, decay_axis):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

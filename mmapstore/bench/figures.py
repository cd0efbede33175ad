"""Figures: what a bench case returns, and the table they print as."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

__all__ = ["Figure", "render"]


@dataclass(slots=True)
class Figure:
    """One row: a case, what was measured, mmapstore's samples and the baseline's."""

    case: str
    what: str
    unit: str
    ours: list[float]
    baseline_name: str = ""
    baseline: list[float] = field(default_factory=list)
    higher_is_better: bool = False
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """How many times better than the baseline (>1 is better)."""
        if not self.baseline:
            return None
        ours, base = statistics.median(self.ours), statistics.median(self.baseline)
        if ours == 0 or base == 0:
            return None
        return ours / base if self.higher_is_better else base / ours


def _fmt(samples: list[float]) -> str:
    if not samples:
        return ""
    median = statistics.median(samples)
    return f"{median:.3g} [{min(samples):.3g}–{max(samples):.3g}]"


def render(figures: list[Figure]) -> str:
    """A markdown table of ``figures``."""
    lines = [
        "| case | measured | unit | mmapstore median [min–max] | baseline | baseline median [min–max] | "
        "ratio (>1 better) | target | met | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fig in figures:
        ratio = f"{fig.ratio:.2f}x" if fig.ratio is not None else ""
        met = "" if fig.met is None else ("yes" if fig.met else "**no**")
        lines.append(
            f"| {fig.case} | {fig.what} | {fig.unit} | {_fmt(fig.ours)} | {fig.baseline_name} | "
            f"{_fmt(fig.baseline)} | {ratio} | {fig.target} | {met} | {fig.note} |"
        )
    return "\n".join(lines)

"""``mmapstore bench``: mmapstore next to what a user would otherwise reach for.

Every figure has a baseline measured in the same run (memcpy, ``pread``,
``cp``, the ``safetensors`` library), because machines are shared and noisy;
the table reports medians with min and max and the ratio to the baseline.
Cases live in a registry (:data:`CASES`): each takes a :class:`Context` and
returns :class:`Figure` values; :func:`run_cases` runs some, and
:func:`run_bench` (the CLI's) prints them.  Nothing here is asserted by the
test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

from . import cases_cold, cases_convert, cases_copy, cases_gpu, cases_layout, cases_open, cases_plan
from .figures import Figure, render
from .registry import CASES, Context

__all__ = ["CASES", "Context", "Figure", "render", "run_bench", "run_cases"]

del (
    cases_cold,
    cases_convert,
    cases_copy,
    cases_gpu,
    cases_layout,
    cases_open,
    cases_plan,
)  # imported for their registrations


def run_cases(
    names: Sequence[str],
    *,
    size: int,
    repeat: int,
    scratch_root: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Figure]:
    """Run the named cases in a scratch directory (removed afterwards).

    Raises
    ------
    KeyError
        An unknown case name.
    """
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise KeyError(f"unknown bench cases {unknown}; choose from {list(CASES)}")
    scratch = tempfile.mkdtemp(prefix="mmapstore-bench-", dir=scratch_root or tempfile.gettempdir())
    figures: list[Figure] = []
    try:
        context = Context(scratch, size, repeat)
        for name in names:
            if progress is not None:
                progress(name)
            figures += CASES[name](context)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return figures


def run_bench(args: argparse.Namespace) -> int:
    """The ``mmapstore bench`` command: run, print the table, optionally save JSON and a plot."""
    # "--cases cold,beyond_ram" and "--cases cold beyond_ram" both work.
    names = [name for item in args.cases for name in item.split(",") if name] if args.cases else list(CASES)
    started = time.perf_counter()
    try:
        figures = run_cases(names, size=args.size, repeat=args.repeat, scratch_root=args.dir,
                            progress=lambda name: print(f"running {name}...", file=sys.stderr, flush=True))  # fmt: skip
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    header = (
        f"mmapstore bench: {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Linux {platform.release()}, data {args.size / 2**30:.1f} GiB, repeat {args.repeat}, {elapsed:.0f} s"
    )
    print(header)
    print()
    print(render(figures))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"header": header, "figures": [asdict(fig) | {"ratio": fig.ratio} for fig in figures]},
                      handle, indent=1)  # fmt: skip
    if args.plot:
        _plot(figures, args.plot)
    return 0


def _plot(figures: list[Figure], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'mmapstore[plot]'", file=sys.stderr)
        return
    rows = [fig for fig in figures if fig.ratio is not None]
    fig, axis = plt.subplots(figsize=(10, 0.4 * len(rows) + 1))
    axis.barh([f"{row.case}: {row.what[:60]}" for row in rows], [row.ratio or 0.0 for row in rows])
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_xlabel("ratio to baseline (>1 is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)

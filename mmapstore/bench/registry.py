"""The case registry: each case is a function of a :class:`Context` that
returns figures; ``mmapstore bench --cases`` picks them by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .figures import Figure

__all__ = ["CASES", "Case", "Context", "case"]


@dataclass(frozen=True, slots=True)
class Context:
    """Where a case may write (``scratch``, removed afterwards), how much data
    (``size`` bytes) and how many repeats."""

    scratch: str
    size: int
    repeat: int


Case = Callable[[Context], list[Figure]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    """Register a case under ``name`` (in the order cases are defined)."""

    def register(function: Case) -> Case:
        if name in CASES:
            raise ValueError(f"bench case {name!r} registered twice")
        CASES[name] = function
        return function

    return register

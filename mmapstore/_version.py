"""The package version, from the installed distribution's metadata (one place)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["VERSION"]

try:
    VERSION: str = version("mmapstore")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0+unknown"

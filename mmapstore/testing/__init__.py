"""Test support shipped with mmapstore: in-memory geometries and sources, and
the conformance suite every sink passes (``SinkTests``).

Importing :mod:`mmapstore.testing.sinks` needs pytest.
"""

from __future__ import annotations

from .memory import ArraySource, FileSource, InMemoryFiles

__all__ = ["ArraySource", "FileSource", "InMemoryFiles"]

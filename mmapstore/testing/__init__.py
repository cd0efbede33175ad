"""Test support shipped with mmapstore: in-memory geometries and sources,
synthetic checkpoints of every supported family with deterministic values,
synthetic routing traces, and the conformance suite every sink passes
(``SinkTests``).

Importing :mod:`mmapstore.testing.sinks` needs pytest.
"""

from __future__ import annotations

from .._families import FAMILIES, FamilyShape, family_tensors
from .._synth import SynthResult, routing_trace, synth_checkpoint
from .._synth_values import synth_tensor, synth_values
from .._trace_synth import block_diffusion_trace, bursty_trace, recency_trace, uniform_trace, zipf_trace
from ._memory import ArraySource, FileSource, InMemoryFiles

__all__ = [
    "FAMILIES",
    "ArraySource",
    "FamilyShape",
    "FileSource",
    "InMemoryFiles",
    "SynthResult",
    "block_diffusion_trace",
    "bursty_trace",
    "family_tensors",
    "recency_trace",
    "routing_trace",
    "synth_checkpoint",
    "synth_tensor",
    "synth_values",
    "uniform_trace",
    "zipf_trace",
]

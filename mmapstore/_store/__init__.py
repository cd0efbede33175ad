"""Store layer: expert stacks discovered from tensor names, served as views."""

from .layouts import LAYOUTS
from .stack import ExpertStack, LayerExperts, SourceSpan
from .store import ExpertStore, open_store

__all__ = ["LAYOUTS", "ExpertStack", "ExpertStore", "LayerExperts", "SourceSpan", "open_store"]

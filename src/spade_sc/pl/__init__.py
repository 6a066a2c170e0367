"""Plotting: read what the tools wrote, draw it, compute nothing."""

from ._attention import attention, top_patches
from ._elbow import elbow
from ._spatial import experts, routing, training_curves

__all__ = ["attention", "elbow", "experts", "routing", "top_patches", "training_curves"]

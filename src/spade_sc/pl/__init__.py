"""Plotting: read what the tools wrote, draw it, compute nothing."""

from ._elbow import elbow
from ._spatial import experts, routing, training_curves

__all__ = ["elbow", "experts", "routing", "training_curves"]

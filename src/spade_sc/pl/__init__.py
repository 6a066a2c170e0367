"""Plotting: read what the tools wrote, draw it, compute nothing."""

from ._attention import attention, top_patches
from ._diagnostics import expert_diagnostics, expert_losses, expert_pairs, routing_entropy
from ._elbow import elbow
from ._spatial import experts, routing, training_curves

__all__ = [
    "attention",
    "elbow",
    "expert_diagnostics",
    "expert_losses",
    "expert_pairs",
    "experts",
    "routing",
    "routing_entropy",
    "top_patches",
    "training_curves",
]

"""Tools: data experts, training, embedding, slide-level models."""

from ._experts import DataExperts, build_experts, expert_elbow
from ._spade import SpadeModel, embed, fit

__all__ = ["DataExperts", "SpadeModel", "build_experts", "embed", "expert_elbow", "fit"]

"""Tools: data experts, training, embedding, slide-level models."""

from ._experts import DataExperts, build_experts, expert_elbow
from ._mil import MILModel, MILResult, attention, train_mil
from ._slides import slide_embeddings
from ._spade import SpadeModel, embed, fit

__all__ = [
    "DataExperts",
    "MILModel",
    "MILResult",
    "SpadeModel",
    "attention",
    "build_experts",
    "embed",
    "expert_elbow",
    "fit",
    "slide_embeddings",
    "train_mil",
]

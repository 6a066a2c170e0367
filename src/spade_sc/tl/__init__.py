"""Tools: data experts, training, embedding, slide-level models."""

from ._evaluate import EvaluationResult, evaluate, predict_expression
from ._experts import DataExperts, build_experts, expert_elbow
from ._mil import MILModel, MILResult, attention, train_mil
from ._slides import slide_embeddings
from ._spade import SpadeModel, embed, fit

__all__ = [
    "DataExperts",
    "EvaluationResult",
    "MILModel",
    "MILResult",
    "SpadeModel",
    "attention",
    "build_experts",
    "embed",
    "evaluate",
    "expert_elbow",
    "fit",
    "predict_expression",
    "slide_embeddings",
    "train_mil",
]

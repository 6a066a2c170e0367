"""Tools: data experts, training, embedding, slide-level models, evaluation."""

from ..model._kmeans import DataExperts
from ..model._mil_model import MILModel
from ..model._spade_model import SpadeModel
from ._clustering import build_experts, expert_elbow
from ._evaluate import EvaluationResult, evaluate, predict_expression
from ._mil import MILResult, attention, train_mil
from ._slides import slide_embeddings
from ._spade import embed, fit

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

"""Torch / Lightning modules of SPADE: data experts, contrastive losses, routing, sampler and gated ABMIL.

This subpackage works on plain tensors only (no AnnData / SpatialData).
"""

from ._experts import BatchedExperts, BatchedProjectionHead, ExpertHeads
from ._heads import ProjectionHead
from ._lightning import PairsDataModule, PairsDataset, SpadeLightningModule, make_dataloader
from ._losses import InfoNCELoss, SoftCLIPLoss, make_loss, soft_clip_loss
from ._mil import GatedABMIL, discrete_time_nll, risk_from_hazards
from ._routing import ROUTING_MODES, mixture_embed, route
from ._sampler import ExpertBatchSampler

__all__ = [
    "ROUTING_MODES",
    "BatchedExperts",
    "BatchedProjectionHead",
    "ExpertBatchSampler",
    "ExpertHeads",
    "GatedABMIL",
    "InfoNCELoss",
    "PairsDataModule",
    "PairsDataset",
    "ProjectionHead",
    "SoftCLIPLoss",
    "SpadeLightningModule",
    "discrete_time_nll",
    "make_dataloader",
    "make_loss",
    "mixture_embed",
    "risk_from_hazards",
    "route",
    "soft_clip_loss",
]

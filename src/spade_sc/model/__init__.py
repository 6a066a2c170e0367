"""The SPADE model, apart from AnnData / SpatialData: model objects, their file format and the torch modules.

- Model objects (scvi-tools' ``model/``): :class:`SpadeModel` (mixture of data experts), :class:`MILModel`
  (gated attention MIL), :class:`DataExperts` (two-step k-means), saved as folders of ``model.safetensors`` +
  ``config.json`` (no pickle).
- Torch and Lightning modules on plain tensors: projection heads, batched experts, contrastive losses, routing,
  the single-expert batch sampler, gated ABMIL and the Lightning modules that train them.

Names are imported on first use (PEP 562), so ``import spade_sc`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> private module defining it.
_EXPORTS = {
    "SpadeModel": "_spade_model",
    "DataExperts": "_kmeans",
    "MILModel": "_mil_model",
    "MILLightningModule": "_lightning",
    "make_bag_dataloader": "_lightning",
    "BatchedExperts": "_experts",
    "BatchedProjectionHead": "_experts",
    "ExpertHeads": "_experts",
    "ProjectionHead": "_heads",
    "PairsDataModule": "_lightning",
    "PairsDataset": "_lightning",
    "SpadeLightningModule": "_lightning",
    "make_dataloader": "_lightning",
    "InfoNCELoss": "_losses",
    "SoftCLIPLoss": "_losses",
    "make_loss": "_losses",
    "soft_clip_loss": "_losses",
    "GatedABMIL": "_mil",
    "discrete_time_nll": "_mil",
    "risk_from_hazards": "_mil",
    "ROUTING_MODES": "_routing",
    "mixture_embed": "_routing",
    "expert_alignment": "_routing",
    "route": "_routing",
    "scale_aware_tau": "_routing",
    "ExpertBatchSampler": "_sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

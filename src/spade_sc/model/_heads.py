"""Single projection head (one side of one data expert)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .._validation import check_int

logger = logging.getLogger(__name__)

__all__ = ["ProjectionHead"]


def _check_dropout(value: float, name: str = "dropout") -> float:
    if not 0.0 <= float(value) < 1.0:
        msg = f"`{name}` must be in [0, 1), got {value!r}."
        raise ValueError(msg)
    return float(value)


class ProjectionHead(nn.Module):
    """Residual projection head used by BLEEP / SPADE.

    Computes ``p = projection(x)``, ``h = dropout(fc(gelu(p)))`` and returns ``layer_norm(h + p)``.

    Parameters
    ----------
    in_dim
        Input feature dimension.
    proj_dim
        Output (embedding) dimension.
    dropout
        Dropout probability applied to the output of ``fc``.

    Attributes
    ----------
    projection : torch.nn.Linear
        ``Linear(in_dim, proj_dim)``.
    gelu : torch.nn.GELU
        Activation.
    fc : torch.nn.Linear
        ``Linear(proj_dim, proj_dim)``.
    dropout : torch.nn.Dropout
        Dropout after ``fc``.
    layer_norm : torch.nn.LayerNorm
        ``LayerNorm(proj_dim)`` applied to the residual sum.
    """

    def __init__(self, in_dim: int, proj_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_dim = check_int(in_dim, "in_dim")
        self.proj_dim = check_int(proj_dim, "proj_dim")
        self.projection = nn.Linear(in_dim, proj_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(proj_dim, proj_dim)
        self.dropout = nn.Dropout(_check_dropout(dropout))
        self.layer_norm = nn.LayerNorm(proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project a batch of features.

        Parameters
        ----------
        x
            Input of shape ``(..., in_dim)``.

        Returns
        -------
        torch.Tensor
            Embedding of shape ``(..., proj_dim)``.
        """
        projected = self.projection(x)
        h = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(h + projected)

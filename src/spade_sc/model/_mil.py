"""Gated attention multiple-instance learning and discrete-time survival loss."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .._validation import check_int
from ._heads import _check_dropout

logger = logging.getLogger(__name__)

__all__ = ["GatedABMIL", "discrete_time_nll", "risk_from_hazards"]


class GatedABMIL(nn.Module):
    """Gated attention-based MIL (Ilse et al. 2018; CLAM-style) for slide-level prediction.

    ``H = fc(bag)``, ``A = attention_c(attention_a(H) * attention_b(H))`` (raw scores), ``a = softmax(A)`` over tiles,
    ``M = a^T H`` and ``logits = classifier(M)``.

    Parameters
    ----------
    in_dim
        Tile feature dimension ``d``.
    n_classes
        Number of outputs (1 for a binary task with a logit, ``n_bins`` for discrete-time survival).
    hidden
        Hidden width of ``fc``.
    attention_dim
        Width of the gated attention branches.
    dropout
        Dropout probability in ``fc``.

    Attributes
    ----------
    fc : torch.nn.Sequential
        ``Linear(d, hidden) - ReLU - Dropout - Linear(hidden, hidden) - ReLU - Dropout``.
    attention_a : torch.nn.Sequential
        ``Linear(hidden, attention_dim) - Tanh``.
    attention_b : torch.nn.Sequential
        ``Linear(hidden, attention_dim) - Sigmoid``.
    attention_c : torch.nn.Linear
        ``Linear(attention_dim, 1)``.
    classifier : torch.nn.Linear
        ``Linear(hidden, n_classes)``.
    """

    def __init__(
        self, in_dim: int, n_classes: int, hidden: int = 512, attention_dim: int = 384, dropout: float = 0.25
    ) -> None:
        super().__init__()
        self.in_dim = check_int(in_dim, "in_dim")
        self.n_classes = check_int(n_classes, "n_classes")
        check_int(hidden, "hidden")
        check_int(attention_dim, "attention_dim")
        p = _check_dropout(dropout)
        self.fc = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Dropout(p),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(p),
        )
        self.attention_a = nn.Sequential(nn.Linear(hidden, attention_dim), nn.Tanh())
        self.attention_b = nn.Sequential(nn.Linear(hidden, attention_dim), nn.Sigmoid())
        self.attention_c = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score one bag.

        Parameters
        ----------
        bag
            Tile features ``(N, in_dim)`` (a leading batch axis of size 1 is squeezed).

        Returns
        -------
        tuple of torch.Tensor
            ``(logits, attention)``: logits ``(n_classes,)`` and raw (pre-softmax) attention scores ``(N,)``.
        """
        if bag.ndim == 3 and bag.shape[0] == 1:
            bag = bag[0]
        if bag.ndim != 2 or bag.shape[1] != self.in_dim or bag.shape[0] == 0:
            msg = f"`bag` must have shape (N>0, {self.in_dim}), got {tuple(bag.shape)}."
            raise ValueError(msg)
        h = self.fc(bag)
        scores = self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)
        attention = torch.softmax(scores, dim=0)
        pooled = attention @ h
        return self.classifier(pooled), scores


def discrete_time_nll(
    hazard_logits: torch.Tensor,
    bin_idx: torch.Tensor,
    event: torch.Tensor,
    eps: float = 1e-7,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Discrete-time survival negative log-likelihood (PORPOISE / CLAM-survival ``nll_loss``).

    ``h = sigmoid(hazard_logits)``, ``S_t = prod_{j<=t} (1 - h_j)`` and ``S_{-1} = 1``. For a sample in bin ``t``:
    with an observed event the loss is ``-log(S_{t-1}) - log(h_t)``; censored, ``-log(S_t)``. Probabilities are clamped
    at ``eps`` before the log. The returned value is
    ``mean((1 - alpha) * (censored + uncensored) + alpha * uncensored)``.

    Parameters
    ----------
    hazard_logits
        Logits ``(B, n_bins)``.
    bin_idx
        Integer tensor ``(B,)``, time bin of each sample in ``[0, n_bins)``.
    event
        Tensor ``(B,)``: 1 if the event was observed, 0 if censored (i.e. ``1 - censorship``).
    eps
        Clamp before taking logs.
    alpha
        Extra weight of the uncensored term (0 in the default PORPOISE-style setup used here).

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    if hazard_logits.ndim != 2:
        msg = f"`hazard_logits` must be 2-D (B, n_bins), got shape {tuple(hazard_logits.shape)}."
        raise ValueError(msg)
    b, n_bins = hazard_logits.shape
    bin_idx = torch.as_tensor(bin_idx, device=hazard_logits.device)
    event = torch.as_tensor(event, device=hazard_logits.device)
    if bin_idx.shape != (b,) or torch.is_floating_point(bin_idx):
        msg = f"`bin_idx` must be an integer tensor of shape ({b},), got {tuple(bin_idx.shape)} {bin_idx.dtype}."
        raise ValueError(msg)
    if b and (int(bin_idx.min()) < 0 or int(bin_idx.max()) >= n_bins):
        msg = f"`bin_idx` values must lie in [0, {n_bins})."
        raise ValueError(msg)
    if event.shape != (b,):
        msg = f"`event` must have shape ({b},), got {tuple(event.shape)}."
        raise ValueError(msg)
    y = bin_idx.long().view(b, 1)
    c = (1.0 - event.to(hazard_logits.dtype)).view(b, 1)
    hazards = torch.sigmoid(hazard_logits)
    survival = torch.cumprod(1.0 - hazards, dim=1)
    survival_padded = torch.cat([torch.ones_like(c), survival], dim=1)
    uncensored = -(1.0 - c) * (
        torch.log(torch.gather(survival_padded, 1, y).clamp(min=eps))
        + torch.log(torch.gather(hazards, 1, y).clamp(min=eps))
    )
    censored = -c * torch.log(torch.gather(survival_padded, 1, y + 1).clamp(min=eps))
    loss = (1.0 - alpha) * (censored + uncensored) + alpha * uncensored
    return loss.mean()


def risk_from_hazards(hazard_logits: torch.Tensor) -> torch.Tensor:
    """Risk score from discrete-time hazard logits: ``-sum_t S_t`` with ``S_t = prod_{j<=t} (1 - sigmoid(h_j))``.

    Parameters
    ----------
    hazard_logits
        Logits ``(..., n_bins)``.

    Returns
    -------
    torch.Tensor
        Risk ``(...)``; higher means shorter expected survival.
    """
    survival = torch.cumprod(1.0 - torch.sigmoid(hazard_logits), dim=-1)
    return -survival.sum(dim=-1)

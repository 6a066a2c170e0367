"""Contrastive losses aligning image and gene embeddings."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["InfoNCELoss", "SoftCLIPLoss", "make_loss", "soft_clip_loss"]

LOSSES = ("soft_clip", "infonce")


def _check_pair(image_emb: torch.Tensor, gene_emb: torch.Tensor) -> None:
    if image_emb.ndim != 2 or gene_emb.ndim != 2 or image_emb.shape != gene_emb.shape:
        msg = (
            "`image_emb` and `gene_emb` must be 2-D tensors of the same shape, got "
            f"{tuple(image_emb.shape)} and {tuple(gene_emb.shape)}."
        )
        raise ValueError(msg)


def soft_clip_loss(image_emb: torch.Tensor, gene_emb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BLEEP soft-target contrastive loss (as used by the SPADE reference implementation).

    With ``I = image_emb`` and ``S = gene_emb`` (not normalised)::

        logits  = S @ I.T / temperature
        targets = softmax((I @ I.T + S @ S.T) / 2 * temperature, dim=-1)
        loss    = mean_i (CE(logits, targets)_i + CE(logits.T, targets.T)_i) / 2

    The multiplication by ``temperature`` inside the targets follows the reference code.

    Parameters
    ----------
    image_emb
        Image embeddings ``(B, D)``.
    gene_emb
        Gene (spot) embeddings ``(B, D)``; row ``i`` is paired with ``image_emb[i]``.
    temperature
        Temperature ``tau > 0``.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    _check_pair(image_emb, gene_emb)
    if not temperature > 0:
        msg = f"`temperature` must be > 0, got {temperature!r}."
        raise ValueError(msg)
    logits = gene_emb @ image_emb.T / temperature
    images_similarity = image_emb @ image_emb.T
    spots_similarity = gene_emb @ gene_emb.T
    targets = F.softmax((images_similarity + spots_similarity) / 2 * temperature, dim=-1)
    spots_loss = F.cross_entropy(logits, targets, reduction="none")
    images_loss = F.cross_entropy(logits.T, targets.T, reduction="none")
    return ((images_loss + spots_loss) / 2.0).mean()


class SoftCLIPLoss(nn.Module):
    """Module wrapper of :func:`soft_clip_loss` (fixed temperature, no parameters).

    Parameters
    ----------
    temperature
        Temperature ``tau > 0``.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            msg = f"`temperature` must be > 0, got {temperature!r}."
            raise ValueError(msg)
        self.temperature = float(temperature)

    def forward(self, image_emb: torch.Tensor, gene_emb: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Parameters
        ----------
        image_emb
            Image embeddings ``(B, D)``.
        gene_emb
            Gene embeddings ``(B, D)``.

        Returns
        -------
        torch.Tensor
            Scalar loss.
        """
        return soft_clip_loss(image_emb, gene_emb, self.temperature)

    def extra_repr(self) -> str:
        """Show the temperature."""
        return f"temperature={self.temperature}"


class InfoNCELoss(nn.Module):
    """CLIP-style symmetric InfoNCE with a learnable temperature.

    Embeddings are L2-normalised, ``logits = min(exp(logit_scale), max_scale) * S @ I.T`` and the loss is the mean of
    the row-wise and column-wise cross-entropies with identity targets.

    Parameters
    ----------
    init_temperature
        Initial temperature; ``logit_scale`` is initialised to ``log(1 / init_temperature)``.
    max_scale
        Upper clamp of ``exp(logit_scale)``.

    Attributes
    ----------
    logit_scale : torch.nn.Parameter
        Scalar learnable log inverse-temperature.
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        if not init_temperature > 0:
            msg = f"`init_temperature` must be > 0, got {init_temperature!r}."
            raise ValueError(msg)
        if not max_scale > 0:
            msg = f"`max_scale` must be > 0, got {max_scale!r}."
            raise ValueError(msg)
        self.max_scale = float(max_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def temperature(self) -> float:
        """Current effective temperature ``1 / min(exp(logit_scale), max_scale)``."""
        return 1.0 / min(math.exp(self.logit_scale.item()), self.max_scale)

    def forward(self, image_emb: torch.Tensor, gene_emb: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Parameters
        ----------
        image_emb
            Image embeddings ``(B, D)``.
        gene_emb
            Gene embeddings ``(B, D)``; row ``i`` is paired with ``image_emb[i]``.

        Returns
        -------
        torch.Tensor
            Scalar loss.
        """
        _check_pair(image_emb, gene_emb)
        image_n = F.normalize(image_emb, dim=-1)
        gene_n = F.normalize(gene_emb, dim=-1)
        scale = self.logit_scale.exp().clamp(max=self.max_scale)
        logits = scale * gene_n @ image_n.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2.0

    def extra_repr(self) -> str:
        """Show the clamp."""
        return f"max_scale={self.max_scale}"


def make_loss(name: str = "soft_clip", *, temperature: float = 1.0, init_temperature: float = 0.07) -> nn.Module:
    """Build a contrastive loss module by name.

    Parameters
    ----------
    name
        ``"soft_clip"`` (:class:`SoftCLIPLoss`) or ``"infonce"`` (:class:`InfoNCELoss`).
    temperature
        Fixed temperature of ``"soft_clip"``.
    init_temperature
        Initial learnable temperature of ``"infonce"``.

    Returns
    -------
    torch.nn.Module
        Module called as ``loss(image_emb, gene_emb)``.
    """
    if name == "soft_clip":
        return SoftCLIPLoss(temperature)
    if name == "infonce":
        return InfoNCELoss(init_temperature)
    msg = f"`name` must be one of {LOSSES}, got {name!r}."
    raise ValueError(msg)

"""Contrastive losses aligning image and gene embeddings."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .._constants import LOSSES
from .._validation import check_choice
from ._groups import Groups, check_expert_idx

logger = logging.getLogger(__name__)

__all__ = ["InfoNCELoss", "SoftCLIPLoss", "make_loss", "soft_clip_loss"]


def _check_pair(image_emb: torch.Tensor, gene_emb: torch.Tensor) -> None:
    if image_emb.ndim != 2 or gene_emb.ndim != 2 or image_emb.shape != gene_emb.shape:
        msg = (
            "`image_emb` and `gene_emb` must be 2-D tensors of the same shape, got "
            f"{tuple(image_emb.shape)} and {tuple(gene_emb.shape)}."
        )
        raise ValueError(msg)


def _check_groups(expert_idx: torch.Tensor | None, n_rows: int) -> torch.Tensor | None:
    """Validate ``expert_idx``; return it as int64, or ``None`` when all rows belong to one expert."""
    if expert_idx is None:
        return None
    expert_idx = check_expert_idx(expert_idx, n_rows)
    if n_rows == 0 or bool((expert_idx == expert_idx[0]).all()):
        return None
    return expert_idx


def _soft_ce_sum(logits: torch.Tensor, targets: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Sum over experts and rows of the row-wise plus column-wise soft cross-entropies, ``(U, M, M)`` inputs.

    ``CE(logits, targets)_i + CE(logits.T, targets.T)_j`` summed over valid ``i`` and ``j`` equals
    ``2 <targets, logits> - sum_i r_i lse_row_i - sum_j c_j lse_col_j`` (negated), with ``r`` / ``c`` the row /
    column sums of ``targets`` (zero on padding) and ``lse`` the log-sum-exp of the valid logits; this avoids
    materialising two ``(U, M, M)`` log-softmax tensors.
    """
    filled = groups.fill_padding(logits)
    lse_row = groups.zero_padding(torch.logsumexp(filled, dim=-1))
    lse_col = groups.zero_padding(torch.logsumexp(filled, dim=-2))
    dot = (targets * logits).sum()
    return -(2.0 * dot - (targets.sum(-1) * lse_row).sum() - (targets.sum(-2) * lse_col).sum())


def _grouped_soft_clip(
    image_emb: torch.Tensor, gene_emb: torch.Tensor, groups: Groups, temperature: float
) -> torch.Tensor:
    """Row-weighted mean over experts of :func:`soft_clip_loss` within each expert, computed batched."""
    image, gene = groups.pad(image_emb), groups.pad(gene_emb)
    image_t = image.transpose(1, 2)
    logits = torch.bmm(gene, image_t) / temperature
    half_tau = temperature / 2.0  # (I I^T + S S^T) / 2 * tau in one baddbmm
    similarity = torch.baddbmm(torch.bmm(image, image_t), gene, gene.transpose(1, 2), beta=half_tau, alpha=half_tau)
    targets = groups.zero_padding(F.softmax(groups.fill_padding(similarity), dim=-1))
    return _soft_ce_sum(logits, targets, groups) / (2.0 * image_emb.shape[0])


def soft_clip_loss(
    image_emb: torch.Tensor,
    gene_emb: torch.Tensor,
    temperature: float = 1.0,
    expert_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """BLEEP soft-target contrastive loss (as used by the SPADE reference implementation).

    With ``I = image_emb`` and ``S = gene_emb`` (not normalised)::

        logits  = S @ I.T / temperature
        targets = softmax((I @ I.T + S @ S.T) / 2 * temperature, dim=-1)
        loss    = mean_i (CE(logits, targets)_i + CE(logits.T, targets.T)_i) / 2

    The multiplication by ``temperature`` inside the targets follows the reference code.

    With ``expert_idx``, the loss is computed within each expert's rows only (the rows of other experts are never
    negatives nor soft targets) and the per-expert losses are averaged **weighted by their number of rows**, i.e.
    ``sum_k n_k * loss_k / sum_k n_k`` -- the mean over all rows of the within-expert per-row losses. A step made of
    several single-expert batches thus gives the same loss (times rows) as those batches one by one, and the
    epoch mean does not depend on how batches are grouped into steps. It is computed batched on zero-padded
    ``(U, M, M)`` logits with masks (``U`` experts present, ``M`` rows of the largest), without a loop over experts.

    Parameters
    ----------
    image_emb
        Image embeddings ``(B, D)``.
    gene_emb
        Gene (spot) embeddings ``(B, D)``; row ``i`` is paired with ``image_emb[i]``.
    temperature
        Temperature ``tau > 0``.
    expert_idx
        Integer tensor ``(B,)``, the expert of each row; ``None`` (or a single expert): one contrastive batch.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    _check_pair(image_emb, gene_emb)
    if not temperature > 0:
        msg = f"`temperature` must be > 0, got {temperature!r}."
        raise ValueError(msg)
    expert_idx = _check_groups(expert_idx, image_emb.shape[0])
    if expert_idx is not None:
        return _grouped_soft_clip(image_emb, gene_emb, Groups(expert_idx.to(image_emb.device)), temperature)
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

    def forward(
        self, image_emb: torch.Tensor, gene_emb: torch.Tensor, expert_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute the loss.

        Parameters
        ----------
        image_emb
            Image embeddings ``(B, D)``.
        gene_emb
            Gene embeddings ``(B, D)``.
        expert_idx
            Integer tensor ``(B,)``: compute the loss within each expert's rows and average over experts weighted by
            rows (see :func:`soft_clip_loss`). ``None``: one contrastive batch.

        Returns
        -------
        torch.Tensor
            Scalar loss.
        """
        return soft_clip_loss(image_emb, gene_emb, self.temperature, expert_idx)

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

    def forward(
        self, image_emb: torch.Tensor, gene_emb: torch.Tensor, expert_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute the loss.

        Parameters
        ----------
        image_emb
            Image embeddings ``(B, D)``.
        gene_emb
            Gene embeddings ``(B, D)``; row ``i`` is paired with ``image_emb[i]``.
        expert_idx
            Integer tensor ``(B,)``: the loss is computed within each expert's rows only (negatives from the same
            expert) and the per-expert losses are averaged weighted by their number of rows (as in
            :func:`soft_clip_loss`), batched over padded groups. ``None`` (or a single expert): one batch.

        Returns
        -------
        torch.Tensor
            Scalar loss.
        """
        _check_pair(image_emb, gene_emb)
        expert_idx = _check_groups(expert_idx, image_emb.shape[0])
        image_n = F.normalize(image_emb, dim=-1)
        gene_n = F.normalize(gene_emb, dim=-1)
        scale = self.logit_scale.exp().clamp(max=self.max_scale)
        if expert_idx is not None:
            groups = Groups(expert_idx.to(image_emb.device))
            logits = scale * torch.bmm(groups.pad(gene_n), groups.pad(image_n).transpose(1, 2))
            filled = groups.fill_padding(logits)
            # CE with identity targets, row- and column-wise: -(2 logits_ii - lse_row_i - lse_col_i) over valid i
            diag = torch.diagonal(logits, dim1=-2, dim2=-1)
            per_row = 2.0 * diag - torch.logsumexp(filled, dim=-1) - torch.logsumexp(filled, dim=-2)
            return -groups.zero_padding(per_row).sum() / (2.0 * image_emb.shape[0])
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
        Module called as ``loss(image_emb, gene_emb)`` or ``loss(image_emb, gene_emb, expert_idx)`` (loss within
        each expert's rows, row-weighted mean over experts).
    """
    check_choice(name, "name", LOSSES)
    return SoftCLIPLoss(temperature) if name == "soft_clip" else InfoNCELoss(init_temperature)

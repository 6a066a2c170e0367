"""Rows grouped by data expert: validation of expert indices and the padded ``(experts, rows, ...)`` layout.

Shared by the batched projection heads (one matrix product per expert present) and the per-expert contrastive
losses (one similarity matrix per expert present).
"""

from __future__ import annotations

import torch


def check_expert_idx(expert_idx: torch.Tensor, n_rows: int, n_experts: int | None = None) -> torch.Tensor:
    """Validate a 1-D integer tensor of ``n_rows`` expert indices (in ``[0, n_experts)`` when given); as int64."""
    expert_idx = torch.as_tensor(expert_idx)
    if expert_idx.ndim != 1 or expert_idx.shape[0] != n_rows:
        msg = f"`expert_idx` must have shape ({n_rows},), got {tuple(expert_idx.shape)}."
        raise ValueError(msg)
    if expert_idx.dtype.is_floating_point or expert_idx.dtype.is_complex or expert_idx.dtype == torch.bool:
        msg = f"`expert_idx` must be an integer tensor, got dtype {expert_idx.dtype}."
        raise ValueError(msg)
    if n_experts is not None and n_rows and (int(expert_idx.min()) < 0 or int(expert_idx.max()) >= n_experts):
        msg = f"`expert_idx` values must lie in [0, {n_experts}), got range [{int(expert_idx.min())}, "
        msg += f"{int(expert_idx.max())}]."
        raise ValueError(msg)
    return expert_idx.long()


class Groups:
    """Layout of rows grouped by expert in a zero-padded ``(U, M, ...)`` tensor.

    Parameters
    ----------
    expert_idx
        Integer tensor ``(B,)``.

    Attributes
    ----------
    experts : torch.Tensor
        The sorted distinct values of ``expert_idx`` (the experts present), one per group.
    n_groups : int
        Number ``U`` of experts present.
    size : int
        Number ``M`` of rows of the largest group.
    slot : torch.Tensor
        ``(B,)`` position of each row in the flattened ``(U * M)`` padded layout.
    mask : torch.Tensor
        ``(U, M)`` boolean, True where a padded slot holds a row.
    full : bool
        No padding (all experts present have ``M`` rows): no masking is needed.
    in_order : bool
        ``full`` and the rows already come expert by expert (as the sampler yields them): padding is a view.
    """

    def __init__(self, expert_idx: torch.Tensor) -> None:
        n = expert_idx.shape[0]
        self.experts, inverse, counts = torch.unique(expert_idx, return_inverse=True, return_counts=True)
        self.n_groups = int(counts.numel())
        self.size = int(counts.max())
        order = torch.argsort(inverse, stable=True)
        group = inverse[order]
        offsets = torch.cumsum(counts, 0) - counts
        position = torch.arange(n, device=expert_idx.device) - offsets[group]
        self.slot = torch.empty_like(order)
        self.slot[order] = group * self.size + position
        flat_mask = torch.zeros(self.n_groups * self.size, dtype=torch.bool, device=expert_idx.device)
        flat_mask[self.slot] = True
        self.mask = flat_mask.view(self.n_groups, self.size)
        self.full = self.n_groups * self.size == n
        self.in_order = self.full and bool((self.slot == torch.arange(n, device=expert_idx.device)).all())

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Scatter rows ``(B, D)`` into the zero-padded ``(U, M, D)`` layout (differentiable)."""
        if self.in_order:
            return x.reshape(self.n_groups, self.size, x.shape[1])
        flat = x.new_zeros(self.n_groups * self.size, x.shape[1]).index_copy(0, self.slot, x)
        return flat.view(self.n_groups, self.size, x.shape[1])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """Rows ``(B, D)`` back from the padded ``(U, M, D)`` layout, in the original order (differentiable)."""
        flat = padded.reshape(self.n_groups * self.size, padded.shape[2])
        return flat if self.in_order else flat[self.slot]

    def fill_padding(self, scores: torch.Tensor) -> torch.Tensor:
        """Set the padded entries of ``(U, M, M)`` scores to the most negative finite value (no ``-inf``).

        A valid row (column) then gives exactly zero softmax weight to padding, and a fully padded row stays finite
        (uniform), so nothing downstream meets ``-inf * 0``.
        """
        if self.full:
            return scores
        pair = self.mask[:, :, None] & self.mask[:, None, :]
        return scores.masked_fill(~pair, torch.finfo(scores.dtype).min)

    def zero_padding(self, values: torch.Tensor) -> torch.Tensor:
        """Zero the padded rows of ``(U, M)`` values (or of ``(U, M, M)`` values, row-wise)."""
        if self.full:
            return values
        mask = self.mask if values.ndim == 2 else self.mask[:, :, None]
        return values.masked_fill(~mask, 0.0)

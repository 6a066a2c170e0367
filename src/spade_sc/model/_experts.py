"""Mixture of data experts computed in one batched pass (stacked parameters)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_int
from ._groups import Groups, check_expert_idx
from ._heads import ProjectionHead, _check_dropout

logger = logging.getLogger(__name__)

__all__ = ["BatchedExperts", "BatchedProjectionHead", "ExpertHeads"]

_LN_EPS = 1e-5


class BatchedProjectionHead(nn.Module):
    """``K`` independent :class:`ProjectionHead` modules stored as stacked parameters.

    Expert ``k`` computes exactly what ``ProjectionHead(in_dim, proj_dim, dropout)`` computes with
    ``projection.weight = projection_weight[k].T``, ``projection.bias = projection_bias[k]``,
    ``fc.weight = fc_weight[k].T``, ``fc.bias = fc_bias[k]``, ``layer_norm.weight = layer_norm_weight[k]`` and
    ``layer_norm.bias = layer_norm_bias[k]``. All experts are evaluated with batched matrix products, never with a
    Python loop over experts.

    Parameters
    ----------
    n_experts
        Number of experts ``K``.
    in_dim
        Input feature dimension.
    proj_dim
        Output (embedding) dimension.
    dropout
        Dropout probability applied after the second linear layer.
    generator
        Random generator used for initialisation. ``None`` uses the global torch RNG.

    Attributes
    ----------
    projection_weight : torch.nn.Parameter
        Shape ``(K, in_dim, proj_dim)`` (transposed with respect to :class:`torch.nn.Linear`).
    projection_bias : torch.nn.Parameter
        Shape ``(K, proj_dim)``.
    fc_weight : torch.nn.Parameter
        Shape ``(K, proj_dim, proj_dim)`` (transposed with respect to :class:`torch.nn.Linear`).
    fc_bias : torch.nn.Parameter
        Shape ``(K, proj_dim)``.
    layer_norm_weight : torch.nn.Parameter
        Shape ``(K, proj_dim)``.
    layer_norm_bias : torch.nn.Parameter
        Shape ``(K, proj_dim)``.
    """

    def __init__(
        self,
        n_experts: int,
        in_dim: int,
        proj_dim: int = 256,
        dropout: float = 0.1,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.n_experts = check_int(n_experts, "n_experts")
        self.in_dim = check_int(in_dim, "in_dim")
        self.proj_dim = check_int(proj_dim, "proj_dim")
        self.dropout = nn.Dropout(_check_dropout(dropout))
        k, d, p = n_experts, in_dim, proj_dim
        self.projection_weight = nn.Parameter(torch.empty(k, d, p))
        self.projection_bias = nn.Parameter(torch.empty(k, p))
        self.fc_weight = nn.Parameter(torch.empty(k, p, p))
        self.fc_bias = nn.Parameter(torch.empty(k, p))
        self.layer_norm_weight = nn.Parameter(torch.empty(k, p))
        self.layer_norm_bias = nn.Parameter(torch.empty(k, p))
        self.reset_parameters(generator=generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every expert like :class:`torch.nn.Linear` / :class:`torch.nn.LayerNorm` would.

        ``nn.Linear`` uses ``kaiming_uniform_(a=sqrt(5))`` for the weight and ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
        for the bias, which both reduce to ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

        Parameters
        ----------
        generator
            Random generator; ``None`` uses the global torch RNG (so :func:`torch.manual_seed` controls it).
        """
        for weight, bias, fan_in in (
            (self.projection_weight, self.projection_bias, self.in_dim),
            (self.fc_weight, self.fc_bias, self.proj_dim),
        ):
            bound = 1.0 / math.sqrt(fan_in)
            weight.uniform_(-bound, bound, generator=generator)
            bias.uniform_(-bound, bound, generator=generator)
        self.layer_norm_weight.fill_(1.0)
        self.layer_norm_bias.zero_()

    # ------------------------------------------------------------------ core
    def _tail(
        self,
        projected: torch.Tensor,
        fc_weight: torch.Tensor,
        fc_bias: torch.Tensor,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
    ) -> torch.Tensor:
        """GELU -> fc -> dropout -> residual -> per-expert LayerNorm on ``(G, M, proj_dim)`` tensors."""
        h = torch.baddbmm(fc_bias.unsqueeze(1), F.gelu(projected), fc_weight)
        h = self.dropout(h)
        out = F.layer_norm(h + projected, (self.proj_dim,), eps=_LN_EPS)
        return out * ln_weight.unsqueeze(1) + ln_bias.unsqueeze(1)

    def _cast(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            msg = f"`{name}` must have shape (n, {self.in_dim}), got {tuple(x.shape)}."
            raise ValueError(msg)
        if not torch.is_floating_point(x):
            msg = f"`{name}` must be a floating point tensor, got dtype {x.dtype}."
            raise ValueError(msg)
        return x.to(dtype=self.projection_weight.dtype)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Apply every expert to every row.

        Parameters
        ----------
        x
            Input of shape ``(B, in_dim)``.

        Returns
        -------
        torch.Tensor
            Shape ``(B, K, proj_dim)``; ``[:, k]`` is the output of expert ``k``.
        """
        x = self._cast(x, "x")
        projected = torch.einsum("bi,kio->kbo", x, self.projection_weight) + self.projection_bias.unsqueeze(1)
        out = self._tail(projected, self.fc_weight, self.fc_bias, self.layer_norm_weight, self.layer_norm_bias)
        return out.transpose(0, 1)

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """Apply to each row the expert given by ``expert_idx``.

        Rows are grouped by expert into a zero-padded ``(U, M, in_dim)`` tensor (``U`` experts present, ``M`` rows in
        the largest group; a view, not a copy, when the rows already come expert by expert in equal numbers, as the
        sampler's steps do) and processed with batched matrix products; a batch of a single expert is therefore a
        single matrix product with that expert's weights.

        Parameters
        ----------
        x
            Input of shape ``(B, in_dim)``.
        expert_idx
            Integer tensor of shape ``(B,)`` with values in ``[0, K)``.

        Returns
        -------
        torch.Tensor
            Shape ``(B, proj_dim)``.
        """
        x = self._cast(x, "x")
        expert_idx = check_expert_idx(expert_idx, x.shape[0], self.n_experts)
        if x.shape[0] == 0:
            return x.new_zeros(0, self.proj_dim)
        groups = Groups(expert_idx.to(x.device))
        names = ("projection_weight", "projection_bias", "fc_weight", "fc_bias", "layer_norm_weight", "layer_norm_bias")
        if groups.n_groups == self.n_experts:  # every expert present (the training step): no copy of the weights
            w1, b1, *params = (getattr(self, name) for name in names)
        else:
            w1, b1, *params = (getattr(self, name)[groups.experts] for name in names)
        projected = torch.baddbmm(b1.unsqueeze(1), groups.pad(x), w1)
        return groups.unpad(self._tail(projected, *params))

    # ------------------------------------------------------------- conversion
    def to_head(self, k: int) -> ProjectionHead:
        """Return a standalone :class:`ProjectionHead` holding a copy of expert ``k``'s weights.

        Parameters
        ----------
        k
            Expert index in ``[0, K)``.

        Returns
        -------
        ProjectionHead
            Independent module (weights are copied) on the same device/dtype as this module.
        """
        k = _check_expert_k(k, self.n_experts)
        head = ProjectionHead(self.in_dim, self.proj_dim, self.dropout.p)
        head = head.to(device=self.projection_weight.device, dtype=self.projection_weight.dtype)
        with torch.no_grad():
            head.projection.weight.copy_(self.projection_weight[k].T)
            head.projection.bias.copy_(self.projection_bias[k])
            head.fc.weight.copy_(self.fc_weight[k].T)
            head.fc.bias.copy_(self.fc_bias[k])
            head.layer_norm.weight.copy_(self.layer_norm_weight[k])
            head.layer_norm.bias.copy_(self.layer_norm_bias[k])
        head.train(self.training)
        return head

    @classmethod
    def from_heads(cls, heads: Sequence[ProjectionHead]) -> BatchedProjectionHead:
        """Stack the weights of separate :class:`ProjectionHead` modules.

        Parameters
        ----------
        heads
            Non-empty sequence of heads with identical dimensions and dropout.

        Returns
        -------
        BatchedProjectionHead
            Module whose expert ``k`` equals ``heads[k]`` (weights are copied).
        """
        heads = list(heads)
        if not heads:
            msg = "`heads` must contain at least one ProjectionHead."
            raise ValueError(msg)
        first = heads[0]
        for i, head in enumerate(heads):
            if not isinstance(head, ProjectionHead):
                msg = f"`heads[{i}]` must be a ProjectionHead, got {type(head).__name__}."
                raise ValueError(msg)
            if (
                head.in_dim != first.in_dim
                or head.proj_dim != first.proj_dim
                or head.dropout.p != first.dropout.p
                or head.layer_norm.eps != _LN_EPS
            ):
                msg = (
                    f"`heads[{i}]` has (in_dim, proj_dim, dropout, eps) = "
                    f"({head.in_dim}, {head.proj_dim}, {head.dropout.p}, {head.layer_norm.eps}), expected "
                    f"({first.in_dim}, {first.proj_dim}, {first.dropout.p}, {_LN_EPS})."
                )
                raise ValueError(msg)
        ref = first.projection.weight
        out = cls(len(heads), first.in_dim, first.proj_dim, first.dropout.p).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            out.projection_weight.copy_(torch.stack([h.projection.weight.T for h in heads]))
            out.projection_bias.copy_(torch.stack([h.projection.bias for h in heads]))
            out.fc_weight.copy_(torch.stack([h.fc.weight.T for h in heads]))
            out.fc_bias.copy_(torch.stack([h.fc.bias for h in heads]))
            out.layer_norm_weight.copy_(torch.stack([h.layer_norm.weight for h in heads]))
            out.layer_norm_bias.copy_(torch.stack([h.layer_norm.bias for h in heads]))
        return out

    def extra_repr(self) -> str:
        """Summarise the dimensions."""
        return f"n_experts={self.n_experts}, in_dim={self.in_dim}, proj_dim={self.proj_dim}"


def _check_expert_k(k: int, n_experts: int) -> int:
    return check_int(k, "k", low=0, high=n_experts)


class BatchedExperts(nn.Module):
    """SPADE mixture of data experts: ``K`` pairs of (image head, gene head), evaluated batched.

    Each expert ``k`` owns an image head (``image_dim -> proj_dim``) and a gene head (``gene_dim -> proj_dim``), both
    shaped like :class:`ProjectionHead`; experts share no weights. Parameters are stacked along a leading expert
    axis, so the state dict keys are stable::

        image_heads.projection_weight  (K, image_dim, proj_dim)
        image_heads.projection_bias    (K, proj_dim)
        image_heads.fc_weight          (K, proj_dim, proj_dim)
        image_heads.fc_bias            (K, proj_dim)
        image_heads.layer_norm_weight  (K, proj_dim)
        image_heads.layer_norm_bias    (K, proj_dim)
        gene_heads.*                   same, with gene_dim

    Linear weights are stored ``(in, out)``, i.e. transposed with respect to :class:`torch.nn.Linear`.

    Parameters
    ----------
    n_experts
        Number of experts ``K``.
    image_dim
        Dimension of the frozen image (patch) features.
    gene_dim
        Dimension of the gene expression vectors.
    proj_dim
        Shared embedding dimension.
    dropout
        Dropout probability inside every head.
    seed
        If given, parameters are initialised from ``torch.Generator().manual_seed(seed)``; otherwise from the global
        torch RNG (controlled by :func:`torch.manual_seed` / :func:`lightning.seed_everything`).
    """

    def __init__(
        self,
        n_experts: int,
        image_dim: int,
        gene_dim: int,
        proj_dim: int = 256,
        dropout: float = 0.1,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        self.image_heads = BatchedProjectionHead(n_experts, image_dim, proj_dim, dropout, generator=generator)
        self.gene_heads = BatchedProjectionHead(n_experts, gene_dim, proj_dim, dropout, generator=generator)

    @property
    def n_experts(self) -> int:
        """Number of experts ``K``."""
        return self.image_heads.n_experts

    @property
    def image_dim(self) -> int:
        """Image feature dimension."""
        return self.image_heads.in_dim

    @property
    def gene_dim(self) -> int:
        """Gene vector dimension."""
        return self.gene_heads.in_dim

    @property
    def proj_dim(self) -> int:
        """Embedding dimension."""
        return self.image_heads.proj_dim

    @property
    def dropout(self) -> float:
        """Dropout probability of the heads."""
        return self.image_heads.dropout.p

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments needed to rebuild this module before loading a state dict.

        Returns
        -------
        dict
            Keys ``n_experts``, ``image_dim``, ``gene_dim``, ``proj_dim`` and ``dropout``.
        """
        return {
            "n_experts": self.n_experts,
            "image_dim": self.image_dim,
            "gene_dim": self.gene_dim,
            "proj_dim": self.proj_dim,
            "dropout": self.dropout,
        }

    def image_embed(self, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """Embed image features, each row with its own expert.

        Parameters
        ----------
        x
            Image features ``(B, image_dim)``.
        expert_idx
            Integer tensor ``(B,)``, expert of each row.

        Returns
        -------
        torch.Tensor
            Image embeddings ``(B, proj_dim)``.
        """
        return self.image_heads(x, expert_idx)

    def gene_embed(self, y: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """Embed gene vectors, each row with its own expert.

        Parameters
        ----------
        y
            Gene expression ``(B, gene_dim)``.
        expert_idx
            Integer tensor ``(B,)``, expert of each row.

        Returns
        -------
        torch.Tensor
            Gene embeddings ``(B, proj_dim)``.
        """
        return self.gene_heads(y, expert_idx)

    def image_embed_all(self, x: torch.Tensor) -> torch.Tensor:
        """Embed image features with every expert at once.

        Parameters
        ----------
        x
            Image features ``(B, image_dim)``.

        Returns
        -------
        torch.Tensor
            Embeddings ``(B, K, proj_dim)``.
        """
        return self.image_heads.forward_all(x)

    def gene_embed_all(self, y: torch.Tensor) -> torch.Tensor:
        """Embed gene vectors with every expert at once.

        Parameters
        ----------
        y
            Gene expression ``(B, gene_dim)``.

        Returns
        -------
        torch.Tensor
            Embeddings ``(B, K, proj_dim)``.
        """
        return self.gene_heads.forward_all(y)

    def forward(self, x: torch.Tensor, y: torch.Tensor, expert_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed paired image features and gene vectors with the experts given per row.

        Parameters
        ----------
        x
            Image features ``(B, image_dim)``.
        y
            Gene expression ``(B, gene_dim)``.
        expert_idx
            Integer tensor ``(B,)``.

        Returns
        -------
        tuple of torch.Tensor
            ``(image_embeddings, gene_embeddings)``, each ``(B, proj_dim)``.
        """
        return self.image_embed(x, expert_idx), self.gene_embed(y, expert_idx)

    def head(self, k: int) -> tuple[ProjectionHead, ProjectionHead]:
        """Return expert ``k`` as two standalone :class:`ProjectionHead` modules (weights copied).

        Parameters
        ----------
        k
            Expert index in ``[0, K)``.

        Returns
        -------
        tuple of ProjectionHead
            ``(image_head, gene_head)``.
        """
        return self.image_heads.to_head(k), self.gene_heads.to_head(k)

    @classmethod
    def from_heads(cls, heads: Sequence[tuple[ProjectionHead, ProjectionHead]]) -> BatchedExperts:
        """Build a batched mixture from separate ``(image_head, gene_head)`` pairs.

        Parameters
        ----------
        heads
            Non-empty sequence of ``(image_head, gene_head)`` pairs; all image heads (resp. gene heads) must have the
            same dimensions, and all heads the same ``proj_dim`` and dropout.

        Returns
        -------
        BatchedExperts
            Module whose expert ``k`` equals ``heads[k]`` (weights are copied).
        """
        pairs = list(heads)
        if not pairs or any(not isinstance(p, tuple | list) or len(p) != 2 for p in pairs):
            msg = "`heads` must be a non-empty sequence of (image_head, gene_head) pairs."
            raise ValueError(msg)
        image = BatchedProjectionHead.from_heads([p[0] for p in pairs])
        gene = BatchedProjectionHead.from_heads([p[1] for p in pairs])
        if image.proj_dim != gene.proj_dim or image.dropout.p != gene.dropout.p:
            msg = "`heads`: image and gene heads must share proj_dim and dropout."
            raise ValueError(msg)
        ref = image.projection_weight
        out = cls(len(pairs), image.in_dim, gene.in_dim, image.proj_dim, image.dropout.p).to(
            device=ref.device, dtype=ref.dtype
        )
        out.image_heads.load_state_dict(image.state_dict())
        out.gene_heads.load_state_dict(gene.state_dict())
        return out


ExpertHeads = BatchedExperts
"""Alias of :class:`BatchedExperts`."""

"""Routing of image features to data experts and mixture embeddings."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from .._constants import ROUTINGS
from .._validation import check_choice, check_int

if TYPE_CHECKING:
    from ._experts import BatchedExperts

logger = logging.getLogger(__name__)

__all__ = ["ROUTING_MODES", "align", "expert_alignment", "mixture_embed", "route", "scale_aware_tau"]

#: The routing strategies (``spade_sc._constants.ROUTINGS``).
ROUTING_MODES = ROUTINGS
DEFAULT_CHUNK_SIZE = 4096


def scale_aware_tau(features: Any, centroids: Any, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """A soft-routing temperature at the scale of the features: the median nearest-centroid gap.

    The gap of a row is the difference between its distances to its nearest and its second-nearest centroid. With
    it the median row gives its second-nearest centroid ``e^-1`` of the weight of its nearest, so soft routing is
    soft: a fixed ``tau = 0.1`` on EfficientNet-Lite0 features (median gap about 0.8 on her2st) gives ``e^-8``,
    i.e. hard routing. One centroid (or gaps of 0): 1.0.

    Parameters
    ----------
    features
        ``(N, D)`` features (e.g. the training pairs' image features).
    centroids
        ``(C, D)`` step-1 centroids.
    chunk_size
        Rows per distance computation.

    Returns
    -------
    float
        The temperature, > 0.
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    c = torch.as_tensor(np.asarray(centroids, dtype=np.float32))
    if c.shape[0] < 2 or x.shape[0] == 0:
        return 1.0
    gaps = []
    for start in range(0, x.shape[0], chunk_size):
        two = torch.cdist(x[start : start + chunk_size], c).topk(2, dim=1, largest=False).values
        gaps.append(two[:, 1] - two[:, 0])
    tau = float(torch.cat(gaps).median())
    return tau if np.isfinite(tau) and tau > 0 else 1.0


def route(
    features: torch.Tensor,
    centroids: torch.Tensor,
    centroid_expert: torch.Tensor,
    n_experts: int,
    mode: Literal["soft", "hard", "uniform"] = "soft",
    tau: float = 0.1,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    row_group: torch.Tensor | None = None,
    centroid_group: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute per-row expert weights from distances to the step-1 cluster centroids.

    Let ``d[i, c]`` be the Euclidean distance of ``features[i]`` to ``centroids[c]``.

    - ``"soft"``: ``softmax(-d / tau)`` over centroids, then summed per expert (``centroid_expert``).
    - ``"hard"``: one-hot on the expert of the nearest centroid.
    - ``"uniform"``: ``1 / n_experts`` everywhere.

    Parameters
    ----------
    features
        Image features ``(N, D)``.
    centroids
        Centroids ``(C, D)`` in the same feature space.
    centroid_expert
        Integer tensor ``(C,)`` mapping each centroid to its expert in ``[0, n_experts)``.
    n_experts
        Number of experts ``K``.
    mode
        One of ``"soft"``, ``"hard"``, ``"uniform"``.
    tau
        Softmax temperature of ``"soft"`` (``> 0``).
    chunk_size
        Rows processed at once (bounds the ``chunk_size x C`` distance matrix).
    row_group, centroid_group
        Optional integer group (tissue) of each row ``(N,)`` and of each centroid ``(C,)``: a row of group ``g >= 0``
        is routed only among the centroids of group ``g`` (``"uniform"``: evenly over the experts owning them); a row
        of group -1 among all centroids.

    Returns
    -------
    torch.Tensor
        Float tensor ``(N, K)`` whose rows sum to 1, on the device of ``features``.
    """
    check_choice(mode, "mode", ROUTING_MODES)
    check_int(n_experts, "n_experts")
    chunk_size = check_int(chunk_size, "chunk_size")
    features = torch.as_tensor(features)
    if features.ndim != 2:
        msg = f"`features` must be 2-D (N, D), got shape {tuple(features.shape)}."
        raise ValueError(msg)
    dtype = features.dtype if torch.is_floating_point(features) else torch.get_default_dtype()
    n = features.shape[0]
    grouped = row_group is not None
    if grouped:
        row_group = torch.as_tensor(row_group, device=features.device).long()
        centroid_group = torch.as_tensor(centroid_group, device=features.device).long()
        if row_group.shape != (n,) or centroid_group.ndim != 1:
            msg = f"`row_group` must have shape ({n},) and `centroid_group` one entry per centroid."
            raise ValueError(msg)
    if mode == "uniform" and grouped:
        owned = torch.zeros(int(centroid_group.max()) + 1, n_experts, dtype=dtype, device=features.device)
        owned[centroid_group, torch.as_tensor(centroid_expert, device=features.device).long()] = 1.0
        out = torch.full((n, n_experts), 1.0 / n_experts, dtype=dtype, device=features.device)
        known = row_group >= 0
        out[known] = owned[row_group[known]] / owned[row_group[known]].sum(1, keepdim=True)
        return out
    if mode == "uniform":
        return torch.full((n, n_experts), 1.0 / n_experts, dtype=dtype, device=features.device)
    if mode == "soft" and not tau > 0:
        msg = f"`tau` must be > 0, got {tau!r}."
        raise ValueError(msg)
    centroids = torch.as_tensor(centroids).to(device=features.device, dtype=dtype)
    if centroids.ndim != 2 or centroids.shape[1] != features.shape[1] or centroids.shape[0] == 0:
        msg = f"`centroids` must have shape (C>0, {features.shape[1]}), got {tuple(centroids.shape)}."
        raise ValueError(msg)
    centroid_expert = torch.as_tensor(centroid_expert, device=features.device)
    if centroid_expert.shape != (centroids.shape[0],) or torch.is_floating_point(centroid_expert):
        msg = f"`centroid_expert` must be an integer tensor of shape ({centroids.shape[0]},)."
        raise ValueError(msg)
    if int(centroid_expert.min()) < 0 or int(centroid_expert.max()) >= n_experts:
        msg = f"`centroid_expert` values must lie in [0, {n_experts}) (n_experts={n_experts})."
        raise ValueError(msg)
    centroid_expert = centroid_expert.long()
    out = torch.zeros(n, n_experts, dtype=dtype, device=features.device)
    for start in range(0, n, chunk_size):
        chunk = features[start : start + chunk_size].to(dtype)
        dist = torch.cdist(chunk, centroids, compute_mode="donot_use_mm_for_euclid_dist")
        if grouped:
            rows = row_group[start : start + chunk_size, None]
            dist = dist.masked_fill((rows >= 0) & (rows != centroid_group[None, :]), float("inf"))
        if mode == "soft":
            w = torch.softmax(-dist / tau, dim=1)
            out[start : start + chunk.shape[0]].index_add_(1, centroid_expert, w)
        else:
            nearest_expert = centroid_expert[dist.argmin(dim=1)]
            out[start + torch.arange(chunk.shape[0], device=features.device), nearest_expert] = 1.0
    return out


def align(embeddings: torch.Tensor, rotations: torch.Tensor | None) -> torch.Tensor:
    """Every expert's embeddings ``(B, K, d)`` in the common space: expert ``k``'s times its ``(d, d)`` rotation.

    ``rotations`` None (a single expert, or a model without alignment): the embeddings as they are.
    """
    if rotations is None:
        return embeddings
    return torch.einsum("bkd,kde->bke", embeddings, rotations.to(embeddings))


def expert_alignment(
    gene_embeddings: torch.Tensor, *, max_iter: int = 100, tol: float = 1e-10, max_rows: int = 4096
) -> torch.Tensor:
    """Orthogonal rotations that put the experts' embedding spaces into one (generalised Procrustes).

    The experts share no weights, so each learns its own 256-d coordinate system: the same expression lands on
    unrelated coordinates in two experts, and a mixture's embedding superimposes unrelated spaces (a linear read-out
    of it fits one map to all of them). Every expert's gene head embeds the same expression vectors; the rotation
    ``R_k`` minimising ``sum_k ||G_k R_k - T||^2`` with ``T`` the mean of the rotated ``G_k R_k`` (alternating
    orthogonal Procrustes steps until ``T`` stops moving) aligns them. Rotations keep every distance and cosine within
    an expert, so each expert's contrastive geometry is unchanged.

    Parameters
    ----------
    gene_embeddings
        ``(N, K, d)``: every expert's gene embedding of the same ``N`` expression vectors (the training pairs).
    max_iter, tol
        Iterations at most, and the relative change of ``T`` that ends them.
    max_rows
        Above this many rows, evenly spaced rows are used: ``d x d`` rotations are well determined by a few
        thousand rows, and each iteration costs ``rows x K x d^2`` (16 experts x 32,768 pairs took minutes, 4,096
        rows about 10 s on one CPU thread).

    Returns
    -------
    torch.Tensor
        ``(K, d, d)`` float32 orthogonal matrices (right-multiplied: ``aligned = embedding @ R_k``).
    """
    g = gene_embeddings.detach().cpu()
    if g.shape[0] > max_rows:
        g = g[torch.linspace(0, g.shape[0] - 1, max_rows).round().long()]
    g = g.double()
    n_experts, dim = g.shape[1], g.shape[2]
    rotations = torch.eye(dim, dtype=torch.float64).repeat(n_experts, 1, 1)
    target = g.mean(dim=1)
    for _ in range(max_iter):
        u, _, vh = torch.linalg.svd(torch.einsum("nkd,ne->kde", g, target))
        rotations = u @ vh
        new = align(g, rotations).mean(dim=1)
        change = float((new - target).norm() / target.norm().clamp_min(1e-30))
        target = new
        if change < tol:
            break
    return rotations.float()


def mixture_embed(
    experts: BatchedExperts,
    features: torch.Tensor,
    weights: torch.Tensor,
    *,
    rotations: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Mixture-of-experts image embedding ``sum_k w_k f_k(x) R_k``.

    Uses :meth:`BatchedExperts.image_embed_all` on chunks of rows. With one-hot (``"hard"``) weights this is exactly the
    chosen expert's embedding; with uniform weights it is the mean over experts. The module's train/eval mode and the
    autograd mode are left to the caller (wrap in :func:`torch.no_grad` and call ``experts.eval()`` for inference).

    Parameters
    ----------
    experts
        The trained experts.
    features
        Image features ``(N, image_dim)``; each chunk is moved to the experts' device.
    weights
        Routing weights ``(N, K)``, e.g. from :func:`route`.
    rotations
        ``(K, d, d)`` rotations into the experts' common space (:func:`expert_alignment`); None: none.
    chunk_size
        Rows processed at once.

    Returns
    -------
    torch.Tensor
        Embeddings ``(N, proj_dim)`` on the device of ``features``.
    """
    chunk_size = check_int(chunk_size, "chunk_size")
    features = torch.as_tensor(features)
    weights = torch.as_tensor(weights)
    if features.ndim != 2:
        msg = f"`features` must be 2-D (N, D), got shape {tuple(features.shape)}."
        raise ValueError(msg)
    if weights.shape != (features.shape[0], experts.n_experts):
        msg = f"`weights` must have shape ({features.shape[0]}, {experts.n_experts}), got {tuple(weights.shape)}."
        raise ValueError(msg)
    param = experts.image_heads.projection_weight
    chunks = []
    for start in range(0, features.shape[0], chunk_size):
        x = features[start : start + chunk_size].to(device=param.device)
        w = weights[start : start + chunk_size].to(device=param.device, dtype=param.dtype)
        # elementwise product + sum (rather than a matmul) keeps one-hot weights exact
        emb = (w.unsqueeze(-1) * align(experts.image_embed_all(x), rotations)).sum(dim=1)
        chunks.append(emb.to(features.device))
    if not chunks:
        return torch.zeros(0, experts.proj_dim, dtype=param.dtype, device=features.device)
    return torch.cat(chunks)

"""Routing of image features to data experts and mixture embeddings."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import torch

from .._constants import ROUTINGS
from .._validation import check_choice, check_int

if TYPE_CHECKING:
    from ._experts import BatchedExperts

logger = logging.getLogger(__name__)

__all__ = ["ROUTING_MODES", "mixture_embed", "route"]

#: The routing strategies (``spade_sc._constants.ROUTINGS``).
ROUTING_MODES = ROUTINGS
DEFAULT_CHUNK_SIZE = 4096


def route(
    features: torch.Tensor,
    centroids: torch.Tensor,
    centroid_expert: torch.Tensor,
    n_experts: int,
    mode: Literal["soft", "hard", "uniform"] = "soft",
    tau: float = 0.1,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
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
        if mode == "soft":
            w = torch.softmax(-dist / tau, dim=1)
            out[start : start + chunk.shape[0]].index_add_(1, centroid_expert, w)
        else:
            nearest_expert = centroid_expert[dist.argmin(dim=1)]
            out[start + torch.arange(chunk.shape[0], device=features.device), nearest_expert] = 1.0
    return out


def mixture_embed(
    experts: BatchedExperts,
    features: torch.Tensor,
    weights: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Mixture-of-experts image embedding ``sum_k w_k f_k(x)``.

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
        emb = (w.unsqueeze(-1) * experts.image_embed_all(x)).sum(dim=1)
        chunks.append(emb.to(features.device))
    if not chunks:
        return torch.zeros(0, experts.proj_dim, dtype=param.dtype, device=features.device)
    return torch.cat(chunks)

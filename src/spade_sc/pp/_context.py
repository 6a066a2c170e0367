"""Spatial context: each spot's features next to the mean features of its ring of neighbours."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import Spots, features_matrix, resolve_spots, shape_centres
from .._version import __version__
from ._features import _check_free

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

#: Default neighbourhood radius, in units of the spot spacing (the median distance to the nearest spot): the first
#: ring of a Visium hexagon (6 spots at 1.0) or of a square ST grid (4 at 1.0, 4 diagonal at 1.41).
CONTEXT_RADIUS = 1.6


def check_radius(radius: Any) -> float:
    """``radius`` as a positive float, or a ValueError naming it."""
    number = isinstance(radius, int | float | np.number) and not isinstance(radius, bool)
    if not (number and 0 < radius < np.inf):
        msg = f"The spatial-context radius must be a positive number (in units of the spot spacing), got {radius!r}."
        raise ValueError(msg)
    return float(radius)


def spot_centres(spots: Spots) -> np.ndarray:
    """(n_obs, 2) centres of the table's rows in the shapes' own coordinates (NaN for rows of other regions)."""
    rows, pos = spots.instances()
    xy = np.full((spots.table.n_obs, 2), np.nan)
    xy[rows] = shape_centres(spots.shapes, spots.shapes_key)[pos]
    return xy


def context_features(features: np.ndarray, xy: np.ndarray, radius: float = CONTEXT_RADIUS) -> tuple[np.ndarray, dict]:
    """``[features, mean features of the neighbours]`` (n, 2 d) and a record of the neighbourhood.

    Neighbours of a spot are the other spots within ``radius`` times the spacing (the median distance from a spot
    to its nearest spot). A spot without neighbours (or a slide of one spot) gets its own features as context. Rows
    with missing features or centres (NaN: rows of other regions) stay NaN and are nobody's neighbour.
    """
    from sklearn.neighbors import NearestNeighbors, radius_neighbors_graph

    feats = np.asarray(features, dtype=np.float32)
    ok = np.isfinite(feats).all(1) & np.isfinite(xy).all(1)
    out = np.full((len(feats), 2 * feats.shape[1]), np.nan, dtype=np.float32)
    x, p = feats[ok], np.asarray(xy, dtype=float)[ok]
    spacing, mean_n = float("nan"), 0.0
    ctx = x.copy()
    if len(x) >= 2:
        dist, _ = NearestNeighbors(n_neighbors=2).fit(p).kneighbors(p)
        spacing = float(np.median(dist[:, 1]))
        if spacing > 0:
            graph = radius_neighbors_graph(p, radius * spacing, include_self=False).tocsr()
            n = np.asarray(graph.sum(1)).ravel()
            has = n > 0
            ctx[has] = (graph[has] @ x) / n[has, None]
            mean_n = float(n.mean())
    out[ok] = np.concatenate([x, ctx], axis=1)
    return out, {"radius": float(radius), "spacing": spacing, "mean_neighbours": mean_n}


def spatial_context(
    sdata: SpatialData,
    *,
    features_key: str,
    radius: float = CONTEXT_RADIUS,
    table_key: str | None = None,
    shapes_key: str | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> np.ndarray | None:
    """Give every spot the features of its neighbourhood: ``[own features, mean over the ring of neighbours]``.

    Expression varies smoothly across tissue, and a single patch sees little of it; the spots around a spot show
    the tissue it sits in (as Hist2ST or THItoGene use context). :func:`spade_sc.tl.fit` does the same internally
    with ``spatial_context=`` (its default), so a SPADE model takes its spots in context; this function writes that
    input as a representation of its own, e.g. to compare with SPADE (the ``"base + context"`` control of
    ``benchmarks/README.md``) or to read out directly.

    Neighbours are the other spots of the same shapes element within ``radius`` times the spot spacing (the median
    distance from a spot to its nearest spot), measured between circle centres or polygon centroids in the shapes'
    own coordinates: no pixel size is needed, and tiles work like spots. A spot without neighbours gets its own
    features as context.

    Parameters
    ----------
    sdata
        The SpatialData holding the spots and their table.
    features_key
        ``obsm`` key of the features (e.g. ``"X_efficientnet_lite0"`` from :func:`spade_sc.pp.image_features`).
    radius
        Neighbourhood radius in units of the spot spacing (default 1.6: the first ring of neighbours on Visium
        and ST grids).
    table_key, shapes_key
        The spot table and shapes, when the slide holds several.
    key_added
        Key of the result; default ``f"{features_key}_context"``.
    overwrite
        Replace an existing ``obsm[key_added]``.
    inplace
        Write into ``sdata`` (return None) or return the array and write nothing.

    Returns
    -------
    With ``inplace=False``, the (n_obs, 2 d) float32 array. Otherwise None, and writes

    - ``tables[t].obsm[key_added]``: the (n_obs, 2 d) float32 features, own features first, then the neighbours'
      mean (NaN for rows of other regions or with missing features);
    - ``tables[t].uns[key_added]``: ``features_key``, ``radius``, ``spacing`` (the median nearest-spot distance),
      ``mean_neighbours`` and ``spade_sc_version``.
    """
    radius = check_radius(radius)
    spots = resolve_spots(sdata, table_key, shapes_key)
    key = key_added or f"{features_key}_context"
    if inplace:
        _check_free(spots, key, overwrite)
    feats = features_matrix(spots.table, features_key, where=f"table {spots.table_key!r}", finite=False)
    out, record = context_features(feats, spot_centres(spots), radius)
    if not inplace:
        return out
    spots.table.obsm[key] = out
    spots.table.uns[key] = {"features_key": features_key, **record, "spade_sc_version": __version__}
    return None

"""Data experts of a cohort: :func:`build_experts` and :func:`expert_elbow` (the k-means itself: :mod:`spade_sc.model`).

The two-step k-means runs on the image features of every spot of every slide; the result,
:class:`~spade_sc.model.DataExperts`, is written back as each spot's expert. The numeric core (numpy in, numpy out)
lives in ``spade_sc.model._kmeans``; this module resolves the tables, checks the features and tissues, and writes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Keys
from .._sdata import as_cohort, check_finite, check_same_dimension, features_matrix, resolve_table
from .._validation import MIN_PAIRS, check_int, check_ints, uns_safe
from ..model._kmeans import ALL_TISSUES, N_INIT_STEP1, DataExperts, _groups, _kmeans, _n_rows, _step2, two_step_kmeans

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

#: ``{slide id: (table key, table)}``: the tables of a cohort, resolved.
Tables = Mapping[str, tuple[str, "AnnData"]]


def slide_tissues(tables: Tables, slides: Mapping[str, SpatialData], tissue_key: str | None) -> dict[str, np.ndarray]:
    """Tissue of every row of every table, from an obs column or a per-slide attribute."""
    if tissue_key is None:
        return {sid: np.full(t.n_obs, ALL_TISSUES) for sid, (_, t) in tables.items()}
    has_col = {sid: tissue_key in t.obs.columns for sid, (_, t) in tables.items()}
    if any(has_col.values()):
        lacking = [sid for sid in tables if not has_col[sid]]
        if lacking:
            msg = (
                f"tissue_key={tissue_key!r} is an obs column of some tables but is missing from the tables of "
                f"slide(s): {lacking}."
            )
            raise KeyError(msg)
        out = {}
        for sid, (tkey, t) in tables.items():
            col = t.obs[tissue_key]
            if col.isna().any():
                msg = (
                    f"Slide {sid!r}, table {tkey!r}: obs[{tissue_key!r}] is missing for {int(col.isna().sum())} "
                    "spot(s); every spot needs a tissue."
                )
                raise ValueError(msg)
            out[sid] = col.astype(str).to_numpy()
        return out
    attrs = {sid: s.attrs.get(Keys.ATTRS, {}).get(Keys.SLIDE, {}) for sid, s in slides.items()}
    in_attrs = {sid: tissue_key in a for sid, a in attrs.items()}
    if not any(in_attrs.values()):
        some_sid, (_, some_table) = next(iter(tables.items()))
        msg = (
            f"tissue_key={tissue_key!r} is neither an obs column of the tables nor a per-slide attribute "
            f"(sdata.attrs[{Keys.ATTRS!r}]['slide']). Obs columns of slide {some_sid!r}: "
            f"{list(some_table.obs.columns)}; slide attributes: {sorted(attrs[some_sid])}."
        )
        raise KeyError(msg)
    lacking = [sid for sid, ok in in_attrs.items() if not ok]
    if lacking:
        msg = f"tissue_key={tissue_key!r} is a per-slide attribute of some slides but is missing from: {lacking}."
        raise KeyError(msg)
    out = {}
    for sid, (_, t) in tables.items():
        value = attrs[sid][tissue_key]
        if value is None or not np.isscalar(value):
            msg = f"Slide {sid!r}: attrs[{Keys.ATTRS!r}]['slide'][{tissue_key!r}] = {value!r} is not a scalar tissue."
            raise ValueError(msg)
        out[sid] = np.full(t.n_obs, str(value))
    return out


def cohort_features(tables: Tables, features_key: str) -> dict[str, np.ndarray]:
    """The checked features ``obsm[features_key]`` of every table, of one dimension across slides."""
    hint = "Compute features first (spade_sc.pp.image_features)."
    where = {sid: f"Slide {sid!r}, table {tkey!r}" for sid, (tkey, _) in tables.items()}
    feats = {
        sid: features_matrix(t, features_key, where=where[sid], hint=hint, finite=False)
        for sid, (_, t) in tables.items()
    }
    check_same_dimension({sid: x.shape[1] for sid, x in feats.items()}, features_key)
    return {sid: check_finite(x, features_key, where=where[sid]) for sid, x in feats.items()}


def experts_of_tables(
    tables: Tables,
    slides: Mapping[str, SpatialData],
    feats: Mapping[str, np.ndarray],
    *,
    tissue_key: str | None,
    n_clusters_per_tissue: int,
    n_experts: int,
    seed: int,
    minibatch_threshold: int,
    assign: bool = True,
    per_tissue: bool = False,
) -> tuple[DataExperts, dict[str, np.ndarray] | None]:
    """The core of :func:`build_experts` on resolved tables and checked features; writes nothing.

    Returns the experts and, with ``assign``, the expert of every row of every table; logs the spots per expert
    (INFO) and the experts with fewer spots than a contrastive batch needs (WARNING, see :func:`log_expert_sizes`).
    """
    features, tissues, order = _sorted_by_tissue(tables, slides, feats, tissue_key)
    experts, labels_sorted = two_step_kmeans(
        features,
        tissues,
        n_clusters_per_tissue=int(n_clusters_per_tissue),
        n_experts=int(n_experts),
        seed=int(seed),
        minibatch_threshold=int(minibatch_threshold),
        assign=assign,
        per_tissue=per_tissue,
    )
    if not assign:
        return experts, None
    labels = np.empty_like(labels_sorted)
    labels[order] = labels_sorted
    bounds = np.cumsum([0, *(t.n_obs for _, t in tables.values())])
    log_expert_sizes(labels, experts.n_experts)
    return experts, {sid: labels[bounds[i] : bounds[i + 1]] for i, sid in enumerate(tables)}


def log_expert_sizes(labels: np.ndarray, n_experts: int) -> None:
    """Log the cohort's spots per expert (INFO) and the experts too small to train (WARNING).

    An expert with fewer than 2 spots (:data:`~spade_sc._validation.MIN_PAIRS`) can never form a contrastive batch:
    :func:`spade_sc.tl.fit` cannot train it, and its heads keep their random initial weights. Training logs again,
    per expert, what it does with the pairs of the training slides (see ``spade_sc.model._lightning``).
    """
    counts = np.bincount(labels, minlength=n_experts)
    logger.info(
        "data experts: spots per expert %s (smallest: expert %d, %d spot(s))",
        counts.tolist(),
        int(counts.argmin()),
        int(counts.min()),
    )
    small = np.flatnonzero(counts < MIN_PAIRS)
    if small.size:
        logger.warning(
            "Data expert(s) %s of %d hold fewer than %d spots of the cohort (%s): a contrastive batch needs %d pairs "
            "of one expert, so spade_sc.tl.fit cannot train them and their heads would keep their random initial "
            "weights. Lower n_experts.",
            small.tolist(),
            n_experts,
            MIN_PAIRS,
            counts[small].tolist(),
            MIN_PAIRS,
        )


def _sorted_by_tissue(
    tables: Tables, slides: Mapping[str, SpatialData], feats: Mapping[str, np.ndarray], tissue_key: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cohort's features with rows sorted by tissue, their tissues, and the order of the rows.

    Features are ``(N, D)`` float32, each tissue a contiguous block; ``features[i]`` is row ``order[i]`` of the rows
    concatenated in slide order.
    """
    tissues_by_slide = slide_tissues(tables, slides, tissue_key)
    tissues_all = np.concatenate([tissues_by_slide[sid] for sid in tables])
    n_total = tissues_all.size
    if n_total == 0:
        msg = "The cohort's tables hold no spots."
        raise ValueError(msg)
    order = np.argsort(tissues_all, kind="stable")
    position = np.empty(n_total, dtype=np.int64)
    position[order] = np.arange(n_total)
    features = np.empty((n_total, next(iter(feats.values())).shape[1]), dtype=np.float32)
    start = 0
    for sid in tables:
        stop = start + len(feats[sid])
        features[position[start:stop]] = feats[sid]
        start = stop
    return features, tissues_all[order], order


def _resolve(
    cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData], table_key: str | None
) -> tuple[dict[str, SpatialData], dict[str, tuple[str, AnnData]]]:
    slides = as_cohort(cohort)
    tables = {sid: (tkey := resolve_table(sdata, table_key), sdata.tables[tkey]) for sid, sdata in slides.items()}
    return slides, tables


def build_experts(
    cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData],
    *,
    features_key: str,
    tissue_key: str | None = None,
    n_clusters_per_tissue: int = 16,
    n_experts: int = 16,
    table_key: str | None = None,
    seed: int = 0,
    minibatch_threshold: int = 200_000,
    inplace: bool = True,
) -> DataExperts:
    """Build SPADE's data experts by two-step k-means on image features.

    Step 1 clusters the features of each tissue type into ``n_clusters_per_tissue`` clusters (a tissue with fewer
    spots gets one cluster per spot, with a warning); step 2 clusters all step-1 centroids into ``n_experts``
    experts. Each spot belongs to the expert of its nearest step-1 centroid among all of them, as in hard routing at
    inference. Step 1 uses :class:`~sklearn.cluster.KMeans` (``n_init=3``), or
    :class:`~sklearn.cluster.MiniBatchKMeans` (batch 4096, ``n_init=3``) for a tissue of more than
    ``minibatch_threshold`` spots; step 2 uses KMeans with ``n_init=10``. All use ``random_state=seed``: the same
    cohort and seed give the same experts. Everything is validated before anything is written.

    Parameters
    ----------
    cohort
        One SpatialData, a mapping ``{slide id: SpatialData}`` or a sequence of them.
    features_key
        ``obsm`` key of the image features in every table (e.g. ``"X_uni"``).
    tissue_key
        Tissue type of each spot: an ``obs`` column present in every table, or, when no table has such a column, a
        per-slide attribute ``sdata.attrs["spade_sc"]["slide"][tissue_key]`` (e.g. ``"organ"``). None: one group.
    n_clusters_per_tissue
        Step-1 clusters per tissue (``k``).
    n_experts
        Number of experts (``K``); at most the number of step-1 centroids.
    table_key
        The table in each SpatialData; may be omitted when each holds exactly one table.
    seed
        Random state of every k-means.
    minibatch_threshold
        Step-1 groups with more spots than this use MiniBatchKMeans.
    inplace
        Whether to write the experts into the tables.

    Returns
    -------
    DataExperts
        The step-1 centroids, their tissue and expert, and the parameters (see :class:`DataExperts`). When
        ``inplace``, also writes into every table ``t``:

        - ``tables[t].obs["spade_expert"]``: expert of each spot, categorical with categories ``"0"`` ..
          ``"K-1"`` (all present, even when empty);
        - ``tables[t].uns["spade_experts"]``: ``params`` (``features_key``, ``tissue_key``, ``n_experts``,
          ``n_centroids`` and the entries of :attr:`DataExperts.params`) and ``counts`` (spots per expert in this
          table).
    """
    check_int(n_clusters_per_tissue, "n_clusters_per_tissue")
    check_int(n_experts, "n_experts")
    check_int(minibatch_threshold, "minibatch_threshold", low=0)
    slides, tables = _resolve(cohort, table_key)
    feats = cohort_features(tables, features_key)
    experts, labels = experts_of_tables(
        tables,
        slides,
        feats,
        tissue_key=tissue_key,
        n_clusters_per_tissue=n_clusters_per_tissue,
        n_experts=n_experts,
        seed=seed,
        minibatch_threshold=minibatch_threshold,
        assign=inplace,
    )
    experts.features_key = features_key
    experts.tissue_key = tissue_key
    if inplace:
        write_experts(tables, experts, labels)
    return experts


def write_experts(tables: Tables, experts: DataExperts, labels: Mapping[str, np.ndarray]) -> None:
    """Write each table's experts: ``obs["spade_expert"]`` and ``uns["spade_experts"]`` (see :func:`build_experts`)."""
    categories = [str(k) for k in range(experts.n_experts)]
    params = uns_safe(
        {
            "features_key": experts.features_key,
            "tissue_key": experts.tissue_key,
            "n_experts": experts.n_experts,
            "n_centroids": experts.n_centroids,
            **experts.params,
        }
    )
    for sid, (tkey, t) in tables.items():
        lab = labels[sid]
        t.obs[Keys.EXPERT] = pd.Categorical.from_codes(lab, categories=categories)
        counts = np.bincount(lab, minlength=experts.n_experts)
        t.uns[Keys.EXPERTS] = {"params": dict(params), "counts": counts.astype(np.int64)}
        logger.debug("experts: slide %s, table %s: spots per expert %s", sid, tkey, counts.tolist())


def expert_elbow(
    cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData],
    *,
    features_key: str,
    tissue_key: str | None = None,
    k_values: Sequence[int] = (4, 8, 16, 32, 64, 128),
    n_experts_values: Sequence[int] | None = None,
    n_clusters_per_tissue: int = 16,
    table_key: str | None = None,
    seed: int = 0,
    minibatch_threshold: int = 200_000,
) -> pd.DataFrame:
    """Within-cluster sums of squares (WCSS) of both clustering steps over a range of cluster numbers.

    For the elbow plots that choose ``k`` and ``K`` (:func:`spade_sc.pl.elbow`). Step 1: k-means of each tissue's
    features for every ``k`` in ``k_values`` (values above the tissue's number of spots are skipped with a warning).
    Step 2: k-means over the step-1 centroids obtained with ``n_clusters_per_tissue`` clusters per tissue, for every
    ``K`` in ``n_experts_values`` (default: ``k_values``; values above the number of centroids are skipped with a
    warning). Same algorithms and seeds as :func:`build_experts`. Nothing is written.

    Parameters
    ----------
    cohort
        One SpatialData, a mapping ``{slide id: SpatialData}`` or a sequence of them.
    features_key
        ``obsm`` key of the image features in every table.
    tissue_key
        As in :func:`build_experts`.
    k_values
        Step-1 cluster numbers.
    n_experts_values
        Step-2 cluster numbers; defaults to ``k_values``.
    n_clusters_per_tissue
        Step-1 clusters per tissue whose centroids step 2 clusters.
    table_key
        The table in each SpatialData; may be omitted when each holds exactly one table.
    seed
        Random state of every k-means.
    minibatch_threshold
        Step-1 groups with more spots than this use MiniBatchKMeans.

    Returns
    -------
    pandas.DataFrame
        One row per clustering, columns ``step`` (``"tissue"`` or ``"experts"``), ``tissue`` (the tissue, or
        ``"all"`` for step 2), ``k`` and ``wcss``.
    """
    k_values = sorted(set(check_ints(k_values, "k_values")))
    n_experts_values = (
        k_values if n_experts_values is None else sorted(set(check_ints(n_experts_values, "n_experts_values")))
    )
    check_int(n_clusters_per_tissue, "n_clusters_per_tissue")
    slides, tables = _resolve(cohort, table_key)
    features, tissues, _ = _sorted_by_tissue(tables, slides, cohort_features(tables, features_key), tissue_key)
    rows = []
    cents = []
    for t, idx in _groups(tissues).items():
        n_t = _n_rows(idx)
        x = features[idx]
        skipped = [k for k in k_values if k > n_t]
        if skipped:
            warnings.warn(
                f"expert_elbow: tissue {t!r} has {n_t} spot(s); skipping k={skipped}.", UserWarning, stacklevel=2
            )
        fitted = {}
        for k in [k for k in k_values if k <= n_t]:
            c, wcss, _ = _kmeans(x, k, seed=seed, n_init=N_INIT_STEP1, minibatch_threshold=minibatch_threshold)
            fitted[k] = c
            rows.append({"step": "tissue", "tissue": t, "k": k, "wcss": wcss})
        k_step1 = min(n_clusters_per_tissue, n_t)
        if k_step1 not in fitted:
            fitted[k_step1] = _kmeans(
                x, k_step1, seed=seed, n_init=N_INIT_STEP1, minibatch_threshold=minibatch_threshold
            )[0]
        cents.append(fitted[k_step1])
    centroids = np.concatenate(cents, axis=0)
    skipped = [k for k in n_experts_values if k > len(centroids)]
    if skipped:
        warnings.warn(
            f"expert_elbow: {len(centroids)} step-1 centroids; skipping n_experts={skipped}.", UserWarning, stacklevel=2
        )
    for k in [k for k in n_experts_values if k <= len(centroids)]:
        model = _step2(centroids, k, seed)
        rows.append({"step": "experts", "tissue": ALL_TISSUES, "k": k, "wcss": float(model.inertia_)})
    df = pd.DataFrame(rows, columns=["step", "tissue", "k", "wcss"])
    return df.astype({"k": np.int64, "wcss": np.float64})

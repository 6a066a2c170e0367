"""Data experts: two-step k-means on image features (SPADE, section 3 of the method).

1. **Step 1**: k-means with ``n_clusters_per_tissue`` clusters on the image features of each tissue type separately
   (all spots form one group ``"all"`` when no tissue key is given).
2. **Step 2**: k-means with ``n_experts`` clusters over all step-1 centroids; each step-1 centroid belongs to one
   expert.
3. **Assignment**: a spot (or any feature vector, at inference) belongs to the expert of its nearest step-1 centroid,
   nearest among *all* step-1 centroids (Euclidean), the rule used by hard routing at inference.

scikit-learn's :class:`~sklearn.cluster.KMeans` runs each clustering; a step-1 group larger than
``minibatch_threshold`` points uses :class:`~sklearn.cluster.MiniBatchKMeans` instead (batches of
:data:`MINIBATCH_SIZE`), so a million 1024-d features cluster in minutes. Nearest-centroid assignments are computed
in chunks of :data:`ASSIGN_CHUNK` rows, so memory stays bounded.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._sdata import ATTRS_KEY, as_cohort, resolve_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

#: ``obs`` column holding the expert of each spot.
EXPERT_KEY = "spade_expert"
#: ``uns`` key of the expert record.
UNS_KEY = "spade_experts"
#: Name of the single step-1 group when no tissue key is given.
ALL_TISSUES = "all"
#: k-means restarts of step 1 (per tissue) and step 2 (over the centroids).
N_INIT_STEP1 = 3
N_INIT_STEP2 = 10
#: Batch size and restarts (of the initialisation) of MiniBatchKMeans.
MINIBATCH_SIZE = 4096
MINIBATCH_N_INIT = 3
#: KMeans (below the mini-batch threshold) seeds each restart by k-means++ on a random sample of at most this many
#: rows (at least ``32 k``), then runs Lloyd on all rows, as MiniBatchKMeans does with ``init_size``: k-means++ on all
#: rows costs more than the Lloyd iterations for large groups.
KMEANS_INIT_SAMPLE = 16384
#: Rows per chunk of the nearest-centroid assignment.
ASSIGN_CHUNK = 65536


# --------------------------------------------------------------------------------------------------------------------
# the result object
# --------------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class DataExperts:
    """The data experts of a SPADE model: step-1 centroids and the expert each belongs to.

    Build it with :func:`spade_sc.tl.build_experts`. For model files, :meth:`arrays` gives the numpy arrays (for
    safetensors) and :meth:`config` the JSON-safe rest; ``DataExperts.from_dict({**config, **arrays})`` rebuilds it.
    :meth:`to_dict` / :meth:`from_dict` round-trip through plain JSON (arrays as nested lists).

    Attributes
    ----------
    centroids
        ``(C, D)`` float32 step-1 centroids, grouped by tissue (tissues in sorted order).
    centroid_tissue
        ``(C,)`` tissue of each centroid.
    centroid_expert
        ``(C,)`` int64 expert of each centroid, in ``[0, n_experts)``.
    n_experts
        Number of experts ``K``.
    features_key
        ``obsm`` key of the features the experts were built on.
    tissue_key
        The tissue key used (None: one group ``"all"``).
    params
        Parameters and diagnostics: ``seed``, ``n_clusters_per_tissue`` (requested), ``clusters_per_tissue``
        (``{tissue: k actually used}``), ``n_spots_per_tissue``, ``algorithm_per_tissue`` (``"kmeans"`` or
        ``"minibatch"``), ``wcss_tissue`` (``{tissue: within-cluster sum of squares of step 1}``), ``wcss_step1``
        (their sum), ``wcss_step2`` (over the centroids), ``minibatch_threshold``, ``n_features``.
    """

    centroids: np.ndarray
    centroid_tissue: np.ndarray
    centroid_expert: np.ndarray
    n_experts: int
    features_key: str | None = None
    tissue_key: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        self.centroid_tissue = np.asarray(self.centroid_tissue, dtype=str)
        self.centroid_expert = np.asarray(self.centroid_expert, dtype=np.int64)
        if self.centroids.ndim != 2 or self.centroids.shape[0] == 0:
            msg = f"centroids must be a non-empty 2-D array (C, D), got shape {self.centroids.shape}."
            raise ValueError(msg)
        if not np.isfinite(self.centroids).all():
            msg = "centroids hold NaN or infinite values."
            raise ValueError(msg)
        n = self.centroids.shape[0]
        if self.centroid_tissue.shape != (n,) or self.centroid_expert.shape != (n,):
            msg = (
                f"centroid_tissue {self.centroid_tissue.shape} and centroid_expert {self.centroid_expert.shape} "
                f"must both have shape ({n},), one entry per centroid."
            )
            raise ValueError(msg)
        if isinstance(self.n_experts, bool) or int(self.n_experts) != self.n_experts or self.n_experts < 1:
            msg = f"n_experts must be a positive integer, got {self.n_experts!r}."
            raise ValueError(msg)
        self.n_experts = int(self.n_experts)
        if self.centroid_expert.min() < 0 or self.centroid_expert.max() >= self.n_experts:
            msg = f"centroid_expert must lie in [0, {self.n_experts}), got values in [{self.centroid_expert.min()}, "
            msg += f"{self.centroid_expert.max()}]."
            raise ValueError(msg)

    @property
    def n_centroids(self) -> int:
        """Number of step-1 centroids ``C``."""
        return int(self.centroids.shape[0])

    @property
    def n_features(self) -> int:
        """Feature dimension ``D``."""
        return int(self.centroids.shape[1])

    @property
    def tissues(self) -> list[str]:
        """The tissue groups of step 1, in centroid order."""
        return list(dict.fromkeys(self.centroid_tissue.tolist()))

    def __repr__(self) -> str:
        return (
            f"DataExperts(n_experts={self.n_experts}, n_centroids={self.n_centroids}, n_features={self.n_features}, "
            f"tissues={self.tissues}, features_key={self.features_key!r}, tissue_key={self.tissue_key!r})"
        )

    def nearest_centroid(self, features: np.ndarray, *, chunk_size: int = ASSIGN_CHUNK) -> np.ndarray:
        """Index of the nearest step-1 centroid of each row of ``features`` ``(N, D)`` (int64, ``(N,)``)."""
        features = self._check_features(features)
        return _nearest(features, self.centroids, chunk_size=chunk_size)

    def assign(self, features: np.ndarray, *, chunk_size: int = ASSIGN_CHUNK) -> np.ndarray:
        """Expert of each row of ``features`` ``(N, D)``, that of its nearest step-1 centroid (int64, ``(N,)``)."""
        return self.centroid_expert[self.nearest_centroid(features, chunk_size=chunk_size)]

    def _check_features(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.n_features:
            msg = f"features must have shape (N, {self.n_features}) like the centroids, got {features.shape}."
            raise ValueError(msg)
        if not np.issubdtype(features.dtype, np.number) or not np.isfinite(features).all():
            msg = "features hold NaN, infinite or non-numeric values."
            raise ValueError(msg)
        return features

    def arrays(self) -> dict[str, np.ndarray]:
        """The numeric arrays: ``centroids`` (float32) and ``centroid_expert`` (int64)."""
        return {"centroids": self.centroids, "centroid_expert": self.centroid_expert}

    def config(self) -> dict[str, Any]:
        """Everything but the arrays, JSON-safe: n_experts, features_key, tissue_key, centroid_tissue, params."""
        return {
            "n_experts": self.n_experts,
            "features_key": self.features_key,
            "tissue_key": self.tissue_key,
            "centroid_tissue": self.centroid_tissue.tolist(),
            "params": _json_safe(self.params),
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: :meth:`config` plus the arrays as nested lists."""
        return {**self.config(), **{k: v.tolist() for k, v in self.arrays().items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataExperts:
        """Rebuild from :meth:`to_dict` output, or from ``{**config(), **arrays()}`` (arrays as numpy)."""
        need = {"centroids", "centroid_tissue", "centroid_expert", "n_experts"}
        missing = sorted(need - set(data))
        if missing:
            msg = f"DataExperts.from_dict: missing entries {missing} (got {sorted(data)})."
            raise KeyError(msg)
        return cls(
            centroids=np.asarray(data["centroids"], dtype=np.float32),
            centroid_tissue=np.asarray(data["centroid_tissue"], dtype=str),
            centroid_expert=np.asarray(data["centroid_expert"], dtype=np.int64),
            n_experts=data["n_experts"],
            features_key=data.get("features_key"),
            tissue_key=data.get("tissue_key"),
            params=dict(data.get("params") or {}),
        )


def _json_safe(obj: Any) -> Any:
    """Numpy scalars / arrays to Python scalars / lists, recursively."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _uns_safe(obj: Any) -> Any:
    """Like :func:`_json_safe` but drops None values (AnnData cannot write them)."""
    obj = _json_safe(obj)
    if isinstance(obj, dict):
        return {k: _uns_safe(v) for k, v in obj.items() if v is not None}
    return obj


# --------------------------------------------------------------------------------------------------------------------
# numeric core (numpy in, numpy out; shared by build_experts, expert_elbow and benchmarks/experts.py)
# --------------------------------------------------------------------------------------------------------------------
def _nearest(features: np.ndarray, centroids: np.ndarray, *, chunk_size: int = ASSIGN_CHUNK) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) of each row, computed ``chunk_size`` rows at a time."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    c_sq = np.einsum("ij,ij->i", centroids, centroids, dtype=np.float64).astype(np.float32)
    out = np.empty(features.shape[0], dtype=np.int64)
    for start in range(0, features.shape[0], chunk_size):
        x = np.asarray(features[start : start + chunk_size], dtype=np.float32)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin.
        d = x @ centroids.T
        d *= -2.0
        d += c_sq
        out[start : start + chunk_size] = np.argmin(d, axis=1)
    return out


def _kmeans(
    x: np.ndarray, k: int, *, seed: int, n_init: int, minibatch_threshold: int
) -> tuple[np.ndarray, float, str]:
    """k-means of ``x``: (centroids float32 (k, D), WCSS, algorithm name)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans, kmeans_plusplus

    with warnings.catch_warnings():
        # Duplicated points may give fewer distinct clusters; the centroids stay usable.
        warnings.filterwarnings("ignore", message="Number of distinct clusters", category=Warning)
        if x.shape[0] > minibatch_threshold:
            model = MiniBatchKMeans(
                n_clusters=k,
                batch_size=MINIBATCH_SIZE,
                n_init=MINIBATCH_N_INIT,
                random_state=seed,
                compute_labels=True,
            )
            model.fit(x)
            return model.cluster_centers_.astype(np.float32, copy=False), float(model.inertia_), "minibatch"
        sample = max(KMEANS_INIT_SAMPLE, 32 * k)
        if x.shape[0] <= sample:
            model = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
            return model.cluster_centers_.astype(np.float32, copy=False), float(model.inertia_), "kmeans"
        best = None
        for restart in range(n_init):
            rng = np.random.default_rng([seed, restart])
            rows = np.sort(rng.choice(x.shape[0], sample, replace=False))
            init, _ = kmeans_plusplus(x[rows], k, random_state=int(rng.integers(2**31 - 1)))
            model = KMeans(n_clusters=k, init=init, n_init=1, random_state=seed).fit(x)
            if best is None or model.inertia_ < best.inertia_:
                best = model
    return best.cluster_centers_.astype(np.float32, copy=False), float(best.inertia_), "kmeans"


def _groups(tissues: np.ndarray) -> dict[str, np.ndarray | slice]:
    """Rows of each tissue (sorted names): a slice when the rows are contiguous (no copy of the features)."""
    out: dict[str, np.ndarray | slice] = {}
    for t in sorted(np.unique(tissues).tolist()):
        rows = np.flatnonzero(tissues == t)
        contiguous = rows[-1] - rows[0] + 1 == rows.size
        out[str(t)] = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
    return out


def _n_rows(rows: np.ndarray | slice) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.size


def _step1(
    features: np.ndarray,
    groups: dict[str, Any],
    *,
    n_clusters: int,
    seed: int,
    minibatch_threshold: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, dict[str, Any]]]:
    """Step 1: k-means within each tissue (``groups``: tissue -> rows, as :func:`_groups` gives).

    Returns centroids (C, D), their tissue (C,) and a per-tissue record.
    """
    cents, labels, record = [], [], {}
    for t, rows in groups.items():
        n_t = _n_rows(rows)
        k = min(n_clusters, n_t)
        if k < n_clusters:
            warnings.warn(
                f"Tissue {t!r} has {n_t} spot(s), fewer than n_clusters_per_tissue={n_clusters}: it gets {k} "
                f"cluster(s).",
                UserWarning,
                stacklevel=4,
            )
        c, wcss, algorithm = _kmeans(
            features[rows], k, seed=seed, n_init=N_INIT_STEP1, minibatch_threshold=minibatch_threshold
        )
        logger.info("experts step 1: tissue %r, %d spots, k=%d (%s), WCSS %.4g", t, n_t, k, algorithm, wcss)
        cents.append(c)
        labels.extend([t] * k)
        record[t] = {"k": k, "n": n_t, "wcss": wcss, "algorithm": algorithm}
    return np.concatenate(cents, axis=0), np.asarray(labels, dtype=str), record


def _step2(centroids: np.ndarray, n_experts: int, seed: int) -> Any:
    """Step 2: k-means over the step-1 centroids (a fitted :class:`sklearn.cluster.KMeans`)."""
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        # Duplicated centroids may give fewer distinct clusters; the experts stay usable.
        warnings.filterwarnings("ignore", message="Number of distinct clusters", category=Warning)
        return KMeans(n_clusters=n_experts, n_init=N_INIT_STEP2, random_state=seed).fit(centroids)


def _two_step_kmeans(
    features: np.ndarray,
    tissues: np.ndarray | None = None,
    *,
    n_clusters_per_tissue: int = 16,
    n_experts: int = 16,
    seed: int = 0,
    minibatch_threshold: int = 200_000,
    assign: bool = True,
) -> tuple[DataExperts, np.ndarray | None]:
    """The two-step clustering on a numpy array.

    Parameters
    ----------
    features
        ``(N, D)`` float features (float32 avoids a copy; rows of one tissue are best contiguous, also to avoid
        copies).
    tissues
        ``(N,)`` tissue of each row; None puts every row in one group ``"all"``.
    n_clusters_per_tissue, n_experts, seed, minibatch_threshold
        See :func:`build_experts`.
    assign
        Whether to compute the expert of each row.

    Returns
    -------
    The :class:`DataExperts` (without ``features_key`` / ``tissue_key``) and the expert of each row (or None).
    """
    n = features.shape[0]
    if tissues is None:
        tissues = np.full(n, ALL_TISSUES)
    tissues = np.asarray(tissues).astype(str)
    _check_counts_of_clusters(n_clusters_per_tissue, n_experts)
    groups = _groups(tissues)
    ks = {t: min(n_clusters_per_tissue, _n_rows(r)) for t, r in groups.items()}
    n_centroids = sum(ks.values())
    if n_experts > n_centroids:
        msg = (
            f"n_experts={n_experts} exceeds the number of step-1 centroids ({n_centroids}: clusters per tissue "
            f"{ks}); lower n_experts or raise n_clusters_per_tissue."
        )
        raise ValueError(msg)

    centroids, centroid_tissue, record = _step1(
        features, groups, n_clusters=n_clusters_per_tissue, seed=seed, minibatch_threshold=minibatch_threshold
    )
    model = _step2(centroids, n_experts, seed)
    centroid_expert = model.labels_.astype(np.int64)
    logger.info("experts step 2: %d centroids -> %d experts, WCSS %.4g", len(centroids), n_experts, model.inertia_)
    params = {
        "seed": int(seed),
        "n_clusters_per_tissue": int(n_clusters_per_tissue),
        "clusters_per_tissue": {t: r["k"] for t, r in record.items()},
        "n_spots_per_tissue": {t: r["n"] for t, r in record.items()},
        "algorithm_per_tissue": {t: r["algorithm"] for t, r in record.items()},
        "wcss_tissue": {t: r["wcss"] for t, r in record.items()},
        "wcss_step1": float(sum(r["wcss"] for r in record.values())),
        "wcss_step2": float(model.inertia_),
        "minibatch_threshold": int(minibatch_threshold),
        "n_features": int(features.shape[1]),
    }
    experts = DataExperts(centroids, centroid_tissue, centroid_expert, n_experts, params=params)
    labels = experts.centroid_expert[_nearest(features, experts.centroids)] if assign else None
    return experts, labels


def _check_counts_of_clusters(n_clusters_per_tissue: int, n_experts: int) -> None:
    for name, v in (("n_clusters_per_tissue", n_clusters_per_tissue), ("n_experts", n_experts)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            msg = f"{name} must be a positive integer, got {v!r}."
            raise ValueError(msg)


# --------------------------------------------------------------------------------------------------------------------
# cohort glue
# --------------------------------------------------------------------------------------------------------------------
def _slide_tissues(
    tables: Mapping[str, tuple[str, AnnData]], slides: Mapping[str, SpatialData], tissue_key: str | None
) -> dict[str, np.ndarray]:
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
    attrs = {sid: s.attrs.get(ATTRS_KEY, {}).get("slide", {}) for sid, s in slides.items()}
    in_attrs = {sid: tissue_key in a for sid, a in attrs.items()}
    if not any(in_attrs.values()):
        some_sid, (_, some_table) = next(iter(tables.items()))
        msg = (
            f"tissue_key={tissue_key!r} is neither an obs column of the tables nor a per-slide attribute "
            f"(sdata.attrs[{ATTRS_KEY!r}]['slide']). Obs columns of slide {some_sid!r}: "
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
            msg = f"Slide {sid!r}: attrs[{ATTRS_KEY!r}]['slide'][{tissue_key!r}] = {value!r} is not a scalar tissue."
            raise ValueError(msg)
        out[sid] = np.full(t.n_obs, str(value))
    return out


def _collect(
    cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData],
    *,
    features_key: str,
    tissue_key: str | None,
    table_key: str | None,
) -> tuple[dict[str, tuple[str, AnnData]], np.ndarray, np.ndarray, np.ndarray]:
    """Validate and gather features.

    Returns the tables ``{sid: (table key, AnnData)}``, the features ``(N, D)`` float32 with rows **sorted by tissue**
    (so each tissue is a contiguous block), their tissues and ``order`` such that ``features[i]`` is row ``order[i]``
    of the cohort's rows concatenated in slide order.
    """
    slides = as_cohort(cohort)
    tables = {}
    for sid, sdata in slides.items():
        tkey = resolve_table(sdata, table_key)
        tables[sid] = (tkey, sdata.tables[tkey])
    dims = {}
    for sid, (tkey, t) in tables.items():
        if features_key not in t.obsm:
            msg = (
                f"Slide {sid!r}, table {tkey!r} has no obsm[{features_key!r}]; obsm keys present: {sorted(t.obsm)}. "
                "Compute features first (spade_sc.pp.image_features)."
            )
            raise KeyError(msg)
        f = t.obsm[features_key]
        shape = np.shape(f)
        if len(shape) != 2:
            msg = f"Slide {sid!r}, table {tkey!r}: obsm[{features_key!r}] must be 2-D, got shape {shape}."
            raise ValueError(msg)
        dims[sid] = shape[1]
    if len(set(dims.values())) > 1:
        msg = f"obsm[{features_key!r}] has different dimensions across slides: {dims}."
        raise ValueError(msg)
    for sid, (tkey, t) in tables.items():
        f = np.asarray(t.obsm[features_key])
        if not np.issubdtype(f.dtype, np.number):
            msg = f"Slide {sid!r}, table {tkey!r}: obsm[{features_key!r}] is not numeric (dtype {f.dtype})."
            raise TypeError(msg)
        n_bad = sum(
            int((~np.isfinite(f[i : i + ASSIGN_CHUNK]).all(axis=1)).sum()) for i in range(0, len(f), ASSIGN_CHUNK)
        )
        if n_bad:
            msg = (
                f"Slide {sid!r}, table {tkey!r}: obsm[{features_key!r}] holds NaN or infinite values in {n_bad} row(s)."
            )
            raise ValueError(msg)
    tissues_by_slide = _slide_tissues(tables, slides, tissue_key)
    tissues_all = np.concatenate([tissues_by_slide[sid] for sid in tables])
    n_total = tissues_all.size
    if n_total == 0:
        msg = "The cohort's tables hold no spots."
        raise ValueError(msg)
    order = np.argsort(tissues_all, kind="stable")
    position = np.empty(n_total, dtype=np.int64)
    position[order] = np.arange(n_total)
    d = next(iter(dims.values()))
    features = np.empty((n_total, d), dtype=np.float32)
    start = 0
    for _, t in tables.values():
        stop = start + t.n_obs
        features[position[start:stop]] = np.asarray(t.obsm[features_key], dtype=np.float32)
        start = stop
    return tables, features, tissues_all[order], order


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
    _check_counts_of_clusters(n_clusters_per_tissue, n_experts)
    if isinstance(minibatch_threshold, bool) or not isinstance(minibatch_threshold, int | np.integer):
        msg = f"minibatch_threshold must be an integer, got {minibatch_threshold!r}."
        raise ValueError(msg)
    tables, features, tissues, order = _collect(
        cohort, features_key=features_key, tissue_key=tissue_key, table_key=table_key
    )
    experts, labels_sorted = _two_step_kmeans(
        features,
        tissues,
        n_clusters_per_tissue=int(n_clusters_per_tissue),
        n_experts=int(n_experts),
        seed=int(seed),
        minibatch_threshold=int(minibatch_threshold),
        assign=inplace,
    )
    experts.features_key = features_key
    experts.tissue_key = tissue_key
    if not inplace:
        return experts

    labels = np.empty_like(labels_sorted)
    labels[order] = labels_sorted
    del features
    categories = [str(k) for k in range(experts.n_experts)]
    params = _uns_safe(
        {
            "features_key": features_key,
            "tissue_key": tissue_key,
            "n_experts": experts.n_experts,
            "n_centroids": experts.n_centroids,
            **experts.params,
        }
    )
    start = 0
    for sid, (tkey, t) in tables.items():
        stop = start + t.n_obs
        lab = labels[start:stop]
        start = stop
        t.obs[EXPERT_KEY] = pd.Categorical.from_codes(lab, categories=categories)
        counts = np.bincount(lab, minlength=experts.n_experts)
        t.uns[UNS_KEY] = {"params": dict(params), "counts": counts.astype(np.int64)}
        logger.debug("experts: slide %s, table %s: spots per expert %s", sid, tkey, counts.tolist())
    return experts


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
    k_values = _check_values(k_values, "k_values")
    n_experts_values = k_values if n_experts_values is None else _check_values(n_experts_values, "n_experts_values")
    _check_counts_of_clusters(n_clusters_per_tissue, 1)
    _, features, tissues, _ = _collect(cohort, features_key=features_key, tissue_key=tissue_key, table_key=table_key)
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


def _check_values(values: Sequence[int], name: str) -> list[int]:
    values = [values] if isinstance(values, int | np.integer) else list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1 for v in values):
        msg = f"{name} must be a non-empty sequence of positive integers, got {values!r}."
        raise ValueError(msg)
    return sorted({int(v) for v in values})

"""Data experts: two-step k-means on image features (SPADE, section 3 of the method), apart from AnnData.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._validation import check_int, json_safe

logger = logging.getLogger("spade_sc")

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

    Build it with :func:`spade_sc.tl.build_experts` (from a cohort) or :meth:`fit` (from a feature matrix). For
    model files, :meth:`arrays` gives the numpy arrays (for safetensors) and :meth:`config` the JSON-safe rest;
    ``DataExperts.from_dict({**config, **arrays})`` rebuilds it. :meth:`to_dict` / :meth:`from_dict` round-trip
    through plain JSON (arrays as nested lists).

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
        self.n_experts = check_int(self.n_experts, "n_experts")
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

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        tissues: np.ndarray | None = None,
        *,
        n_clusters_per_tissue: int = 16,
        n_experts: int = 16,
        seed: int = 0,
        minibatch_threshold: int = 200_000,
        per_tissue: bool = False,
    ) -> DataExperts:
        """Two-step k-means on a feature matrix (no AnnData): what :func:`spade_sc.tl.build_experts` runs.

        Parameters
        ----------
        features
            ``(N, D)`` image features (float32 avoids a copy).
        tissues
            ``(N,)`` tissue of each row; None: one group ``"all"``.
        n_clusters_per_tissue, n_experts, seed, minibatch_threshold, per_tissue
            As in :func:`spade_sc.tl.build_experts`.

        Returns
        -------
        The data experts (``features_key`` and ``tissue_key`` None); :meth:`assign` gives the expert of each row.
        """
        experts, _ = two_step_kmeans(
            features,
            tissues,
            n_clusters_per_tissue=n_clusters_per_tissue,
            n_experts=n_experts,
            seed=seed,
            minibatch_threshold=minibatch_threshold,
            assign=False,
            per_tissue=per_tissue,
        )
        return experts

    @property
    def per_tissue(self) -> bool:
        """Whether step 2 ran within each tissue (every expert serves one tissue; ``two_step_kmeans(per_tissue=)``)."""
        return bool(self.params.get("per_tissue", False))

    def tissue_groups(self, tissues: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(group of each row, group of each centroid): the index of the tissue in :attr:`tissues`.

        Rows of a tissue the experts do not know get -1 (routed among all centroids).
        """
        known = {t: i for i, t in enumerate(self.tissues)}
        rows = np.array([known.get(str(t), -1) for t in np.asarray(tissues).tolist()], dtype=np.int64)
        return rows, np.array([known[t] for t in self.centroid_tissue.tolist()], dtype=np.int64)

    def nearest_centroid(
        self, features: np.ndarray, *, tissues: np.ndarray | None = None, chunk_size: int = ASSIGN_CHUNK
    ) -> np.ndarray:
        """Index of the nearest step-1 centroid of each row of ``features`` ``(N, D)`` (int64, ``(N,)``).

        With ``tissues`` (one per row): among the centroids of the row's tissue, where the experts know it.
        """
        features = self._check_features(features)
        if tissues is None:
            return _nearest(features, self.centroids, chunk_size=chunk_size)
        rows, cents = self.tissue_groups(tissues)
        out = np.empty(len(features), dtype=np.int64)
        for g in np.unique(rows):
            mine = rows == g
            allowed = np.arange(self.n_centroids) if g < 0 else np.flatnonzero(cents == g)
            out[mine] = allowed[_nearest(features[mine], self.centroids[allowed], chunk_size=chunk_size)]
        return out

    def assign(
        self, features: np.ndarray, *, tissues: np.ndarray | None = None, chunk_size: int = ASSIGN_CHUNK
    ) -> np.ndarray:
        """Expert of each row of ``features`` ``(N, D)``, that of its nearest step-1 centroid (int64, ``(N,)``).

        With ``tissues``: the nearest centroid of the row's tissue (:meth:`nearest_centroid`).
        """
        return self.centroid_expert[self.nearest_centroid(features, tissues=tissues, chunk_size=chunk_size)]

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
            "params": json_safe(self.params),
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


def two_step_kmeans(
    features: np.ndarray,
    tissues: np.ndarray | None = None,
    *,
    n_clusters_per_tissue: int = 16,
    n_experts: int = 16,
    seed: int = 0,
    minibatch_threshold: int = 200_000,
    assign: bool = True,
    per_tissue: bool = False,
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
        See :func:`spade_sc.tl.build_experts`.
    assign
        Whether to compute the expert of each row.
    per_tissue
        Step 2 within each tissue: the experts are shared out among the tissues in proportion to their rows (at
        least one each), and no expert mixes tissues; rows are assigned within their own tissue.

    Returns
    -------
    The :class:`DataExperts` (without ``features_key`` / ``tissue_key``) and the expert of each row (or None).
    """
    n = features.shape[0]
    if tissues is None:
        tissues = np.full(n, ALL_TISSUES)
    tissues = np.asarray(tissues).astype(str)
    check_int(n_clusters_per_tissue, "n_clusters_per_tissue")
    check_int(n_experts, "n_experts")
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
    if per_tissue:
        centroid_expert, inertia = _step2_per_tissue(centroids, centroid_tissue, groups, ks, n_experts, seed)
    else:
        model = _step2(centroids, n_experts, seed)
        centroid_expert, inertia = model.labels_.astype(np.int64), float(model.inertia_)
    logger.info("experts step 2: %d centroids -> %d experts, WCSS %.4g", len(centroids), n_experts, inertia)
    params = {
        "seed": int(seed),
        "n_clusters_per_tissue": int(n_clusters_per_tissue),
        "clusters_per_tissue": {t: r["k"] for t, r in record.items()},
        "n_spots_per_tissue": {t: r["n"] for t, r in record.items()},
        "algorithm_per_tissue": {t: r["algorithm"] for t, r in record.items()},
        "wcss_tissue": {t: r["wcss"] for t, r in record.items()},
        "wcss_step1": float(sum(r["wcss"] for r in record.values())),
        "wcss_step2": inertia,
        "minibatch_threshold": int(minibatch_threshold),
        "n_features": int(features.shape[1]),
    }
    if per_tissue:
        params["per_tissue"] = True
    experts = DataExperts(centroids, centroid_tissue, centroid_expert, n_experts, params=params)
    labels = experts.assign(features, tissues=tissues if per_tissue else None) if assign else None
    return experts, labels


def _share(sizes: dict[str, int], caps: dict[str, int], total: int) -> dict[str, int]:
    """``total`` experts shared out among tissues in proportion to ``sizes``.

    At least 1 and at most ``caps`` (the tissue's centroids) each; each next expert goes where rows per expert are most.
    """
    out = {t: 1 for t in sizes}
    while sum(out.values()) < total:
        room = [t for t in sizes if out[t] < caps[t]]
        if not room:
            break
        t = max(room, key=lambda t: (sizes[t] / out[t], t))
        out[t] += 1
    return out


def _step2_per_tissue(
    centroids: np.ndarray,
    centroid_tissue: np.ndarray,
    groups: dict[str, Any],
    ks: dict[str, int],
    n_experts: int,
    seed: int,
) -> tuple[np.ndarray, float]:
    """Step 2 within each tissue: (expert of each centroid, numbered tissue by tissue; summed WCSS)."""
    if n_experts < len(groups):
        msg = (
            f"n_experts={n_experts} is fewer than the {len(groups)} tissues {sorted(groups)}; per-tissue experts need "
            "at least one expert per tissue."
        )
        raise ValueError(msg)
    share = _share({t: _n_rows(r) for t, r in groups.items()}, ks, n_experts)
    expert = np.empty(len(centroids), dtype=np.int64)
    first, inertia = 0, 0.0
    for t in groups:
        mine = np.flatnonzero(centroid_tissue == t)
        model = _step2(centroids[mine], share[t], seed)
        expert[mine] = first + model.labels_
        first += share[t]
        inertia += float(model.inertia_)
    if first != n_experts:
        msg = f"The tissues' {sum(ks.values())} step-1 centroids cannot make {n_experts} per-tissue experts."
        raise ValueError(msg)
    return expert, inertia

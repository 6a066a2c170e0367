"""Is SPADE better than the encoder it is built on? Leave-one-slide-out evaluation on the user's own cohort.

:func:`evaluate` compares representations of the same spots (the frozen encoder features, SPADE with its three
routings, a single expert, a random projection, any other ``obsm`` key) on the same folds with three protocols:

``"expression"`` / ``"expression_pca"``
    Gene-expression prediction in the style of HEST-Benchmark: log1p-normalised expression of the most variable
    genes of the **training** slides, predicted from the representation by a ridge regression (standardised
    features, optionally PCA), scored by the Pearson r of each gene on the held-out slide(s), averaged over genes.
``"label"``
    Spot-label probe: a logistic regression on region labels, scored by balanced accuracy and macro F1.
``"retrieval"``
    Expression predicted as the mean of the ``k`` most similar reference spots (:func:`predict_expression` for SPADE:
    query image embedding against reference gene embeddings, as BLEEP does).

Every protocol runs with all labelled training spots and with a few (``shots``), over repeated draws that are the
same for every representation, so differences are paired. SPADE is trained inside each fold on the training slides
only: the held-out slide's expression enters nothing but the scores.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import EVALUATION_TASKS, EXTRA_REPRESENTATIONS, REPRESENTATIONS, ROUTINGS, Keys
from .._sdata import Spots, as_cohort, features_matrix, resolve_spots
from .._validation import check_choice, check_int, check_ints
from ..pp import gene_matrix
from ..pp._genes import (
    _check_counts,
    _check_has_counts,
    _check_unique,
    _counts,
    _counts_source,
    _shared_genes,
    _spot_scale,
    _where,
)
from ._spade import fit, model_features, model_gene_input, model_input, model_tissues

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..model import SpadeModel

logger = logging.getLogger("spade_sc")

#: Ridge penalties searched by inner cross-validation (features are standardised first).
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-1, 7, 17))
#: Inverse L2 penalties of the logistic probe searched by inner cross-validation with all labels.
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 1, 6))
#: ``shots`` value of the rows that use every labelled training spot.
ALL = "all"
#: SPADE representations: the image embedding of the fold's SPADE model with each routing.
_SPADE_REPS = {f"spade_{r}": r for r in ROUTINGS}
#: Representations read from a model trained in the fold, and the routing of each.
_SPADE_ROUTING = {**_SPADE_REPS, "single_expert": "soft"}
_TASK_CODE = {"expression": 1, "label": 2}
_COLUMNS = ["representation", "task", "fold", "shots", "draw", "metric", "value", "n_train", "n_test", "param"]


# --------------------------------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class EvaluationResult:
    """Scores of :func:`evaluate`, with the protocol that produced them.

    Attributes
    ----------
    table
        Tidy scores, one row per representation x task x fold x shots x draw x metric, with columns

        - ``representation``, ``task`` (``"expression"``, ``"expression_pca"``, ``"label"``, ``"retrieval"``),
          ``fold`` (its name: the held-out slide for leave-one-slide-out);
        - ``shots``: ordered categorical, ``"all"`` (every labelled training spot) or the number of labelled spots
          (expression: in total; label: per class) as a string;
        - ``draw``: the draw of the labelled spots (0 with ``shots="all"``); draws are the same for every
          representation;
        - ``metric`` (``"pearson"``; ``"balanced_accuracy"``, ``"macro_f1"``), ``value``;
        - ``n_train``, ``n_test``: labelled training spots used and held-out spots scored;
        - ``param``: the chosen ridge ``alpha`` or logistic ``C`` (NaN where none is chosen).
    per_gene
        Pearson r of every target gene: ``representation``, ``task``, ``fold``, ``shots``, ``gene``, ``pearson``
        (few-shot rows averaged over draws; NaN where the gene does not vary in the held-out slide).
    protocol
        Everything needed to reproduce the scores: folds (test and training slides, target genes and the slides
        that chose them, label classes, drawn spots by ``obs_names``, the slides SPADE was trained on, its training
        record and fingerprint), seeds, grids, PCA, shots, draws (every field: :func:`evaluate`'s Returns).
    """

    table: pd.DataFrame
    per_gene: pd.DataFrame
    protocol: dict[str, Any] = field(default_factory=dict)

    def _order(self, df: pd.DataFrame) -> pd.DataFrame:
        reps = list(self.protocol.get("representations", []))
        tasks = ["expression", "expression_pca", "retrieval", "label"]
        metrics = ["pearson", "balanced_accuracy", "macro_f1"]
        key = {
            "representation": lambda s: s.map({r: i for i, r in enumerate(reps)}).fillna(len(reps)),
            "task": lambda s: s.map({t: i for i, t in enumerate(tasks)}).fillna(len(tasks)),
            "metric": lambda s: s.map({m: i for i, m in enumerate(metrics)}).fillna(len(metrics)),
        }
        cols = [c for c in ("task", "metric", "shots", "representation") if c in df.columns]
        return df.sort_values(cols, key=lambda s: key[s.name](s) if s.name in key else s).reset_index(drop=True)

    def summary(self) -> pd.DataFrame:
        """Mean and spread per representation, task, shots and metric.

        The score of a fold is its mean over draws; ``mean`` is the mean over folds of those, ``sd`` their standard
        deviation over folds, ``sd_draws`` the standard deviation over draws within a fold (averaged over folds;
        0 with all labels), ``n_folds`` and ``n_draws`` the counts.

        Returns
        -------
        pandas.DataFrame
            Columns ``task``, ``metric``, ``shots``, ``representation``, ``mean``, ``sd``, ``sd_draws``, ``n_folds``,
            ``n_draws``.
        """
        keys = ["task", "metric", "shots", "representation"]
        t = self.table
        per_fold = (
            t.groupby([*keys, "fold"], observed=True, sort=False)["value"]
            .agg(fold_mean="mean", fold_sd=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, n="size")
            .reset_index()
        )
        out = (
            per_fold.groupby(keys, observed=True, sort=False)
            .agg(
                mean=("fold_mean", "mean"),
                sd=("fold_mean", lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0),
                sd_draws=("fold_sd", "mean"),
                n_folds=("fold", "size"),
                n_draws=("n", "max"),
            )
            .reset_index()
        )
        return self._order(out)

    def compare(self, reference: str = "base") -> pd.DataFrame:
        """Every representation's mean score relative to ``reference``, on the same folds and draws.

        Parameters
        ----------
        reference
            The representation to divide by (default: the base encoder features).

        Returns
        -------
        pandas.DataFrame
            ``summary()`` columns ``task``, ``metric``, ``shots``, ``representation``, ``mean``, plus ``reference``
            (the reference's mean), ``ratio`` (``mean / reference``) and ``wins`` (fraction of paired fold x draw
            scores above the reference's).
        """
        if reference not in set(self.table["representation"]):
            msg = f"reference={reference!r} is not among the representations {sorted(set(self.table.representation))}."
            raise ValueError(msg)
        s = self.summary()
        ref = s[s["representation"] == reference][["task", "metric", "shots", "mean"]].rename(
            columns={"mean": "reference"}
        )
        out = s[["task", "metric", "shots", "representation", "mean"]].merge(
            ref, on=["task", "metric", "shots"], how="left"
        )
        out["ratio"] = out["mean"] / out["reference"]
        keys = ["task", "metric", "shots", "fold", "draw"]
        t = self.table
        paired = t.merge(
            t[t["representation"] == reference][[*keys, "value"]].rename(columns={"value": "ref_value"}),
            on=keys,
            how="inner",
        )
        paired["win"] = (paired["value"] > paired["ref_value"]).astype(float)
        wins = paired.groupby(["task", "metric", "shots", "representation"], observed=True)["win"].mean().reset_index()
        out = out.merge(wins.rename(columns={"win": "wins"}), on=["task", "metric", "shots", "representation"])
        return self._order(out)

    def __repr__(self) -> str:
        p = self.protocol
        return (
            f"EvaluationResult({len(self.table)} scores; representations {p.get('representations')}, "
            f"tasks {sorted(set(self.table['task']))}, {len(p.get('folds', {}))} folds)"
        )


# --------------------------------------------------------------------------------------------------------------------
# small numerical pieces (pure numpy / scikit-learn)
# --------------------------------------------------------------------------------------------------------------------
def pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r of every column of ``y_pred`` with the same column of ``y_true`` (NaN where either is constant).

    Parameters
    ----------
    y_true, y_pred
        ``(n_spots, n_genes)`` arrays.

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` float64.
    """
    a = np.asarray(y_true, dtype=np.float64)
    b = np.asarray(y_pred, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        msg = f"y_true and y_pred must be 2-D arrays of the same shape, got {a.shape} and {b.shape}."
        raise ValueError(msg)
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    num = (a * b).sum(0)
    scale = np.sqrt((np.abs(a).max(0, initial=0) + 1e-300) * (np.abs(b).max(0, initial=0) + 1e-300))
    ok = den > 1e-12 * scale * scale * max(len(a), 1)
    out = np.full(a.shape[1], np.nan)
    out[ok] = num[ok] / den[ok]
    return out


def _inner_splits(n: int, groups: np.ndarray | None, seed: int, n_splits: int = 5) -> list[tuple[np.ndarray, ...]]:
    """Inner CV splits: one slide out when the rows come from 3+ slides, else shuffled K-fold."""
    idx = np.arange(n)
    if groups is not None:
        uniq = np.unique(groups)
        if len(uniq) >= 3:
            return [(idx[groups != g], idx[groups == g]) for g in uniq]
    k = int(min(n_splits, n))
    if k < 2:
        return []
    perm = np.random.default_rng(seed).permutation(n)
    return [(np.setdiff1d(idx, part), np.sort(part)) for part in np.array_split(perm, k)]


def _ridge_path(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, alphas: Sequence[float]) -> np.ndarray:
    """Ridge predictions (with intercept) for every alpha at once, through one SVD: ``(len(alphas), n_new, g)``."""
    xm, ym = x.mean(0), y.mean(0)
    u, s, vt = np.linalg.svd(x - xm, full_matrices=False)
    uty = u.T @ (y - ym)
    z = (x_new - xm) @ vt.T
    out = np.empty((len(alphas), len(x_new), y.shape[1]))
    for i, a in enumerate(alphas):
        out[i] = (z * (s / (s * s + a))) @ uty + ym
    return out


def ridge_cv_predict(
    x: np.ndarray,
    y: np.ndarray,
    x_new: np.ndarray,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    groups: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Ridge regression whose penalty is chosen by inner cross-validation, then refitted on all rows.

    Equivalent to :class:`sklearn.linear_model.RidgeCV` with ``cv`` = leave-one-slide-out when ``groups`` holds 3 or
    more slides (spots of one slide are correlated: leaving single spots out would favour small penalties), else a
    shuffled 5-fold split; the score is the mean squared error over all genes (one ``alpha`` for all genes). Solved
    through one SVD per split, so the whole grid costs little more than one fit.

    Parameters
    ----------
    x
        ``(n, d)`` training features (already standardised / projected).
    y
        ``(n, g)`` targets.
    x_new
        ``(m, d)`` features to predict.
    alphas
        The penalty grid.
    groups
        Slide of each training row (for the inner split).
    seed
        Seed of the K-fold shuffle.

    Returns
    -------
    ``(predictions (m, g), chosen alpha)``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x_new = np.asarray(x_new, dtype=np.float64)
    alphas = [float(a) for a in alphas]
    splits = _inner_splits(len(x), groups, seed)
    if len(alphas) > 1 and splits:
        err = np.zeros(len(alphas))
        for tr, va in splits:
            pred = _ridge_path(x[tr], y[tr], x[va], alphas)
            err += ((pred - y[va][None]) ** 2).sum(axis=(1, 2))
        alpha = alphas[int(np.argmin(err))]
    else:
        alpha = alphas[len(alphas) // 2]
    return _ridge_path(x, y, x_new, [alpha])[0], alpha


def _logistic(c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=float(c), max_iter=2000, tol=1e-4, random_state=seed)


def logistic_cv_predict(
    x: np.ndarray,
    y: np.ndarray,
    x_new: np.ndarray,
    *,
    cs: Sequence[float] = DEFAULT_CS,
    groups: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Multinomial logistic regression whose ``C`` is chosen by inner cross-validation (balanced accuracy).

    Inner split as in :func:`ridge_cv_predict`. With a single ``C`` (or too few rows to split) no search is run.

    Parameters
    ----------
    x
        ``(n, d)`` training features (already standardised).
    y
        ``(n,)`` class labels.
    x_new
        ``(m, d)`` features to classify.
    cs
        Inverse L2 penalties searched.
    groups
        Slide of each training row (for the inner split).
    seed
        Seed of the split and of the solver.

    Returns
    -------
    ``(predicted labels (m,), chosen C)``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import balanced_accuracy_score

    cs = [float(c) for c in cs]
    y = np.asarray(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true.*")
        splits = [(tr, va) for tr, va in _inner_splits(len(x), groups, seed) if len(np.unique(y[tr])) > 1]
        c_best = cs[len(cs) // 2]
        if len(cs) > 1 and splits:
            scores = np.zeros(len(cs))
            for tr, va in splits:
                for i, c in enumerate(cs):
                    pred = _logistic(c, seed).fit(x[tr], y[tr]).predict(x[va])
                    scores[i] += balanced_accuracy_score(y[va], pred) * len(va)
            c_best = cs[int(np.argmax(scores))]
        if len(np.unique(y)) < 2:
            return np.full(len(x_new), y[0]), c_best
        return _logistic(c_best, seed).fit(x, y).predict(x_new), c_best


class _Preprocess:
    """StandardScaler (+ PCA) fitted on the features of every training spot (labels are never used)."""

    def __init__(self, pool: np.ndarray, n_pca: int | None, seed: int) -> None:
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(pool)
        self.pca = None
        if n_pca is not None:
            k = int(min(n_pca, pool.shape[0], pool.shape[1]))
            self.pca = PCA(n_components=k, random_state=seed).fit(self.scaler.transform(pool))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = self.scaler.transform(x)
        return z if self.pca is None else self.pca.transform(z)


# --------------------------------------------------------------------------------------------------------------------
# cohort helpers
# --------------------------------------------------------------------------------------------------------------------
def _log1p_moments(table: AnnData, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-gene sum and sum of squares of log1p(normalize_total) over a table's spots, sparse-aware."""
    source = _counts_source(table, None, "The table")
    counts = _counts(table, source)
    _check_counts(counts, "The table")
    idx = table.var_names.get_indexer(list(genes))
    scale = _spot_scale(counts)
    sub = counts[:, idx]
    if sparse.issparse(sub):
        sub = sparse.csr_matrix(sub, dtype=np.float64)
        sub = sparse.diags(scale) @ sub
        sub.data = np.log1p(sub.data)
        s1 = np.asarray(sub.sum(0)).ravel()
        s2 = np.asarray(sub.multiply(sub).sum(0)).ravel()
    else:
        v = np.log1p(np.asarray(sub, dtype=np.float64) * scale[:, None])
        s1, s2 = v.sum(0), (v * v).sum(0)
    return s1, s2, table.n_obs


def top_variable_genes(
    tables: Sequence[AnnData], n_genes: int = 50, *, genes: Sequence[str] | None = None
) -> list[str]:
    """The ``n_genes`` genes of highest variance of log1p-normalised expression over the spots of ``tables``.

    Expression as in :func:`spade_sc.pp.gene_matrix` (``gene_input="log1p"``: each spot scaled to 1e4 counts over
    all its genes, then log1p), pooled over the tables; ties broken by gene name.

    Parameters
    ----------
    tables
        The training tables (raw counts in the ``"counts"`` layer or ``X``).
    n_genes
        Genes returned.
    genes
        Candidate genes (default: those present in every table).

    Returns
    -------
    list[str]
        Gene names, most variable first.
    """
    if genes is None:
        shared = set(tables[0].var_names)
        for t in tables[1:]:
            shared &= set(t.var_names)
        genes = sorted(shared)
    genes = list(genes)
    return _most_variable(genes, [_log1p_moments(t, genes) for t in tables], n_genes)


def _most_variable(genes: list[str], moments: Sequence[tuple[np.ndarray, np.ndarray, int]], n_genes: int) -> list[str]:
    """The ``n_genes`` genes of highest variance from per-table moments (:func:`_log1p_moments`), pooled in order."""
    s1 = np.zeros(len(genes))
    s2 = np.zeros(len(genes))
    n = 0
    for a, b, m in moments:
        s1 += a
        s2 += b
        n += m
    var = s2 / max(n, 1) - (s1 / max(n, 1)) ** 2
    order = np.lexsort((np.array(genes, dtype=object).astype(str), -var))
    return [genes[i] for i in order[: int(n_genes)]]


def _light_copy(spots: Spots) -> SpatialData:
    """The spots, a copy of their table and the attrs of a slide: what tl.fit needs when features exist."""
    from spatialdata import SpatialData

    out = SpatialData(shapes={spots.shapes_key: spots.shapes}, tables={spots.table_key: spots.table.copy()})
    out.attrs.update(copy.deepcopy(dict(spots.sdata.attrs)))
    return out


def _fold_seed(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *[int(p) for p in parts]]))


# --------------------------------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------------------------------
def _topk_rows(sims: np.ndarray, ref_values: np.ndarray, k: int) -> np.ndarray:
    """The mean of ``ref_values`` over the ``k`` most similar reference rows of every row of ``sims``."""
    kk = min(k, sims.shape[1])
    top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    return ref_values[top].mean(1)


def _topk_mean(sim_chunks, ref_values: np.ndarray, k: int) -> np.ndarray:
    out = [_topk_rows(s, ref_values, k) for s in sim_chunks]
    return np.concatenate(out) if out else np.zeros((0, ref_values.shape[1]))


def _joint_topk_means(
    model: SpadeModel,
    features: np.ndarray,
    ref_gene_input: np.ndarray,
    ref_values: np.ndarray,
    routings: Sequence[str],
    k: int,
    chunk: int = 1024,
    tissues: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Retrieval in the joint space under each of ``routings``: ``{routing: (n_query, n_values) top-k means}``.

    The query's expert image embeddings and the references' gene embeddings are computed once, whatever the number
    of routings; only the mixing weights differ (query chunk by query chunk, so memory stays bounded).
    """
    import torch

    from ..model._routing import align

    weights = {r: model.routing_weights(features, r, tissues=tissues) for r in routings}
    cosine = model.init_params_["loss"] == "infonce"
    parts: dict[str, list[np.ndarray]] = {r: [] for r in routings}
    model.module.eval()
    with torch.no_grad():
        rotations = model.rotations()
        g = align(model.module.gene_embed_all(torch.as_tensor(np.asarray(ref_gene_input, dtype=np.float32))), rotations)
        if cosine:
            g = torch.nn.functional.normalize(g, dim=-1)
        for start in range(0, len(features), chunk):
            f = model.module.image_embed_all(torch.as_tensor(np.asarray(features[start : start + chunk], np.float32)))
            f = align(f, rotations)
            if cosine:
                f = torch.nn.functional.normalize(f, dim=-1)
            for r in routings:
                w = torch.as_tensor(weights[r][start : start + chunk])
                # (q, K, d) x (r, K, d) -> (q, r): sum_k w_qk <f_k(x_q), g_k(y_r)>
                parts[r].append(_topk_rows(torch.einsum("qkd,rkd,qk->qr", f, g, w).numpy(), ref_values, k))
    empty = np.zeros((0, ref_values.shape[1]))
    return {r: np.concatenate(p) if p else empty for r, p in parts.items()}


def _cosine_chunks(query: np.ndarray, ref: np.ndarray, chunk: int = 1024):
    def unit(a):
        a = np.asarray(a, dtype=np.float32)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    r = unit(ref)
    for start in range(0, len(query), chunk):
        yield unit(query[start : start + chunk]) @ r.T


def predict_expression(
    sdata: SpatialData,
    model: SpadeModel,
    *,
    reference: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData],
    k: int = 50,
    routing: Literal["soft", "hard", "uniform"] | None = None,
    genes: Sequence[str] | None = None,
    features_key: str | None = None,
    table_key: str | None = None,
    reference_table_key: str | None = None,
    key_added: str = Keys.PREDICTED,
    inplace: bool = True,
) -> np.ndarray | None:
    """Predict the expression of every spot of a slide by retrieval in SPADE's joint space (as BLEEP does).

    For a query spot with image features ``x`` and routing weights ``w`` (``routing``), the similarity to a reference
    spot with gene input ``y`` is ``sum_k w_k <f_k(x), g_k(y)>``: each expert compares the query's image embedding
    with the reference's gene embedding in its own joint space, and the experts are mixed by the **query's** routing
    (the reference spots need no image). Mixing the two embeddings first would add products across experts, whose
    spaces were never aligned with each other. Embeddings are compared by dot product for the soft-CLIP loss (as
    trained) and by cosine for InfoNCE. The prediction is the mean log1p-normalised expression
    (:func:`spade_sc.pp.gene_matrix`) of the ``k`` most similar reference spots.

    Parameters
    ----------
    sdata
        The query slide; its spot table needs the model's image features (see :func:`spade_sc.tl.embed`).
    model
        A trained :class:`~spade_sc.model.SpadeModel`.
    reference
        Slides with expression (raw counts of the model's panel genes and of ``genes``), e.g. the training cohort.
    k
        Reference spots averaged per query.
    routing
        ``"soft"``, ``"hard"`` or ``"uniform"``; defaults to the model's.
    genes
        Genes to predict (default: the model's panel); every reference table must hold them.
    features_key
        ``obsm`` key of the query features; default the model's.
    table_key
        The query's spot table, when the slide holds several.
    reference_table_key
        The spot table of each reference slide, when they hold several.
    key_added
        Key of what is written.
    inplace
        Write into the query's table; when False, return the predictions and write nothing.

    Returns
    -------
    None when ``inplace``; writes into the query's spot table:

    - ``obsm[key_added]``: predicted log1p-normalised expression, ``(n_spots, n_genes)`` float32;
    - ``uns[key_added]``: ``genes`` (column names of the obsm), ``params`` (``k``, ``routing``, ``similarity``,
      ``n_reference_spots``, ``reference_slides``, model ``fingerprint``).

    Otherwise the ``(n_spots, n_genes)`` array.
    """
    if not model.is_trained_:
        msg = "The model is not trained; fit it first (spade_sc.tl.fit)."
        raise ValueError(msg)
    k = check_int(k, "k")
    routing = check_choice(routing or model.init_params_["routing"], "routing", ROUTINGS)
    genes = list(model.genes) if genes is None else [str(g) for g in genes]
    spots = resolve_spots(sdata, table_key)
    table = spots.table
    feats = model_features(model, spots, where=f"table {spots.table_key!r}", features_key=features_key)
    ref = as_cohort(reference)
    ref_in, ref_y = [], []
    for name, s in ref.items():
        t = resolve_spots(s, reference_table_key).table
        ref_in.append(model_gene_input(model, t))
        ref_y.append(gene_matrix(t, genes, gene_input="log1p"))
        logger.debug("predict_expression: reference slide %s, %d spots", name, t.n_obs)
    ref_in_arr, ref_y_arr = np.concatenate(ref_in), np.concatenate(ref_y)
    if len(ref_y_arr) == 0:
        msg = "The reference holds no spots."
        raise ValueError(msg)
    tissues = model_tissues(model, spots, "the query slide")
    pred = _joint_topk_means(model, feats, ref_in_arr, ref_y_arr, [routing], k, tissues=tissues)[routing]
    pred = pred.astype(np.float32)
    if not inplace:
        return pred
    table.obsm[key_added] = pred
    table.uns[key_added] = {
        "genes": genes,
        "params": {
            "k": k,
            "routing": routing,
            "similarity": "cosine" if model.init_params_["loss"] == "infonce" else "dot",
            "n_reference_spots": len(ref_y_arr),
            "reference_slides": list(ref),
            "fingerprint": model.fingerprint(),
        },
    }
    return None


# --------------------------------------------------------------------------------------------------------------------
# evaluate: what every fold shares
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Settings:
    """The checked settings of one :func:`evaluate` call, the same for every fold."""

    representations: list[str]
    tasks: list[str]
    n_genes: int
    shots: list[int]
    gene_shots: list[int]
    n_draws: int
    pca: list[bool]
    n_pca: int
    alphas: tuple[float, ...]
    cs: tuple[float, ...]
    few_shot_c: float
    retrieval_k: int
    seed: int


@dataclass(frozen=True)
class _Cohort:
    """The checked inputs of every slide: spots, features, labels, the representations that no fold changes.

    The tables are the user's: read, never written.
    """

    features_key: str
    spots: dict[str, Spots]
    feats: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    fixed: dict[str, dict[str, np.ndarray]]

    @property
    def slides(self) -> list[str]:
        return list(self.spots)

    @cached_property
    def tables(self) -> dict[str, AnnData]:
        return {s: spots.table for s, spots in self.spots.items()}

    @cached_property
    def shared_genes(self) -> list[str]:
        """The genes every slide holds, sorted: the candidates of every fold's target genes."""
        return sorted(set.intersection(*[set(t.var_names) for t in self.tables.values()]))

    @cached_property
    def _moments(self) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        return {}

    @cached_property
    def _inputs(self) -> dict[float, dict[str, np.ndarray]]:
        return {}

    def model_inputs(self, model: SpadeModel) -> dict[str, np.ndarray]:
        """Every slide's features as ``model`` takes them (in their spatial context, if so trained): once per radius."""
        radius = model.init_params_.get("spatial_context")
        if radius is None:
            return self.feats
        if radius not in self._inputs:
            self._inputs[radius] = {s: model_input(model, self.spots[s], x) for s, x in self.feats.items()}
        return self._inputs[radius]

    def model_tissues(self, model: SpadeModel) -> dict[str, np.ndarray | None]:
        """Every slide's spot tissues for a model with per-tissue experts (None values otherwise)."""
        return {s: model_tissues(model, self.spots[s], s) for s in self.slides}

    def gene_moments(self, slide: str) -> tuple[np.ndarray, np.ndarray, int]:
        """Per-gene sums of log1p expression of a slide over :attr:`shared_genes`: once per call, for every fold."""
        if slide not in self._moments:
            self._moments[slide] = _log1p_moments(self.tables[slide], self.shared_genes)
        return self._moments[slide]


@dataclass(frozen=True)
class _Fold:
    """One fold: its held-out and training slides, the models trained on the latter, every representation."""

    name: str
    index: int
    test: list[str]
    train: list[str]
    cohort: _Cohort
    settings: _Settings
    models: dict[str, SpadeModel]
    reps: dict[str, dict[str, np.ndarray]]

    def stack(self, rep: str, slides: Sequence[str]) -> np.ndarray:
        """The representation ``rep`` of the spots of ``slides``, in order."""
        return np.concatenate([self.reps[rep][s] for s in slides])


def _check_shots(values: int | Sequence[int], name: str) -> list[int]:
    """Sorted distinct positive shot counts (an empty sequence: no few-shot rows)."""
    values = [values] if isinstance(values, int | np.integer) else list(values)
    return sorted(set(check_ints(values, name))) if values else []


def _check_settings(
    representations: Sequence[str], tasks: Sequence[str], label_key: str | None, **kw: Any
) -> _Settings:
    """The settings of :func:`evaluate` (its keyword arguments of those names), checked.

    ``"label"`` is dropped from the tasks without ``label_key``.
    """
    representations = list(dict.fromkeys(representations))
    if not representations:
        msg = "representations is empty."
        raise ValueError(msg)
    tasks = [check_choice(t, "tasks", EVALUATION_TASKS) for t in dict.fromkeys(tasks)]
    if not tasks:
        msg = f"tasks is empty; choose among {EVALUATION_TASKS}."
        raise ValueError(msg)
    if "label" in tasks and label_key is None:
        tasks.remove("label")
    shots, gene_shots = _check_shots(kw["shots"], "shots"), _check_shots(kw["gene_shots"], "gene_shots")
    n_draws = check_int(kw["n_draws"], "n_draws")
    pca = kw["pca"]
    pca = [bool(p) for p in ([pca] if isinstance(pca, bool) else pca)]
    if not pca and "expression" in tasks:
        msg = "pca must hold False and / or True."
        raise ValueError(msg)
    return _Settings(
        representations=representations,
        tasks=tasks,
        n_genes=check_int(kw["n_genes"], "n_genes"),
        shots=shots,
        gene_shots=gene_shots,
        n_draws=n_draws,
        pca=pca,
        n_pca=check_int(kw["n_pca"], "n_pca"),
        alphas=tuple(float(a) for a in kw["alphas"]),
        cs=tuple(float(c) for c in kw["cs"]),
        few_shot_c=float(kw["few_shot_c"]),
        retrieval_k=check_int(kw["retrieval_k"], "retrieval_k"),
        seed=check_int(kw["seed"], "seed", low=0),
    )


def _resolve_folds(
    slides: list[str], folds: Mapping[str, Sequence[str]] | Sequence[Sequence[str]] | None
) -> dict[str, list[str]]:
    if isinstance(folds, str):
        folds = [[folds]]  # one held-out slide, never the characters of its id
    if folds is None:
        if len(slides) < 2:
            msg = "evaluate needs at least two slides (one slide out, the others to train on)."
            raise ValueError(msg)
        return {s: [s] for s in slides}
    if isinstance(folds, Mapping):
        out = {str(k): [v] if isinstance(v, str) else list(v) for k, v in folds.items()}
    else:
        out = {}
        for f in folds:
            f = [f] if isinstance(f, str) else list(f)
            out["+".join(f)] = f
    for name, test in out.items():
        unknown = [s for s in test if s not in slides]
        if unknown or not test:
            msg = f"Fold {name!r}: test slides {test} must be a non-empty subset of the cohort {slides}."
            raise ValueError(msg)
        if len(set(test)) == len(slides):
            msg = f"Fold {name!r} leaves no slide to train on."
            raise ValueError(msg)
    return out


def _check_features(spots: Mapping[str, Spots], features_key: str) -> dict[str, np.ndarray]:
    """The features of every slide, checked, of one width."""
    feats = {
        sid: features_matrix(
            s.table,
            features_key,
            where=f"Slide {sid!r}, table {s.table_key!r}",
            hint="Compute it with spade_sc.pp.image_features.",
        )
        for sid, s in spots.items()
    }
    if len({x.shape[1] for x in feats.values()}) > 1:
        dims = {s: x.shape[1] for s, x in feats.items()}
        msg = f"obsm[{features_key!r}] differs in dimension across slides: {dims}."
        raise ValueError(msg)
    return feats


def _check_obsm_representations(spots: Mapping[str, Spots], representations: Sequence[str]) -> None:
    known = REPRESENTATIONS + EXTRA_REPRESENTATIONS
    for rep in representations:
        missing = [sid for sid, s in spots.items() if rep not in known and rep not in s.table.obsm]
        if missing:
            msg = (
                f"Representation {rep!r} is neither one of {known} nor an obsm key of every slide "
                f"(missing in {missing})."
            )
            raise ValueError(msg)


def _labels(spots: Mapping[str, Spots], label_key: str, group_key: str | None) -> dict[str, np.ndarray]:
    """Every spot's group and label joined by the unit separator (None where unlabelled): compared within a group."""
    labels = {}
    for sid, s in spots.items():
        t = s.table
        for key in (label_key, group_key):
            if key is not None and key not in t.obs:
                msg = f"Slide {sid!r}, table {s.table_key!r}: obs[{key!r}] is missing."
                raise KeyError(msg)
        lab = t.obs[label_key]
        ok = lab.notna().to_numpy()
        grp = np.full(t.n_obs, "", dtype=object) if group_key is None else t.obs[group_key].astype(str).to_numpy()
        labels[sid] = np.where(ok, grp.astype(str) + "\x1f" + lab.astype(str).to_numpy(), None)
    return labels


def _check_counts_of_slides(spots: Mapping[str, Spots]) -> None:
    """Every slide's counts, checked before any fold: unique gene names, no NaN / negative value, some counts."""
    tables = {}
    for sid, s in spots.items():
        source = _counts_source(s.table, None, f"Slide {sid!r}, table {s.table_key!r}")
        where = _where(sid, s.table_key, source)
        _check_unique(s.table, where)
        _check_counts(_counts(s.table, source), where)
        tables[sid] = (s.table_key, s.table, source)
    shared = _shared_genes({sid: (key, table) for sid, (key, table, _) in tables.items()})
    for sid, (key, table, source) in tables.items():
        _check_has_counts(table, source, shared, _where(sid, key, source))


def _check_fit_kwargs(fit_kwargs: Mapping[str, Any] | None, seed: int) -> dict[str, Any]:
    import inspect

    from ._spade import fit as spade_fit  # the function itself, even where a test stands in for ``fit`` here

    if fit_kwargs is not None and not isinstance(fit_kwargs, Mapping):
        msg = f"fit_kwargs must be a mapping of arguments of spade_sc.tl.fit, got {type(fit_kwargs).__name__}."
        raise TypeError(msg)
    fit_kwargs = dict(fit_kwargs or {})
    known = set(inspect.signature(spade_fit).parameters) - {"sdata_or_cohort"}
    unknown = sorted(str(k) for k in fit_kwargs if k not in known)
    if unknown:
        msg = f"fit_kwargs {unknown} are not arguments of spade_sc.tl.fit; it takes {sorted(known)}."
        raise ValueError(msg)
    for k in ("key_added", "features_key", "table_key"):
        if k in fit_kwargs:
            msg = f"fit_kwargs may not set {k!r} (evaluate sets it)."
            raise ValueError(msg)
    fit_kwargs.setdefault("seed", seed)
    fit_kwargs.setdefault("progress", False)
    return fit_kwargs


def _fixed_representations(
    feats: Mapping[str, np.ndarray], representations: Sequence[str], projection_dim: int, seed: int, heads_seed: int
) -> dict[str, dict[str, np.ndarray]]:
    """The representations that no fold changes: the features, their random projection, the untrained heads."""
    dim = next(iter(feats.values())).shape[1]
    out: dict[str, dict[str, np.ndarray]] = {"base": dict(feats)}
    if "random_projection" in representations:
        projection = _fold_seed(seed, 7).standard_normal((dim, projection_dim)) / np.sqrt(projection_dim)
        projection = projection.astype(np.float32)
        out["random_projection"] = {s: x @ projection for s, x in feats.items()}
    if "untrained_heads" in representations:
        import torch

        from ..model import BatchedExperts

        # the image head of a single expert exactly as SpadeModel initialises it (image heads are drawn first)
        heads = BatchedExperts(1, dim, 1, seed=int(heads_seed)).eval()
        with torch.no_grad():
            out["untrained_heads"] = {
                s: heads.image_embed_all(torch.as_tensor(x))[:, 0].numpy() for s, x in feats.items()
            }
    return out


def _protocol(
    settings: _Settings,
    *,
    features_key: str,
    label_key: str | None,
    label_group_key: str | None,
    projection_dim: int,
    fit_kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """The settings of the call, as recorded in ``EvaluationResult.protocol`` (the folds are added as they run)."""
    s = settings
    return {
        "features_key": features_key,
        "representations": s.representations,
        "tasks": s.tasks,
        "label_key": label_key,
        "label_group_key": label_group_key,
        "n_genes": s.n_genes,
        "gene_selection": "variance of log1p(normalize_total(1e4)) over the training slides' spots",
        "shots": s.shots,
        "gene_shots": s.gene_shots,
        "n_draws": s.n_draws,
        "pca": s.pca,
        "n_pca": s.n_pca,
        "preprocessing": "StandardScaler (+ PCA) fitted on the features of all training spots",
        "alphas": list(s.alphas),
        "alpha_selection": "inner leave-one-slide-out CV (3+ slides; else shuffled 5-fold), MSE over genes",
        "cs": list(s.cs),
        "c_selection": "inner leave-one-slide-out CV (3+ slides; else shuffled 5-fold), balanced accuracy",
        "few_shot_c": s.few_shot_c,
        "retrieval_k": s.retrieval_k,
        "retrieval": "SPADE: sum_k w_k(query) <f_k(x_query), g_k(y_ref)>; others: cosine of features",
        "projection_dim": projection_dim,
        "fit_kwargs": {k: v for k, v in fit_kwargs.items() if k != "trainer_kwargs"},
        "seed": s.seed,
        "folds": {},
    }


# --------------------------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------------------------
def evaluate(
    cohort: Mapping[str, SpatialData] | Sequence[SpatialData],
    *,
    features_key: str,
    label_key: str | None = None,
    label_group_key: str | None = None,
    representations: Sequence[str] = REPRESENTATIONS,
    tasks: Sequence[str] = EVALUATION_TASKS,
    folds: Mapping[str, Sequence[str]] | Sequence[Sequence[str]] | None = None,
    fit_kwargs: Mapping[str, Any] | None = None,
    n_genes: int = 50,
    shots: Sequence[int] = (1, 5, 10),
    gene_shots: Sequence[int] = (25, 50, 100),
    n_draws: int = 20,
    pca: Sequence[bool] = (False, True),
    n_pca: int = 256,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    cs: Sequence[float] = DEFAULT_CS,
    few_shot_c: float = 1.0,
    retrieval_k: int = 50,
    projection_dim: int = 256,
    table_key: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> EvaluationResult:
    """Compare SPADE with the encoder it is built on (and controls), leaving one slide out at a time.

    For every fold (by default each slide in turn is held out):

    1. SPADE is trained by :func:`spade_sc.tl.fit` on **copies** of the training slides only (``fit_kwargs``), with
       its data experts, and, for ``"single_expert"``, with one expert (``n_experts=1``: BLEEP heads on frozen
       features; the same model when ``fit_kwargs`` already asks for one expert). Nothing is written into
       ``cohort``.
    2. Every representation of every spot is computed: ``"base"`` (``obsm[features_key]``), ``"spade_soft"``,
       ``"spade_hard"``, ``"spade_uniform"`` (the SPADE image embedding with that routing), ``"single_expert"``,
       ``"random_projection"`` (the base features times a fixed Gaussian matrix to ``projection_dim``, a control);
       optionally ``"untrained_heads"`` (the image head of a single expert at its seeded initialisation, never
       trained: what SPADE's architecture does without the expression, a control); any other name is read from
       ``obsm[name]`` (e.g. another encoder's features).
    3. ``"expression"``: targets are the log1p-normalised expression (:func:`spade_sc.pp.gene_matrix`) of the
       ``n_genes`` genes of highest variance of that expression over the **training** slides' spots (among the
       genes every slide holds; ties broken by name; the same genes for all shots). Features are standardised,
       optionally projected by PCA to ``n_pca`` components (task ``"expression_pca"``), both fitted on the
       features of all training spots (no expression used); a ridge regression (with intercept) with ``alpha``
       chosen from ``alphas`` by inner cross-validation (leave one training slide out with 3 or more training
       slides, else shuffled 5-fold; squared error summed over genes), then refitted on all training spots,
       predicts the held-out spots; score: Pearson r per gene over the held-out spots, averaged over genes (genes
       constant on the held-out slide are skipped). Few-shot: ``gene_shots`` spots drawn uniformly from the
       training spots, ``n_draws`` times.
    4. ``"label"`` (when ``label_key`` is given): a multinomial logistic regression on standardised features.
       Labels are only compared within a ``label_group_key`` group (e.g. the patient, when clusters are named per
       patient): the training spots are the labelled spots of the training slides in the held-out slide's group;
       a fold whose group has no training slide is skipped. With all labels ``C`` is chosen from ``cs`` by inner
       CV (balanced accuracy); few-shot: exactly ``k`` spots per class for every ``k`` in ``shots``, ``n_draws``
       draws, ``C = few_shot_c``, only classes with at least ``k`` training spots. Held-out spots of classes
       without training spots (or fewer than ``k``) are not scored (counts in ``protocol``). Scores: balanced
       accuracy and macro F1 over the scored classes.
    5. ``"retrieval"``: the expression of a held-out spot predicted as the mean of its ``retrieval_k`` most similar
       training spots. SPADE representations use the joint space (:func:`predict_expression`: image embedding of
       the query vs gene embeddings of the references, experts mixed by the query's routing); the others use the
       cosine similarity of query and reference features (image-to-image neighbours). Targets and score as in 3.

    The drawn spots depend on ``seed``, the fold, the task, the shots and the draw only, so they are identical for
    every representation (paired comparisons). Same inputs and seed, same result.

    What "few-shot" limits: the labels of the downstream readout only. SPADE itself is trained on the expression of
    every spot of the training slides, as a SPADE pretrained on a large cohort would be before a task with few
    labels; the scaler and the PCA see the features (never the labels) of every training spot, for every
    representation alike. When the labels are themselves derived from expression (clusters), the label task is
    not independent of what SPADE was trained on.

    Parameters
    ----------
    cohort
        ``{slide id: SpatialData}`` (or a sequence), at least two slides, each with raw counts and
        ``obsm[features_key]`` in its spot table (:func:`spade_sc.pp.image_features`).
    features_key
        ``obsm`` key of the frozen encoder features.
    label_key
        ``obs`` column of spot labels for the label probe (None: no label task). Missing values are skipped.
    label_group_key
        ``obs`` column within which labels are comparable (e.g. ``"patient"``); None: all slides share labels.
    representations
        Representations compared (see above).
    tasks
        Any of ``"expression"``, ``"label"``, ``"retrieval"``.
    folds
        ``{fold name: held-out slides}`` or a sequence of held-out slide lists; default one fold per slide.
    fit_kwargs
        Passed to :func:`spade_sc.tl.fit` (e.g. ``n_experts``, ``max_epochs``, ``lr``, ``gene_input``); ``seed``
        defaults to ``seed``, ``progress`` to False.
    n_genes
        Target genes of the expression tasks.
    shots
        Labelled spots per class of the few-shot label probe (empty: all labels only).
    gene_shots
        Labelled spots (in total) of the few-shot expression task (empty: all training spots only).
    n_draws
        Draws per few-shot setting.
    pca
        Run the expression task without (False) and / or with (True) PCA.
    n_pca
        PCA components (at most the number of training spots and features).
    alphas
        Ridge penalty grid.
    cs
        Logistic ``C`` grid (all labels).
    few_shot_c
        Logistic ``C`` of the few-shot probe (too few labels to choose it).
    retrieval_k
        Neighbours averaged by the retrieval task.
    projection_dim
        Output dimension of the random projection.
    table_key
        The spot table of every slide, when slides hold several.
    seed
        Seed of SPADE, the draws, the projection and the inner splits.
    progress
        Progress bar over folds.

    Returns
    -------
    EvaluationResult
        ``.table`` (tidy scores), ``.per_gene`` (per-gene Pearson r), ``.summary()``, ``.compare()`` (see
        :class:`EvaluationResult`) and ``.protocol``, a JSON-safe dict:

        - the settings: ``features_key``, ``representations``, ``tasks`` (without ``"label"`` when ``label_key`` is
          None), ``label_key``, ``label_group_key``, ``n_genes``, ``shots``, ``gene_shots``, ``n_draws``, ``pca``,
          ``n_pca``, ``alphas``, ``cs``, ``few_shot_c``, ``retrieval_k``, ``projection_dim``, ``seed``,
          ``fit_kwargs`` (without ``trainer_kwargs``), and the rules in words: ``gene_selection``,
          ``preprocessing``, ``alpha_selection``, ``c_selection``, ``retrieval``;
        - ``seconds``: wall time of the folds;
        - ``folds``: ``{fold name: record}``, each record holding ``test`` and ``train`` (slide ids), ``seconds``,
          and where the tasks ran:

          - ``spade`` / ``single_expert`` (when a representation needs it): the model trained in the fold:
            ``slides`` (the slide ids whose copies :func:`spade_sc.tl.fit` trained it on), ``fingerprint``,
            ``n_experts``, ``n_panel_genes``, ``init_params``, ``train_params`` (``epochs_run``, ``best_epoch``,
            ``best_val_loss``, ``train_groups``, ``validation_groups``);
          - ``gene_selection_slides`` (the slide ids whose expression chose the target genes), ``genes`` (the
            targets), ``expression_draws`` (``{shots: [obs_names of each draw]}``);
          - ``label_train`` (labelled training slides of the held-out slides' group), ``label_skipped`` (why, when
            no such slide exists), ``label_classes`` (``{class: training spots}``), ``label_unseen_test_spots`` and
            ``label_unseen_test_classes`` (held-out spots and classes without training spots, not scored),
            ``label_draws`` (``{k: {"classes", "n_test_scored", "spots"}}``, spots by ``obs_names``).

        Nothing is written into ``cohort``.
    """
    from tqdm.auto import tqdm

    slides_map = as_cohort(cohort)
    settings = _check_settings(
        representations,
        tasks,
        label_key,
        shots=shots,
        gene_shots=gene_shots,
        n_draws=n_draws,
        pca=pca,
        n_genes=n_genes,
        n_pca=n_pca,
        alphas=alphas,
        cs=cs,
        few_shot_c=few_shot_c,
        retrieval_k=retrieval_k,
        seed=seed,
    )
    fold_map = _resolve_folds(list(slides_map), folds)
    projection_dim = check_int(projection_dim, "projection_dim")

    # ---- the inputs, checked before anything is computed
    spots = {sid: resolve_spots(s, table_key) for sid, s in slides_map.items()}
    feats = _check_features(spots, features_key)
    _check_obsm_representations(spots, settings.representations)
    labels = _labels(spots, label_key, label_group_key) if "label" in settings.tasks else {}
    fit_kwargs = _check_fit_kwargs(fit_kwargs, seed)
    if {"expression", "retrieval"} & set(settings.tasks) or set(_SPADE_ROUTING) & set(settings.representations):
        _check_counts_of_slides(spots)  # before any fold trains a model or reads expression
    fixed = _fixed_representations(feats, settings.representations, projection_dim, seed, fit_kwargs["seed"])
    data = _Cohort(features_key=features_key, spots=spots, feats=feats, labels=labels, fixed=fixed)
    protocol = _protocol(
        settings,
        features_key=features_key,
        label_key=label_key,
        label_group_key=label_group_key,
        projection_dim=projection_dim,
        fit_kwargs=fit_kwargs,
    )

    rows: list[dict[str, Any]] = []
    gene_rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for index, (name, test) in enumerate(tqdm(list(fold_map.items()), desc="evaluate", disable=not progress)):
        rec, fold_rows, fold_gene_rows = _run_fold(data, settings, fit_kwargs, name, index, test)
        protocol["folds"][name] = rec
        rows += fold_rows
        gene_rows += fold_gene_rows
    protocol["seconds"] = round(time.perf_counter() - t_start, 2)
    table, per_gene = _tables(rows, gene_rows, settings)
    return EvaluationResult(table=table, per_gene=per_gene, protocol=protocol)


def _tables(
    rows: list[dict[str, Any]], gene_rows: list[dict[str, Any]], settings: _Settings
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tidy scores and the per-gene scores, ``shots`` ordered (numbers up, then ``"all"``)."""
    used = set(settings.shots if "label" in settings.tasks else [])
    used |= set(settings.gene_shots if "expression" in settings.tasks else [])
    shot_cats = [str(s) for s in sorted(used)] + [ALL]
    table = pd.DataFrame(rows, columns=_COLUMNS)
    table["shots"] = pd.Categorical(table["shots"], categories=shot_cats, ordered=True)
    table = table.astype({"draw": np.int64, "n_train": np.int64, "n_test": np.int64, "value": np.float64})
    per_gene = pd.DataFrame(gene_rows, columns=["representation", "task", "fold", "shots", "gene", "pearson"])
    per_gene["shots"] = pd.Categorical(per_gene["shots"], categories=shot_cats, ordered=True)
    return table, per_gene


# --------------------------------------------------------------------------------------------------------------------
# one fold
# --------------------------------------------------------------------------------------------------------------------
def _run_fold(
    data: _Cohort, settings: _Settings, fit_kwargs: Mapping[str, Any], name: str, index: int, test: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(protocol record, score rows, per-gene rows) of one fold."""
    t0 = time.perf_counter()
    train = [s for s in data.slides if s not in test]
    rec: dict[str, Any] = {"test": list(test), "train": train}
    models, model_records = _fit_models(data, train, settings.representations, fit_kwargs)
    rec.update(model_records)
    fold = _Fold(name, index, list(test), train, data, settings, models, _fold_representations(data, settings, models))
    rows: list[dict[str, Any]] = []
    gene_rows: list[dict[str, Any]] = []
    if "expression" in settings.tasks or "retrieval" in settings.tasks:
        expression_rows, expression_gene_rows, expression_rec = _expression_fold(fold)
        rows += expression_rows
        gene_rows += expression_gene_rows
        rec.update(expression_rec)
    if "label" in settings.tasks:
        label_rows, label_rec = _label_fold(fold)
        rows += label_rows
        rec.update(label_rec)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    logger.info("evaluate: fold %s (test %s) done in %.1f s", name, test, rec["seconds"])
    return rec, rows, gene_rows


def _fit_models(
    data: _Cohort, train: list[str], representations: Sequence[str], fit_kwargs: Mapping[str, Any]
) -> tuple[dict[str, SpadeModel], dict[str, dict[str, Any]]]:
    """SPADE (and the single expert) trained on copies of the training slides only, and their records."""
    need_spade = any(r in _SPADE_REPS for r in representations)
    need_single = "single_expert" in representations
    models: dict[str, SpadeModel] = {}
    if not (need_spade or need_single):
        return models, {}
    copies = {s: _light_copy(data.spots[s]) for s in train}  # one table, one shapes element each: no keys to pass
    if need_spade:
        models["spade"] = fit(copies, features_key=data.features_key, **fit_kwargs)
    if need_single and need_spade and fit_kwargs.get("n_experts") == 1:
        models["single_expert"] = models["spade"]  # SPADE is a single expert already: same training
    elif need_single:
        kw = {**fit_kwargs, "n_experts": 1, "n_clusters_per_tissue": 1, "tissue_experts": False}
        models["single_expert"] = fit(copies, features_key=data.features_key, **kw)
    records = {
        name: {
            "slides": list(copies),
            "fingerprint": m.fingerprint(),
            "n_experts": m.n_experts,
            "n_panel_genes": len(m.genes),
            "train_params": {
                k: v
                for k, v in m.train_params_.items()
                if k in ("epochs_run", "best_epoch", "best_val_loss", "train_groups", "validation_groups")
            },
            "init_params": dict(m.init_params_),
        }
        for name, m in models.items()
    }
    return models, records


def _model_of(rep: str) -> str:
    """The fold's model behind a SPADE representation."""
    return "single_expert" if rep == "single_expert" else "spade"


def _spade_routings(
    representations: Sequence[str], models: Mapping[str, SpadeModel]
) -> dict[str, tuple[SpadeModel, dict[str, str]]]:
    """The fold's distinct trained models and, for each, ``{representation: routing}`` of the SPADE representations.

    Keyed by the first model name; ``single_expert`` joins ``spade`` when both are the same model.
    """
    out: dict[str, tuple[SpadeModel, dict[str, str]]] = {}
    for rep in representations:
        if rep not in _SPADE_ROUTING:
            continue
        m = models[_model_of(rep)]
        name = next((n for n, (other, _) in out.items() if other is m), _model_of(rep))
        out.setdefault(name, (m, {}))[1][rep] = _SPADE_ROUTING[rep]
    return out


def _mixture_embeddings(
    model: SpadeModel,
    feats: Mapping[str, np.ndarray],
    routings: Sequence[str],
    tissues: Mapping[str, np.ndarray | None] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{routing: {slide: embedding}}``: :meth:`SpadeModel.get_image_embedding` under several routings at once.

    Every expert's embedding of a slide is computed once and mixed by each routing's weights, chunk by chunk as
    :func:`spade_sc.model._routing.mixture_embed` does (the same arithmetic, so the same numbers).
    """
    import torch

    from ..model._routing import DEFAULT_CHUNK_SIZE, align

    module = model.module.eval()
    rotations = model.rotations()
    param = next(module.parameters())
    out: dict[str, dict[str, np.ndarray]] = {r: {} for r in routings}
    for sid, x in feats.items():
        x = np.asarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            msg = "features hold NaN or infinite values."
            raise ValueError(msg)
        tissue = None if tissues is None else tissues.get(sid)
        weights = {r: torch.as_tensor(model.routing_weights(x, r, tissues=tissue)) for r in routings}
        xt = torch.as_tensor(x)
        chunks: dict[str, list[torch.Tensor]] = {r: [] for r in routings}
        with torch.no_grad():
            for start in range(0, len(x), DEFAULT_CHUNK_SIZE):
                every = align(
                    module.image_embed_all(xt[start : start + DEFAULT_CHUNK_SIZE].to(device=param.device)), rotations
                )
                for r in routings:
                    w = weights[r][start : start + DEFAULT_CHUNK_SIZE].to(device=param.device, dtype=param.dtype)
                    chunks[r].append((w.unsqueeze(-1) * every).sum(dim=1).to(xt.device))
        for r in routings:
            emb = torch.cat(chunks[r]) if chunks[r] else torch.zeros(0, module.proj_dim, dtype=param.dtype)
            out[r][sid] = emb.numpy().astype(np.float32)
    return out


def _fold_representations(
    data: _Cohort, settings: _Settings, models: Mapping[str, SpadeModel]
) -> dict[str, dict[str, np.ndarray]]:
    """Every representation of every spot in this fold: ``{representation: {slide: (n_spots, d)}}``."""
    spade: dict[str, dict[str, np.ndarray]] = {}
    for m, routing_of in _spade_routings(settings.representations, models).values():
        routings = list(dict.fromkeys(routing_of.values()))
        by_routing = _mixture_embeddings(m, data.model_inputs(m), routings, data.model_tissues(m))
        spade.update({rep: by_routing[r] for rep, r in routing_of.items()})
    reps: dict[str, dict[str, np.ndarray]] = {}
    for rep in settings.representations:
        if rep in data.fixed:
            reps[rep] = data.fixed[rep]
        elif rep in _SPADE_ROUTING:
            reps[rep] = spade[rep]
        else:
            reps[rep] = {s: np.asarray(t.obsm[rep], dtype=np.float32) for s, t in data.tables.items()}
    return reps


def _gene_scores(
    scores: list[tuple[np.ndarray, int, float]],
    *,
    rep: str,
    task: str,
    fold: str,
    shot: str,
    genes: list[str],
    n_test: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per draw (mean Pearson over genes) and one per gene (mean over draws)."""
    rows = [
        {
            "representation": rep,
            "task": task,
            "fold": fold,
            "shots": shot,
            "draw": d,
            "metric": "pearson",
            "value": float(np.nanmean(r)) if np.isfinite(r).any() else np.nan,
            "n_train": n_train,
            "n_test": n_test,
            "param": param,
        }
        for d, (r, n_train, param) in enumerate(scores)
    ]
    stacked = np.stack([r for r, _, _ in scores])
    with np.errstate(invalid="ignore"):
        per = stacked[0] if len(stacked) == 1 else np.nanmean(np.where(np.isfinite(stacked), stacked, np.nan), 0)
    gene_rows = [
        {"representation": rep, "task": task, "fold": fold, "shots": shot, "gene": g, "pearson": v}
        for g, v in zip(genes, per, strict=True)
    ]
    return rows, gene_rows


# --------------------------------------------------------------------------------------------------------------------
# one fold: expression prediction (protocol 3) and retrieval (protocol 5)
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Targets:
    """The expression targets of a fold: genes, log1p expression of training and held-out spots, few-shot draws."""

    genes: list[str]
    y_tr: np.ndarray
    y_te: np.ndarray
    groups: np.ndarray
    draws: dict[int, list[np.ndarray]]

    def common(self, fold: _Fold) -> dict[str, Any]:
        return {"fold": fold.name, "genes": self.genes, "n_test": len(self.y_te)}


def _expression_fold(fold: _Fold) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(score rows, per-gene rows, protocol record) of protocols 3 (ridge, with / without PCA) and 5 (retrieval)."""
    targets, rec = _expression_targets(fold)
    joint = _joint_predictions(fold, targets) if "retrieval" in fold.settings.tasks else {}
    rows: list[dict[str, Any]] = []
    gene_rows: list[dict[str, Any]] = []
    for rep in fold.settings.representations:
        x_tr, x_te = fold.stack(rep, fold.train), fold.stack(rep, fold.test)
        if "expression" in fold.settings.tasks:
            for use_pca in fold.settings.pca:
                r, g = _ridge_scores(fold, targets, rep, x_tr, x_te, use_pca)
                rows += r
                gene_rows += g
        if "retrieval" in fold.settings.tasks:
            r, g = _retrieval_scores(fold, targets, rep, x_tr, x_te, joint.get(rep))
            rows += r
            gene_rows += g
    return rows, gene_rows, rec


def _expression_targets(fold: _Fold) -> tuple[_Targets, dict[str, Any]]:
    """The targets of a fold and their record; the held-out slides' expression is read for the scores only."""
    s, tables = fold.settings, fold.cohort.tables
    # target genes: the most variable of the training slides, among the names every slide holds (the moments of
    # each slide are computed once per call: the same as top_variable_genes over the training tables)
    cohort = fold.cohort
    genes = _most_variable(cohort.shared_genes, [cohort.gene_moments(sid) for sid in fold.train], s.n_genes)
    rec: dict[str, Any] = {"gene_selection_slides": list(fold.train), "genes": genes}
    y_tr = np.concatenate([gene_matrix(tables[sid], genes, gene_input="log1p") for sid in fold.train])
    y_te = np.concatenate([gene_matrix(tables[sid], genes, gene_input="log1p") for sid in fold.test])
    groups = np.concatenate([np.full(tables[sid].n_obs, sid, dtype=object) for sid in fold.train])
    n_tr = len(y_tr)
    draws: dict[int, list[np.ndarray]] = {}
    if "expression" in s.tasks:
        for n in s.gene_shots:
            if n > n_tr:
                logger.warning("evaluate: fold %s has %d training spots; skipping gene shots %d.", fold.name, n_tr, n)
                continue
            draws[n] = [
                np.sort(_fold_seed(s.seed, fold.index, _TASK_CODE["expression"], n, d).choice(n_tr, n, replace=False))
                for d in range(s.n_draws)
            ]
        names = np.concatenate([tables[sid].obs_names.to_numpy() for sid in fold.train])
        rec["expression_draws"] = {str(n): [names[i].tolist() for i in ds] for n, ds in draws.items()}
    return _Targets(genes, y_tr, y_te, groups, draws), rec


def _ridge_scores(
    fold: _Fold, targets: _Targets, rep: str, x_tr: np.ndarray, x_te: np.ndarray, use_pca: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Protocol 3 for one representation, with or without PCA: all training spots, then every few-shot draw."""
    s, t = fold.settings, targets
    task = "expression_pca" if use_pca else "expression"
    prep = _Preprocess(x_tr, s.n_pca if use_pca else None, s.seed)
    z_tr, z_te = prep(x_tr), prep(x_te)
    pred, alpha = ridge_cv_predict(z_tr, t.y_tr, z_te, alphas=s.alphas, groups=t.groups, seed=s.seed)
    scores = [(pearson_per_gene(t.y_te, pred), len(t.y_tr), alpha)]
    rows, gene_rows = _gene_scores(scores, rep=rep, task=task, shot=ALL, **t.common(fold))
    for n, ds in t.draws.items():
        scores = []
        for d, idx in enumerate(ds):
            pred, alpha = ridge_cv_predict(
                z_tr[idx], t.y_tr[idx], z_te, alphas=s.alphas, groups=t.groups[idx], seed=s.seed + d
            )
            scores.append((pearson_per_gene(t.y_te, pred), n, alpha))
        r, g = _gene_scores(scores, rep=rep, task=task, shot=str(n), **t.common(fold))
        rows += r
        gene_rows += g
    return rows, gene_rows


def _joint_predictions(fold: _Fold, targets: _Targets) -> dict[str, np.ndarray]:
    """Retrieval predictions of every SPADE representation in the joint space, ``{representation: prediction}``.

    Per distinct model of the fold, the reference spots' gene input and embeddings and the held-out spots' expert
    embeddings are computed once for all its routings.
    """
    out: dict[str, np.ndarray] = {}
    for m, routing_of in _spade_routings(fold.settings.representations, fold.models).values():
        inputs, tissues = fold.cohort.model_inputs(m), fold.cohort.model_tissues(m)
        query = np.concatenate([inputs[s] for s in fold.test])
        known = all(tissues[s] is not None for s in fold.test)
        query_tissues = np.concatenate([tissues[s] for s in fold.test]) if known else None
        ref_in = np.concatenate([model_gene_input(m, fold.cohort.tables[s]) for s in fold.train])
        routings = list(dict.fromkeys(routing_of.values()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            preds = _joint_topk_means(
                m, query, ref_in, targets.y_tr, routings, fold.settings.retrieval_k, tissues=query_tissues
            )
        out.update({rep: preds[r] for rep, r in routing_of.items()})
    return out


def _retrieval_scores(
    fold: _Fold, targets: _Targets, rep: str, x_tr: np.ndarray, x_te: np.ndarray, pred: np.ndarray | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Protocol 5 for one representation: SPADE's joint space (``pred``, computed for its routings), else cosine."""
    if pred is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            pred = _topk_mean(_cosine_chunks(x_te, x_tr), targets.y_tr, fold.settings.retrieval_k)
    scores = [(pearson_per_gene(targets.y_te, pred), len(targets.y_tr), np.nan)]
    return _gene_scores(scores, rep=rep, task="retrieval", shot=ALL, **targets.common(fold))


# --------------------------------------------------------------------------------------------------------------------
# one fold: label probe (protocol 4)
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LabelSetup:
    """The labelled spots of a fold, and every (shots, draws, scored held-out spots, classes) setting."""

    lab_train: list[str]
    tr_ok: np.ndarray
    te_ok: np.ndarray
    y_tr: np.ndarray
    g_tr: np.ndarray
    y_te: np.ndarray
    settings: list[tuple[str, list[np.ndarray], np.ndarray, list[str]]]


def _label_group(values: np.ndarray) -> set[str]:
    return {v.split("\x1f", 1)[0] for v in values if v is not None}


def _label_name(value: str) -> str:
    return value.split("\x1f", 1)[1]


def _label_fold(fold: _Fold) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(score rows, protocol record) of the label probe within the held-out slides' label group."""
    setup, rec = _label_setup(fold)
    if setup is None:
        return [], rec
    rows = []
    for rep in fold.settings.representations:
        rows += _label_scores(fold, setup, rep)
    return rows, rec


def _label_setup(fold: _Fold) -> tuple[_LabelSetup | None, dict[str, Any]]:
    """The training spots (labelled, in the held-out slides' groups), the few-shot draws, and their record."""
    labels, s = fold.cohort.labels, fold.settings
    y_te_all = np.concatenate([labels[sid] for sid in fold.test])
    groups = _label_group(y_te_all)
    lab_train = [sid for sid in fold.train if _label_group(labels[sid]) & groups]
    rec: dict[str, Any] = {"label_train": lab_train}
    if not lab_train or not groups:
        rec["label_skipped"] = "no labelled training slide shares the held-out slides' label group"
        logger.info("evaluate: fold %s: no label training slide in group(s) %s; label task skipped.", fold.name, groups)
        return None, rec
    y_tr_all = np.concatenate([labels[sid] for sid in lab_train])
    g_tr_all = np.concatenate([np.full(len(labels[sid]), sid, dtype=object) for sid in lab_train])
    names_tr_all = np.concatenate([fold.cohort.tables[sid].obs_names.to_numpy() for sid in lab_train])
    tr_ok = np.array([v is not None and v.split("\x1f", 1)[0] in groups for v in y_tr_all])
    te_ok = np.array([v is not None for v in y_te_all])
    y_tr, g_tr, names_tr = y_tr_all[tr_ok].astype(str), g_tr_all[tr_ok], names_tr_all[tr_ok]
    classes, counts = np.unique(y_tr, return_counts=True)
    rec["label_classes"] = {_label_name(c): int(n) for c, n in zip(classes, counts, strict=True)}

    y_te = y_te_all[te_ok].astype(str)
    seen = np.isin(y_te, classes)
    rec["label_unseen_test_spots"] = int((~seen).sum())
    rec["label_unseen_test_classes"] = sorted({_label_name(c) for c in y_te[~seen]})
    settings = [(ALL, [np.arange(len(y_tr))], seen, sorted(set(y_te[seen])))]
    rec["label_draws"] = {}
    for k in s.shots:
        eligible = classes[counts >= k]
        eligible = eligible[np.isin(eligible, y_te)]
        if len(eligible) < 2:
            logger.warning(
                "evaluate: fold %s: fewer than two classes with %d training spots; skipping k=%d.", fold.name, k, k
            )
            continue
        by_class = {c: np.flatnonzero(y_tr == c) for c in eligible}
        draws = []
        for d in range(s.n_draws):
            rng = _fold_seed(s.seed, fold.index, _TASK_CODE["label"], k, d)
            draws.append(np.sort(np.concatenate([rng.choice(by_class[c], k, replace=False) for c in eligible])))
        scored = np.isin(y_te, eligible)
        settings.append((str(k), draws, scored, sorted(eligible)))
        rec["label_draws"][str(k)] = {
            "classes": [_label_name(c) for c in eligible],
            "n_test_scored": int(scored.sum()),
            "spots": [names_tr[i].tolist() for i in draws],
        }
    return _LabelSetup(lab_train, tr_ok, te_ok, y_tr, g_tr, y_te, settings), rec


def _label_scores(fold: _Fold, setup: _LabelSetup, rep: str) -> list[dict[str, Any]]:
    """Balanced accuracy and macro F1 of the logistic probe on one representation, for every setting and draw."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    s, u = fold.settings, setup
    x_te = fold.stack(rep, fold.test)[u.te_ok]
    prep = _Preprocess(fold.stack(rep, fold.train), None, s.seed)
    z_tr, z_te = prep(fold.stack(rep, u.lab_train)[u.tr_ok]), prep(x_te)
    rows = []
    for shot, draws, scored, eval_classes in u.settings:
        for d, idx in enumerate(draws):
            if shot == ALL:
                pred, c = logistic_cv_predict(z_tr, u.y_tr, z_te[scored], cs=s.cs, groups=u.g_tr, seed=s.seed)
            else:
                pred, c = logistic_cv_predict(z_tr[idx], u.y_tr[idx], z_te[scored], cs=[s.few_shot_c], seed=s.seed)
            truth = u.y_te[scored]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bacc = balanced_accuracy_score(truth, pred)
                f1 = f1_score(truth, pred, labels=eval_classes, average="macro", zero_division=0)
            rows += [
                {
                    "representation": rep,
                    "task": "label",
                    "fold": fold.name,
                    "shots": shot,
                    "draw": d,
                    "metric": metric,
                    "value": float(value),
                    "n_train": len(idx),
                    "n_test": int(scored.sum()),
                    "param": float(c),
                }
                for metric, value in (("balanced_accuracy", bacc), ("macro_f1", f1))
            ]
    return rows

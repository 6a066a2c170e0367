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

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._sdata import as_cohort

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ._spade import SpadeModel

logger = logging.getLogger("spade_sc")

#: Representations :func:`evaluate` compares by default; any other name is read from ``obsm``.
REPRESENTATIONS = ("base", "spade_soft", "spade_hard", "spade_uniform", "single_expert", "random_projection")
#: Built-in representations that are not in the default list.
EXTRA_REPRESENTATIONS = ("untrained_heads",)
#: Protocols of :func:`evaluate`.
TASKS = ("expression", "label", "retrieval")
#: Ridge penalties searched by inner cross-validation (features are standardised first).
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-1, 7, 17))
#: Inverse L2 penalties of the logistic probe searched by inner cross-validation with all labels.
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 1, 6))
#: ``shots`` value of the rows that use every labelled training spot.
ALL = "all"
_SPADE_ROUTING = {"spade_soft": "soft", "spade_hard": "hard", "spade_uniform": "uniform", "single_expert": "soft"}
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
        Everything needed to reproduce the scores: folds (test and training slides, target genes, label classes,
        drawn spots by ``obs_names``, SPADE training record and fingerprint), seeds, grids, PCA, shots, draws.
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
    import warnings

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
def _spot_tables(cohort: Mapping[str, SpatialData], table_key: str | None) -> dict[str, tuple[str, str, AnnData]]:
    from ._spade import _spots_table

    out = {}
    for sid, sdata in cohort.items():
        tkey, skey = _spots_table(sdata, table_key, None)
        out[sid] = (tkey, skey, sdata.tables[tkey])
    return out


def _log1p_moments(table: AnnData, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-gene sum and sum of squares of log1p(normalize_total) over a table's spots, sparse-aware."""
    from scipy import sparse

    from ..pp._genes import _check_counts, _counts, _counts_source, _spot_scale

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
    s1 = np.zeros(len(genes))
    s2 = np.zeros(len(genes))
    n = 0
    for t in tables:
        a, b, m = _log1p_moments(t, genes)
        s1 += a
        s2 += b
        n += m
    var = s2 / max(n, 1) - (s1 / max(n, 1)) ** 2
    order = np.lexsort((np.array(genes, dtype=object).astype(str), -var))
    return [genes[i] for i in order[: int(n_genes)]]


def _light_copy(sdata: SpatialData, tkey: str, skey: str) -> SpatialData:
    """The spots, a copy of their table and the attrs of a slide: what tl.fit needs when features exist."""
    import copy

    from spatialdata import SpatialData

    out = SpatialData(shapes={skey: sdata.shapes[skey]}, tables={tkey: sdata.tables[tkey].copy()})
    out.attrs.update(copy.deepcopy(dict(sdata.attrs)))
    return out


def _fold_seed(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *[int(p) for p in parts]]))


# --------------------------------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------------------------------
def _topk_mean(sim_chunks, ref_values: np.ndarray, k: int) -> np.ndarray:
    out = []
    for s in sim_chunks:
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        out.append(ref_values[top].mean(1))
    return np.concatenate(out) if out else np.zeros((0, ref_values.shape[1]))


def _joint_similarity_chunks(
    model: SpadeModel, features: np.ndarray, ref_gene_input: np.ndarray, routing: str, chunk: int = 1024
):
    """Query image embedding vs reference gene embedding, per expert, weighted by the query's routing."""
    import torch

    weights = model.routing_weights(features, routing)
    model.module.eval()
    with torch.no_grad():
        g = model.module.gene_embed_all(torch.as_tensor(np.asarray(ref_gene_input, dtype=np.float32)))
        if model.init_params_["loss"] == "infonce":
            g = torch.nn.functional.normalize(g, dim=-1)
        for start in range(0, len(features), chunk):
            f = model.module.image_embed_all(torch.as_tensor(np.asarray(features[start : start + chunk], np.float32)))
            if model.init_params_["loss"] == "infonce":
                f = torch.nn.functional.normalize(f, dim=-1)
            w = torch.as_tensor(weights[start : start + chunk])
            # (q, K, d) x (r, K, d) -> (q, r): sum_k w_qk <f_k(x_q), g_k(y_r)>
            yield torch.einsum("qkd,rkd,qk->qr", f, g, w).numpy()


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
    key_added: str = "spade_predicted",
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
        A trained :class:`~spade_sc.tl.SpadeModel`.
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
    from ..pp import gene_matrix
    from ._spade import ROUTINGS, _spots_table

    if not model.is_trained_:
        msg = "The model is not trained; fit it first (spade_sc.tl.fit)."
        raise ValueError(msg)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        msg = f"k must be a positive integer, got {k!r}."
        raise ValueError(msg)
    routing = routing or model.init_params_["routing"]
    if routing not in ROUTINGS:
        msg = f"routing={routing!r}; choose one of {ROUTINGS}."
        raise ValueError(msg)
    features_key = features_key or model.features_key
    genes = list(model.genes) if genes is None else [str(g) for g in genes]
    tkey, _ = _spots_table(sdata, table_key, None)
    table = sdata.tables[tkey]
    feats = model._features(table, f"table {tkey!r}", features_key)
    ref = as_cohort(reference)
    ref_in, ref_y = [], []
    for name, s in ref.items():
        rk, _ = _spots_table(s, reference_table_key, None)
        t = s.tables[rk]
        ref_in.append(model.gene_input_matrix(t))
        ref_y.append(gene_matrix(t, genes, gene_input="log1p"))
        logger.debug("predict_expression: reference slide %s, %d spots", name, t.n_obs)
    ref_in_arr, ref_y_arr = np.concatenate(ref_in), np.concatenate(ref_y)
    if len(ref_y_arr) == 0:
        msg = "The reference holds no spots."
        raise ValueError(msg)
    pred = _topk_mean(_joint_similarity_chunks(model, feats, ref_in_arr, routing), ref_y_arr, int(k)).astype(np.float32)
    if not inplace:
        return pred
    table.obsm[key_added] = pred
    table.uns[key_added] = {
        "genes": genes,
        "params": {
            "k": int(k),
            "routing": routing,
            "similarity": "cosine" if model.init_params_["loss"] == "infonce" else "dot",
            "n_reference_spots": len(ref_y_arr),
            "reference_slides": list(ref),
            "fingerprint": model.fingerprint(),
        },
    }
    return None


# --------------------------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------------------------
def _check_shots(values: Sequence[int], name: str) -> list[int]:
    values = [values] if isinstance(values, int | np.integer) else list(values)
    if any(isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1 for v in values):
        msg = f"{name} must be positive integers, got {values!r}."
        raise ValueError(msg)
    return sorted({int(v) for v in values})


def _resolve_folds(
    slides: list[str], folds: Mapping[str, Sequence[str]] | Sequence[Sequence[str]] | None
) -> dict[str, list[str]]:
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


def evaluate(
    cohort: Mapping[str, SpatialData] | Sequence[SpatialData],
    *,
    features_key: str,
    label_key: str | None = None,
    label_group_key: str | None = None,
    representations: Sequence[str] = REPRESENTATIONS,
    tasks: Sequence[str] = TASKS,
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
       ``n_genes`` genes of highest variance over the **training** slides' spots (:func:`top_variable_genes`;
       the same genes for all shots). Features are standardised, optionally projected by PCA to ``n_pca``
       components (task ``"expression_pca"``), both fitted on the features of all training spots (no expression
       used); a ridge regression with ``alpha`` chosen from ``alphas`` by inner leave-one-slide-out CV
       (:func:`ridge_cv_predict`) predicts the held-out spots; score: Pearson r per gene over the held-out spots,
       averaged over genes (genes constant on the held-out slide are skipped). Few-shot: ``gene_shots`` spots drawn
       uniformly from the training spots, ``n_draws`` times.
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
        Labelled spots per class of the few-shot label probe.
    gene_shots
        Labelled spots (in total) of the few-shot expression task.
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
        ``.table`` (tidy scores), ``.per_gene``, ``.protocol``, ``.summary()``, ``.compare()``. Nothing is written
        into ``cohort``.
    """
    from tqdm.auto import tqdm

    from ._spade import fit

    slides_map = as_cohort(cohort)
    slides = list(slides_map)
    representations = list(dict.fromkeys(representations))
    if not representations:
        msg = "representations is empty."
        raise ValueError(msg)
    tasks = list(dict.fromkeys(tasks))
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        msg = f"tasks={tasks!r}; choose among {TASKS}."
        raise ValueError(msg)
    if "label" in tasks and label_key is None:
        tasks.remove("label")
    shots = _check_shots(shots, "shots")
    gene_shots = _check_shots(gene_shots, "gene_shots")
    if isinstance(n_draws, bool) or not isinstance(n_draws, int | np.integer) or n_draws < 1:
        msg = f"n_draws must be a positive integer, got {n_draws!r}."
        raise ValueError(msg)
    pca = [bool(p) for p in ([pca] if isinstance(pca, bool) else pca)]
    if not pca and "expression" in tasks:
        msg = "pca must hold False and / or True."
        raise ValueError(msg)
    fold_map = _resolve_folds(slides, folds)

    # ---- validation of the inputs (nothing is computed before it passes) ----
    spot_tables = _spot_tables(slides_map, table_key)
    feats: dict[str, np.ndarray] = {}
    for sid, (tkey, _, t) in spot_tables.items():
        if features_key not in t.obsm:
            msg = (
                f"Slide {sid!r}, table {tkey!r}: obsm[{features_key!r}] is missing; compute it with "
                "spade_sc.pp.image_features."
            )
            raise KeyError(msg)
        x = np.asarray(t.obsm[features_key], dtype=np.float32)
        if x.ndim != 2 or not np.isfinite(x).all():
            msg = f"Slide {sid!r}: obsm[{features_key!r}] must be a finite 2-D array, got shape {x.shape}."
            raise ValueError(msg)
        feats[sid] = x
    if len({x.shape[1] for x in feats.values()}) > 1:
        msg = (
            f"obsm[{features_key!r}] differs in dimension across slides: { {s: x.shape[1] for s, x in feats.items()} }."
        )
        raise ValueError(msg)
    for rep in representations:
        if rep in REPRESENTATIONS or rep in EXTRA_REPRESENTATIONS:
            continue
        missing = [sid for sid, (_, _, t) in spot_tables.items() if rep not in t.obsm]
        if missing:
            msg = (
                f"Representation {rep!r} is neither one of {REPRESENTATIONS + EXTRA_REPRESENTATIONS} nor an obsm key "
                "of every slide "
                f"(missing in {missing})."
            )
            raise ValueError(msg)
    labels: dict[str, np.ndarray] = {}
    if "label" in tasks:
        for sid, (tkey, _, t) in spot_tables.items():
            for key in (label_key, label_group_key):
                if key is not None and key not in t.obs:
                    msg = f"Slide {sid!r}, table {tkey!r}: obs[{key!r}] is missing."
                    raise KeyError(msg)
            lab = t.obs[label_key]
            ok = lab.notna().to_numpy()
            grp = (
                np.full(t.n_obs, "", dtype=object)
                if label_group_key is None
                else t.obs[label_group_key].astype(str).to_numpy()
            )
            lab_s = np.where(ok, grp.astype(str) + "\x1f" + lab.astype(str).to_numpy(), None)
            labels[sid] = lab_s
    fit_kwargs = dict(fit_kwargs or {})
    for k in ("key_added", "features_key", "table_key"):
        if k in fit_kwargs:
            msg = f"fit_kwargs may not set {k!r} (evaluate sets it)."
            raise ValueError(msg)
    fit_kwargs.setdefault("seed", seed)
    fit_kwargs.setdefault("progress", False)
    need_spade = any(r in ("spade_soft", "spade_hard", "spade_uniform") for r in representations)
    need_single = "single_expert" in representations
    dim = next(iter(feats.values())).shape[1]
    projection = None
    if "random_projection" in representations:
        projection = (_fold_seed(seed, 7).standard_normal((dim, int(projection_dim))) / np.sqrt(projection_dim)).astype(
            np.float32
        )

    untrained: dict[str, np.ndarray] = {}
    if "untrained_heads" in representations:
        import torch

        from ..model import BatchedExperts

        # the image head of a single expert exactly as SpadeModel initialises it (image heads are drawn first)
        heads = BatchedExperts(1, dim, 1, seed=int(fit_kwargs["seed"])).eval()
        with torch.no_grad():
            untrained = {s: heads.image_embed_all(torch.as_tensor(x))[:, 0].numpy() for s, x in feats.items()}

    protocol: dict[str, Any] = {
        "features_key": features_key,
        "representations": representations,
        "tasks": tasks,
        "label_key": label_key,
        "label_group_key": label_group_key,
        "n_genes": int(n_genes),
        "gene_selection": "variance of log1p(normalize_total(1e4)) over the training slides' spots",
        "shots": shots,
        "gene_shots": gene_shots,
        "n_draws": int(n_draws),
        "pca": pca,
        "n_pca": int(n_pca),
        "preprocessing": "StandardScaler (+ PCA) fitted on the features of all training spots",
        "alphas": [float(a) for a in alphas],
        "alpha_selection": "inner leave-one-slide-out CV (3+ slides; else shuffled 5-fold), MSE over genes",
        "cs": [float(c) for c in cs],
        "c_selection": "inner leave-one-slide-out CV (3+ slides; else shuffled 5-fold), balanced accuracy",
        "few_shot_c": float(few_shot_c),
        "retrieval_k": int(retrieval_k),
        "retrieval": "SPADE: sum_k w_k(query) <f_k(x_query), g_k(y_ref)>; others: cosine of features",
        "projection_dim": int(projection_dim),
        "fit_kwargs": {k: v for k, v in fit_kwargs.items() if k != "trainer_kwargs"},
        "seed": int(seed),
        "folds": {},
    }

    rows: list[dict[str, Any]] = []
    gene_rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    bar = tqdm(list(fold_map.items()), desc="evaluate", disable=not progress)
    for fold_idx, (fold, test) in enumerate(bar):
        t0 = time.perf_counter()
        train = [s for s in slides if s not in test]
        rec: dict[str, Any] = {"test": list(test), "train": train}
        protocol["folds"][fold] = rec

        # -- 1. SPADE on copies of the training slides only
        models: dict[str, SpadeModel] = {}
        if need_spade or need_single:
            copies = {s: _light_copy(slides_map[s], spot_tables[s][0], spot_tables[s][1]) for s in train}
            tk = table_key
            if need_spade:
                models["spade"] = fit(copies, features_key=features_key, table_key=tk, **fit_kwargs)
            if need_single and need_spade and fit_kwargs.get("n_experts") == 1:
                models["single_expert"] = models["spade"]  # SPADE is a single expert already: same training
            elif need_single:
                kw = {**fit_kwargs, "n_experts": 1, "n_clusters_per_tissue": 1}
                models["single_expert"] = fit(copies, features_key=features_key, table_key=tk, **kw)
            del copies
            for name, m in models.items():
                rec[name] = {
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

        # -- 2. representations of every spot
        reps: dict[str, dict[str, np.ndarray]] = {}
        for rep in representations:
            if rep == "base":
                reps[rep] = feats
            elif rep == "random_projection":
                reps[rep] = {s: x @ projection for s, x in feats.items()}
            elif rep == "untrained_heads":
                reps[rep] = untrained
            elif rep in _SPADE_ROUTING:
                m = models["single_expert" if rep == "single_expert" else "spade"]
                reps[rep] = {s: m.get_image_embedding(x, _SPADE_ROUTING[rep])[0] for s, x in feats.items()}
            else:
                reps[rep] = {s: np.asarray(spot_tables[s][2].obsm[rep], dtype=np.float32) for s in slides}

        # -- 3 / 5. expression prediction and retrieval
        if "expression" in tasks or "retrieval" in tasks:
            _expression_fold(
                fold,
                fold_idx,
                test,
                train,
                {s: spot_tables[s][2] for s in slides},
                reps,
                feats,
                models,
                representations,
                rec,
                rows,
                gene_rows,
                tasks=tasks,
                n_genes=int(n_genes),
                gene_shots=gene_shots,
                n_draws=int(n_draws),
                pca=pca,
                n_pca=int(n_pca),
                alphas=alphas,
                retrieval_k=int(retrieval_k),
                seed=seed,
            )

        # -- 4. label probe within the held-out slides' label group
        if "label" in tasks:
            _label_fold(
                fold,
                fold_idx,
                test,
                train,
                labels,
                reps,
                representations,
                rec,
                rows,
                shots=shots,
                n_draws=int(n_draws),
                cs=cs,
                few_shot_c=few_shot_c,
                seed=seed,
                obs_names={s: spot_tables[s][2].obs_names.to_numpy() for s in slides},
            )
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        logger.info("evaluate: fold %s (test %s) done in %.1f s", fold, test, rec["seconds"])
    protocol["seconds"] = round(time.perf_counter() - t_start, 2)

    used = set(shots if "label" in tasks else []) | set(gene_shots if "expression" in tasks else [])
    shot_cats = [str(s) for s in sorted(used)] + [ALL]
    table = pd.DataFrame(rows, columns=_COLUMNS)
    table["shots"] = pd.Categorical(table["shots"], categories=shot_cats, ordered=True)
    table = table.astype({"draw": np.int64, "n_train": np.int64, "n_test": np.int64, "value": np.float64})
    per_gene = pd.DataFrame(gene_rows, columns=["representation", "task", "fold", "shots", "gene", "pearson"])
    per_gene["shots"] = pd.Categorical(per_gene["shots"], categories=shot_cats, ordered=True)
    return EvaluationResult(table=table, per_gene=per_gene, protocol=protocol)


def _add_gene_scores(
    rows: list[dict[str, Any]],
    gene_rows: list[dict[str, Any]],
    scores: list[tuple[np.ndarray, int, float]],
    *,
    rep: str,
    task: str,
    fold: str,
    shot: str,
    genes: list[str],
    n_test: int,
) -> None:
    """One row per draw (mean Pearson over genes) and one per gene (mean over draws)."""
    for d, (r, n_train, param) in enumerate(scores):
        rows.append(
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
        )
    stacked = np.stack([r for r, _, _ in scores])
    with np.errstate(invalid="ignore"):
        per = stacked[0] if len(stacked) == 1 else np.nanmean(np.where(np.isfinite(stacked), stacked, np.nan), 0)
    for g, v in zip(genes, per, strict=True):
        gene_rows.append({"representation": rep, "task": task, "fold": fold, "shots": shot, "gene": g, "pearson": v})


def _expression_fold(
    fold: str,
    fold_idx: int,
    test: list[str],
    train: list[str],
    tables: dict[str, AnnData],
    reps: dict[str, dict[str, np.ndarray]],
    feats: dict[str, np.ndarray],
    models: dict[str, SpadeModel],
    representations: list[str],
    rec: dict[str, Any],
    rows: list[dict[str, Any]],
    gene_rows: list[dict[str, Any]],
    *,
    tasks: list[str],
    n_genes: int,
    gene_shots: list[int],
    n_draws: int,
    pca: list[bool],
    n_pca: int,
    alphas: Sequence[float],
    retrieval_k: int,
    seed: int,
) -> None:
    """Protocols 1 (ridge, with / without PCA, all and few training spots) and 3 (retrieval) on one fold."""
    import warnings

    from ..pp import gene_matrix

    # target genes: the most variable of the training slides (names shared by every slide, the held-out one's
    # expression never read here)
    shared = set.intersection(*[set(t.var_names) for t in tables.values()])
    genes = top_variable_genes([tables[s] for s in train], n_genes, genes=sorted(shared))
    rec["genes"] = genes
    y_tr = np.concatenate([gene_matrix(tables[s], genes, gene_input="log1p") for s in train])
    y_te = np.concatenate([gene_matrix(tables[s], genes, gene_input="log1p") for s in test])
    groups = np.concatenate([np.full(tables[s].n_obs, s, dtype=object) for s in train])
    n_tr = len(y_tr)
    draws: dict[int, list[np.ndarray]] = {}
    if "expression" in tasks:
        for n in gene_shots:
            if n > n_tr:
                logger.warning("evaluate: fold %s has %d training spots; skipping gene shots %d.", fold, n_tr, n)
                continue
            draws[n] = [
                np.sort(_fold_seed(seed, fold_idx, _TASK_CODE["expression"], n, d).choice(n_tr, n, replace=False))
                for d in range(n_draws)
            ]
        names = np.concatenate([tables[s].obs_names.to_numpy() for s in train])
        rec["expression_draws"] = {str(n): [names[i].tolist() for i in ds] for n, ds in draws.items()}
    common = {"fold": fold, "genes": genes, "n_test": len(y_te)}

    for rep in representations:
        x_tr = np.concatenate([reps[rep][s] for s in train])
        x_te = np.concatenate([reps[rep][s] for s in test])
        for use_pca in pca if "expression" in tasks else []:
            task = "expression_pca" if use_pca else "expression"
            prep = _Preprocess(x_tr, n_pca if use_pca else None, seed)
            z_tr, z_te = prep(x_tr), prep(x_te)
            pred, alpha = ridge_cv_predict(z_tr, y_tr, z_te, alphas=alphas, groups=groups, seed=seed)
            scores = [(pearson_per_gene(y_te, pred), n_tr, alpha)]
            _add_gene_scores(rows, gene_rows, scores, rep=rep, task=task, shot=ALL, **common)
            for n, ds in draws.items():
                scores = []
                for d, idx in enumerate(ds):
                    pred, alpha = ridge_cv_predict(
                        z_tr[idx], y_tr[idx], z_te, alphas=alphas, groups=groups[idx], seed=seed + d
                    )
                    scores.append((pearson_per_gene(y_te, pred), n, alpha))
                _add_gene_scores(rows, gene_rows, scores, rep=rep, task=task, shot=str(n), **common)
        if "retrieval" in tasks:
            if rep in _SPADE_ROUTING:
                m = models["single_expert" if rep == "single_expert" else "spade"]
                ref_in = np.concatenate([m.gene_input_matrix(tables[s]) for s in train])
                query = np.concatenate([feats[s] for s in test])
                sims = _joint_similarity_chunks(m, query, ref_in, _SPADE_ROUTING[rep])
            else:
                sims = _cosine_chunks(x_te, x_tr)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                pred = _topk_mean(sims, y_tr, retrieval_k)
            scores = [(pearson_per_gene(y_te, pred), n_tr, np.nan)]
            _add_gene_scores(rows, gene_rows, scores, rep=rep, task="retrieval", shot=ALL, **common)


def _label_fold(
    fold: str,
    fold_idx: int,
    test: list[str],
    train: list[str],
    labels: dict[str, np.ndarray],
    reps: dict[str, dict[str, np.ndarray]],
    representations: list[str],
    rec: dict[str, Any],
    rows: list[dict[str, Any]],
    *,
    shots: list[int],
    n_draws: int,
    cs: Sequence[float],
    few_shot_c: float,
    seed: int,
    obs_names: dict[str, np.ndarray],
) -> None:
    import warnings

    from sklearn.metrics import balanced_accuracy_score, f1_score

    def group_of(values: np.ndarray) -> set[str]:
        return {v.split("\x1f", 1)[0] for v in values if v is not None}

    y_te_all = np.concatenate([labels[s] for s in test])
    groups = group_of(y_te_all)
    lab_train = [s for s in train if group_of(labels[s]) & groups]
    rec["label_train"] = lab_train
    if not lab_train or not groups:
        rec["label_skipped"] = "no labelled training slide shares the held-out slides' label group"
        logger.info("evaluate: fold %s: no label training slide in group(s) %s; label task skipped.", fold, groups)
        return
    y_tr_all = np.concatenate([labels[s] for s in lab_train])
    g_tr_all = np.concatenate([np.full(len(labels[s]), s, dtype=object) for s in lab_train])
    names_tr_all = np.concatenate([obs_names[s] for s in lab_train])
    tr_ok = np.array([v is not None and v.split("\x1f", 1)[0] in groups for v in y_tr_all])
    te_ok = np.array([v is not None for v in y_te_all])
    y_tr, g_tr, names_tr = y_tr_all[tr_ok].astype(str), g_tr_all[tr_ok], names_tr_all[tr_ok]
    classes, counts = np.unique(y_tr, return_counts=True)
    pretty = lambda c: c.split("\x1f", 1)[1]
    rec["label_classes"] = {pretty(c): int(n) for c, n in zip(classes, counts, strict=True)}

    settings: list[tuple[str, list[np.ndarray], np.ndarray, list[str]]] = []
    y_te_lab = y_te_all[te_ok].astype(str)
    seen = np.isin(y_te_lab, classes)
    rec["label_unseen_test_spots"] = int((~seen).sum())
    rec["label_unseen_test_classes"] = sorted({pretty(c) for c in y_te_lab[~seen]})
    settings.append((ALL, [np.arange(len(y_tr))], seen, sorted(set(y_te_lab[seen]))))
    rec["label_draws"] = {}
    for k in shots:
        eligible = classes[counts >= k]
        eligible = eligible[np.isin(eligible, y_te_lab)]
        if len(eligible) < 2:
            logger.warning(
                "evaluate: fold %s: fewer than two classes with %d training spots; skipping k=%d.", fold, k, k
            )
            continue
        by_class = {c: np.flatnonzero(y_tr == c) for c in eligible}
        draws = []
        for d in range(n_draws):
            rng = _fold_seed(seed, fold_idx, _TASK_CODE["label"], k, d)
            draws.append(np.sort(np.concatenate([rng.choice(by_class[c], k, replace=False) for c in eligible])))
        scored = np.isin(y_te_lab, eligible)
        settings.append((str(k), draws, scored, sorted(eligible)))
        rec["label_draws"][str(k)] = {
            "classes": [pretty(c) for c in eligible],
            "n_test_scored": int(scored.sum()),
            "spots": [names_tr[i].tolist() for i in draws],
        }

    for rep in representations:
        x_tr_all = np.concatenate([reps[rep][s] for s in lab_train])
        x_te = np.concatenate([reps[rep][s] for s in test])[te_ok]
        prep = _Preprocess(np.concatenate([reps[rep][s] for s in train]), None, seed)
        z_tr, z_te = prep(x_tr_all[tr_ok]), prep(x_te)
        for shot, draws, scored, eval_classes in settings:
            for d, idx in enumerate(draws):
                if shot == ALL:
                    pred, c = logistic_cv_predict(z_tr, y_tr, z_te[scored], cs=cs, groups=g_tr, seed=seed)
                else:
                    pred, c = logistic_cv_predict(z_tr[idx], y_tr[idx], z_te[scored], cs=[few_shot_c], seed=seed)
                truth = y_te_lab[scored]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    bacc = balanced_accuracy_score(truth, pred)
                    f1 = f1_score(truth, pred, labels=eval_classes, average="macro", zero_division=0)
                for metric, value in (("balanced_accuracy", bacc), ("macro_f1", f1)):
                    rows.append(
                        {
                            "representation": rep,
                            "task": "label",
                            "fold": fold,
                            "shots": shot,
                            "draw": d,
                            "metric": metric,
                            "value": float(value),
                            "n_train": len(idx),
                            "n_test": int(scored.sum()),
                            "param": float(c),
                        }
                    )

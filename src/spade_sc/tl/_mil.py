"""Slide-level gated attention MIL (ABMIL) on tile embeddings: training, cross-validation, few-shot, attention.

Protocol
--------
- **Bags.** A slide is a bag of its tile embeddings, ``tables["<image>_tiles_table"].obsm[features_key]`` (made by
  :func:`spade_sc.tl.slide_embeddings`, or :func:`spade_sc.pp.tile_tissue` + :func:`spade_sc.tl.embed`).
- **Labels.** From ``labels`` (a DataFrame indexed by slide id, or the AnnData of :func:`slide_embeddings`), else
  from ``sdata.attrs["spade_sc"]["slide"]`` (where :func:`spade_sc.datasets.synthetic` writes its ground truth).
  Slides without a label are left out (logged).
- **Model.** :class:`spade_sc.model.GatedABMIL`, one bag per step, AdamW, a fixed number of epochs (no early
  stopping, so no validation slides are taken from the training fold). Features are standardised with the mean and
  standard deviation of the training tiles (stored in the model). Classification: class-balanced sampling with
  replacement (``WeightedRandomSampler``, one epoch = as many bags as training slides); BCE with logits for two
  classes (one logit), cross-entropy otherwise. Survival: discrete-time NLL over (at most) 4 bins whose edges are
  the quartiles of the training fold's event times; risk = ``-sum_t S_t``.
- **Evaluation.** Cross-validation by slide (``StratifiedKFold`` on the label, on the event indicator for survival),
  or few-shot: ``k_shot`` slides per class (per event group for survival) drawn ``n_repeats`` times, tested on all
  remaining labelled slides. Metrics: ROC AUC (one-vs-rest macro with more than two classes) and macro F1
  (threshold 0.5 / argmax) for classification; Harrell's C-index for survival.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import MIL_TASKS, Keys
from .._sdata import as_cohort, check_same_dimension
from .._validation import check_choice, check_fraction, check_int
from ..model._mil_model import MILModel
from ..model._trainer import default_trainer_kwargs, quiet_lightning, torch_state
from ._slides import labels_frame, require_tiles, slide_info, tile_features

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["MILModel", "MILResult", "attention", "train_mil"]

logger = logging.getLogger("spade_sc")

#: Number of discrete-time survival bins (quartiles of the training event times).
N_BINS = 4


# --------------------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------------------
def concordance_index(time: Any, risk: Any, event: Any) -> float:
    """Harrell's concordance index of risk scores (higher risk, shorter survival).

    A pair (i, j) is comparable when the shorter time is an observed event: ``t_i < t_j`` and ``event_i``, or
    ``t_i == t_j`` with ``event_i`` and not ``event_j`` (the censored one outlived the event). Two events at the same
    time are not comparable. A comparable pair is concordant when ``risk_i > risk_j`` and counts 1/2 when the risks
    tie. ``C = (concordant + ties / 2) / comparable``; NaN when no pair is comparable.

    Parameters
    ----------
    time
        Survival or censoring times (n,).
    risk
        Predicted risk (n,).
    event
        1 (or True) when the event was observed, 0 when censored (n,).

    Returns
    -------
    The C-index in [0, 1].
    """
    t = np.asarray(time, dtype=float)
    r = np.asarray(risk, dtype=float)
    e = np.asarray(event).astype(bool)
    if not (t.shape == r.shape == e.shape) or t.ndim != 1:
        msg = f"time, risk and event must be 1-D of the same length, got {t.shape}, {r.shape}, {e.shape}."
        raise ValueError(msg)
    if not (np.isfinite(t).all() and np.isfinite(r).all()):
        msg = "time and risk must be finite."
        raise ValueError(msg)
    shorter = (t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & ~e[None, :])
    comparable = shorter & e[:, None]
    np.fill_diagonal(comparable, False)
    n = comparable.sum()
    if n == 0:
        return float("nan")
    concordant = (comparable & (r[:, None] > r[None, :])).sum()
    ties = (comparable & (r[:, None] == r[None, :])).sum()
    return float((concordant + 0.5 * ties) / n)


def _auc(y: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    """ROC AUC: binary on the positive column, else one-vs-rest macro over the classes present with negatives."""
    from sklearn.metrics import roc_auc_score

    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1])) if len(np.unique(y)) == 2 else float("nan")
    aucs = [
        roc_auc_score(y == c, probs[:, c]) for c in range(n_classes) if 0 < int((y == c).sum()) < len(y)
    ]  # one-vs-rest
    return float(np.mean(aucs)) if aucs else float("nan")


def _classification_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, float]:
    from sklearn.metrics import f1_score

    pred = (probs[:, 1] > 0.5).astype(int) if n_classes == 2 else probs.argmax(1)
    f1 = f1_score(y, pred, labels=list(range(n_classes)), average="macro", zero_division=0)
    return {"auc": _auc(y, probs, n_classes), "f1": float(f1)}


# --------------------------------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class MILResult:
    """What :func:`train_mil` returns.

    Attributes
    ----------
    task
        ``"classification"`` or ``"survival"``.
    protocol
        ``"cv"`` (cross-validation by slide), ``"few_shot"`` or ``"full"`` (all slides, no evaluation).
    metrics
        One row per split and metric: ``split`` (``"cv"`` or ``"<k>-shot"``), ``fold`` (fold, or draw of the
        few-shot protocol), ``metric`` (``auc``, ``f1`` or ``c_index``), ``value``, ``n_train``, ``n_test``.
    splits
        One dict per split: ``split``, ``fold``, ``train`` and ``test`` (slide ids).
    predictions
        One row per (split, test slide): ``split``, ``fold``, ``slide``, the truth (``label`` or ``time`` and
        ``event``) and the prediction (``prob_<class>`` for every class, or ``risk``). Under cross-validation each
        slide appears once: these are the out-of-fold predictions.
    models
        The model of every split, in the order of ``splits``.
    model
        The model trained on all labelled slides (``folds=None``), else the model of the last split; use
        :meth:`model_for` for the model that did not see a given slide.
    labels
        The labels used (index: slide id).
    params
        The arguments of the run.
    """

    task: str
    protocol: str
    metrics: pd.DataFrame
    splits: list[dict[str, Any]]
    predictions: pd.DataFrame
    models: list[MILModel]
    model: MILModel | None
    labels: pd.DataFrame
    params: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Mean and standard deviation (ddof=1) of every metric over folds or draws.

        Returns
        -------
        A DataFrame indexed by metric with columns ``mean``, ``sd``, ``n`` (splits with a defined value) and, under
        cross-validation, ``pooled`` (the metric of all out-of-fold predictions together).
        """
        if self.metrics.empty:
            return pd.DataFrame(columns=["mean", "sd", "n"])
        g = self.metrics.groupby("metric", sort=False)["value"]
        out = pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1), "n": g.count()})
        if self.protocol == "cv":
            out["pooled"] = pd.Series(self.pooled_metrics())
        return out

    def pooled_metrics(self) -> dict[str, float]:
        """Metrics of the out-of-fold predictions pooled over all folds (cross-validation only)."""
        if self.protocol != "cv":
            msg = "Pooled out-of-fold metrics exist for cross-validation only."
            raise ValueError(msg)
        p = self.predictions
        if self.task == "survival":
            return {"c_index": concordance_index(p["time"], p["risk"], p["event"])}
        classes = self.params["classes"]
        probs = p[[f"prob_{c}" for c in classes]].to_numpy()
        y = p["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
        return _classification_metrics(y, probs, len(classes))

    def model_for(self, slide: str) -> MILModel:
        """The model of the split whose test set holds ``slide`` (cross-validation), else :attr:`model`."""
        if self.protocol == "cv":
            for split, m in zip(self.splits, self.models, strict=True):
                if slide in split["test"]:
                    return m
            msg = f"Slide {slide!r} was in no test fold (labelled slides: {list(self.labels.index)[:10]}...)."
            raise KeyError(msg)
        if self.model is None:  # pragma: no cover - every protocol sets a model
            msg = "No model."
            raise ValueError(msg)
        return self.model

    def __repr__(self) -> str:
        s = self.summary()
        parts = [f"{m}={r['mean']:.3f}+/-{r['sd']:.3f}" for m, r in s.iterrows()] if len(s) else []
        return f"MILResult({self.task}, {self.protocol}, {len(self.splits)} split(s); {', '.join(parts)})"


# --------------------------------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _SlideLabels:
    """The checked labels of the labelled slides (rows of ``frame``, in the order of ``names``).

    ``strata`` is what the splits stratify on: the class index (classification) or the event indicator (survival).
    """

    task: str
    frame: pd.DataFrame
    strata: np.ndarray
    classes: list[Any] | None = None
    y: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    event_key: str | None = None

    @property
    def names(self) -> list[str]:
        """Ids of the labelled slides."""
        return list(self.frame.index)

    @property
    def group(self) -> str:
        """What a stratum is called in messages."""
        return "class" if self.task == "classification" else "event group"

    def stratum_name(self, s: int) -> Any:
        """The class label, or ``"<event_key>=<0/1>"``, of stratum ``s``."""
        return self.classes[s] if self.task == "classification" else f"{self.event_key}={int(s)}"

    def targets(self, idx: np.ndarray) -> tuple[list[dict[str, Any]], np.ndarray | None, int]:
        """Training targets of the slides ``idx``, the survival bin edges (set on them) and the number of outputs."""
        if self.task == "classification":
            n = len(self.classes)
            return [{"y": int(self.y[i])} for i in idx], None, 1 if n == 2 else n
        edges = _bin_edges(self.time[idx], self.event[idx])
        bins = _time_bins(self.time[idx], edges)
        targets = [{"bin": int(b), "event": float(self.event[i])} for b, i in zip(bins, idx, strict=True)]
        return targets, edges, len(edges) - 1

    def sampling_weights(self, idx: np.ndarray) -> np.ndarray:
        """Class-balanced weights (classification), uniform ones (survival)."""
        if self.task != "classification":
            return np.ones(len(idx))
        strata = self.strata[idx]
        return 1.0 / pd.Series(strata).value_counts().loc[strata].to_numpy(dtype=float)

    def score(self, idx: np.ndarray, predictions: Sequence[Any]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Rows of truth and prediction of the test slides ``idx``, and their metrics."""
        if self.task == "classification":
            probs = np.stack(predictions)
            rows = [
                {
                    "label": self.classes[self.y[i]],
                    **{f"prob_{c}": float(v) for c, v in zip(self.classes, p, strict=True)},
                }
                for i, p in zip(idx, probs, strict=True)
            ]
            return rows, _classification_metrics(self.y[idx], probs, len(self.classes))
        risk = np.asarray(predictions, dtype=float)
        rows = [
            {"time": float(self.time[i]), "event": int(self.event[i]), "risk": float(r)}
            for i, r in zip(idx, risk, strict=True)
        ]
        return rows, {"c_index": concordance_index(self.time[idx], risk, self.event[idx])}


def _label_keys(task: str, label_key: str | None, time_key: str | None, event_key: str | None) -> list[str]:
    """The label columns the task needs, checked to be given."""
    if task == "classification":
        if label_key is None:
            msg = "Classification needs label_key= (the slide label column)."
            raise ValueError(msg)
        return [label_key]
    if time_key is None or event_key is None:
        msg = (
            f"Survival needs time_key= and event_key= (got time_key={time_key!r}, event_key={event_key!r}): "
            "the columns of the survival time and of the event indicator (1 observed, 0 censored)."
        )
        raise ValueError(msg)
    return [time_key, event_key]


def _labels(slides: Mapping[str, SpatialData], labels: Any, keys: Sequence[str], task: str) -> pd.DataFrame:
    """Columns ``keys`` for every slide (NaN where unknown), from ``labels`` or the slides' attrs."""
    ids = list(slides)
    if labels is not None:
        frame = labels_frame(labels, ids)
        missing = [k for k in keys if k not in frame.columns]
        if missing:
            msg = f"labels has no column(s) {missing}; its columns: {list(frame.columns)}."
            raise KeyError(msg)
        return frame.reindex(ids)[list(keys)]
    infos = {name: slide_info(s) for name, s in slides.items()}
    out = pd.DataFrame({k: [infos[n].get(k, np.nan) for n in ids] for k in keys}, index=pd.Index(ids))
    absent = [k for k in keys if out[k].isna().all()]
    if absent:
        msg = (
            f"No slide has {absent} in sdata.attrs[{Keys.ATTRS!r}][{Keys.SLIDE!r}] (the key is named by "
            f"{'label_key' if task == 'classification' else 'time_key / event_key'}): pass labels= (a DataFrame "
            "indexed by slide id)."
        )
        raise KeyError(msg)
    return out


def _slide_labels(
    slides: Mapping[str, SpatialData],
    labels: Any,
    task: str,
    label_key: str | None,
    time_key: str | None,
    event_key: str | None,
) -> _SlideLabels:
    """The checked labels of the slides that have one (the others are left out, logged)."""
    frame = _labels(slides, labels, _label_keys(task, label_key, time_key, event_key), task)
    known = frame.notna().all(axis=1)
    if not known.all():
        logger.info(
            "train_mil: %d slide(s) without a label are left out: %s",
            int((~known).sum()),
            list(frame.index[~known])[:10],
        )
    frame = frame[known]
    if task == "classification":
        return _classification_labels(frame, label_key)
    return _survival_labels(frame, time_key, event_key)


def _classification_labels(frame: pd.DataFrame, label_key: str) -> _SlideLabels:
    y_raw = frame[label_key].to_numpy()
    classes = sorted(pd.unique(y_raw).tolist(), key=lambda v: (str(type(v)), v))
    if len(classes) < 2:
        msg = (
            f"Label {label_key!r} has a single class {classes} over the {len(frame)} labelled slides; at least two "
            "classes are needed."
        )
        raise ValueError(msg)
    y = np.array([classes.index(v) for v in y_raw])
    return _SlideLabels("classification", frame, strata=y, classes=classes, y=y)


def _survival_labels(frame: pd.DataFrame, time_key: str, event_key: str) -> _SlideLabels:
    time = pd.to_numeric(frame[time_key], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(time).all() or (time < 0).any():
        msg = f"Survival times {time_key!r} must be finite and >= 0."
        raise ValueError(msg)
    try:
        event = frame[event_key].to_numpy().astype(float)
    except (TypeError, ValueError) as err:
        msg = f"Event indicator {event_key!r} must be 0/1 or boolean."
        raise ValueError(msg) from err
    if not np.isin(event, (0.0, 1.0)).all():
        msg = f"Event indicator {event_key!r} must be 0/1 or boolean, got values {sorted(set(event.tolist()))[:5]}."
        raise ValueError(msg)
    if event.sum() < 2:
        msg = f"Survival needs at least two observed events ({event_key!r} == 1), got {int(event.sum())}."
        raise ValueError(msg)
    return _SlideLabels("survival", frame, strata=event.astype(int), time=time, event=event, event_key=event_key)


# --------------------------------------------------------------------------------------------------------------------
# protocols
# --------------------------------------------------------------------------------------------------------------------
def _protocol(lab: _SlideLabels, folds: int | None, k_shot: int | None) -> str:
    """``"few_shot"``, ``"cv"`` or ``"full"``, after checking that every stratum is large enough for it."""
    counts = pd.Series(lab.strata).value_counts()
    smallest, name = int(counts.min()), lab.stratum_name(counts.idxmin())
    if k_shot is not None:
        if k_shot >= smallest:
            msg = (
                f"k_shot={k_shot} is not smaller than the smallest {lab.group} ({name!r}: {smallest} slides): every "
                f"{lab.group} needs k_shot training slides and at least one test slide."
            )
            raise ValueError(msg)
        return "few_shot"
    if folds is None:
        return "full"
    if len(counts) > 1 and smallest < folds:
        msg = (
            f"folds={folds} needs at least {folds} slides in every {lab.group}; the smallest ({name!r}) has "
            f"{smallest}. Use fewer folds."
        )
        raise ValueError(msg)
    if len(lab.frame) < folds:
        msg = f"folds={folds} but only {len(lab.frame)} labelled slides."
        raise ValueError(msg)
    return "cv"


def _plan_splits(
    lab: _SlideLabels, protocol: str, *, folds: int | None, k_shot: int | None, n_repeats: int, seed: int
) -> tuple[str, list[tuple[list[str], list[str]]]]:
    """The name of the splits (``"cv"``, ``"<k>-shot"``, ``"full"``) and their (train, test) slide ids."""
    names = lab.names
    if protocol == "cv":
        from sklearn.model_selection import StratifiedKFold

        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % (2**32))
        folds_ = skf.split(np.zeros(len(names)), lab.strata)
        return "cv", [([names[i] for i in tr], [names[i] for i in te]) for tr, te in folds_]
    if protocol == "few_shot":
        return f"{k_shot}-shot", _draw_few_shot(lab.strata, names, k_shot, n_repeats, seed)
    return "full", [(names, [])]


def _draw_few_shot(
    strata: np.ndarray, names: Sequence[str], k: int, n_repeats: int, seed: int
) -> list[tuple[list[str], list[str]]]:
    """``n_repeats`` draws of exactly ``k`` slides per stratum (train) and all the others (test)."""
    rng = np.random.default_rng(seed)
    names = np.asarray(names)
    out = []
    for _ in range(n_repeats):
        train = []
        for s in pd.unique(strata):
            idx = np.flatnonzero(strata == s)
            train.extend(rng.choice(idx, size=k, replace=False).tolist())
        train_set = set(train)
        test = [i for i in range(len(names)) if i not in train_set]
        out.append((names[sorted(train)].tolist(), names[test].tolist()))
    return out


# --------------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------------
def _split_seed(seed: int, *parts: int) -> int:
    return int(np.random.SeedSequence([int(seed), *[int(p) for p in parts]]).generate_state(1)[0] % (2**31 - 1))


def _bin_edges(times: np.ndarray, events: np.ndarray) -> np.ndarray:
    """Edges ``[0, q1, q2, q3, inf]`` from the quartiles of the event times (duplicates merged)."""
    t = times[events.astype(bool)]
    if len(t) == 0:
        msg = "The training slides hold no observed event: the survival time bins cannot be set."
        raise ValueError(msg)
    inner = np.unique(np.quantile(t, np.linspace(0, 1, N_BINS + 1)[1:-1]))
    return np.concatenate([[0.0], inner, [np.inf]])


def _time_bins(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of every time: right-closed intervals ``(e_k, e_k+1]`` (the first also takes 0)."""
    return np.searchsorted(edges[1:-1], times, side="left").astype(np.int64)


def _collect_bags(
    slides: Mapping[str, SpatialData],
    names: Sequence[str],
    features_key: str,
    image_key: str | None,
    tiles_key: str | None,
) -> dict[str, np.ndarray]:
    """The checked tile features of every slide in ``names``, all of one dimension."""
    bags = {}
    for name in names:
        where = f"Slide {name!r}"
        _, tkey = require_tiles(slides[name], image_key=image_key, tiles_key=tiles_key, where=where)
        bags[name] = tile_features(slides[name].tables[tkey], features_key, where=where)
    check_same_dimension({n: b.shape[1] for n, b in bags.items()}, features_key)
    return bags


def _hyperparameters(
    hidden: int,
    attention_dim: int,
    dropout: float,
    max_epochs: int,
    lr: float,
    weight_decay: float,
    standardize: bool,
) -> dict[str, Any]:
    """The checked training settings of every split."""
    return {
        "hidden": check_int(hidden, "hidden"),
        "attention_dim": check_int(attention_dim, "attention_dim"),
        "dropout": check_fraction(dropout, "dropout"),
        "max_epochs": check_int(max_epochs, "max_epochs"),
        "lr": lr,
        "weight_decay": weight_decay,
        "standardize": standardize,
    }


def _standardisation(bags: Sequence[np.ndarray], standardize: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Mean and standard deviation of the tiles of ``bags`` (constant features keep a scale of 1), or None."""
    if not standardize:
        return None, None
    stacked = np.concatenate(bags)
    std = stacked.std(0)
    return stacked.mean(0), np.where(std > 1e-6 * max(float(std.max()), 1e-12), std, 1.0)


def _fit_one(
    bags: list[np.ndarray],
    lab: _SlideLabels,
    idx: np.ndarray,
    *,
    features_key: str,
    seed: int,
    hp: Mapping[str, Any],
    trainer_kwargs: Mapping[str, Any] | None,
    progress: bool,
    record: Mapping[str, Any],
    checkpoint: tuple[str, dict[str, Any], Any] | None = None,
) -> MILModel:
    """Train one GatedABMIL on ``bags`` (of the slides ``idx`` of ``lab``) and wrap it.

    ``checkpoint``: (folder, signature, state to resume from) of an :class:`~spade_sc.model._lightning.EpochCheckpoint`.
    """
    import lightning as L

    from ..model._lightning import EpochCheckpoint, MILLightningModule, make_bag_dataloader
    from ..model._mil import GatedABMIL

    targets, edges, n_out = lab.targets(idx)
    mean, std = _standardisation(bags, hp["standardize"])
    L.seed_everything(seed, workers=True, verbose=False)
    net = GatedABMIL(bags[0].shape[1], n_out, hp["hidden"], hp["attention_dim"], hp["dropout"])
    inputs = [(b - mean) / std for b in bags] if mean is not None else bags
    loader = make_bag_dataloader(inputs, targets, lab.sampling_weights(idx), seed=seed)
    loss = "nll" if lab.task == "survival" else ("bce" if n_out == 1 else "ce")
    lit = MILLightningModule(
        net, loss=loss, lr=hp["lr"], weight_decay=hp["weight_decay"], generator=loader.sampler.generator
    )
    kwargs = default_trainer_kwargs(
        hp["max_epochs"], progress, {"log_every_n_steps": max(1, len(bags)), **(trainer_kwargs or {})}
    )
    if checkpoint is not None:  # a Checkpoint callback needs enable_checkpointing (Lightning then adds none of its own)
        kwargs["callbacks"] = [EpochCheckpoint(*checkpoint), *list(kwargs.get("callbacks", []) or [])]
        kwargs["enable_checkpointing"] = True
    with quiet_lightning(not progress), torch_state():
        trainer = L.Trainer(**kwargs)
        if trainer.world_size > 1:
            msg = (
                f"train_mil trains one small bag per step on a single device; trainer_kwargs ask for "
                f"{trainer.world_size} processes (devices / num_nodes / strategy). Pass devices=1."
            )
            raise ValueError(msg)
        trainer.fit(lit, train_dataloaders=loader)
    train_params = {**record, "seed": int(seed), **_record_hp(hp), "loss_history": list(lit.history)}
    return MILModel(
        lit.net,
        features_key=features_key,
        task=lab.task,
        classes=lab.classes,
        bin_edges=edges,
        feature_mean=mean,
        feature_std=std,
        train_params=train_params,
    )


def _record_hp(hp: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings recorded in a model's ``train_params_``."""
    return {
        "max_epochs": int(hp["max_epochs"]),
        "lr": float(hp["lr"]),
        "weight_decay": float(hp["weight_decay"]),
        "standardize": bool(hp["standardize"]),
    }


@dataclass(eq=False)
class _Runs:
    """What the splits produced, gathered in split order."""

    models: list[MILModel] = field(default_factory=list)
    splits: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _fit_splits(
    bags: Mapping[str, np.ndarray],
    lab: _SlideLabels,
    split_name: str,
    planned: Sequence[tuple[list[str], list[str]]],
    *,
    features_key: str,
    hp: Mapping[str, Any],
    seed: int,
    trainer_kwargs: Mapping[str, Any] | None,
    progress: bool,
    checkpoints: Sequence[tuple[str, dict[str, Any], Any] | None],
) -> _Runs:
    """Train a model on the train slides of every split and score it on the test slides."""
    pos = {n: i for i, n in enumerate(lab.names)}
    runs = _Runs()
    for f, ((train, test), checkpoint) in enumerate(zip(planned, checkpoints, strict=True)):
        model = _fit_one(
            [bags[n] for n in train],
            lab,
            np.array([pos[n] for n in train]),
            features_key=features_key,
            seed=_split_seed(seed, f),
            hp=hp,
            trainer_kwargs=trainer_kwargs,
            progress=progress,
            record={"split": split_name, "fold": f, "train_slides": list(train)},
            checkpoint=checkpoint,
        )
        runs.models.append(model)
        runs.splits.append({"split": split_name, "fold": f, "train": list(train), "test": list(test)})
        if not test:
            continue
        rows, values = lab.score(np.array([pos[n] for n in test]), [model.predict(bags[n]) for n in test])
        at = {"split": split_name, "fold": f}
        runs.predictions += [{**at, "slide": n, **row} for n, row in zip(test, rows, strict=True)]
        sizes = {"n_train": len(train), "n_test": len(test)}
        runs.metrics += [{**at, "metric": m, "value": v, **sizes} for m, v in values.items()]
        logger.info(
            "train_mil: %s split %d (%d train / %d test slides): %s",
            split_name,
            f,
            len(train),
            len(test),
            ", ".join(f"{k}={v:.3f}" for k, v in values.items()),
        )
    return runs


def _split_checkpoints(
    bags: Mapping[str, np.ndarray],
    lab: _SlideLabels,
    split_name: str,
    planned: Sequence[tuple[list[str], list[str]]],
    *,
    hp: Mapping[str, Any],
    seed: int,
    checkpoint_dir: str | os.PathLike | None,
    resume: bool,
) -> list[tuple[str, dict[str, Any], Any] | None]:
    """(folder, signature, state to resume from) of every split's checkpoint, all checked before any training.

    A split's checkpoint lives in ``<checkpoint_dir>/<split>_<fold>/``; its signature holds the model settings, the
    training settings and seed, and a hash of every training bag and its target.
    """
    if checkpoint_dir is None:
        if resume:
            msg = "resume=True needs checkpoint_dir."
            raise ValueError(msg)
        return [None] * len(planned)
    from ..model._trainer import load_resume_state

    pos = {n: i for i, n in enumerate(lab.names)}
    out = []
    for f, (train, _) in enumerate(planned):
        targets, _, n_out = lab.targets(np.array([pos[n] for n in train]))
        data = {}
        for name, target in zip(train, targets, strict=True):
            h = hashlib.sha256(np.ascontiguousarray(bags[name], dtype=np.float32).tobytes())
            h.update(json.dumps(target, sort_keys=True, default=str).encode())
            data[str(name)] = h.hexdigest()
        model = {
            "task": lab.task,
            "classes": lab.classes,
            "n_outputs": n_out,
            "dim": next(iter(bags.values())).shape[1],
        }
        model.update({k: hp[k] for k in ("hidden", "attention_dim", "dropout", "standardize")})
        training = {k: hp[k] for k in ("max_epochs", "lr", "weight_decay")}
        training.update(seed=_split_seed(seed, f), split=split_name, fold=f)
        signature = json.loads(json.dumps({"model": model, "training": training, "data": data}, default=str))
        folder = Path(checkpoint_dir) / f"{split_name}_{f}"
        out.append((str(folder), signature, load_resume_state(folder, signature, resume=resume)))
    return out


def _mil_result(lab: _SlideLabels, protocol: str, runs: _Runs, params: dict[str, Any]) -> MILResult:
    """The :class:`MILResult` of the runs; out-of-fold predictions in slide order under cross-validation."""
    metrics = pd.DataFrame(runs.metrics, columns=["split", "fold", "metric", "value", "n_train", "n_test"])
    predictions = pd.DataFrame(runs.predictions)
    if protocol == "cv" and len(predictions):
        order = [n for n in lab.names if n in set(predictions["slide"])]
        predictions = predictions.set_index("slide", drop=False).loc[order]
        predictions.index.name = None
    return MILResult(
        task=lab.task,
        protocol=protocol,
        metrics=metrics,
        splits=runs.splits,
        predictions=predictions,
        models=runs.models,
        model=runs.models[-1],
        labels=lab.frame.copy(),
        params=params,
    )


def train_mil(
    cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData],
    *,
    label_key: str | None = None,
    task: Literal["classification", "survival"] = "classification",
    time_key: str | None = None,
    event_key: str | None = None,
    features_key: str = Keys.SPADE,
    labels: pd.DataFrame | AnnData | None = None,
    image_key: str | None = None,
    tiles_key: str | None = None,
    hidden: int = 512,
    attention_dim: int = 384,
    dropout: float = 0.25,
    max_epochs: int = 20,
    lr: float = 2e-4,
    weight_decay: float = 1e-4,
    standardize: bool = True,
    folds: int | None = 5,
    k_shot: int | None = None,
    n_repeats: int = 5,
    seed: int = 0,
    trainer_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> MILResult:
    """Train and evaluate gated attention MIL on whole slides (classification or discrete-time survival).

    Each slide is a bag of its tile embeddings (``obsm[features_key]`` of its tiles table). Three protocols:

    - ``k_shot=None`` and ``folds=K``: K-fold cross-validation by slide (``StratifiedKFold`` on the label, on the
      event indicator for survival); every slide is predicted once by the model that did not see it.
    - ``k_shot=k``: few-shot, ``k`` labelled slides per class (per event group for survival) drawn ``n_repeats``
      times (seeded), each draw evaluated on **all** remaining labelled slides; ``folds`` is ignored.
    - ``folds=None`` (and ``k_shot=None``): one model trained on all labelled slides, in ``result.model``.

    Slide labels come from ``labels`` (a DataFrame indexed by slide id, e.g. the AnnData of
    :func:`spade_sc.tl.slide_embeddings`) or, without it, from ``sdata.attrs["spade_sc"]["slide"]`` of every slide
    (where :func:`spade_sc.datasets.synthetic` keeps ``label`` and ``tumour_fraction``). Slides without a label are
    left out. Everything is checked before training starts.

    Parameters
    ----------
    cohort
        ``{slide id: SpatialData}``, a sequence of them, or one SpatialData.
    label_key
        Class label column (classification).
    task
        ``"classification"`` or ``"survival"``.
    time_key, event_key
        Survival time and event indicator (1 observed, 0 censored) columns (survival).
    features_key
        ``obsm`` key of the tile embeddings: ``"X_spade"`` or base-encoder features ``"X_<encoder>"``.
    labels
        Slide-level labels (DataFrame or AnnData, indexed by slide id).
    image_key, tiles_key
        Which tiles, when a slide holds several images or tilings (default shapes ``"<image>_tiles"``).
    hidden, attention_dim, dropout
        :class:`spade_sc.model.GatedABMIL` hyperparameters.
    max_epochs
        Training epochs (one epoch = as many bags as training slides).
    lr, weight_decay
        AdamW.
    standardize
        Standardise the tile features with the mean and standard deviation of the training tiles.
    folds
        Number of cross-validation folds, or None for no evaluation.
    k_shot
        Labelled slides per class of the few-shot protocol.
    n_repeats
        Few-shot draws.
    seed
        Seed of splits, draws, initialisation and sampling; same seed, same result on CPU.
    trainer_kwargs
        Passed to :class:`lightning.Trainer` (``accelerator``, ``precision``, ...). One device only: a request for
        several processes is refused.
    progress
        Lightning's progress bars.
    checkpoint_dir
        Write a checkpoint of every split's training at the end of every epoch, into
        ``<checkpoint_dir>/<split>_<fold>/last/`` (safetensors + JSON, no pickle, replaced atomically): weights,
        optimizer state, loss history, the bag sampler's generator and every random state. A folder that already
        holds a checkpoint is refused unless ``resume``.
    resume
        Continue from the checkpoints in ``checkpoint_dir``: finished splits are restored without training, the
        interrupted one continues from its last epoch, the others start afresh. Checkpoints of other settings, another
        split plan or other bags and labels are refused, naming the difference, before any training. A run killed and
        resumed ends with bitwise the same models and results as an uninterrupted one (same seed, device and torch
        thread count).

    Returns
    -------
    A :class:`MILResult`: per-split ``metrics`` and their ``summary()`` (mean +/- sd, pooled out-of-fold under
    cross-validation), the train / test slides of every ``splits`` entry, the ``predictions`` of every test slide,
    the per-split ``models`` and ``model``. Nothing is written into the slides.
    """
    check_choice(task, "task", MIL_TASKS)
    hp = _hyperparameters(hidden, attention_dim, dropout, max_epochs, lr, weight_decay, standardize)
    folds = check_int(folds, "folds", low=2, none_ok=True)
    k_shot = check_int(k_shot, "k_shot", none_ok=True)
    n_repeats = check_int(n_repeats, "n_repeats")
    seed = check_int(seed, "seed", low=0)
    slides = as_cohort(cohort)
    lab = _slide_labels(slides, labels, task, label_key, time_key, event_key)
    protocol = _protocol(lab, folds, k_shot)
    bags = _collect_bags(slides, lab.names, features_key, image_key, tiles_key)
    split_name, planned = _plan_splits(lab, protocol, folds=folds, k_shot=k_shot, n_repeats=n_repeats, seed=seed)
    checkpoints = _split_checkpoints(
        bags, lab, split_name, planned, hp=hp, seed=seed, checkpoint_dir=checkpoint_dir, resume=resume
    )
    runs = _fit_splits(
        bags,
        lab,
        split_name,
        planned,
        features_key=features_key,
        hp=hp,
        seed=seed,
        trainer_kwargs=trainer_kwargs,
        progress=progress,
        checkpoints=checkpoints,
    )
    params = {
        "task": task,
        "label_key": label_key,
        "time_key": time_key,
        "event_key": event_key,
        "features_key": features_key,
        "classes": lab.classes,
        "folds": folds if protocol == "cv" else None,
        "k_shot": k_shot,
        "n_repeats": n_repeats if protocol == "few_shot" else None,
        "seed": seed,
        **hp,
    }
    result = _mil_result(lab, protocol, runs, params)
    if protocol != "full":
        logger.info("train_mil: %r", result)
    return result


# --------------------------------------------------------------------------------------------------------------------
# attention on one slide
# --------------------------------------------------------------------------------------------------------------------
def attention(
    sdata: SpatialData,
    mil_model: MILModel,
    *,
    features_key: str | None = None,
    image_key: str | None = None,
    tiles_key: str | None = None,
    key_added: str = Keys.ATTENTION,
) -> None:
    """Attention of a MIL model over the tiles of one slide.

    Parameters
    ----------
    sdata
        The slide, with tiles and their embeddings (see :func:`spade_sc.tl.slide_embeddings`).
    mil_model
        A trained :class:`MILModel` (``result.model`` or ``result.model_for(slide)`` of :func:`train_mil`).
    features_key
        ``obsm`` key of the tile features; default the model's. Features of another dimension are an error.
    image_key, tiles_key
        Which tiles, when the slide holds several images or tilings (default shapes ``"<image>_tiles"``).
    key_added
        Name of the attention column.

    Returns
    -------
    None; writes into the tiles table ``tables["<image>_tiles_table"]``:

    - ``obs[key_added]`` (``"spade_attention"``): the raw (pre-softmax) attention score of every tile;
    - ``obs[key_added + "_pct"]`` (``"spade_attention_pct"``): its percentile rank in (0, 1] (rank / n_tiles,
      ties averaged), what :func:`spade_sc.pl.attention` thresholds and colours;
    - ``uns[key_added]``: ``params`` (features key, task, classes, model record) and ``prediction`` (class
      probabilities, or the risk) of the slide.
    """
    if not isinstance(mil_model, MILModel):
        msg = f"mil_model must be a MILModel (from spade_sc.tl.train_mil), got {type(mil_model).__name__}."
        raise TypeError(msg)
    features_key = features_key or mil_model.features_key
    skey, tkey = require_tiles(sdata, image_key=image_key, tiles_key=tiles_key)
    table = sdata.tables[tkey]
    where = f"Tiles table {tkey!r}"
    x = tile_features(table, features_key, where=where)
    prediction, scores = mil_model.predict_with_attention(x, where=f"{where}, obsm[{features_key!r}]")
    params = {
        "features_key": features_key,
        "tiles_key": skey,
        "task": mil_model.task,
        "score": "raw pre-softmax attention",
        "pct": "rank / n_tiles (ties averaged)",
    }
    if mil_model.classes is not None:
        params["classes"] = [str(c) for c in mil_model.classes]
    _write_attention(table, key_added, scores, prediction, params)


def _write_attention(
    table: AnnData, key_added: str, scores: np.ndarray, prediction: np.ndarray | float, params: dict[str, Any]
) -> None:
    """Scores, their percentile ranks, and the record of :func:`attention` into the tiles table."""
    from scipy.stats import rankdata

    table.obs[key_added] = scores.astype(np.float32)
    table.obs[Keys.pct(key_added)] = (rankdata(scores, method="average") / len(scores)).astype(np.float32)
    value = float(prediction) if np.ndim(prediction) == 0 else np.asarray(prediction, dtype=float)
    table.uns[key_added] = {"params": params, "prediction": value}

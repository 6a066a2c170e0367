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

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from ..model._files import FORMAT_VERSION, read_model_folder, versions, write_model_folder
from .._sdata import as_cohort
from ..model._trainer import default_trainer_kwargs, quiet_lightning, torch_state
from ._slides import SPADE_KEY, labels_frame, require_tiles, tile_features

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

TASKS = ("classification", "survival")
#: Number of discrete-time survival bins (quartiles of the training event times).
N_BINS = 4
#: Names of the attention columns (raw score, percentile rank) and the key of their parameters.
ATTENTION_KEY = "spade_attention"


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
# the model
# --------------------------------------------------------------------------------------------------------------------
class MILModel:
    """A trained gated-attention MIL model with what is needed to apply it: features key, task, classes, bins.

    Built by :func:`train_mil`; apply it with :meth:`predict`, :meth:`attention_scores` or
    :func:`spade_sc.tl.attention`; save it with :meth:`save` and read it back with :meth:`load`.

    Parameters
    ----------
    module
        The :class:`spade_sc.model.GatedABMIL`.
    features_key
        ``obsm`` key of the tile features it takes.
    task
        ``"classification"`` or ``"survival"``.
    classes
        Class labels in output order (classification).
    bin_edges
        Time bin edges (survival): ``n_bins + 1`` values from 0 to inf.
    feature_mean, feature_std
        Standardisation of the features (from the training tiles); None: none.
    init_params
        Hyperparameters of the module (``in_dim``, ``n_classes``, ``hidden``, ``attention_dim``, ``dropout``).
    train_params
        Record of the training (slides, epochs, lr, ...).
    """

    def __init__(
        self,
        module: Any,
        *,
        features_key: str,
        task: Literal["classification", "survival"],
        classes: Sequence[Any] | None = None,
        bin_edges: Sequence[float] | None = None,
        feature_mean: np.ndarray | None = None,
        feature_std: np.ndarray | None = None,
        init_params: Mapping[str, Any] | None = None,
        train_params: Mapping[str, Any] | None = None,
    ) -> None:
        if task not in TASKS:
            msg = f"task={task!r}; choose one of {TASKS}."
            raise ValueError(msg)
        self.module = module.cpu().eval()
        self.features_key = str(features_key)
        self.task = task
        self.classes = None if classes is None else [_py(c) for c in classes]
        self.bin_edges = None if bin_edges is None else [float(b) for b in bin_edges]
        self.feature_mean = None if feature_mean is None else np.asarray(feature_mean, dtype=np.float32)
        self.feature_std = None if feature_std is None else np.asarray(feature_std, dtype=np.float32)
        self.init_params_ = dict(
            init_params
            or {
                "in_dim": int(module.in_dim),
                "n_classes": int(module.n_classes),
                "hidden": int(module.fc[0].out_features),
                "attention_dim": int(module.attention_a[0].out_features),
                "dropout": float(module.fc[2].p),
            }
        )
        self.train_params_ = dict(train_params or {})

    @property
    def in_dim(self) -> int:
        """Dimension of the tile features the model takes."""
        return int(self.init_params_["in_dim"])

    def __repr__(self) -> str:
        what = f"classes={self.classes}" if self.task == "classification" else f"{len(self.bin_edges or []) - 1} bins"
        return f"MILModel({self.task}, {self.in_dim}-d {self.features_key!r}, {what})"

    # ------------------------------------------------------------------ inference
    def _tensor(self, bag: Any, where: str = "bag") -> Any:
        import torch

        x = np.asarray(bag, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            msg = f"{where}: a bag is a non-empty (n_tiles, d) matrix, got shape {x.shape}."
            raise ValueError(msg)
        if x.shape[1] != self.in_dim:
            msg = (
                f"{where}: the tile features are {x.shape[1]}-dimensional but the MIL model takes {self.in_dim}-d "
                f"features ({self.features_key!r}); use the features it was trained on."
            )
            raise ValueError(msg)
        if not np.isfinite(x).all():
            msg = f"{where}: the tile features hold NaN or inf."
            raise ValueError(msg)
        if self.feature_mean is not None:
            x = (x - self.feature_mean) / self.feature_std
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def _forward(self, bag: Any, where: str = "bag") -> tuple[Any, Any]:
        import torch

        x = self._tensor(bag, where)
        self.module.eval()
        with torch.no_grad():
            return self.module(x)

    def predict(self, bag: Any) -> np.ndarray | float:
        """Prediction for one slide.

        Parameters
        ----------
        bag
            Tile features (n_tiles, in_dim).

        Returns
        -------
        Classification: the class probabilities (n_classes,) in the order of :attr:`classes` (two classes:
        ``[1 - p, p]``). Survival: the risk ``-sum_t S_t`` (higher means shorter survival).
        """
        return self._prediction(self._forward(bag)[0])

    def _prediction(self, logits: Any) -> np.ndarray | float:
        """:meth:`predict` from the network's logits."""
        import torch

        from ..model import risk_from_hazards

        if self.task == "survival":
            return float(risk_from_hazards(logits))
        if logits.shape[0] == 1:
            p = float(torch.sigmoid(logits)[0])
            return np.array([1.0 - p, p])
        return torch.softmax(logits, dim=0).numpy().astype(float)

    def survival_function(self, bag: Any) -> np.ndarray:
        """Survival probability at the end of every time bin (survival models), ``S_t = prod_{j<=t} (1 - h_j)``."""
        import torch

        if self.task != "survival":
            msg = "survival_function needs a survival model."
            raise ValueError(msg)
        logits, _ = self._forward(bag)
        return torch.cumprod(1 - torch.sigmoid(logits), dim=0).numpy().astype(float)

    def attention_scores(self, bag: Any) -> np.ndarray:
        """Raw (pre-softmax) attention score of every tile of one bag (n_tiles,)."""
        _, scores = self._forward(bag)
        return scores.numpy().astype(np.float32)

    # ------------------------------------------------------------------ files
    def config(self) -> dict[str, Any]:
        """The JSON part of the model file."""
        return {
            "format_version": FORMAT_VERSION,
            "class": type(self).__name__,
            "init_params": self.init_params_,
            "features_key": self.features_key,
            "task": self.task,
            "classes": self.classes,
            "bin_edges": None if self.bin_edges is None else [_json_float(b) for b in self.bin_edges],
            "standardised": self.feature_mean is not None,
            "train_params": json.loads(json.dumps(self.train_params_, default=str)),
            "versions": versions(),
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to a folder: ``model.safetensors`` (weights, standardisation) and ``config.json``.

        Parameters
        ----------
        path
            The folder.
        overwrite
            Replace an existing folder.

        Returns
        -------
        The folder.
        """
        import torch

        tensors = {f"module.{k}": v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        if self.feature_mean is not None:
            tensors["feature_mean"] = torch.from_numpy(self.feature_mean.copy())
            tensors["feature_std"] = torch.from_numpy(self.feature_std.copy())
        return write_model_folder(path, tensors, self.config(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> MILModel:
        """Read a folder written by :meth:`save`, checking its format and loading the weights strictly.

        Parameters
        ----------
        path
            The folder.

        Returns
        -------
        The model.
        """
        from ..model import GatedABMIL

        config, tensors = read_model_folder(path, cls.__name__)
        p = config["init_params"]
        module = GatedABMIL(p["in_dim"], p["n_classes"], p["hidden"], p["attention_dim"], p["dropout"])
        module.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("module.")}, strict=True)
        std = config.get("standardised")
        if std and "feature_mean" not in tensors:
            msg = f"{path} lacks the feature standardisation its config records."
            raise ValueError(msg)
        edges = config.get("bin_edges")
        return cls(
            module,
            features_key=config["features_key"],
            task=config["task"],
            classes=config.get("classes"),
            bin_edges=None if edges is None else [float(b) for b in edges],
            feature_mean=tensors["feature_mean"].numpy() if std else None,
            feature_std=tensors["feature_std"].numpy() if std else None,
            init_params=p,
            train_params=config.get("train_params"),
        )


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _json_float(v: float) -> float | str:
    return "inf" if np.isinf(v) else float(v)


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
# training
# --------------------------------------------------------------------------------------------------------------------
@functools.cache
def _lightning_module_class() -> type:
    """The LightningModule class (built lazily: lightning is imported only when training)."""
    import lightning as L
    import torch

    from ..model import discrete_time_nll

    class MILLightningModule(L.LightningModule):
        """One bag per step; BCE / cross-entropy / discrete-time NLL; AdamW."""

        def __init__(self, net: torch.nn.Module, *, loss: str, lr: float, weight_decay: float) -> None:
            super().__init__()
            self.net = net
            self.loss_kind = loss
            self.lr = float(lr)
            self.weight_decay = float(weight_decay)
            self.history: list[float] = []
            self._epoch_losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            bag, target = batch
            logits, _ = self.net(bag)
            if self.loss_kind == "bce":
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target["y"].view(1).float())
            elif self.loss_kind == "ce":
                loss = torch.nn.functional.cross_entropy(logits[None], target["y"].view(1).long())
            else:
                loss = discrete_time_nll(logits[None], target["bin"].view(1).long(), target["event"].view(1).float())
            self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=1)
            self._epoch_losses.append(float(loss.detach()))
            return loss

        def on_train_epoch_end(self) -> None:
            if self._epoch_losses:
                self.history.append(float(np.mean(self._epoch_losses)))
            self._epoch_losses = []

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    return MILLightningModule


def _first(items: list[Any]) -> Any:
    """Collate of a batch of one bag: the bag itself, no stacking."""
    return items[0]


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


def _fit_one(
    bags: list[np.ndarray],
    targets: list[dict[str, Any]],
    *,
    task: str,
    n_out: int,
    features_key: str,
    classes: list[Any] | None,
    bin_edges: np.ndarray | None,
    strata: np.ndarray,
    seed: int,
    hp: Mapping[str, Any],
    trainer_kwargs: Mapping[str, Any] | None,
    progress: bool,
    record: Mapping[str, Any],
) -> MILModel:
    """Train one GatedABMIL on ``bags`` and wrap it."""
    import lightning as L
    import torch

    from ..model import GatedABMIL

    stacked = np.concatenate(bags)
    mean = stacked.mean(0) if hp["standardize"] else None
    std = None
    if hp["standardize"]:
        std = stacked.std(0)
        std = np.where(std > 1e-6 * max(float(std.max()), 1e-12), std, 1.0)  # constant features stay as they are
    L.seed_everything(seed, workers=True, verbose=False)
    net = GatedABMIL(bags[0].shape[1], n_out, hp["hidden"], hp["attention_dim"], hp["dropout"])
    tensors = []
    for b, tgt in zip(bags, targets, strict=True):
        x = (b - mean) / std if mean is not None else b
        tensors.append(
            (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), {k: torch.tensor(v) for k, v in tgt.items()})
        )
    if task == "classification":
        counts = pd.Series(strata).value_counts()
        weights = 1.0 / counts.loc[strata].to_numpy(dtype=float)
    else:
        weights = np.ones(len(bags))
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double), num_samples=len(bags), replacement=True, generator=generator
    )
    loader = torch.utils.data.DataLoader(tensors, batch_size=1, sampler=sampler, collate_fn=_first, num_workers=0)
    loss = "nll" if task == "survival" else ("bce" if n_out == 1 else "ce")
    lit = _lightning_module_class()(net, loss=loss, lr=hp["lr"], weight_decay=hp["weight_decay"])
    kwargs = default_trainer_kwargs(
        hp["max_epochs"], progress, {"log_every_n_steps": max(1, len(bags)), **(trainer_kwargs or {})}
    )
    with quiet_lightning(not progress), torch_state():
        trainer = L.Trainer(**kwargs)
        if trainer.world_size > 1:
            msg = (
                f"train_mil trains one small bag per step on a single device; trainer_kwargs ask for "
                f"{trainer.world_size} processes (devices / num_nodes / strategy). Pass devices=1."
            )
            raise ValueError(msg)
        trainer.fit(lit, train_dataloaders=loader)
    return MILModel(
        lit.net,
        features_key=features_key,
        task=task,
        classes=classes,
        bin_edges=bin_edges,
        feature_mean=mean,
        feature_std=std,
        train_params={
            **dict(record),
            "seed": int(seed),
            "max_epochs": int(hp["max_epochs"]),
            "lr": float(hp["lr"]),
            "weight_decay": float(hp["weight_decay"]),
            "standardize": bool(hp["standardize"]),
            "loss_history": list(lit.history),
        },
    )


def _collect_bags(
    slides: Mapping[str, SpatialData],
    names: Sequence[str],
    features_key: str,
    image_key: str | None,
    tiles_key: str | None,
) -> dict[str, np.ndarray]:
    bags = {}
    for name in names:
        where = f"Slide {name!r}"
        _, tkey = require_tiles(slides[name], image_key=image_key, tiles_key=tiles_key, where=where)
        bags[name] = tile_features(slides[name].tables[tkey], features_key, where=where)
    dims = {n: b.shape[1] for n, b in bags.items()}
    if len(set(dims.values())) > 1:
        msg = f"The tile features {features_key!r} differ in dimension across slides: {dims}."
        raise ValueError(msg)
    return bags


def _labels(slides: Mapping[str, SpatialData], labels: Any, keys: Sequence[str], task: str) -> pd.DataFrame:
    """Columns ``keys`` for every slide (NaN where unknown), from ``labels`` or the slides' attrs."""
    from ._slides import slide_info

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
            f"No slide has {absent} in sdata.attrs['spade_sc']['slide'] (the key is named by "
            f"{'label_key' if task == 'classification' else 'time_key / event_key'}): pass labels= (a DataFrame "
            "indexed by slide id)."
        )
        raise KeyError(msg)
    return out


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


def train_mil(
    cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData],
    *,
    label_key: str | None = None,
    task: Literal["classification", "survival"] = "classification",
    time_key: str | None = None,
    event_key: str | None = None,
    features_key: str = SPADE_KEY,
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

    Returns
    -------
    A :class:`MILResult`: per-split ``metrics`` and their ``summary()`` (mean +/- sd, pooled out-of-fold under
    cross-validation), the train / test slides of every ``splits`` entry, the ``predictions`` of every test slide,
    the per-split ``models`` and ``model``. Nothing is written into the slides.
    """
    from sklearn.model_selection import StratifiedKFold

    # ---- arguments ------------------------------------------------------------------------------------------------
    if task not in TASKS:
        msg = f"task={task!r}; choose one of {TASKS}."
        raise ValueError(msg)
    for name, value in (("max_epochs", max_epochs), ("n_repeats", n_repeats)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            msg = f"{name} must be a positive integer, got {value!r}."
            raise ValueError(msg)
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int | np.integer) or folds < 2):
        msg = f"folds must be an integer >= 2 or None, got {folds!r}."
        raise ValueError(msg)
    if k_shot is not None and (isinstance(k_shot, bool) or not isinstance(k_shot, int | np.integer) or k_shot < 1):
        msg = f"k_shot must be a positive integer or None, got {k_shot!r}."
        raise ValueError(msg)
    if task == "classification":
        if label_key is None:
            msg = "Classification needs label_key= (the slide label column)."
            raise ValueError(msg)
        keys = [label_key]
    else:
        if time_key is None or event_key is None:
            msg = (
                f"Survival needs time_key= and event_key= (got time_key={time_key!r}, event_key={event_key!r}): "
                "the columns of the survival time and of the event indicator (1 observed, 0 censored)."
            )
            raise ValueError(msg)
        keys = [time_key, event_key]
    slides = as_cohort(cohort)
    frame = _labels(slides, labels, keys, task)
    known = frame.notna().all(axis=1)
    if not known.all():
        logger.info(
            "train_mil: %d slide(s) without a label are left out: %s",
            int((~known).sum()),
            list(frame.index[~known])[:10],
        )
    frame = frame[known]
    names = list(frame.index)

    if task == "classification":
        y_raw = frame[label_key].to_numpy()
        classes = sorted(pd.unique(y_raw).tolist(), key=lambda v: (str(type(v)), v))
        if len(classes) < 2:
            msg = (
                f"Label {label_key!r} has a single class {classes} over the {len(names)} labelled slides; at least two "
                "classes are needed."
            )
            raise ValueError(msg)
        y = np.array([classes.index(v) for v in y_raw])
        strata = y
        n_out = 1 if len(classes) == 2 else len(classes)
    else:
        time = pd.to_numeric(frame[time_key], errors="coerce").to_numpy(dtype=float)
        if not np.isfinite(time).all() or (time < 0).any():
            msg = f"Survival times {time_key!r} must be finite and >= 0."
            raise ValueError(msg)
        ev = frame[event_key].to_numpy()
        try:
            event = ev.astype(float)
        except (TypeError, ValueError) as err:
            msg = f"Event indicator {event_key!r} must be 0/1 or boolean."
            raise ValueError(msg) from err
        if not np.isin(event, (0.0, 1.0)).all():
            msg = f"Event indicator {event_key!r} must be 0/1 or boolean, got values {sorted(set(event.tolist()))[:5]}."
            raise ValueError(msg)
        if event.sum() < 2:
            msg = f"Survival needs at least two observed events ({event_key!r} == 1), got {int(event.sum())}."
            raise ValueError(msg)
        classes = None
        strata = event.astype(int)
        n_out = N_BINS
    counts = pd.Series(strata).value_counts()
    what = "class" if task == "classification" else "event group"
    stratum_name = (lambda s: classes[s]) if task == "classification" else (lambda s: f"{event_key}={int(s)}")
    if k_shot is not None:
        smallest = int(counts.min())
        if k_shot >= smallest:
            msg = (
                f"k_shot={k_shot} is not smaller than the smallest {what} ({stratum_name(counts.idxmin())!r}: "
                f"{smallest} slides): every {what} needs k_shot training slides and at least one test slide."
            )
            raise ValueError(msg)
        protocol = "few_shot"
    elif folds is not None:
        if len(counts) > 1 and int(counts.min()) < folds:
            msg = (
                f"folds={folds} needs at least {folds} slides in every {what}; the smallest "
                f"({stratum_name(counts.idxmin())!r}) has {int(counts.min())}. Use fewer folds."
            )
            raise ValueError(msg)
        if len(names) < folds:
            msg = f"folds={folds} but only {len(names)} labelled slides."
            raise ValueError(msg)
        protocol = "cv"
    else:
        protocol = "full"
    bags = _collect_bags(slides, names, features_key, image_key, tiles_key)
    hp = {
        "hidden": hidden,
        "attention_dim": attention_dim,
        "dropout": dropout,
        "max_epochs": max_epochs,
        "lr": lr,
        "weight_decay": weight_decay,
        "standardize": standardize,
    }
    from ..model._heads import _check_dropout, _check_positive_int

    _check_positive_int(hidden, "hidden")
    _check_positive_int(attention_dim, "attention_dim")
    _check_dropout(dropout)

    # ---- splits ---------------------------------------------------------------------------------------------------
    if protocol == "cv":
        skf = StratifiedKFold(n_splits=int(folds), shuffle=True, random_state=int(seed) % (2**32))
        split_list = [
            ([names[i] for i in tr], [names[i] for i in te]) for tr, te in skf.split(np.zeros(len(names)), strata)
        ]
        split_name = "cv"
    elif protocol == "few_shot":
        split_list = _draw_few_shot(strata, names, int(k_shot), int(n_repeats), seed)
        split_name = f"{k_shot}-shot"
    else:
        split_list = [(names, [])]
        split_name = "full"

    # ---- training -------------------------------------------------------------------------------------------------
    pos = {n: i for i, n in enumerate(names)}
    metric_rows: list[dict[str, Any]] = []
    pred_rows: list[dict[str, Any]] = []
    splits: list[dict[str, Any]] = []
    models: list[MILModel] = []
    for f, (train, test) in enumerate(split_list):
        tr = np.array([pos[n] for n in train])
        if task == "classification":
            targets = [{"y": int(y[i])} for i in tr]
            edges = None
        else:
            edges = _bin_edges(time[tr], event[tr])
            bins = _time_bins(time[tr], edges)
            targets = [{"bin": int(b), "event": float(event[i])} for b, i in zip(bins, tr, strict=True)]
        model = _fit_one(
            [bags[n] for n in train],
            targets,
            task=task,
            n_out=n_out if task == "classification" else len(edges) - 1,
            features_key=features_key,
            classes=classes,
            bin_edges=edges,
            strata=strata[tr],
            seed=_split_seed(seed, f),
            hp=hp,
            trainer_kwargs=trainer_kwargs,
            progress=progress,
            record={"split": split_name, "fold": f, "train_slides": list(train)},
        )
        models.append(model)
        splits.append({"split": split_name, "fold": f, "train": list(train), "test": list(test)})
        if not test:
            continue
        te = np.array([pos[n] for n in test])
        if task == "classification":
            probs = np.stack([model.predict(bags[n]) for n in test])
            for n, i, p in zip(test, te, probs, strict=True):
                pred_rows.append(
                    {
                        "split": split_name,
                        "fold": f,
                        "slide": n,
                        "label": classes[y[i]],
                        **{f"prob_{c}": float(v) for c, v in zip(classes, p, strict=True)},
                    }
                )
            values = _classification_metrics(y[te], probs, len(classes))
        else:
            risk = np.array([model.predict(bags[n]) for n in test])
            for n, i, r in zip(test, te, risk, strict=True):
                pred_rows.append(
                    {
                        "split": split_name,
                        "fold": f,
                        "slide": n,
                        "time": float(time[i]),
                        "event": int(event[i]),
                        "risk": float(r),
                    }
                )
            values = {"c_index": concordance_index(time[te], risk, event[te])}
        for metric, value in values.items():
            metric_rows.append(
                {
                    "split": split_name,
                    "fold": f,
                    "metric": metric,
                    "value": value,
                    "n_train": len(train),
                    "n_test": len(test),
                }
            )
        logger.info(
            "train_mil: %s split %d (%d train / %d test slides): %s",
            split_name,
            f,
            len(train),
            len(test),
            ", ".join(f"{k}={v:.3f}" for k, v in values.items()),
        )

    metrics = pd.DataFrame(metric_rows, columns=["split", "fold", "metric", "value", "n_train", "n_test"])
    predictions = pd.DataFrame(pred_rows)
    if protocol == "cv" and len(predictions):
        order = [n for n in names if n in set(predictions["slide"])]
        predictions = predictions.set_index("slide", drop=False).loc[order]
        predictions.index.name = None
    params = {
        "task": task,
        "label_key": label_key,
        "time_key": time_key,
        "event_key": event_key,
        "features_key": features_key,
        "classes": classes,
        "folds": folds if protocol == "cv" else None,
        "k_shot": k_shot,
        "n_repeats": n_repeats if protocol == "few_shot" else None,
        "seed": seed,
        **hp,
    }
    result = MILResult(
        task=task,
        protocol=protocol,
        metrics=metrics,
        splits=splits,
        predictions=predictions,
        models=models,
        model=models[-1],
        labels=frame.copy(),
        params=params,
    )
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
    key_added: str = ATTENTION_KEY,
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
    from scipy.stats import rankdata

    if not isinstance(mil_model, MILModel):
        msg = f"mil_model must be a MILModel (from spade_sc.tl.train_mil), got {type(mil_model).__name__}."
        raise TypeError(msg)
    features_key = features_key or mil_model.features_key
    skey, tkey = require_tiles(sdata, image_key=image_key, tiles_key=tiles_key)
    table = sdata.tables[tkey]
    where = f"Tiles table {tkey!r}"
    x = tile_features(table, features_key, where=where)
    if x.shape[1] != mil_model.in_dim:
        msg = (
            f"{where}: obsm[{features_key!r}] holds {x.shape[1]}-d features, but the MIL model takes "
            f"{mil_model.in_dim}-d features ({mil_model.features_key!r})."
        )
        raise ValueError(msg)
    logits, scores = mil_model._forward(x)  # one pass gives the attention and the prediction
    scores = scores.numpy().astype(np.float32)
    pred = mil_model._prediction(logits)
    pct = rankdata(scores, method="average") / len(scores)
    table.obs[key_added] = scores.astype(np.float32)
    table.obs[f"{key_added}_pct"] = pct.astype(np.float32)
    params = {
        "features_key": features_key,
        "tiles_key": skey,
        "task": mil_model.task,
        "score": "raw pre-softmax attention",
        "pct": "rank / n_tiles (ties averaged)",
    }
    if mil_model.classes is not None:
        params["classes"] = [str(c) for c in mil_model.classes]
    table.uns[key_added] = {
        "params": params,
        "prediction": np.asarray(pred, dtype=float) if mil_model.task == "classification" else float(pred),
    }

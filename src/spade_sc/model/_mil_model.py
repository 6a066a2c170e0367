"""The slide-level MIL model object: a trained :class:`GatedABMIL` with what is needed to apply it, and its files.

AnnData-free: it takes bags as arrays (``(n_tiles, d)``) and returns numpy. Torch is imported inside the methods,
so that :mod:`spade_sc.tl` can import this module at its top without importing torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._constants import MIL_TASKS
from .._validation import check_choice, file_errors, json_safe
from ._files import FORMAT_VERSION, read_model_folder, versions, write_model_folder
from ._schema import check_tensors

__all__ = ["MILModel"]

#: Prefix of the module's weights among the tensors of a model folder.
_MODULE_PREFIX = "module."


class MILModel:
    """A trained gated-attention MIL model with what is needed to apply it: features key, task, classes, bins.

    Built by :func:`spade_sc.tl.train_mil`; apply it with :meth:`predict`, :meth:`attention_scores` or
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
        check_choice(task, "task", MIL_TASKS)
        self.module = module.cpu().eval()
        self.features_key = str(features_key)
        self.task = task
        self.classes = None if classes is None else json_safe(list(classes))
        self.bin_edges = None if bin_edges is None else [float(b) for b in bin_edges]
        self.feature_mean = None if feature_mean is None else np.asarray(feature_mean, dtype=np.float32)
        self.feature_std = None if feature_std is None else np.asarray(feature_std, dtype=np.float32)
        self.init_params_ = dict(init_params or _init_params(module))
        self.train_params_ = dict(train_params or {})

    @property
    def in_dim(self) -> int:
        """Dimension of the tile features the model takes."""
        return int(self.init_params_["in_dim"])

    def __repr__(self) -> str:
        what = f"classes={self.classes}" if self.task == "classification" else f"{len(self.bin_edges or []) - 1} bins"
        return f"MILModel({self.task}, {self.in_dim}-d {self.features_key!r}, {what})"

    # ------------------------------------------------------------------ inference
    def check_bag(self, bag: Any, where: str = "bag") -> np.ndarray:
        """``bag`` as a float32 ``(n_tiles, in_dim)`` array, checked: 2-D, non-empty, ``in_dim`` wide, finite.

        Parameters
        ----------
        bag
            Tile features.
        where
            What the bag is, to start the error messages with.

        Returns
        -------
        The features as a float32 array (not standardised).
        """
        x = np.asarray(bag, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            msg = f"{where}: a bag is a non-empty (n_tiles, d) matrix, got shape {x.shape}."
            raise ValueError(msg)
        if x.shape[1] != self.in_dim:
            msg = (
                f"{where}: {x.shape[1]}-d features, but the MIL model takes {self.in_dim}-d features "
                f"({self.features_key!r}); use the features it was trained on."
            )
            raise ValueError(msg)
        if not np.isfinite(x).all():
            msg = f"{where}: the tile features hold NaN or inf."
            raise ValueError(msg)
        return x

    def _tensor(self, bag: Any, where: str = "bag") -> Any:
        """The checked and standardised bag as a torch tensor."""
        import torch

        x = self.check_bag(bag, where)
        if self.feature_mean is not None:
            x = (x - self.feature_mean) / self.feature_std
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def _forward(self, bag: Any, where: str = "bag") -> tuple[Any, Any]:
        """``(logits, raw attention scores)`` of one bag, without gradients."""
        import torch

        x = self._tensor(bag, where)
        self.module.eval()
        with torch.no_grad():
            return self.module(x)

    def _prediction(self, logits: Any) -> np.ndarray | float:
        """:meth:`predict` from the network's logits."""
        import torch

        from ._mil import risk_from_hazards

        if self.task == "survival":
            return float(risk_from_hazards(logits))
        if logits.shape[0] == 1:
            p = float(torch.sigmoid(logits)[0])
            return np.array([1.0 - p, p])
        return torch.softmax(logits, dim=0).numpy().astype(float)

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

    def predict_with_attention(self, bag: Any, where: str = "bag") -> tuple[np.ndarray | float, np.ndarray]:
        """:meth:`predict` and :meth:`attention_scores` of one bag, from a single forward pass.

        Parameters
        ----------
        bag
            Tile features (n_tiles, in_dim).
        where
            What the bag is, to start the error messages with.

        Returns
        -------
        ``(prediction, scores)``: the prediction of :meth:`predict` and the raw attention scores (n_tiles,).
        """
        logits, scores = self._forward(bag, where)
        return self._prediction(logits), scores.numpy().astype(np.float32)

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
            "train_params": json.loads(json.dumps(json_safe(self.train_params_), default=str)),
            "versions": versions(),
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to a folder: ``model.safetensors`` (weights, standardisation) and ``config.json``.

        Parameters
        ----------
        path
            The folder.
        overwrite
            Replace an existing model folder. Only a folder holding a model's files (``config.json``,
            ``model.safetensors`` and the records ``spade-sc fit`` keeps beside them) is replaced; a folder holding
            anything else is refused (:class:`FileExistsError`). The folder is written under a temporary name and
            swapped into place when complete: a kill leaves the old model or the new one.

        Returns
        -------
        The folder.
        """
        import torch

        state = self.module.state_dict()
        tensors = {f"{_MODULE_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in state.items()}
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
        from ._mil import GatedABMIL

        config, tensors = read_model_folder(path, cls.__name__)  # config checked against the schema
        p = config["init_params"]
        module = GatedABMIL(p["in_dim"], p["n_classes"], p["hidden"], p["attention_dim"], p["dropout"])
        n = len(_MODULE_PREFIX)
        std = bool(config.get("standardised"))
        expected = {f"{_MODULE_PREFIX}{k}": v for k, v in module.state_dict().items()}
        if std:
            expected.update(feature_mean=np.zeros(p["in_dim"]), feature_std=np.ones(p["in_dim"]))
        check_tensors(expected, tensors, path)
        if std and not (tensors["feature_std"] > 0).all():
            msg = f"{path}: the tensor 'feature_std' holds values <= 0; a standard deviation is positive."
            raise ValueError(msg)
        module.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(_MODULE_PREFIX)}, strict=True)
        edges = config.get("bin_edges")
        with file_errors(path, "model folder"):
            return cls(
                module,
                features_key=config["features_key"],
                task=config["task"],
                classes=config.get("classes"),
                bin_edges=None if edges is None else [float(b) for b in edges],
                feature_mean=tensors["feature_mean"].numpy() if std else None,
                feature_std=tensors["feature_std"].numpy() if std else None,
                init_params=p,
                train_params=config.get("train_params") or {},
            )


def _init_params(module: Any) -> dict[str, Any]:
    """Hyperparameters of a :class:`GatedABMIL`, read from its layers."""
    return {
        "in_dim": int(module.in_dim),
        "n_classes": int(module.n_classes),
        "hidden": int(module.fc[0].out_features),
        "attention_dim": int(module.attention_a[0].out_features),
        "dropout": float(module.fc[2].p),
    }


def _json_float(v: float) -> float | str:
    """A float for JSON, ``inf`` as the string ``"inf"`` (read back by ``float``)."""
    return "inf" if np.isinf(v) else float(v)

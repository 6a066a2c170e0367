"""SpadeModel: the SPADE mixture of data experts behind AnnData / SpatialData, and ``tl.fit`` / ``tl.embed``."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..model._files import FORMAT_VERSION, read_model_folder, versions, write_model_folder
from .._sdata import as_cohort, features_matrix, resolve_key, resolve_table, table_region
from ..pp import gene_matrix
from ..model._trainer import default_trainer_kwargs, quiet_lightning, torch_state

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ._experts import DataExperts

logger = logging.getLogger("spade_sc")

ROUTINGS = ("soft", "hard", "uniform")
LOSSES = ("soft_clip", "infonce")
GENE_INPUTS = ("counts", "log1p")


def _check_finite(name: str, x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        msg = f"{name} holds NaN or infinite values."
        raise ValueError(msg)


def auto_n_experts(n_pairs: int, *, min_pairs_per_expert: int = 1000, max_experts: int = 16) -> int:
    """Number of experts for ``n_pairs`` training pairs: at most 16, each with about 1000 pairs or more.

    Measured on her2st (about 800 training pairs per leave-one-section-out fold, benchmarks/README.md): every
    split into 2, 8 or 16 experts lowered gene-expression prediction and label probes below the single expert,
    which itself beat the base features; experts need enough pairs each for their own contrastive heads.
    """
    return int(np.clip(n_pairs // min_pairs_per_expert, 1, max_experts))


class SpadeModel:
    """The SPADE mixture of data experts, with its gene panel, data experts and encoder record.

    Built and trained by :func:`spade_sc.tl.fit`; applied to new slides by :func:`spade_sc.tl.embed`; saved to
    and loaded from a folder with :meth:`save` / :meth:`load` (safetensors weights + JSON, no pickle).

    Parameters
    ----------
    experts
        The data experts (step-1 centroids and their expert) from :func:`spade_sc.tl.build_experts`.
    genes
        The gene panel (gene names, in model input order).
    image_dim
        Dimension of the frozen image features.
    features_key
        ``obsm`` key of the image features the model was trained on (``"X_<encoder>"``).
    encoder_spec
        The encoder's :attr:`spade_sc.encoders.Encoder.spec` (None when features came from elsewhere).
    gene_input
        ``"log1p"`` (library-size normalised, log1p) or ``"counts"`` (raw counts, as the reference code).
    loss
        ``"soft_clip"`` (BLEEP soft targets, tau = 1) or ``"infonce"`` (CLIP, learnable temperature).
    routing
        Default routing at inference: ``"soft"``, ``"hard"`` or ``"uniform"``.
    routing_tau
        Temperature of soft routing.
    proj_dim
        Embedding dimension.
    dropout
        Dropout inside each head.
    seed
        Seed of the weight initialisation.
    """

    def __init__(
        self,
        experts: DataExperts,
        genes: Sequence[str],
        image_dim: int,
        *,
        features_key: str,
        encoder_spec: Mapping[str, Any] | None = None,
        gene_input: Literal["counts", "log1p"] = "log1p",
        loss: Literal["soft_clip", "infonce"] = "soft_clip",
        routing: Literal["soft", "hard", "uniform"] = "soft",
        routing_tau: float = 0.1,
        proj_dim: int = 256,
        dropout: float = 0.1,
        seed: int = 0,
    ) -> None:
        from ..model import BatchedExperts, make_loss

        _check_choices(gene_input=gene_input, loss=loss, routing=routing)
        if experts.centroids.shape[1] != image_dim:
            msg = f"The experts' centroids have dimension {experts.centroids.shape[1]}, the features {image_dim}."
            raise ValueError(msg)
        self.experts = experts
        self.genes = [str(g) for g in genes]
        if len(set(self.genes)) != len(self.genes):
            msg = "The gene panel holds duplicate gene names."
            raise ValueError(msg)
        self.init_params_ = {
            "image_dim": int(image_dim),
            "gene_dim": len(self.genes),
            "n_experts": int(experts.n_experts),
            "features_key": str(features_key),
            "gene_input": gene_input,
            "loss": loss,
            "routing": routing,
            "routing_tau": float(routing_tau),
            "proj_dim": int(proj_dim),
            "dropout": float(dropout),
            "seed": int(seed),
        }
        self.encoder_spec = None if encoder_spec is None else dict(encoder_spec)
        self.module = BatchedExperts(
            experts.n_experts, int(image_dim), len(self.genes), int(proj_dim), float(dropout), seed=int(seed)
        )
        self.loss_module = make_loss(loss)
        self.history_: list[dict[str, Any]] = []
        self.train_params_: dict[str, Any] = {}
        self.is_trained_ = False

    # ------------------------------------------------------------------ properties
    @property
    def features_key(self) -> str:
        """``obsm`` key of the image features the model takes."""
        return self.init_params_["features_key"]

    @property
    def n_experts(self) -> int:
        """Number of data experts."""
        return self.init_params_["n_experts"]

    def __repr__(self) -> str:
        p = self.init_params_
        state = "trained" if self.is_trained_ else "untrained"
        return (
            f"SpadeModel({state}; {p['n_experts']} experts, {p['image_dim']}-d {p['features_key']} x "
            f"{p['gene_dim']} genes ({p['gene_input']}) -> {p['proj_dim']}-d, loss={p['loss']}, routing={p['routing']})"
        )

    # ------------------------------------------------------------------ data
    def gene_input_matrix(self, table: AnnData) -> np.ndarray:
        """The model's gene input for every row of ``table`` (panel genes by name)."""
        from ..pp import gene_matrix

        return gene_matrix(table, self.genes, gene_input=self.init_params_["gene_input"])

    def _features(self, table: AnnData, where: str, features_key: str | None = None) -> np.ndarray:
        key = features_key or self.features_key
        if key not in table.obsm:
            msg = f"{where}: obsm[{key!r}] is missing (present: {sorted(table.obsm)})."
            raise KeyError(msg)
        x = np.asarray(table.obsm[key], dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.init_params_["image_dim"]:
            msg = (
                f"{where}: obsm[{key!r}] has shape {x.shape}, but the model takes "
                f"{self.init_params_['image_dim']}-d features from {self.features_key!r}."
            )
            raise ValueError(msg)
        _check_finite(f"{where}: obsm[{key!r}]", x)
        return x

    # ------------------------------------------------------------------ training
    def train(
        self,
        pairs: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
        *,
        validation: Sequence[str] | None = None,
        max_epochs: int = 100,
        batch_size: int = 512,
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        early_stopping_patience: int | None = None,
        trainer_kwargs: Mapping[str, Any] | None = None,
        progress: bool = True,
        experts_per_step: int | None = None,
    ) -> SpadeModel:
        """Train the experts contrastively (negatives only within each expert); keep the weights of the best epoch.

        Parameters
        ----------
        pairs
            ``{group: (image features, gene input, expert index)}``; a group is a slide (or a spatial block).
        validation
            Groups held out for validation (the best epoch is chosen by their loss). None or empty: no
            validation; the last epoch is kept.
        max_epochs
            Epochs.
        batch_size
            Pairs per expert batch (a batch holds pairs of one expert; a step holds up to ``experts_per_step``
            such batches, each with its own contrastive loss).
        lr
            AdamW learning rate (cosine schedule over ``max_epochs``).
        weight_decay
            AdamW weight decay.
        early_stopping_patience
            Stop when the validation loss has not improved for this many epochs (None: never).
        trainer_kwargs
            Passed to :class:`lightning.Trainer` (``accelerator``, ``devices``, ``strategy``, ``precision``, ...).
            Under DDP (``devices=N``, ``strategy="ddp"``, ``"ddp_spawn"`` or ``"ddp_notebook"`` in Jupyter) every
            process runs an equal share of each epoch's steps, sharded by :class:`~spade_sc.model.ExpertBatchSampler`,
            and evaluates the whole validation set; the weights of the best epoch come back to this process.
        progress
            Show Lightning's progress bar.
        experts_per_step
            Single-expert batches (of distinct experts) per optimiser step, each expert's loss computed within its
            own rows; None: all experts in each step (one batched step trains them all), 1: one expert per step.

        Returns
        -------
        The model itself, trained; ``history_`` holds the loss of every epoch.
        """
        import lightning as L

        from ..model import PairsDataModule, PairsDataset, SpadeLightningModule

        validation = list(validation or [])
        unknown = [g for g in validation if g not in pairs]
        if unknown:
            msg = f"validation groups {unknown} are not among {sorted(pairs)}."
            raise ValueError(msg)
        train_groups = [g for g in pairs if g not in validation]
        if not train_groups:
            msg = "No training slides left after the validation split."
            raise ValueError(msg)

        def stack(groups: list[str]) -> PairsDataset | None:
            if not groups:
                return None
            x = np.concatenate([pairs[g][0] for g in groups])
            y = np.concatenate([pairs[g][1] for g in groups])
            e = np.concatenate([pairs[g][2] for g in groups])
            return PairsDataset(x, y, e)

        train_ds, val_ds = stack(train_groups), stack(validation)
        seed = self.init_params_["seed"]
        L.seed_everything(seed, workers=True, verbose=False)

        lit = SpadeLightningModule(
            self.module,
            loss=self.init_params_["loss"],
            lr=lr,
            weight_decay=weight_decay,
            max_epochs=max_epochs,
        )
        lit.loss_fn = self.loss_module
        callbacks: list[Any] = []
        if early_stopping_patience is not None and val_ds is not None:
            callbacks.append(L.pytorch.callbacks.EarlyStopping("val_loss", patience=int(early_stopping_patience)))
        kwargs = default_trainer_kwargs(max_epochs, progress, trainer_kwargs)
        kwargs["callbacks"] = [*callbacks, *list(kwargs.get("callbacks", []) or [])]
        # Lightning announces devices and tips at INFO level at every fit: kept out of the user's log, progress or not
        with quiet_lightning(True), torch_state():
            trainer = L.Trainer(**kwargs)
            data = PairsDataModule(
                train_ds, val_ds, batch_size=batch_size, seed=seed, experts_per_step=experts_per_step
            )
            trainer.fit(lit, datamodule=data)
        self.module = lit.experts.cpu().eval()
        self.loss_module = lit.loss_fn.cpu()
        self.history_ = [dict(h) for h in lit.history]
        self.train_params_ = {
            "max_epochs": int(max_epochs),
            "epochs_run": len(self.history_),
            "best_epoch": lit.best_epoch,
            "best_val_loss": lit.best_val_loss,
            "batch_size": int(batch_size),
            "experts_per_step": None if experts_per_step is None else int(experts_per_step),
            "lr": float(lr),
            "weight_decay": float(weight_decay),
            "early_stopping_patience": early_stopping_patience,
            "train_groups": train_groups,
            "validation_groups": validation,
            "n_train_pairs": len(train_ds),
            "n_validation_pairs": 0 if val_ds is None else len(val_ds),
        }
        self.is_trained_ = True
        return self

    # ------------------------------------------------------------------ inference
    def routing_weights(self, features: np.ndarray, routing: str | None = None) -> np.ndarray:
        """Routing weights (N x K, rows sum to 1) of image features over the experts."""
        import torch

        from ..model import route

        routing = routing or self.init_params_["routing"]
        _check_choices(routing=routing)
        with torch.no_grad():
            w = route(
                torch.as_tensor(np.asarray(features, dtype=np.float32)),
                torch.as_tensor(self.experts.centroids, dtype=torch.float32),
                torch.as_tensor(self.experts.centroid_expert, dtype=torch.long),
                self.n_experts,
                mode=routing,
                tau=self.init_params_["routing_tau"],
            )
        return w.numpy()

    def get_image_embedding(self, features: np.ndarray, routing: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """SPADE image embedding of frozen features and the routing weights used.

        Parameters
        ----------
        features
            (N, image_dim) features from the model's encoder.
        routing
            ``"soft"``, ``"hard"`` or ``"uniform"``; defaults to the model's.

        Returns
        -------
        ``(embedding (N, proj_dim), routing weights (N, K))`` as float32 numpy arrays.
        """
        import torch

        from ..model import mixture_embed

        features = np.asarray(features, dtype=np.float32)
        _check_finite("features", features)
        weights = self.routing_weights(features, routing)
        self.module.eval()
        with torch.no_grad():
            emb = mixture_embed(self.module, torch.as_tensor(features), torch.as_tensor(weights))
        return emb.numpy().astype(np.float32), weights.astype(np.float32)

    def get_gene_embedding(self, gene_input: np.ndarray, routing_weights: np.ndarray) -> np.ndarray:
        """Gene-side embedding, mixed over experts with the given routing weights (N x K)."""
        import torch

        self.module.eval()
        y = torch.as_tensor(np.asarray(gene_input, dtype=np.float32))
        w = torch.as_tensor(np.asarray(routing_weights, dtype=np.float32))
        with torch.no_grad():
            out = (self.module.gene_embed_all(y) * w[:, :, None]).sum(1)
        return out.numpy()

    # ------------------------------------------------------------------ files
    def state_tensors(self) -> dict[str, Any]:
        """Every tensor of the model file: expert weights, loss parameters, centroids and their experts."""
        import torch

        tensors = {f"experts.{k}": v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        tensors.update({f"loss.{k}": v.detach().cpu().contiguous() for k, v in self.loss_module.state_dict().items()})
        for k, v in self.experts.arrays().items():
            tensors[f"data_experts.{k}"] = torch.as_tensor(np.ascontiguousarray(v))
        return tensors

    def fingerprint(self) -> str:
        """SHA-256 over every tensor of the model (names, shapes, bytes): identical weights, identical print."""
        h = hashlib.sha256()
        for name, t in sorted(self.state_tensors().items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def config(self) -> dict[str, Any]:
        """The JSON part of the model file."""
        return {
            "format_version": FORMAT_VERSION,
            "class": type(self).__name__,
            "init_params": self.init_params_,
            "genes": self.genes,
            "encoder": self.encoder_spec,
            "data_experts": self.experts.config(),
            "train_params": self.train_params_,
            "history": self.history_,
            "is_trained": self.is_trained_,
            "fingerprint": self.fingerprint(),
            "versions": versions(),
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to a folder: ``model.safetensors`` (every tensor) and ``config.json`` (the rest).

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
        return write_model_folder(path, self.state_tensors(), self.config(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, *, genes: Sequence[str] | None = None) -> SpadeModel:
        """Read a model folder written by :meth:`save`, validating everything before building the modules.

        Parameters
        ----------
        path
            The folder.
        genes
            When given, the gene panel the caller expects; a different stored panel is an error.

        Returns
        -------
        The model, with bit-identical weights.
        """
        from ._experts import DataExperts

        config, tensors = read_model_folder(path, cls.__name__)
        if genes is not None and list(genes) != list(config["genes"]):
            diff = sorted(set(genes) ^ set(config["genes"]))[:10]
            msg = f"The gene panel stored in {path} differs from the expected one (e.g. {diff})."
            raise ValueError(msg)
        arrays = {k.split(".", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith("data_experts.")}
        experts = DataExperts.from_dict({**config["data_experts"], **arrays})
        p = config["init_params"]
        model = cls(
            experts,
            config["genes"],
            p["image_dim"],
            features_key=p["features_key"],
            encoder_spec=config["encoder"],
            gene_input=p["gene_input"],
            loss=p["loss"],
            routing=p["routing"],
            routing_tau=p["routing_tau"],
            proj_dim=p["proj_dim"],
            dropout=p["dropout"],
            seed=p["seed"],
        )
        expected = model.state_tensors()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        shapes = [
            f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in sorted(set(expected) & set(tensors))
            if tuple(tensors[k].shape) != tuple(expected[k].shape)
        ]
        if missing or unexpected or shapes:
            msg = (
                f"{path} does not match its config: missing {missing[:10]}, unexpected "
                f"{unexpected[:10]}, shape mismatches {shapes[:10]}."
            )
            raise ValueError(msg)
        model.module.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("experts.")}, strict=True
        )
        model.loss_module.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("loss.")}, strict=True
        )
        model.module.eval()
        model.history_ = config.get("history", [])
        model.train_params_ = config.get("train_params", {})
        model.is_trained_ = bool(config.get("is_trained", False))
        if config.get("fingerprint") and model.fingerprint() != config["fingerprint"]:
            msg = f"The weights in {path} do not match the fingerprint recorded in its config."
            raise ValueError(msg)
        return model


# ---------------------------------------------------------------------- helpers for fit / embed (and evaluate)
def model_features(model: SpadeModel, table: AnnData, *, where: str, features_key: str | None = None) -> np.ndarray:
    """The features of ``table`` that ``model`` takes (its ``features_key`` by default), checked against its size."""
    return features_matrix(
        table,
        features_key or model.features_key,
        where=where,
        dim=model.init_params_["image_dim"],
        expected=f"the model (trained on {model.features_key!r})",
    )


def model_gene_input(model: SpadeModel, table: AnnData) -> np.ndarray:
    """The model's gene input for every row of ``table`` (its panel genes, by name)."""
    return gene_matrix(table, model.genes, gene_input=model.init_params_["gene_input"])


def _check_choices(**values: str) -> None:
    """Raise a ValueError naming the first argument whose value is not one of its allowed choices."""
    allowed = {"gene_input": GENE_INPUTS, "loss": LOSSES, "routing": ROUTINGS}
    for name, value in values.items():
        if value not in allowed[name]:
            msg = f"{name}={value!r}; choose one of {allowed[name]}."
            raise ValueError(msg)


def _spots_table(sdata: SpatialData, table_key: str | None, shapes_key: str | None) -> tuple[str, str]:
    """(table key, shapes key) of the spot table of a slide."""
    if shapes_key is None and table_key is not None:
        regions, _, _ = table_region(sdata.tables[resolve_key(sdata, "tables", table_key)])
        shapes_key = regions[0]
    shapes_key = resolve_key(sdata, "shapes", shapes_key)
    return resolve_table(sdata, table_key, shapes_key), shapes_key


def _spade_record(model: SpadeModel, *, routing: str, key_added: str, features_key: str) -> dict[str, Any]:
    """The ``uns["spade"]`` provenance of an embedding (the same for every slide embedded by one call)."""
    return {
        "params": {**model.init_params_, "routing": routing, "key_added": key_added, "features_key": features_key},
        "genes": list(model.genes),
        "fingerprint": model.fingerprint(),
        "train_params": json.loads(json.dumps(model.train_params_, default=str)),
        "experts": model.experts.config()["params"],
        "versions": versions(),
    }


def _write_embedding(
    table: AnnData,
    model: SpadeModel,
    emb: np.ndarray,
    weights: np.ndarray,
    assigned: np.ndarray,
    record: Mapping[str, Any],
) -> None:
    import copy

    import pandas as pd

    cats = [str(k) for k in range(model.n_experts)]
    table.obsm[record["params"]["key_added"]] = emb
    table.obs["spade_expert"] = pd.Categorical([str(a) for a in assigned], categories=cats)
    table.obsm["spade_routing"] = weights
    w = np.clip(weights, 1e-12, 1.0)
    table.obs["spade_routing_entropy"] = -(w * np.log(w)).sum(1)
    table.uns["spade"] = copy.deepcopy(dict(record))


def _split_single_slide(table: AnnData, name: str, fraction: float) -> dict[str, np.ndarray]:
    """Spatially blocked split of one slide: the spots right of the (1 - fraction) x-quantile are held out."""
    xy = np.asarray(table.obsm["spatial"]) if "spatial" in table.obsm else None
    if xy is None:
        msg = f"Slide {name!r}: a single slide needs obsm['spatial'] for the spatially blocked validation split."
        raise ValueError(msg)
    cut = np.quantile(xy[:, 0], 1 - fraction)
    val = xy[:, 0] > cut
    return {f"{name}:train": ~val, f"{name}:validation": val}


def fit(
    sdata_or_cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData],
    *,
    features_key: str | None = None,
    encoder: Any = "efficientnet_lite0",
    n_experts: int | Literal["auto"] = "auto",
    n_clusters_per_tissue: int | Literal["auto"] = "auto",
    tissue_key: str | None = None,
    n_top_genes: int = 50,
    gene_input: Literal["counts", "log1p"] = "log1p",
    loss: Literal["soft_clip", "infonce"] = "soft_clip",
    routing: Literal["soft", "hard", "uniform"] = "soft",
    routing_tau: float = 0.1,
    max_epochs: int = 100,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    validation_slides: Sequence[str] | None = None,
    validation_fraction: float = 0.2,
    early_stopping_patience: int | None = None,
    table_key: str | None = None,
    shapes_key: str | None = None,
    seed: int = 0,
    key_added: str = "X_spade",
    trainer_kwargs: Mapping[str, Any] | None = None,
    feature_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    experts_per_step: int | None = None,
) -> SpadeModel:
    """Fit SPADE on one slide or a cohort: features, gene panel, data experts, contrastive training, embedding.

    Every missing step runs with defaults: patch features with ``encoder`` (:func:`spade_sc.pp.image_features`)
    for slides that lack ``obsm[features_key]``, the gene panel (:func:`spade_sc.pp.gene_panel`), the two-step
    data experts (:func:`spade_sc.tl.build_experts`). Training draws every contrastive batch from one expert's
    pairs (hard negatives), uses AdamW with a cosine schedule, and keeps the epoch with the lowest loss on
    held-out **slides**.

    Parameters
    ----------
    sdata_or_cohort
        One SpatialData, ``{slide id: SpatialData}`` or a sequence of them.
    features_key
        ``obsm`` key of existing features; default ``"X_<encoder name>"``, computed where missing.
    encoder
        Encoder spec for missing features (see :func:`spade_sc.encoders.get_encoder`).
    n_experts
        Number of data experts; ``"auto"``: ``clip(n_pairs // 1000, 1, 16)`` (16 as in the paper on large
        cohorts, fewer when each expert would get too few pairs to train on).
    n_clusters_per_tissue
        Step-1 clusters per tissue type; ``"auto"``: 16 (the paper), at least ``n_experts``.
    tissue_key
        Tissue / organ grouping of step 1: an ``obs`` column, or a key of ``sdata.attrs["spade_sc"]["slide"]``.
    n_top_genes
        HVGs per slide in the gene panel.
    gene_input
        Gene input of the model: ``"log1p"`` (normalised) or ``"counts"`` (raw, as the reference code).
    loss
        ``"soft_clip"`` (BLEEP) or ``"infonce"`` (CLIP with a learnable temperature).
    routing
        Routing written to ``obsm[key_added]``: ``"soft"``, ``"hard"`` or ``"uniform"``.
    routing_tau
        Soft-routing temperature.
    max_epochs
        Training epochs.
    batch_size
        Pairs per expert batch.
    lr
        AdamW learning rate. 1e-3 rather than the paper's 1e-4: the paper trained on 10^5-10^6 pairs; on about a
        thousand pairs (her2st) 1e-4 had not converged after 300 epochs and gave a weaker embedding
        (benchmarks/README.md).
    weight_decay
        Weight decay.
    validation_slides
        Slides held out to pick the best epoch; default a ``validation_fraction`` of the slides (at least one
        when there are two or more). A single slide is split into spatial blocks: the spots right of the
        ``1 - validation_fraction`` quantile of x are held out.
    validation_fraction
        Fraction of slides (or of one slide's width) used for validation; 0 disables validation.
    early_stopping_patience
        Stop after this many epochs without improvement of the validation loss.
    table_key, shapes_key
        The spot table and shapes of every slide, when a slide holds several.
    seed
        Seed of k-means, initialisation, batching and the validation draw; same seed, same model on CPU.
    key_added
        ``obsm`` key of the embedding.
    trainer_kwargs
        Passed to :class:`lightning.Trainer` (e.g. ``accelerator="gpu", devices=4, strategy="ddp"``).
    feature_kwargs
        Passed to :func:`spade_sc.pp.image_features` for missing features.
    progress
        Progress bars.
    experts_per_step
        Single-expert batches (of distinct experts) per optimiser step, each expert's contrastive loss computed
        within its own rows (hard negatives kept); None: all experts in each step, 1: one expert per step.

    Returns
    -------
    The trained :class:`SpadeModel`. Writes into the spot table of every slide:

    - ``obsm[key_added]``: the SPADE embedding (n_spots x 256) with ``routing``;
    - ``obs["spade_expert"]``: the expert of the nearest step-1 centroid (categorical);
    - ``obsm["spade_routing"]``: routing weights (n_spots x K, rows sum to 1);
    - ``obs["spade_routing_entropy"]``: entropy of those weights;
    - ``uns["spade"]``: parameters, gene panel (``genes``), data experts (``experts``: tissue key, clusters per
      tissue, WCSS), model fingerprint, training record, versions;
    - ``obsm["X_<encoder>"]`` and ``uns["X_<encoder>"]`` where features were computed.
    """
    import torch

    from ..encoders import get_encoder
    from ..pp import gene_matrix, gene_panel, image_features
    from ._experts import build_experts

    threads = torch.get_num_threads()  # scanpy's numba kernels in the gene panel can change it
    cohort = as_cohort(sdata_or_cohort)
    keys = {name: _spots_table(s, table_key, shapes_key) for name, s in cohort.items()}
    tables = {name: cohort[name].tables[keys[name][0]] for name in cohort}
    if not 0 <= validation_fraction < 1:
        msg = f"validation_fraction must be in [0, 1), got {validation_fraction}."
        raise ValueError(msg)
    if validation_slides is not None:
        unknown = [v for v in validation_slides if v not in cohort]
        if unknown:
            msg = f"validation_slides {unknown} are not in the cohort {sorted(cohort)}."
            raise ValueError(msg)
        if len(validation_slides) >= len(cohort):
            msg = "validation_slides leaves no slide to train on."
            raise ValueError(msg)
    _check_choices(gene_input=gene_input, loss=loss, routing=routing)
    if key_added in ("spade_routing",):
        msg = f"key_added={key_added!r} collides with a key spade_sc writes."
        raise ValueError(msg)

    # Gene panel first: it validates the counts (shared genes, NaN, negative values) before anything is written.
    genes = gene_panel(cohort, n_top_genes=n_top_genes, table_key=table_key, inplace=False)
    torch.set_num_threads(threads)

    enc = None
    if features_key is None:
        enc = get_encoder(encoder)
        features_key = f"X_{enc.name}"
    missing = [name for name, t in tables.items() if features_key not in t.obsm]
    if missing:
        if enc is None:
            enc = get_encoder(encoder)
        for name in missing:
            logger.info("spade_sc.tl.fit: computing %s features for slide %s", enc.name, name)
            image_features(
                cohort[name],
                encoder=enc,
                shapes_key=keys[name][1],
                table_key=keys[name][0],
                key_added=features_key,
                progress=progress,
                **dict(feature_kwargs or {}),
            )
    feats = {}
    for name, t in tables.items():
        if features_key not in t.obsm:
            msg = f"Slide {name!r}: obsm[{features_key!r}] is missing."
            raise KeyError(msg)
        x = np.asarray(t.obsm[features_key], dtype=np.float32)
        _check_finite(f"Slide {name!r}: obsm[{features_key!r}]", x)
        feats[name] = x
    dims = {name: x.shape[1] for name, x in feats.items()}
    if len(set(dims.values())) > 1:
        msg = f"Features {features_key!r} differ in dimension across slides: {dims}."
        raise ValueError(msg)
    encoder_spec = None
    for t in tables.values():
        params = t.uns.get(features_key, {})
        if isinstance(params, Mapping) and "encoder" in params:
            encoder_spec = dict(params["encoder"])
            break
    if encoder_spec is None and enc is not None:
        encoder_spec = enc.spec

    n_pairs = sum(len(x) for x in feats.values())
    k = auto_n_experts(n_pairs) if n_experts == "auto" else int(n_experts)
    k1 = max(16, k) if n_clusters_per_tissue == "auto" else int(n_clusters_per_tissue)
    if n_experts == "auto":
        logger.info(
            "spade_sc.tl.fit: %d training pairs -> n_experts=%d (auto: about 1000 pairs or more each)", n_pairs, k
        )
    experts = build_experts(
        cohort,
        features_key=features_key,
        tissue_key=tissue_key,
        n_clusters_per_tissue=k1,
        n_experts=k,
        table_key=table_key,
        seed=seed,
        inplace=False,
    )
    gene_inputs = {name: gene_matrix(t, genes, gene_input=gene_input) for name, t in tables.items()}
    assigned = {name: experts.assign(feats[name]) for name in cohort}

    # Validation split by slide (or by spatial block of a single slide).
    groups: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if len(cohort) == 1:
        name = next(iter(cohort))
        if validation_fraction > 0:
            masks = _split_single_slide(tables[name], name, validation_fraction)
            for g, m in masks.items():
                groups[g] = (feats[name][m], gene_inputs[name][m], assigned[name][m])
            validation = [f"{name}:validation"]
        else:
            groups[name] = (feats[name], gene_inputs[name], assigned[name])
            validation = []
    else:
        for name in cohort:
            groups[name] = (feats[name], gene_inputs[name], assigned[name])
        if validation_slides is not None:
            validation = list(validation_slides)
        elif validation_fraction > 0:
            n_val = max(1, round(validation_fraction * len(cohort)))
            rng = np.random.default_rng(seed)
            validation = sorted(rng.choice(sorted(cohort), size=n_val, replace=False).tolist())
        else:
            validation = []

    model = SpadeModel(
        experts,
        genes,
        dims[next(iter(dims))],
        features_key=features_key,
        encoder_spec=encoder_spec,
        gene_input=gene_input,
        loss=loss,
        routing=routing,
        routing_tau=routing_tau,
        seed=seed,
    )
    model.train(
        groups,
        validation=validation,
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        early_stopping_patience=early_stopping_patience,
        trainer_kwargs=trainer_kwargs,
        progress=progress,
        experts_per_step=experts_per_step,
    )
    model.train_params_["n_experts_auto"] = n_experts == "auto"
    model.train_params_["tissue_key"] = tissue_key

    record = _spade_record(model, routing=routing, key_added=key_added, features_key=features_key)
    for name, t in tables.items():
        emb, weights = model.get_image_embedding(feats[name], routing)
        _write_embedding(t, model, emb, weights, assigned[name], record)
    return model


def embed(
    sdata: SpatialData,
    model: SpadeModel,
    *,
    routing: Literal["soft", "hard", "uniform"] | None = None,
    features_key: str | None = None,
    table_key: str | None = None,
    shapes_key: str | None = None,
    key_added: str = "X_spade",
    inplace: bool = True,
    progress: bool = True,
    feature_kwargs: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Embed the spots or tiles of a new slide with a trained :class:`SpadeModel`.

    Features are computed with the model's own encoder when the table lacks them; features from another
    encoder or of another dimension are refused.

    Parameters
    ----------
    sdata
        The slide.
    model
        A trained model (:func:`fit` or :meth:`SpadeModel.load`).
    routing
        ``"soft"``, ``"hard"`` or ``"uniform"``; defaults to the model's.
    features_key
        ``obsm`` key of the features; must be the model's (default).
    table_key, shapes_key
        The table and the shapes (spots or tiles) it annotates, when the slide holds several.
    key_added
        ``obsm`` key of the embedding.
    inplace
        Write into the table; when False, return ``(embedding, routing weights)`` and write nothing.
    progress
        Progress bar of the feature extraction.
    feature_kwargs
        Passed to :func:`spade_sc.pp.image_features` when features are computed.

    Returns
    -------
    None when ``inplace``; writes into ``tables[t]``:

    - ``obsm[key_added]``: the embedding (n x 256);
    - ``obs["spade_expert"]``: the expert of the nearest step-1 centroid;
    - ``obsm["spade_routing"]``: routing weights (n x K);
    - ``obs["spade_routing_entropy"]``: entropy of those weights;
    - ``uns["spade"]``: parameters, gene panel, model fingerprint, versions;
    - ``obsm[<model features key>]`` / ``uns[...]`` when features were computed.

    Otherwise ``(embedding, routing weights)``.
    """
    from ..encoders import encoder_from_spec
    from ..pp import image_features

    features_key = features_key or model.features_key
    if features_key != model.features_key:
        msg = (
            f"features_key={features_key!r}, but the model was trained on {model.features_key!r} features; "
            "features from another encoder cannot be embedded."
        )
        raise ValueError(msg)
    routing = routing or model.init_params_["routing"]
    _check_choices(routing=routing)
    tkey, skey = _spots_table(sdata, table_key, shapes_key)
    table = sdata.tables[tkey]
    if features_key in table.obsm:
        stored = table.uns.get(features_key, {})
        stored_name = stored.get("encoder", {}).get("name") if isinstance(stored, Mapping) else None
        model_name = (model.encoder_spec or {}).get("name")
        if stored_name and model_name and stored_name != model_name:
            msg = (
                f"obsm[{features_key!r}] of table {tkey!r} comes from encoder {stored_name!r}; "
                f"the model's is {model_name!r}."
            )
            raise ValueError(msg)
        feats = model._features(table, f"table {tkey!r}", features_key)
    else:
        if model.encoder_spec is None:
            msg = f"Table {tkey!r} has no obsm[{features_key!r}] and the model records no encoder to compute them."
            raise ValueError(msg)
        enc = encoder_from_spec(model.encoder_spec)
        if enc.dim != model.init_params_["image_dim"]:
            msg = f"The model's encoder gives {enc.dim}-d features; the model takes {model.init_params_['image_dim']}."
            raise ValueError(msg)
        kwargs = {"encoder": enc, "shapes_key": skey, "table_key": tkey, "progress": progress, **(feature_kwargs or {})}
        if inplace:
            image_features(sdata, key_added=features_key, **kwargs)
            feats = model._features(table, f"table {tkey!r}", features_key)
        else:
            feats = np.asarray(image_features(sdata, inplace=False, **kwargs), dtype=np.float32)
    emb, weights = model.get_image_embedding(feats, routing)
    if not inplace:
        return emb, weights
    assigned = model.experts.assign(feats)
    record = _spade_record(model, routing=routing, key_added=key_added, features_key=features_key)
    _write_embedding(table, model, emb, weights, assigned, record)
    return None

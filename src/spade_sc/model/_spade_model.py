"""SpadeModel: the SPADE mixture of data experts, its training on feature / expression pairs, and its model folder.

AnnData-free: it trains on and embeds numpy arrays. :func:`spade_sc.tl.fit` and :func:`spade_sc.tl.embed` read and
write SpatialData around it. Its torch modules are imported inside the methods, so importing it does not import torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._constants import GENE_INPUTS, LOSSES, ROUTINGS
from .._validation import check_choice, check_pairs, file_errors
from ._files import FORMAT_VERSION, read_model_folder, versions, write_model_folder
from ._kmeans import DataExperts
from ._schema import ALIGNMENT_TENSOR, check_alignment, check_tensors
from ._trainer import default_trainer_kwargs, quiet_lightning, torch_state


class SpadeModel:
    """The SPADE mixture of data experts, with its gene panel, data experts and encoder record.

    Built and trained by :func:`spade_sc.tl.fit`; applied to new slides by :func:`spade_sc.tl.embed`; saved to
    and loaded from a folder with :meth:`save` / :meth:`load` (safetensors weights + JSON, no pickle).

    Parameters
    ----------
    experts
        The data experts (step-1 centroids and their expert) from :func:`spade_sc.tl.build_experts` or
        :meth:`DataExperts.fit`.
    genes
        The gene panel (gene names, in model input order).
    image_dim
        Dimension of the image input (the frozen features; twice their dimension with ``spatial_context``).
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
    spatial_context
        None: the image features are the spots' own. A radius (in units of the spot spacing): the image input is
        ``[features, mean features of the neighbours within that radius]`` (:func:`spade_sc.pp.spatial_context`),
        so ``image_dim`` is twice the encoder's dimension; :func:`spade_sc.tl.embed` builds that input itself.
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
        spatial_context: float | None = None,
    ) -> None:
        from ._experts import BatchedExperts
        from ._losses import make_loss

        check_choice(gene_input, "gene_input", GENE_INPUTS)
        check_choice(loss, "loss", LOSSES)
        check_choice(routing, "routing", ROUTINGS)
        number = isinstance(routing_tau, int | float | np.number) and not isinstance(routing_tau, bool)
        if not (number and 0 < routing_tau < np.inf):
            msg = f"routing_tau must be a positive number, got {routing_tau!r}."
            raise ValueError(msg)
        if spatial_context is not None:
            from ..pp._context import check_radius

            spatial_context = check_radius(spatial_context)
            if image_dim % 2:
                msg = f"With a spatial context the input is [features, neighbours' mean]: image_dim {image_dim} is odd."
                raise ValueError(msg)
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
        if spatial_context is not None:  # recorded only when used: models without context keep their config
            self.init_params_["spatial_context"] = spatial_context
        self.encoder_spec = None if encoder_spec is None else dict(encoder_spec)
        self.module = BatchedExperts(
            experts.n_experts, int(image_dim), len(self.genes), int(proj_dim), float(dropout), seed=int(seed)
        )
        self.loss_module = make_loss(loss)
        self.history_: list[dict[str, Any]] = []
        self.train_params_: dict[str, Any] = {}
        self.is_trained_ = False
        #: (K, d, d) rotations of the experts' embeddings into one space (:meth:`train`); None: not aligned
        self.alignment_: np.ndarray | None = None

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
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        align_experts: bool = True,
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
        checkpoint_dir
            Write a checkpoint at the end of every epoch into this folder (``last/checkpoint.safetensors`` +
            ``last/checkpoint.json``, no pickle, replaced atomically): weights, optimizer and scheduler states, the
            epoch, the best-epoch weights and validation loss, the early-stopping counter and every random state.
            A folder that already holds a checkpoint is refused unless ``resume``.
        resume
            Continue from the checkpoint in ``checkpoint_dir`` (start afresh when there is none). A checkpoint of
            another model configuration, other settings or other pairs is refused, naming the difference. A run
            killed and resumed ends with bitwise the same weights as an uninterrupted one (same seed, device and
            torch thread count).
        align_experts
            With several experts, rotate each expert's embedding space into one common space once training ends
            (``alignment_``, :func:`~spade_sc.model.expert_alignment` on every expert's gene embedding of the training
            pairs): the experts share no weights, so without it their embeddings are unrelated coordinate systems
            and a linear read-out of the mixture fits one map to all of them (``benchmarks/mixture.py``). Rotations
            change no distance within an expert, nor hard-routed retrieval. False: the paper's unaligned mixture.

        Returns
        -------
        The model itself, trained; ``history_`` holds the loss of every epoch.
        """
        import lightning as L
        import torch

        from ._lightning import PairsDataModule, PairsDataset, SpadeLightningModule

        validation = list(validation or [])
        unknown = [g for g in validation if g not in pairs]
        if unknown:
            msg = f"validation groups {unknown} are not among {sorted(pairs)}."
            raise ValueError(msg)
        train_groups = [g for g in pairs if g not in validation]
        if not train_groups:
            msg = "No training slides left after the validation split."
            raise ValueError(msg)
        # at least 2 pairs of one expert to train (and to validate): never 0 steps reported as a trained model
        check_pairs({g: pairs[g][2] for g in train_groups}, {g: pairs[g][2] for g in validation})

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
            self.module, loss=self.loss_module, lr=lr, weight_decay=weight_decay, max_epochs=max_epochs
        )
        callbacks: list[Any] = []
        if early_stopping_patience is not None and val_ds is not None:
            callbacks.append(L.pytorch.callbacks.EarlyStopping("val_loss", patience=int(early_stopping_patience)))
        if checkpoint_dir is not None:
            settings = {"max_epochs": int(max_epochs), "batch_size": int(batch_size), "lr": float(lr)}
            settings.update(weight_decay=float(weight_decay), experts_per_step=experts_per_step)
            settings.update(early_stopping_patience=early_stopping_patience, validation=validation)
            callbacks.append(self._checkpoint_callback(checkpoint_dir, resume, pairs, settings))
        elif resume:
            msg = "resume=True needs checkpoint_dir."
            raise ValueError(msg)
        kwargs = default_trainer_kwargs(max_epochs, progress, trainer_kwargs)
        kwargs["callbacks"] = [*callbacks, *list(kwargs.get("callbacks", []) or [])]
        if checkpoint_dir is not None:  # a Checkpoint callback needs it (Lightning then adds no checkpoint of its own)
            kwargs["enable_checkpointing"] = True
        threads = torch.get_num_threads()  # recorded: bitwise reproducible at a fixed thread count (see tl.fit)
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
        self.alignment_ = self._alignment(train_ds.gene_feats) if align_experts and self.n_experts > 1 else None
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
            # per expert (pl.expert_diagnostics): pairs of the training and of the validation groups
            "n_train_pairs_per_expert": np.bincount(train_ds.expert_idx.numpy(), minlength=self.n_experts).tolist(),
            "n_validation_pairs_per_expert": None
            if val_ds is None
            else np.bincount(val_ds.expert_idx.numpy(), minlength=self.n_experts).tolist(),
            "torch_threads": int(threads),
            "align_experts": self.alignment_ is not None,
        }
        self.is_trained_ = True
        return self

    def _checkpoint_callback(
        self,
        checkpoint_dir: str | Path,
        resume: bool,
        pairs: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
        settings: Mapping[str, Any],
    ) -> Any:
        """The Lightning callback writing a checkpoint every epoch, loaded with the checkpoint to resume from."""
        from ._lightning import EpochCheckpoint
        from ._trainer import load_resume_state

        data = {}
        for group, arrays in pairs.items():
            h = hashlib.sha256()
            for a in arrays:
                a = np.ascontiguousarray(a)
                h.update(f"{a.dtype}{a.shape}".encode())
                h.update(a.tobytes())
            data[str(group)] = h.hexdigest()
        model = {**self.init_params_, "genes": hashlib.sha256("\n".join(self.genes).encode()).hexdigest()}
        model["experts"] = self.fingerprint_of({f"data_experts.{k}": v for k, v in self.experts.arrays().items()})
        model["initial_weights"] = self.fingerprint()
        signature = json.loads(json.dumps({"model": model, "training": dict(settings), "data": data}, default=str))
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        state = load_resume_state(checkpoint_dir, signature, resume=resume)
        return EpochCheckpoint(str(checkpoint_dir), signature, state)

    # ------------------------------------------------------------------ inference
    def routing_weights(
        self, features: np.ndarray, routing: str | None = None, *, tissues: np.ndarray | None = None
    ) -> np.ndarray:
        """Routing weights (N x K, rows sum to 1) of image features over the experts.

        With per-tissue experts (``tl.fit(tissue_experts=True)``) and ``tissues`` (the tissue of each row), a row
        is routed among its own tissue's experts (among all where the experts do not know its tissue); otherwise
        ``tissues`` is ignored.
        """
        import torch

        from ._routing import route

        routing = check_choice(routing or self.init_params_["routing"], "routing", ROUTINGS)
        groups = {}
        if tissues is not None and self.experts.per_tissue:
            rows, cents = self.experts.tissue_groups(tissues)
            groups = {"row_group": torch.as_tensor(rows), "centroid_group": torch.as_tensor(cents)}
        with torch.no_grad():
            w = route(
                torch.as_tensor(np.asarray(features, dtype=np.float32)),
                torch.as_tensor(self.experts.centroids, dtype=torch.float32),
                torch.as_tensor(self.experts.centroid_expert, dtype=torch.long),
                self.n_experts,
                mode=routing,
                tau=self.init_params_["routing_tau"],
                **groups,
            )
        return w.numpy()

    def get_image_embedding(
        self, features: np.ndarray, routing: str | None = None, *, tissues: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """SPADE image embedding of frozen features and the routing weights used.

        Parameters
        ----------
        features
            (N, image_dim) features from the model's encoder.
        routing
            ``"soft"``, ``"hard"`` or ``"uniform"``; defaults to the model's.
        tissues
            The tissue of each row, for per-tissue experts (:meth:`routing_weights`).

        Returns
        -------
        ``(embedding (N, proj_dim), routing weights (N, K))`` as float32 numpy arrays.
        """
        import torch

        from ._routing import mixture_embed

        features = np.asarray(features, dtype=np.float32)
        if not np.isfinite(features).all():
            msg = "features hold NaN or infinite values."
            raise ValueError(msg)
        weights = self.routing_weights(features, routing, tissues=tissues)
        self.module.eval()
        with torch.no_grad():
            emb = mixture_embed(
                self.module, torch.as_tensor(features), torch.as_tensor(weights), rotations=self.rotations()
            )
        return emb.numpy().astype(np.float32), weights.astype(np.float32)

    def get_gene_embedding(self, gene_input: np.ndarray, routing_weights: np.ndarray) -> np.ndarray:
        """Gene-side embedding, mixed over experts with the given routing weights (N x K)."""
        import torch

        from ._routing import align

        self.module.eval()
        y = torch.as_tensor(np.asarray(gene_input, dtype=np.float32))
        w = torch.as_tensor(np.asarray(routing_weights, dtype=np.float32))
        with torch.no_grad():
            out = (align(self.module.gene_embed_all(y), self.rotations()) * w[:, :, None]).sum(1)
        return out.numpy()

    def rotations(self) -> Any:
        """The experts' rotations into their common space as a float32 tensor ``(K, d, d)``, or None (unaligned)."""
        import torch

        return None if self.alignment_ is None else torch.as_tensor(self.alignment_)

    def _alignment(self, gene_input: Any) -> np.ndarray:
        """Rotations aligning the experts' spaces through their gene embeddings of ``gene_input`` (training pairs)."""
        import torch

        from ._routing import expert_alignment

        self.module.eval()
        with torch.no_grad():
            g = torch.cat([self.module.gene_embed_all(y) for y in torch.as_tensor(gene_input).split(4096)])
        return expert_alignment(g).numpy()

    # ------------------------------------------------------------------ files
    def state_tensors(self) -> dict[str, Any]:
        """Every tensor of the model file: expert weights, loss parameters, centroids and their experts, alignment."""
        import torch

        tensors = {f"experts.{k}": v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        if self.alignment_ is not None:
            tensors[ALIGNMENT_TENSOR] = torch.as_tensor(np.ascontiguousarray(self.alignment_))
        tensors.update({f"loss.{k}": v.detach().cpu().contiguous() for k, v in self.loss_module.state_dict().items()})
        for k, v in self.experts.arrays().items():
            tensors[f"data_experts.{k}"] = torch.as_tensor(np.ascontiguousarray(v))
        return tensors

    def fingerprint(self) -> str:
        """SHA-256 over every tensor of the model (names, shapes, bytes): identical weights, identical print."""
        return self.fingerprint_of(self.state_tensors())

    @staticmethod
    def fingerprint_of(tensors: Mapping[str, Any]) -> str:
        """SHA-256 over named tensors or arrays (names, shapes, bytes)."""
        h = hashlib.sha256()
        for name, t in sorted(tensors.items()):
            a = np.ascontiguousarray(t.numpy() if hasattr(t, "numpy") else t)
            h.update(name.encode())
            h.update(str(tuple(a.shape)).encode())
            h.update(a.tobytes())
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
            Replace an existing model folder. Only a folder holding a model's files (``config.json``,
            ``model.safetensors`` and the records ``spade-sc fit`` keeps beside them) is replaced; a folder holding
            anything else is refused (:class:`FileExistsError`). The folder is written under a temporary name and
            swapped into place when complete: a kill leaves the old model or the new one.

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
        config, tensors = read_model_folder(path, cls.__name__)  # config checked against the schema
        if genes is not None and list(genes) != list(config["genes"]):
            diff = sorted(set(genes) ^ set(config["genes"]))[:10]
            msg = f"The gene panel stored in {path} differs from the expected one (e.g. {diff})."
            raise ValueError(msg)
        arrays = {k.split(".", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith("data_experts.")}
        p = config["init_params"]
        with file_errors(path, "model folder"):  # values the schema cannot see (e.g. an expert index out of range)
            experts = DataExperts.from_dict({**config["data_experts"], **arrays})
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
                spatial_context=p.get("spatial_context"),  # absent in older folders: no context
            )
        alignment = tensors.pop(ALIGNMENT_TENSOR, None)  # absent: unaligned (one expert, or an older folder)
        check_tensors(model.state_tensors(), tensors, path)
        if alignment is not None:
            model.alignment_ = check_alignment(alignment.numpy(), model.n_experts, p["proj_dim"], path)
        model.module.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("experts.")}, strict=True
        )
        model.loss_module.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("loss.")}, strict=True
        )
        model.module.eval()
        model.history_ = config.get("history") or []
        model.train_params_ = config.get("train_params") or {}
        model.is_trained_ = bool(config.get("is_trained", False))
        if config.get("fingerprint") and model.fingerprint() != config["fingerprint"]:
            msg = f"The weights in {path} do not match the fingerprint recorded in its config."
            raise ValueError(msg)
        return model

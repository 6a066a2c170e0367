"""Lightning training: data experts on (image feature, gene vector, expert) pairs; slide-level MIL, one bag a step."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from .._validation import check_int
from ._experts import BatchedExperts
from ._losses import make_loss
from ._mil import discrete_time_nll
from ._sampler import ExpertBatchSampler
from ._trainer import flatten_state, rng_state, set_rng_state, unflatten_state, write_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "EpochCheckpoint",
    "MILLightningModule",
    "PairsDataModule",
    "PairsDataset",
    "SpadeLightningModule",
    "make_bag_dataloader",
    "make_dataloader",
]

_BATCH_KEYS = ("image", "gene", "expert")


def _as_float32(values: Any) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=torch.float32)
    return torch.as_tensor(np.asarray(values, dtype=np.float32))


class PairsDataset(Dataset):
    """In-memory dataset of paired image features, gene vectors and expert indices.

    Parameters
    ----------
    image_feats
        Array/tensor ``(N, image_dim)``; stored as float32.
    gene_feats
        Array/tensor ``(N, gene_dim)``; stored as float32.
    expert_idx
        Integer array/tensor ``(N,)`` (non-negative); stored as int64.

    Attributes
    ----------
    image_feats : torch.Tensor
        ``(N, image_dim)`` float32.
    gene_feats : torch.Tensor
        ``(N, gene_dim)`` float32.
    expert_idx : torch.Tensor
        ``(N,)`` int64.
    """

    def __init__(self, image_feats: Any, gene_feats: Any, expert_idx: Any) -> None:
        self.image_feats = _as_float32(image_feats)
        self.gene_feats = _as_float32(gene_feats)
        expert = expert_idx.detach().cpu().numpy() if isinstance(expert_idx, torch.Tensor) else np.asarray(expert_idx)
        if self.image_feats.ndim != 2:
            msg = f"`image_feats` must be 2-D, got shape {tuple(self.image_feats.shape)}."
            raise ValueError(msg)
        if self.gene_feats.ndim != 2 or self.gene_feats.shape[0] != self.image_feats.shape[0]:
            msg = f"`gene_feats` must be 2-D with {self.image_feats.shape[0]} rows, got {tuple(self.gene_feats.shape)}."
            raise ValueError(msg)
        if expert.shape != (self.image_feats.shape[0],) or not np.issubdtype(expert.dtype, np.integer):
            msg = f"`expert_idx` must be an integer array of shape ({self.image_feats.shape[0]},)."
            raise ValueError(msg)
        if expert.size and expert.min() < 0:
            msg = "`expert_idx` must be non-negative."
            raise ValueError(msg)
        self.expert_idx = torch.as_tensor(expert.astype(np.int64))

    def __len__(self) -> int:
        return self.image_feats.shape[0]

    def __getitem__(self, i: int | Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row ``i``, or the rows of a list of indices at once (a whole step, as :func:`make_dataloader` asks)."""
        if not isinstance(i, int | np.integer):
            i = torch.as_tensor(i, dtype=torch.long)
        return self.image_feats[i], self.gene_feats[i], self.expert_idx[i]


def make_dataloader(
    dataset: Dataset,
    expert_labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    batch_size: int = 256,
    shuffle: bool = True,
    seed: int = 0,
    *,
    drop_last: bool = False,
    experts_per_step: int | None = 1,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader:
    """Build a single-process :class:`~torch.utils.data.DataLoader` with an :class:`ExpertBatchSampler`.

    Parameters
    ----------
    dataset
        Map-style dataset, e.g. :class:`PairsDataset`.
    expert_labels
        Expert of each row; ``None`` uses ``dataset.expert_idx``.
    batch_size
        Target batch size (``>= 2``).
    shuffle
        Shuffle rows within experts and the order of batches.
    seed
        Base seed of the sampler.
    drop_last
        Passed to :class:`ExpertBatchSampler`.
    experts_per_step
        Passed to :class:`ExpertBatchSampler`: number of single-expert batches (distinct experts) per step;
        ``None``: all experts.
    num_replicas
        Number of processes sharing each epoch (DDP world size); passed to :class:`ExpertBatchSampler`.
    rank
        Rank of this process; passed to :class:`ExpertBatchSampler`.

    Returns
    -------
    torch.utils.data.DataLoader
        Loader with ``sampler=ExpertBatchSampler(...)``, ``batch_size=None`` and ``num_workers=0``: each step's
        rows are fetched from the dataset with one indexing call (``dataset[list_of_rows]``), not row by row.
    """
    if expert_labels is None:
        expert_labels = getattr(dataset, "expert_idx", None)
        if expert_labels is None:
            msg = "`expert_labels` is required when `dataset` has no `expert_idx` attribute."
            raise ValueError(msg)
    if len(expert_labels) != len(dataset):  # type: ignore[arg-type]
        msg = f"`expert_labels` has {len(expert_labels)} entries but `dataset` has {len(dataset)} rows."  # type: ignore[arg-type]
        raise ValueError(msg)
    sampler = ExpertBatchSampler(
        expert_labels,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        experts_per_step=experts_per_step,
        num_replicas=num_replicas,
        rank=rank,
    )
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)


class PairsDataModule(L.LightningDataModule):
    """Training and validation loaders of :class:`PairsDataset` s, sharded by rank under DDP.

    The loaders are built when Lightning asks for them, after the processes are set up, so the training sampler
    knows the world size and the rank (``Trainer(use_distributed_sampler=False)`` must be set: the
    :class:`ExpertBatchSampler` does the sharding itself). Every process runs the same number of training steps
    (the steps of an epoch are padded to a multiple of the world size) and evaluates the **whole** validation set,
    so the validation loss, the best epoch and early stopping are identical on every process without communication.

    Parameters
    ----------
    train
        Training pairs.
    val
        Validation pairs, or None.
    batch_size
        Rows per single-expert batch.
    seed
        Seed of the samplers.
    experts_per_step
        Single-expert batches (distinct experts) per step; None: all experts.
    """

    def __init__(
        self,
        train: PairsDataset,
        val: PairsDataset | None = None,
        *,
        batch_size: int = 512,
        seed: int = 0,
        experts_per_step: int | None = None,
    ) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.kwargs = {"batch_size": batch_size, "seed": seed, "experts_per_step": experts_per_step}

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader; this process's share of every epoch's steps."""
        trainer = self.trainer
        world, rank = (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)
        return make_dataloader(self.train, shuffle=True, num_replicas=world, rank=rank, **self.kwargs)

    def val_dataloader(self) -> DataLoader | list:
        """Validation loader in a fixed order (every process evaluates all validation pairs)."""
        if self.val is None:
            return []
        return make_dataloader(self.val, shuffle=False, **self.kwargs)


def _unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        missing = [k for k in _BATCH_KEYS if k not in batch]
        if missing:
            msg = f"`batch` dict is missing keys {missing}; expected {_BATCH_KEYS}."
            raise ValueError(msg)
        return batch["image"], batch["gene"], batch["expert"]
    if isinstance(batch, Sequence) and len(batch) == 3:
        return batch[0], batch[1], batch[2]
    msg = "`batch` must be a (image, gene, expert) tuple or a dict with keys 'image', 'gene', 'expert'."
    raise ValueError(msg)


class SpadeLightningModule(L.LightningModule):
    """Contrastive training of :class:`BatchedExperts` on steps made of single-expert batches.

    Each training/validation step holds the rows of one or several experts (see :class:`ExpertBatchSampler` and its
    ``experts_per_step``); every row is embedded, on both the image and the gene side, by its own expert, and the
    contrastive loss is computed within each expert's rows only (hard negatives from the same expert), the step loss
    being the row-weighted mean over the experts present (``loss_fn(image_emb, gene_emb, expert_idx)``). One
    optimiser step thus trains all experts present in the step, with batched matrix products.

    Parameters
    ----------
    experts
        The mixture of data experts to train (stored as ``self.experts``; state dict prefix ``experts.``).
    loss
        ``"soft_clip"`` (BLEEP soft targets, fixed ``temperature``) or ``"infonce"`` (learnable temperature,
        a parameter ``loss_fn.logit_scale`` of this module), or a loss module to train as it is (e.g. the
        ``loss_module`` of a :class:`~spade_sc.model.SpadeModel`, whose parameters then come back trained).
    lr
        AdamW learning rate.
    weight_decay
        AdamW weight decay of the expert parameters (the InfoNCE temperature is not decayed).
    max_epochs
        ``T_max`` of the cosine annealing schedule (stepped once per epoch).
    temperature
        Temperature of ``"soft_clip"``.
    init_temperature
        Initial temperature of ``"infonce"``.
    restore_best
        At the end of fitting, put back the weights (experts and loss parameters) of the epoch with the lowest
        validation loss; without validation the last epoch's weights stay.

    Attributes
    ----------
    history : list of dict
        One entry per training epoch: ``{"epoch", "train_loss", "val_loss"}`` (sample-weighted epoch means over all
        processes; ``None`` when not computed). The sanity-check validation pass is not recorded.
    best_epoch : int or None
        Epoch of the lowest validation loss (None without validation).
    best_val_loss : float or None
        That loss.

    Notes
    -----
    The history and the best epoch live in the buffers ``loss_history`` and ``best_epoch_loss`` (float32, so the
    module moves to any device), so they travel with the state dict: Lightning's spawning strategies
    (``"ddp_spawn"``, ``"ddp_notebook"``) hand only the state dict of rank 0 back to the calling process, and the
    best weights are restored in :meth:`on_fit_end`, inside the processes, for the same reason.
    """

    def __init__(
        self,
        experts: BatchedExperts,
        loss: str | torch.nn.Module = "soft_clip",
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        max_epochs: int = 100,
        temperature: float = 1.0,
        init_temperature: float = 0.07,
        restore_best: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(experts, BatchedExperts):
            msg = f"`experts` must be a BatchedExperts, got {type(experts).__name__}."
            raise ValueError(msg)
        if not lr > 0:
            msg = f"`lr` must be > 0, got {lr!r}."
            raise ValueError(msg)
        if not weight_decay >= 0:
            msg = f"`weight_decay` must be >= 0, got {weight_decay!r}."
            raise ValueError(msg)
        check_int(max_epochs, "max_epochs")
        self.save_hyperparameters(ignore=["experts", "loss"])
        self.experts = experts
        if isinstance(loss, torch.nn.Module):
            self.loss_fn = loss
        else:
            self.loss_fn = make_loss(loss, temperature=temperature, init_temperature=init_temperature)
        self.register_buffer("loss_history", torch.full((max_epochs, 2), float("nan")))
        self.register_buffer("best_epoch_loss", torch.full((2,), float("nan")))
        self._best_state: dict[str, dict[str, torch.Tensor]] | None = None
        # per stage: the step losses (left on the device: no host sync per step) and the rows of each step
        self._steps: dict[str, tuple[list[torch.Tensor], list[int]]] = {"train": ([], []), "val": ([], [])}

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per epoch run: ``{"epoch", "train_loss", "val_loss"}`` (None where not computed)."""
        rows = self.loss_history.detach().cpu().double().tolist()
        ran = [i for i, row in enumerate(rows) if not all(np.isnan(row))]
        out = []
        for epoch in range(ran[-1] + 1 if ran else 0):
            train, val = (None if np.isnan(v) else v for v in rows[epoch])
            out.append({"epoch": epoch, "train_loss": train, "val_loss": val})
        return out

    @property
    def best_epoch(self) -> int | None:
        """Epoch of the lowest validation loss (None without validation)."""
        epoch = float(self.best_epoch_loss[0])
        return None if np.isnan(epoch) else int(epoch)

    @property
    def best_val_loss(self) -> float | None:
        """Lowest validation loss (None without validation)."""
        loss = float(self.best_epoch_loss[1])
        return None if np.isnan(loss) else loss

    def forward(
        self, image: torch.Tensor, gene: torch.Tensor, expert_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch.

        Parameters
        ----------
        image
            Image features ``(B, image_dim)``.
        gene
            Gene vectors ``(B, gene_dim)``.
        expert_idx
            Integer tensor ``(B,)``.

        Returns
        -------
        tuple of torch.Tensor
            ``(image_embeddings, gene_embeddings)``, each ``(B, proj_dim)``.
        """
        return self.experts(image, gene, expert_idx)

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        image, gene, expert_idx = _unpack_batch(batch)
        image_emb, gene_emb = self(image, gene, expert_idx)
        loss = self.loss_fn(image_emb, gene_emb, expert_idx)
        n = image.shape[0]
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        losses, rows = self._steps[stage]
        losses.append(loss.detach())
        rows.append(n)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Contrastive loss of one step (within each expert's rows); logs ``train_loss`` (epoch mean over rows).

        Parameters
        ----------
        batch
            ``(image, gene, expert)`` tuple or dict with those keys.
        batch_idx
            Index of the batch.

        Returns
        -------
        torch.Tensor
            Scalar loss.
        """
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Contrastive loss of one validation step (within each expert's rows); logs ``val_loss`` (mean over rows).

        Parameters
        ----------
        batch
            ``(image, gene, expert)`` tuple or dict with those keys.
        batch_idx
            Index of the batch.

        Returns
        -------
        torch.Tensor
            Scalar loss.
        """
        return self._shared_step(batch, "val")

    def on_train_epoch_start(self) -> None:
        """Reset the running training loss."""
        self._steps["train"] = ([], [])

    def on_validation_epoch_start(self) -> None:
        """Reset the running validation loss."""
        self._steps["val"] = ([], [])

    def _epoch_mean(self, stage: str) -> float:
        """Row-weighted mean loss of the epoch; training sums are added over processes (validation is not sharded)."""
        losses, rows = self._steps[stage]
        total = float(torch.stack(losses).cpu().double() @ torch.tensor(rows, dtype=torch.float64)) if rows else 0.0
        n = sum(rows)
        trainer = self.trainer
        if stage == "train" and trainer.world_size > 1:
            sums = trainer.strategy.reduce(torch.tensor([total, n], device=self.device), reduce_op="sum")
            total, n = (float(v) for v in sums.cpu())
        return total / n if n else float("nan")

    def _record(self, column: int, value: float) -> None:
        epoch = int(self.current_epoch)
        if epoch >= self.loss_history.shape[0]:  # the Trainer runs more epochs than the schedule's max_epochs
            grown = torch.full((epoch + 1, 2), float("nan"), device=self.loss_history.device)
            grown[: self.loss_history.shape[0]] = self.loss_history
            self.loss_history = grown
        self.loss_history[epoch, column] = value

    def on_train_epoch_end(self) -> None:
        """Record the epoch's mean training loss in :attr:`history`."""
        self._record(0, self._epoch_mean("train"))

    def on_validation_epoch_end(self) -> None:
        """Record the epoch's mean validation loss in :attr:`history`; remember the best weights.

        The sanity-check pass and validation outside of fitting are not recorded.
        """
        trainer = self.trainer
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        loss = self._epoch_mean("val")
        self._record(1, loss)
        best = self.best_val_loss
        if self.hparams.restore_best and not np.isnan(loss) and (best is None or loss < best):
            self.best_epoch_loss.copy_(torch.tensor([self.current_epoch, loss]))
            self._best_state = {
                name: {k: v.detach().cpu().clone() for k, v in getattr(self, name).state_dict().items()}
                for name in ("experts", "loss_fn")
            }

    def on_fit_end(self) -> None:
        """Restore the weights of the best validation epoch (when there was validation and ``restore_best``)."""
        if self._best_state is None:
            return
        for name, state in self._best_state.items():
            getattr(self, name).load_state_dict(state, strict=True)
        self._best_state = None
        logger.info("Restored the weights of epoch %s (val_loss %.4f).", self.best_epoch, self.best_val_loss)

    def best_state(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """The weights of the best validation epoch so far (``{"experts": ..., "loss_fn": ...}``), or None."""
        return self._best_state

    def set_best_state(self, state: Mapping[str, Mapping[str, torch.Tensor]] | None) -> None:
        """Put back the best-epoch weights of a checkpoint (restored into the modules at the end of fitting)."""
        self._best_state = None if state is None else {n: dict(s) for n, s in state.items()}

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with cosine annealing over ``max_epochs`` (stepped per epoch).

        Returns
        -------
        dict
            Lightning optimizer/scheduler configuration.
        """
        hp = self.hparams
        groups = [{"params": list(self.experts.parameters()), "weight_decay": hp.weight_decay}]
        loss_params = list(self.loss_fn.parameters())
        if loss_params:
            groups.append({"params": loss_params, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


# --------------------------------------------------------------------------------------------------------------------
# checkpoint at the end of every epoch, and resume
# --------------------------------------------------------------------------------------------------------------------
class EpochCheckpoint(Checkpoint):
    """Write the whole training state at the end of every epoch; restore it to continue a killed training exactly.

    The checkpoint (``<folder>/last/``: ``checkpoint.safetensors`` + ``checkpoint.json``, no pickle, swapped into
    place atomically) holds the module's weights and buffers (history, best epoch and loss), the best-epoch weights,
    the optimizer and scheduler states, the early-stopping state, ``trainer.should_stop``, the number of epochs done,
    and every random state (Python, numpy, torch CPU and CUDA: dropout draws from torch's). The batches of epoch
    ``e`` are drawn by :class:`ExpertBatchSampler` from ``seed + e`` alone, so the sampler needs no state.

    It is written in ``on_train_epoch_end`` after the module's own hook, after validation, early stopping and the
    epoch's scheduler step (Lightning runs :class:`~lightning.pytorch.callbacks.Checkpoint` callbacks last).
    Resuming (``state`` given) puts everything back in ``on_train_start``, sets the loop to the next epoch, and
    restores the random states at the start of that epoch, before its data loader draws from them: the resumed run
    then takes the same steps with the same numbers as the uninterrupted one.
    Only rank 0 writes; every process of a DDP run restores the same state.

    Parameters
    ----------
    folder
        The checkpoint folder.
    signature
        What the training is (model configuration, settings, a hash of every group's data), stored to refuse
        resuming another training.
    state
        ``(tensors, record)`` of the checkpoint to resume from, or None.
    """

    def __init__(
        self, folder: str, signature: Mapping[str, Any], state: tuple[dict[str, Any], dict[str, Any]] | None = None
    ) -> None:
        super().__init__()
        self.folder = str(folder)
        self.signature = dict(signature)
        self._resume = state
        self._rng: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Restore the checkpoint's state (when resuming)."""
        if self._resume is None:
            return
        tensors, record = self._resume
        self._resume = None
        device = pl_module.device
        module = {k.split(".", 1)[1]: v.to(device) for k, v in tensors.items() if k.startswith("module.")}
        pl_module.loss_history = torch.empty_like(module["loss_history"])
        pl_module.load_state_dict(module, strict=True)
        pl_module.set_best_state(unflatten_state(record["best_state"], tensors))
        trainer.optimizers[0].load_state_dict(unflatten_state(record["optimizer"], tensors))
        for config, state in zip(trainer.lr_scheduler_configs, record["schedulers"], strict=True):
            config.scheduler.load_state_dict(unflatten_state(state, tensors))
        stoppers = [cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping)]
        for cb, state in zip(stoppers, record["early_stopping"], strict=True):
            cb.load_state_dict(unflatten_state(state, tensors))
        trainer.should_stop = bool(record["should_stop"])
        done = int(record["epochs_done"])
        progress = trainer.fit_loop.epoch_progress
        for tracker in (progress.current, progress.total):
            tracker.ready = tracker.started = tracker.processed = tracker.completed = done
        steps = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
        steps.ready = steps.completed = int(record["global_step"])
        self._rng = unflatten_state(record["rng"], tensors)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Restore the random states at the start of the first resumed epoch."""
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the checkpoint of the epoch that just ended (rank 0)."""
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        tensors: dict[str, Any] = {}
        for k, v in pl_module.state_dict().items():
            tensors[f"module.{k}"] = v.detach().cpu().contiguous().clone()
        stoppers = [cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping)]
        best = pl_module.best_state() if hasattr(pl_module, "best_state") else None
        record = {
            "epochs_done": int(trainer.current_epoch) + 1,
            "global_step": int(trainer.global_step),
            "should_stop": bool(trainer.should_stop),
            "best_state": flatten_state(best, "best", tensors),
            "optimizer": flatten_state(trainer.optimizers[0].state_dict(), "optimizer", tensors),
            "schedulers": [
                flatten_state(c.scheduler.state_dict(), "scheduler", tensors) for c in trainer.lr_scheduler_configs
            ],
            "early_stopping": [flatten_state(cb.state_dict(), "early_stopping", tensors) for cb in stoppers],
            "rng": flatten_state(rng_state(), "rng", tensors),
            "signature": self.signature,
        }
        write_checkpoint(self.folder, tensors, record)


# --------------------------------------------------------------------------------------------------------------------
# slide-level MIL (one bag per step)
# --------------------------------------------------------------------------------------------------------------------
def _first(items: list[Any]) -> Any:
    """Collate of a batch of one bag: the bag itself, no stacking."""
    return items[0]


def make_bag_dataloader(
    bags: Sequence[np.ndarray], targets: Sequence[Mapping[str, Any]], weights: Any, *, seed: int
) -> DataLoader:
    """Loader of one ``(bag, target)`` per step, bags drawn with replacement in proportion to ``weights``.

    Parameters
    ----------
    bags
        Tile features of every bag, ``(n_tiles, d)`` each (already standardised).
    targets
        One dict of scalars per bag: ``{"y": class}`` or ``{"bin": time bin, "event": 0/1}``.
    weights
        Sampling weight of every bag (e.g. inverse class frequency); an epoch draws ``len(bags)`` bags.
    seed
        Seed of the draws.

    Returns
    -------
    DataLoader
        Batches ``(bag (n_tiles, d) float32, {name: tensor})``.
    """
    items = [
        (torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)), {k: torch.tensor(v) for k, v in t.items()})
        for b, t in zip(bags, targets, strict=True)
    ]
    sampler = torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(np.asarray(weights, dtype=float), dtype=torch.double),
        num_samples=len(items),
        replacement=True,
        generator=torch.Generator().manual_seed(int(seed)),
    )
    return DataLoader(items, batch_size=1, sampler=sampler, collate_fn=_first, num_workers=0)


class MILLightningModule(L.LightningModule):
    """Training of a slide-level network on one bag per step: BCE, cross-entropy or discrete-time NLL; AdamW.

    Parameters
    ----------
    net
        The network (:class:`spade_sc.model.GatedABMIL`): ``net(bag) -> (logits, attention scores)``.
    loss
        ``"bce"`` (one logit, target ``y``), ``"ce"`` (one logit per class, target ``y``) or ``"nll"``
        (discrete-time survival, targets ``bin`` and ``event``).
    lr, weight_decay
        AdamW.

    Attributes
    ----------
    history : list of float
        Mean training loss of every epoch.
    """

    LOSSES = ("bce", "ce", "nll")

    def __init__(self, net: torch.nn.Module, *, loss: str, lr: float, weight_decay: float) -> None:
        super().__init__()
        if loss not in self.LOSSES:
            msg = f"loss={loss!r}; choose one of {self.LOSSES}."
            raise ValueError(msg)
        self.net = net
        self.loss_kind = loss
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.history: list[float] = []
        self._epoch_losses: list[float] = []

    def _loss(self, logits: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.loss_kind == "bce":
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, target["y"].view(1).float())
        if self.loss_kind == "ce":
            return torch.nn.functional.cross_entropy(logits[None], target["y"].view(1).long())
        return discrete_time_nll(logits[None], target["bin"].view(1).long(), target["event"].view(1).float())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Loss of one bag."""
        bag, target = batch
        logits, _ = self.net(bag)
        loss = self._loss(logits, target)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=1)
        self._epoch_losses.append(float(loss.detach()))
        return loss

    def on_train_epoch_end(self) -> None:
        """Record the epoch's mean loss in :attr:`history`."""
        if self._epoch_losses:
            self.history.append(float(np.mean(self._epoch_losses)))
        self._epoch_losses = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over all parameters."""
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

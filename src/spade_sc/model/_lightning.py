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

from .._validation import MIN_PAIRS, check_int
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


def _listed(experts: np.ndarray, counts: np.ndarray) -> str:
    """``"3 (1 pair), 5 (0 pairs)"``: experts and their pair counts, for a log line."""
    return ", ".join(f"{k} ({counts[k]} pair{'' if counts[k] == 1 else 's'})" for k in experts)


def report_small_experts(train: np.ndarray, val: np.ndarray | None, n_experts: int, batch_size: int) -> None:
    """Log the experts that get fewer training (or validation) pairs than they need, and what training does.

    - fewer than 2 training pairs (:data:`~spade_sc._validation.MIN_PAIRS`, the smallest contrastive batch):
      WARNING; the expert is skipped by :class:`ExpertBatchSampler` and its heads keep their initial random weights;
    - fewer than ``batch_size`` training pairs: INFO; the expert trains on one smaller batch per epoch (fewer
      in-batch negatives, one optimiser step per epoch);
    - fewer than 2 validation pairs: INFO; the expert has no validation loss of its own (the best epoch is chosen on
      the others' pairs).

    Parameters
    ----------
    train, val
        Expert index of every training / validation pair (``val`` None: no validation).
    n_experts
        Number of experts.
    batch_size
        Pairs per single-expert batch.
    """
    n = np.bincount(np.asarray(train, dtype=np.int64), minlength=n_experts)
    untrained = np.flatnonzero(n < MIN_PAIRS)
    if untrained.size:
        logger.warning(
            "Data expert(s) %s of %d get fewer than %d training pairs, the smallest contrastive batch: they are "
            "skipped, and their heads keep their random initial weights (spots routed to them at inference get an "
            "untrained embedding). Lower n_experts, or add slides.",
            _listed(untrained, n),
            n_experts,
            MIN_PAIRS,
        )
    small = np.flatnonzero((n >= MIN_PAIRS) & (n < batch_size))
    if small.size:
        logger.info(
            "Data expert(s) %s of %d get fewer training pairs than batch_size=%d: each trains on one batch of all its "
            "pairs per epoch (fewer in-batch negatives and one optimiser step per epoch).",
            _listed(small, n),
            n_experts,
            batch_size,
        )
    if val is None:
        return
    m = np.bincount(np.asarray(val, dtype=np.int64), minlength=n_experts)
    unvalidated = np.flatnonzero(m < MIN_PAIRS)
    if unvalidated.size:
        logger.info(
            "Data expert(s) %s of %d get fewer than %d validation pairs: they have no validation loss of their own "
            "(None in the history's val_loss_per_expert); the best epoch is chosen on the other experts' pairs.",
            _listed(unvalidated, m),
            n_experts,
            MIN_PAIRS,
        )


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
        One entry per training epoch: ``{"epoch", "train_loss", "val_loss", "train_loss_per_expert",
        "val_loss_per_expert"}`` (sample-weighted epoch means over all processes; ``None`` when not computed). The
        per-expert entries are lists of one loss per expert (the mean over that expert's rows of its within-expert
        loss, ``None`` for an expert without rows that epoch); their row-weighted mean is ``train_loss`` /
        ``val_loss``. The sanity-check validation pass is not recorded.
    best_epoch : int or None
        Epoch of the lowest validation loss (None without validation).
    best_val_loss : float or None
        That loss.

    Notes
    -----
    The history and the best epoch live in the buffers ``loss_history``, ``expert_loss_history`` and
    ``best_epoch_loss`` (float32, so the module moves to any device), so they travel with the state dict:
    Lightning's spawning strategies (``"ddp_spawn"``, ``"ddp_notebook"``) hand only the state dict of rank 0 back to
    the calling process, and the best weights are restored in :meth:`on_fit_end`, inside the processes, for the same
    reason.

    The per-expert losses of a step are its experts' losses computed one expert at a time, without gradients, on the
    embeddings the step computed (a step of one expert costs nothing more; a step of ``E`` experts costs ``E`` small
    loss evaluations, no extra forward pass through the heads).
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
        self.register_buffer("expert_loss_history", torch.full((max_epochs, 2, experts.n_experts), float("nan")))
        self.register_buffer("best_epoch_loss", torch.full((2,), float("nan")))
        self._best_state: dict[str, dict[str, torch.Tensor]] | None = None
        # per stage: the step losses (left on the device: no host sync per step) and the rows of each step
        self._steps: dict[str, tuple[list[torch.Tensor], list[int]]] = {"train": ([], []), "val": ([], [])}
        # per stage: (2, K) per step, the loss times the rows of every expert and its rows (zeros where absent)
        self._expert_steps: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per epoch run (see the class's Attributes); None where not computed.

        Keys: ``epoch``, ``train_loss``, ``val_loss``, ``train_loss_per_expert`` and ``val_loss_per_expert`` (a list
        with one loss per expert, None for an expert without rows that epoch).
        """
        rows = self.loss_history.detach().cpu().double().tolist()
        per_expert = self.expert_loss_history.detach().cpu().double().tolist()
        ran = [i for i, row in enumerate(rows) if not all(np.isnan(row))]
        out = []
        for epoch in range(ran[-1] + 1 if ran else 0):
            train, val = (None if np.isnan(v) else v for v in rows[epoch])
            train_k, val_k = (
                None if all(np.isnan(values)) else [None if np.isnan(v) else v for v in values]
                for values in per_expert[epoch]
            )
            out.append(
                {
                    "epoch": epoch,
                    "train_loss": train,
                    "val_loss": val,
                    "train_loss_per_expert": train_k,
                    "val_loss_per_expert": val_k,
                }
            )
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
        self._expert_steps[stage].append(self._expert_sums(image_emb, gene_emb, expert_idx, loss))
        return loss

    def _expert_sums(
        self, image_emb: torch.Tensor, gene_emb: torch.Tensor, expert_idx: torch.Tensor, loss: torch.Tensor
    ) -> torch.Tensor:
        """``(2, K)``: each expert's loss in this step times its rows, and its rows (zeros where absent); no grad.

        A step of one expert reuses the step loss; otherwise each expert's loss is evaluated on its own rows of the
        embeddings already computed (the step loss is their row-weighted mean).
        """
        out = torch.zeros(2, self.experts.n_experts, device=loss.device)
        with torch.no_grad():
            present, inverse, counts = torch.unique(expert_idx.to(loss.device), return_inverse=True, return_counts=True)
            if present.numel() == 1:
                values = loss.detach().float().reshape(1)
            else:
                image_emb, gene_emb = image_emb.detach(), gene_emb.detach()
                parts = torch.split(torch.argsort(inverse, stable=True), counts.tolist())
                values = torch.stack([self.loss_fn(image_emb[p], gene_emb[p]).float() for p in parts])
            out[0, present] = values * counts
            out[1, present] = counts.float()
        return out

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
        self._expert_steps["train"] = []

    def on_validation_epoch_start(self) -> None:
        """Reset the running validation loss."""
        self._steps["val"] = ([], [])
        self._expert_steps["val"] = []

    def on_fit_start(self) -> None:
        """Log the experts with too few training or validation pairs, and what training does about them."""
        data = getattr(self.trainer, "datamodule", None)
        if isinstance(data, PairsDataModule) and self.trainer.is_global_zero:
            val = None if data.val is None else data.val.expert_idx.numpy()
            report_small_experts(data.train.expert_idx.numpy(), val, self.experts.n_experts, data.kwargs["batch_size"])

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

    def _expert_epoch_means(self, stage: str) -> torch.Tensor:
        """``(K,)`` row-weighted mean loss of every expert over the epoch (NaN without rows).

        Training sums are added over processes, as in :meth:`_epoch_mean`.
        """
        steps = self._expert_steps[stage]
        sums = torch.stack(steps).sum(0) if steps else torch.zeros(2, self.experts.n_experts, device=self.device)
        trainer = self.trainer
        if stage == "train" and trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums.to(self.device), reduce_op="sum")
        sums = sums.detach().cpu().double()
        return torch.where(sums[1] > 0, sums[0] / sums[1].clamp(min=1), torch.full_like(sums[0], float("nan")))

    def _record(self, column: int, value: float, per_expert: torch.Tensor) -> None:
        epoch = int(self.current_epoch)
        if epoch >= self.loss_history.shape[0]:  # the Trainer runs more epochs than the schedule's max_epochs
            for name in ("loss_history", "expert_loss_history"):
                old = getattr(self, name)
                grown = torch.full((epoch + 1, *old.shape[1:]), float("nan"), device=old.device)
                grown[: old.shape[0]] = old
                setattr(self, name, grown)
        self.loss_history[epoch, column] = value
        self.expert_loss_history[epoch, column] = per_expert.to(self.expert_loss_history)

    def on_train_epoch_end(self) -> None:
        """Record the epoch's mean training loss (overall and per expert) in :attr:`history`."""
        self._record(0, self._epoch_mean("train"), self._expert_epoch_means("train"))

    def on_validation_epoch_end(self) -> None:
        """Record the epoch's mean validation loss in :attr:`history`; remember the best weights.

        The sanity-check pass and validation outside of fitting are not recorded.
        """
        trainer = self.trainer
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        loss = self._epoch_mean("val")
        self._record(1, loss, self._expert_epoch_means("val"))
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
        if hasattr(pl_module, "expert_loss_history"):
            if "expert_loss_history" not in module:  # a checkpoint written before per-expert losses were recorded
                shape = (module["loss_history"].shape[0], *pl_module.expert_loss_history.shape[1:])
                module["expert_loss_history"] = torch.full(shape, float("nan"), device=device)
            pl_module.expert_loss_history = torch.empty_like(module["expert_loss_history"])
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
    generator
        The generator of the bag sampler (``loader.sampler.generator`` of :func:`make_bag_dataloader`), whose state
        runs on from epoch to epoch: kept in the buffer ``sampler_state`` at the end of every epoch and put back at
        the start of training, so that a training resumed from an :class:`EpochCheckpoint` draws the same bags.

    Attributes
    ----------
    history : list of float
        Mean training loss of every epoch (kept in the buffer ``loss_history``, float32, so that it travels with the
        state dict and the checkpoints).
    """

    LOSSES = ("bce", "ce", "nll")

    def __init__(
        self,
        net: torch.nn.Module,
        *,
        loss: str,
        lr: float,
        weight_decay: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if loss not in self.LOSSES:
            msg = f"loss={loss!r}; choose one of {self.LOSSES}."
            raise ValueError(msg)
        self.net = net
        self.loss_kind = loss
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self._generator = generator
        self.register_buffer("loss_history", torch.zeros(0))
        state = generator.get_state() if generator is not None else torch.zeros(0, dtype=torch.uint8)
        self.register_buffer("sampler_state", state.clone())
        self._epoch_losses: list[float] = []

    @property
    def history(self) -> list[float]:
        """Mean training loss of every epoch run."""
        return [float(v) for v in self.loss_history.detach().cpu()]

    def best_state(self) -> None:
        """None: MIL training keeps the last epoch (the :class:`EpochCheckpoint` interface)."""
        return None

    def set_best_state(self, state: Any) -> None:
        """Nothing to restore: MIL training keeps the last epoch (the :class:`EpochCheckpoint` interface)."""

    def on_train_start(self) -> None:
        """Put the bag sampler's generator in the state of ``sampler_state`` (a checkpoint's, when resuming)."""
        if self._generator is not None and self.sampler_state.numel():
            self._generator.set_state(self.sampler_state.detach().cpu())

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
        """Record the epoch's mean loss in :attr:`history` and the bag sampler's state in ``sampler_state``."""
        if self._epoch_losses:
            mean = torch.tensor([float(np.mean(self._epoch_losses))], device=self.loss_history.device)
            self.loss_history = torch.cat([self.loss_history, mean.to(self.loss_history)])
        self._epoch_losses = []
        if self._generator is not None:
            self.sampler_state = self._generator.get_state().to(self.sampler_state.device)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over all parameters."""
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

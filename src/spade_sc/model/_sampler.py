"""Batch sampler whose batches each contain the rows of a single data expert."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

__all__ = ["ExpertBatchSampler"]


class ExpertBatchSampler(Sampler[list[int]]):
    """Yield batches of row indices where every batch belongs to ONE expert (hard negatives).

    Per epoch, the rows of each expert are permuted (if ``shuffle``) and cut into batches of ``batch_size``; the
    batches of all experts are then shuffled together so experts are interleaved. Every row of every expert appears
    exactly once per epoch (unless ``drop_last``).

    Small experts:

    - a trailing batch of a single row is merged into the previous batch of the same expert (that batch then has
      ``batch_size + 1`` rows), so no batch has size 1 (a contrastive loss needs at least 2 pairs);
    - an expert with fewer than ``batch_size`` rows yields one smaller batch;
    - an expert with a single row in total cannot form a contrastive batch: it is skipped and a warning naming it is
      logged at construction (never dropped silently). Skipped experts are listed in :attr:`skipped_experts`.

    The permutation of epoch ``e`` is drawn from ``torch.Generator().manual_seed(seed + e)``; call :meth:`set_epoch`
    before each epoch (Lightning does it automatically through the :attr:`sampler` attribute).

    Parameters
    ----------
    expert_labels
        1-D sequence/array/tensor of length ``N`` with the expert of each row (any sortable labels, usually ints).
    batch_size
        Target batch size (``>= 2``).
    shuffle
        Permute rows within experts and interleave the batches of different experts. If ``False``, batches are
        yielded expert by expert (sorted labels) in row order.
    seed
        Base seed of the permutations.
    drop_last
        Drop the incomplete trailing batch of each expert, except when it is that expert's only batch (so no
        expert with at least 2 rows is ever dropped).

    Attributes
    ----------
    experts : numpy.ndarray
        Sorted unique labels.
    skipped_experts : list
        Labels of experts with a single row, which never appear in batches.
    epoch : int
        Current epoch.
    """

    def __init__(
        self,
        expert_labels: Sequence[Any] | np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 2:
            msg = f"`batch_size` must be an integer >= 2 (contrastive batches need pairs), got {batch_size!r}."
            raise ValueError(msg)
        if isinstance(expert_labels, torch.Tensor):
            expert_labels = expert_labels.detach().cpu().numpy()
        labels = np.asarray(expert_labels)
        if labels.ndim != 1:
            msg = f"`expert_labels` must be 1-D, got shape {labels.shape}."
            raise ValueError(msg)
        if labels.size == 0:
            msg = "`expert_labels` is empty."
            raise ValueError(msg)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.n_rows = int(labels.size)
        experts, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(experts))
        groups = np.split(order.astype(np.int64), np.cumsum(counts)[:-1])
        self.experts = experts
        self.skipped_experts = [experts[i].item() for i in range(len(experts)) if counts[i] < 2]
        if self.skipped_experts:
            logger.warning(
                "ExpertBatchSampler: expert(s) %s have a single row and cannot form a contrastive batch; "
                "they are skipped.",
                self.skipped_experts,
            )
        self._groups = [g for g in groups if g.size >= 2]
        self._sizes = [self._split_sizes(g.size) for g in self._groups]
        self._length = sum(len(s) for s in self._sizes)

    def _split_sizes(self, n: int) -> list[int]:
        """Sizes of the batches cut from an expert of ``n >= 2`` rows."""
        full, rem = divmod(n, self.batch_size)
        sizes = [self.batch_size] * full
        if rem:
            if full == 0:
                sizes = [rem]
            elif self.drop_last:
                pass
            elif rem == 1:
                sizes[-1] += 1
            else:
                sizes.append(rem)
        return sizes

    @property
    def sampler(self) -> ExpertBatchSampler:
        """Return the sampler itself, so Lightning calls :meth:`set_epoch` via ``batch_sampler.sampler``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, which selects the permutation (``seed + epoch``).

        Parameters
        ----------
        epoch
            Epoch number.
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches: list[list[int]] = []
        for rows, sizes in zip(self._groups, self._sizes, strict=True):
            if self.shuffle:
                rows = rows[torch.randperm(rows.size, generator=generator).numpy()]
            start = 0
            for size in sizes:
                batches.append(rows[start : start + size].tolist())
                start += size
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        yield from batches

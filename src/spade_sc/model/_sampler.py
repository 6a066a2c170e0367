"""Batch sampler whose batches are made of single-expert sub-batches (hard negatives within each expert)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from .._validation import check_int

logger = logging.getLogger(__name__)

__all__ = ["ExpertBatchSampler"]


class ExpertBatchSampler(Sampler[list[int]]):
    """Yield training steps made of single-expert batches of row indices (hard negatives).

    Per epoch, the rows of each expert are permuted (if ``shuffle``) and cut into single-expert batches of
    ``batch_size``. With ``experts_per_step=1`` (the default) every yielded batch is one of them and the batches of
    all experts are shuffled together so experts are interleaved. With ``experts_per_step=E > 1`` (or ``None``: all
    experts), each yielded step is the concatenation of up to ``E`` single-expert batches of **different** experts,
    so that one optimiser step trains several experts at once; the contrastive loss is then computed within each
    expert's rows only (``loss_fn(image_emb, gene_emb, expert_idx)``, see :class:`~spade_sc.model.SoftCLIPLoss`).
    In both cases every row of every expert appears exactly once per epoch (unless ``drop_last``).

    Grouping (``E > 1``): at each step the ``E`` experts with the most single-expert batches left contribute their
    next batch (ties broken by a per-epoch random order of the experts, or by label when ``shuffle=False``); this
    uses the fewest steps possible, ``max(max_k n_k, ceil(sum_k n_k / E))`` for experts of ``n_k`` batches, and keeps
    every expert in as many steps as possible. The steps are then shuffled (if ``shuffle``). Within a step the
    sub-batches are contiguous and in label order (so rows come sorted by expert); :meth:`iter_steps` gives the
    same steps split into their single-expert batches.

    Small experts:

    - a trailing batch of a single row is merged into the previous batch of the same expert (that batch then has
      ``batch_size + 1`` rows), so no single-expert batch has size 1 (a contrastive loss needs at least 2 pairs);
    - an expert with fewer than ``batch_size`` rows yields one smaller batch;
    - an expert with a single row in total cannot form a contrastive batch: it is skipped and a warning naming it is
      logged at construction (never dropped silently). Skipped experts are listed in :attr:`skipped_experts`.

    The permutations of epoch ``e`` are drawn from ``torch.Generator().manual_seed(seed + e)``; call
    :meth:`set_epoch` before each epoch (Lightning does it automatically through the :attr:`sampler` attribute).

    Distributed training (``num_replicas > 1``): every replica draws the same steps (same seed and epoch) and
    replica ``rank`` takes every ``num_replicas``-th of them, starting at ``rank``. With ``even=True`` (for training
    under DDP, where every process must run the same number of optimiser steps) the list of steps is first padded
    to a multiple of ``num_replicas`` by repeating its first steps, as :class:`~torch.utils.data.DistributedSampler`
    does, so each replica gets ``ceil(n_steps / num_replicas)`` steps and an epoch holds at most
    ``num_replicas - 1`` extra steps; with ``even=False`` the replicas split the steps exactly (their counts may
    differ by one).

    Parameters
    ----------
    expert_labels
        1-D sequence/array/tensor of length ``N`` with the expert of each row (any sortable labels, usually ints).
    batch_size
        Target size of each single-expert batch (``>= 2``); a step holds up to ``experts_per_step`` of them.
    shuffle
        Permute rows within experts and interleave the batches (steps) of different experts. If ``False``, rows
        stay in order; with ``experts_per_step=1`` batches are yielded expert by expert (sorted labels).
    seed
        Base seed of the permutations.
    drop_last
        Drop the incomplete trailing batch of each expert, except when it is that expert's only batch (so no
        expert with at least 2 rows is ever dropped).
    experts_per_step
        Maximum number of (distinct) experts per yielded step; ``1`` gives single-expert batches, ``None`` all
        experts in every step (as long as they have batches left).
    num_replicas
        Number of processes sharing the epoch (the DDP world size).
    rank
        Rank of this process in ``[0, num_replicas)``.
    even
        Pad the steps so that every replica gets the same number (see above).

    Attributes
    ----------
    experts : numpy.ndarray
        Sorted unique labels.
    skipped_experts : list
        Labels of experts with a single row, which never appear in batches.
    epoch : int
        Current epoch.
    experts_per_step : int or None
        As given.
    n_steps : int
        Steps per epoch over all replicas (before padding); ``len(sampler)`` is this replica's share.
    num_replicas, rank : int
        As given.
    """

    def __init__(
        self,
        expert_labels: Sequence[Any] | np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        experts_per_step: int | None = 1,
        num_replicas: int = 1,
        rank: int = 0,
        even: bool = True,
    ) -> None:
        check_int(batch_size, "batch_size", low=2, why=" (contrastive batches need pairs)")
        if experts_per_step is not None:
            check_int(experts_per_step, "experts_per_step", none_ok=True)
        check_int(num_replicas, "num_replicas")
        check_int(rank, "rank", low=0, high=num_replicas)
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
        self.experts_per_step = None if experts_per_step is None else int(experts_per_step)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.even = bool(even)
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
        n_batches = [len(s) for s in self._sizes]
        if self._per_step == 1:
            self.n_steps = sum(n_batches)
        else:
            self.n_steps = len(self._schedule(n_batches, list(range(len(n_batches)))))

    @property
    def _per_step(self) -> int:
        """Effective number of experts per step (at least 1)."""
        n_groups = max(len(self._groups), 1)
        return n_groups if self.experts_per_step is None else min(self.experts_per_step, n_groups)

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

    def _schedule(self, n_batches: list[int], rank: list[int]) -> list[list[tuple[int, int]]]:
        """Group single-expert batches into steps of distinct experts.

        Parameters
        ----------
        n_batches
            Number of batches of each (non-skipped) expert.
        rank
            Tie-breaking rank of each expert (lower first).

        Returns
        -------
        list of list of tuple
            One list per step of ``(expert position, batch index within the expert)``, in expert (label) order.
        """
        per_step = self._per_step
        remaining = list(n_batches)
        taken = [0] * len(n_batches)
        steps: list[list[tuple[int, int]]] = []
        while True:
            live = [g for g, r in enumerate(remaining) if r > 0]
            if not live:
                return steps
            chosen = sorted(live, key=lambda g: (-remaining[g], rank[g]))[:per_step]
            chosen.sort()
            steps.append([(g, taken[g]) for g in chosen])
            for g in chosen:
                remaining[g] -= 1
                taken[g] += 1

    @property
    def sampler(self) -> ExpertBatchSampler:
        """Return the sampler itself, so Lightning finds :meth:`set_epoch` when this is a loader's ``batch_sampler``."""
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
        if self.even:
            return -(-self.n_steps // self.num_replicas)
        return len(range(self.rank, self.n_steps, self.num_replicas))

    def iter_steps(self) -> Iterator[list[list[int]]]:
        """Yield the steps of the current epoch, each split into its single-expert batches.

        Yields
        ------
        list of list of int
            One list per step holding the row indices of each of its single-expert batches (distinct experts);
            concatenated, they are the batch yielded by iterating the sampler.
        """
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        per_expert: list[list[list[int]]] = []
        for rows, sizes in zip(self._groups, self._sizes, strict=True):
            if self.shuffle:
                rows = rows[torch.randperm(rows.size, generator=generator).numpy()]
            start = 0
            batches = []
            for size in sizes:
                batches.append(rows[start : start + size].tolist())
                start += size
            per_expert.append(batches)
        if self._per_step == 1:
            # exactly the single-expert behaviour: all batches of all experts, shuffled together
            steps = [[b] for batches in per_expert for b in batches]
        else:
            n_groups = len(per_expert)
            rank = list(range(n_groups))
            if self.shuffle:
                rank = torch.argsort(torch.randperm(n_groups, generator=generator)).tolist()
            schedule = self._schedule([len(b) for b in per_expert], rank)
            steps = [[per_expert[g][j] for g, j in step] for step in schedule]
        if self.shuffle:
            steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
        if self.even and steps and len(steps) % self.num_replicas:
            steps += [steps[i % len(steps)] for i in range(self.num_replicas - len(steps) % self.num_replicas)]
        yield from steps[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.iter_steps():
            if len(step) == 1:
                yield step[0]
            else:
                yield [i for batch in step for i in batch]

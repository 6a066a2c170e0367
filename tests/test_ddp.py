"""Training under DDP: two CPU processes talking through gloo, spawned by Lightning from this process."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from spade_sc.model import ExpertBatchSampler, soft_clip_loss
from spade_sc.tl import DataExperts, SpadeModel

N_EXPERTS, IMAGE_DIM, GENE_DIM, BATCH = 3, 24, 16, 16


class RecordSteps(L.Callback):
    """Writes, from every process, which rows each training step held (the rows' index is image column 0)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.steps: list[list[int]] = []
        self.epochs: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(batch[0][:, 0].round().long().tolist())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        sampler = trainer.train_dataloader.sampler
        self.epochs.append(
            {
                "rank": trainer.global_rank,
                "world": trainer.world_size,
                "sampler": [sampler.rank, sampler.num_replicas, sampler.n_steps],
                "steps": self.steps,
            }
        )
        self.steps = []

    def on_fit_end(self, trainer, pl_module) -> None:
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(self.epochs))


def _pairs(seed: int = 0):
    """Three groups of pairs from a shared latent; image column 0 holds the row's index within its group."""
    gen = np.random.default_rng(seed)
    out = {}
    for name, n in (("a", 150), ("b", 130), ("val", 60)):
        z = gen.normal(size=(n, 4))
        image = z @ gen.normal(size=(4, IMAGE_DIM)) + 0.1 * gen.normal(size=(n, IMAGE_DIM))
        gene = z @ gen.normal(size=(4, GENE_DIM)) + 0.1 * gen.normal(size=(n, GENE_DIM))
        image[:, 0] = np.arange(n) + (150 if name == "b" else 0)  # a and b are stacked: index into the training set
        out[name] = (image.astype(np.float32), gene.astype(np.float32), gen.integers(0, N_EXPERTS, n))
    return out


def _model(seed: int = 0) -> SpadeModel:
    experts = DataExperts(
        centroids=np.zeros((N_EXPERTS, IMAGE_DIM), dtype=np.float32),
        centroid_tissue=np.array(["all"] * N_EXPERTS),
        centroid_expert=np.arange(N_EXPERTS),
        n_experts=N_EXPERTS,
    )
    genes = [f"g{i}" for i in range(GENE_DIM)]
    return SpadeModel(experts, genes, IMAGE_DIM, features_key="X_test", proj_dim=32, seed=seed)


@pytest.mark.filterwarnings("ignore")
def test_two_process_ddp_shards_steps_and_returns_the_best_weights(tmp_path):
    pairs = _pairs()
    model = _model()
    init = {k: v.clone() for k, v in model.module.state_dict().items()}
    record = RecordSteps(str(tmp_path))
    epochs = 4
    model.train(
        pairs,
        validation=["val"],
        max_epochs=epochs,
        batch_size=BATCH,
        lr=1e-2,
        progress=False,
        trainer_kwargs={
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp_spawn",
            "callbacks": [record],
        },
    )

    # both processes trained, each on its own half of every epoch's steps
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expert = np.concatenate([pairs["a"][2], pairs["b"][2]])
    whole = ExpertBatchSampler(expert, BATCH, seed=0, experts_per_step=None)
    for epoch in range(epochs):
        whole.set_epoch(epoch)
        steps = [sorted(s) for s in whole]
        got = [ranks[r][epoch] for r in (0, 1)]
        for r in (0, 1):
            assert got[r]["rank"] == r and got[r]["world"] == 2
            assert got[r]["sampler"] == [r, 2, len(steps)]
            assert len(got[r]["steps"]) == -(-len(steps) // 2)  # equal step counts: DDP never waits forever
        assert [sorted(s) for s in got[0]["steps"]] == steps[0::2][: len(got[0]["steps"])]
        assert [sorted(s) for s in got[1]["steps"]] == (steps[1::2] + steps[:1])[: len(got[1]["steps"])]
        seen = Counter(i for g in got for s in g["steps"] for i in s)
        assert set(seen) == set(range(len(expert)))  # every training row, in one process or the other

    # the calling process got the history and the best epoch's weights back
    history = model.history_
    assert [h["epoch"] for h in history] == list(range(epochs))
    assert all(h["train_loss"] is not None and h["val_loss"] is not None for h in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    val = [h["val_loss"] for h in history]
    assert model.train_params_["best_epoch"] == int(np.argmin(val))
    assert model.train_params_["best_val_loss"] == pytest.approx(min(val), rel=1e-5)
    weights = model.module.state_dict()
    assert any(not torch.equal(weights[k], init[k]) for k in init)
    # recompute the validation loss of the returned weights (every process evaluated the whole validation set)
    x, y, e = (torch.as_tensor(v) for v in pairs["val"])
    model.module.eval()
    total = 0.0
    with torch.no_grad():
        for rows in ExpertBatchSampler(e.numpy(), BATCH, shuffle=False, experts_per_step=None):
            for k in e[rows].unique():
                sub = [i for i in rows if e[i] == k]
                image, gene = model.module(x[sub], y[sub], e[sub])
                total += float(soft_clip_loss(image, gene)) * len(sub)
    assert total / len(e) == pytest.approx(min(val), rel=1e-4)

"""Expert diagnostics: per-expert pairs and losses recorded by training, the pl panels reading them, the logs of fit."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

import spade_sc as sp

FEAT = "X_toy"
# each spot alone: the tests build models on the raw toy features and count the spots of every expert
SMALL = {
    "n_clusters_per_tissue": 8,
    "max_epochs": 4,
    "batch_size": 64,
    "lr": 3e-3,
    "progress": False,
    "spatial_context": None,
}


def _with_toy_features(cohort, copy_slide, *, outlier: bool = False):
    """Copies of the slides with cheap features (a fixed projection of log1p counts); no encoder needed.

    With ``outlier``, one spot of slide0 lies far from every other: the two-step k-means gives it an expert alone.
    """
    rng = np.random.default_rng(0)
    out, proj = {}, None
    for sid, sdata in cohort.items():
        s = copy_slide(sdata)
        t = s.tables["table"]
        x = np.log1p(np.asarray(t.X.todense() if hasattr(t.X, "todense") else t.X, dtype=np.float32))
        if proj is None:
            proj = rng.normal(size=(x.shape[1], 16)).astype(np.float32) / np.sqrt(x.shape[1])
        feats = x @ proj + 0.05 * rng.normal(size=(x.shape[0], 16)).astype(np.float32)
        if outlier and sid == "slide0":
            feats[0] += 1e3
        t.obsm[FEAT] = feats
        out[sid] = s
    return out


@pytest.fixture(scope="module")
def fitted(synthetic_cohort, copy_slide, one_torch_thread):
    cohort = _with_toy_features(synthetic_cohort, copy_slide)
    model = sp.tl.fit(cohort, features_key=FEAT, n_experts=3, validation_slides=["slide3"], seed=0, **SMALL)
    return cohort, model


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _values(row):
    return np.array([np.nan if v is None else v for v in row], dtype=float)


def test_training_records_per_expert_pairs_and_losses(fitted):
    cohort, model = fitted
    tp = model.train_params_
    train, val = np.array(tp["n_train_pairs_per_expert"]), np.array(tp["n_validation_pairs_per_expert"])
    assert train.shape == val.shape == (3,)
    assert train.sum() == tp["n_train_pairs"] and val.sum() == tp["n_validation_pairs"]
    t3 = cohort["slide3"].tables["table"]  # the validation slide: its pairs are the experts' validation pairs
    np.testing.assert_array_equal(val, np.bincount(t3.obs["spade_expert"].cat.codes, minlength=3))
    assert len(model.history_) == SMALL["max_epochs"]
    for h in model.history_:
        tr, va = _values(h["train_loss_per_expert"]), _values(h["val_loss_per_expert"])
        assert tr.shape == va.shape == (3,)
        # each per-expert loss is a share of the epoch's loss: their row-weighted mean gives it back
        ok = ~np.isnan(tr)
        assert np.average(tr[ok], weights=train[ok]) == pytest.approx(h["train_loss"], rel=1e-5)
        ok = ~np.isnan(va)
        assert np.average(va[ok], weights=val[ok]) == pytest.approx(h["val_loss"], rel=1e-5)


def test_per_expert_history_survives_save_and_load(fitted, tmp_path):
    _, model = fitted
    path = model.save(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())  # JSON only
    assert config["history"][0]["val_loss_per_expert"] == model.history_[0]["val_loss_per_expert"]
    back = sp.model.SpadeModel.load(path)
    assert back.history_ == model.history_
    assert back.train_params_["n_train_pairs_per_expert"] == model.train_params_["n_train_pairs_per_expert"]


def test_expert_pairs_bars(fitted):
    cohort, model = fitted
    ax = sp.pl.expert_pairs(model, show=False)
    training, validation = ax.containers  # one bar per expert each
    assert len(training) == len(validation) == model.n_experts
    assert [b.get_height() for b in training] == model.train_params_["n_train_pairs_per_expert"]
    assert any(line.get_label() == "batch size (64)" for line in ax.get_lines())
    ax = sp.pl.expert_pairs(cohort, show=False)
    (bars,) = ax.containers
    counts = sum(np.bincount(s.tables["table"].obs["spade_expert"].cat.codes, minlength=3) for s in cohort.values())
    assert [b.get_height() for b in bars] == counts.tolist()
    ax = sp.pl.expert_pairs(cohort, by_slide=True, show=False)
    assert len(ax.containers) == len(cohort) and all(len(c) == model.n_experts for c in ax.containers)


def test_routing_entropy_boxes_one_per_slide(fitted):
    cohort, _ = fitted
    ax = sp.pl.routing_entropy(cohort, show=False)
    assert len(ax.patches) == len(cohort)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(cohort)
    assert any("log 3" in line.get_label() for line in ax.get_lines())


def test_expert_losses_one_curve_per_expert(fitted):
    _, model = fitted
    for stage in ("val", "train"):
        ax = sp.pl.expert_losses(model, stage=stage, show=False)
        curves = [line for line in ax.get_lines() if line.get_label().startswith("expert ")]
        assert [c.get_label() for c in curves] == [f"expert {k}" for k in range(model.n_experts)]
        assert all(len(c.get_xdata()) == len(model.history_) for c in curves)
        np.testing.assert_allclose(curves[0].get_ydata(), [h[f"{stage}_loss_per_expert"][0] for h in model.history_])


def test_expert_diagnostics_figure(fitted, tmp_path):
    cohort, model = fitted
    axes = sp.pl.expert_diagnostics(model, cohort, show=False, save=tmp_path / "diag.png")
    assert len(axes) == 3 and (tmp_path / "diag.png").stat().st_size > 0
    assert len(sp.pl.expert_diagnostics(model, show=False)) == 2
    with pytest.raises(ValueError, match="3 Axes"):
        sp.pl.expert_diagnostics(model, cohort, ax=[plt.gca()], show=False)


def test_clear_errors_name_the_key_and_its_writer(fitted, copy_slide, synthetic_cohort):
    _, model = fitted
    bare = {"slide0": copy_slide(synthetic_cohort["slide0"])}
    with pytest.raises(KeyError, match=r"Slide 'slide0'.*spade_routing_entropy.*spade_sc\.tl\.fit"):
        sp.pl.routing_entropy(bare, show=False)
    with pytest.raises(KeyError, match=r"Slide 'slide0'.*spade_expert.*spade_sc\.tl\.fit"):
        sp.pl.expert_pairs(bare, show=False)
    # a model saved before per-expert records existed (tests/data/spade_model_v0)
    old = sp.model.SpadeModel.load(Path(__file__).parent / "data" / "spade_model_v0")
    with pytest.raises(KeyError, match=r"n_train_pairs_per_expert.*spade_sc\.tl\.fit"):
        sp.pl.expert_pairs(old, show=False)
    with pytest.raises(KeyError, match=r"val_loss_per_expert.*spade_sc\.tl\.fit"):
        sp.pl.expert_losses(old, show=False)
    untrained = sp.model.SpadeModel(model.experts, model.genes, 16, features_key=FEAT)
    with pytest.raises(ValueError, match="not trained"):
        sp.pl.expert_losses(untrained, show=False)
    with pytest.raises(ValueError, match="stage"):
        sp.pl.expert_losses(model, stage="test", show=False)
    # trained without validation: no validation loss per expert, the training one is there
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 16)).astype(np.float32), rng.normal(size=(40, len(model.genes))).astype(np.float32)
    no_val = sp.model.SpadeModel(model.experts, model.genes, 16, features_key=FEAT, proj_dim=8)
    no_val.train({"a": (x, y, np.arange(40) % 3)}, max_epochs=1, batch_size=8, progress=False)
    assert (
        no_val.history_[0]["val_loss_per_expert"] is None
        and no_val.train_params_["n_validation_pairs_per_expert"] is None
    )
    with pytest.raises(ValueError, match=r"without validation.*stage='train'"):
        sp.pl.expert_losses(no_val, show=False)
    assert len(sp.pl.expert_pairs(no_val, show=False).containers) == 1
    sp.pl.expert_losses(no_val, stage="train", show=False)


def test_fit_logs_under_populated_experts(synthetic_cohort, copy_slide, one_torch_thread, caplog):
    cohort = _with_toy_features(synthetic_cohort, copy_slide, outlier=True)
    with caplog.at_level(logging.INFO, logger="spade_sc"):
        model = sp.tl.fit(
            cohort,
            features_key=FEAT,
            n_experts=3,
            validation_slides=["slide3"],
            seed=0,
            **{**SMALL, "n_clusters_per_tissue": 3, "max_epochs": 2, "batch_size": 512},
        )
    lone = int(cohort["slide0"].tables["table"].obs["spade_expert"].iloc[0])
    assert model.train_params_["n_train_pairs_per_expert"][lone] == 1
    text = caplog.text
    # the cohort's clustering: spots per expert, and the expert too small to ever train
    assert "spots per expert" in text
    assert f"Data expert(s) [{lone}] of 3 hold fewer than 2 spots of the cohort" in text
    # training: what happens to it (skipped, random weights), to experts under the batch size, and to validation
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "training pairs" in r.getMessage()]
    assert len(warned) == 1
    assert f"{lone} (1 pair) of 3 get fewer than 2 training pairs" in warned[0].getMessage()
    assert "keep their random initial weights" in warned[0].getMessage()
    assert "fewer training pairs than batch_size=512" in text and "one batch of all its pairs per epoch" in text
    assert f"{lone} (0 pairs) of 3 get fewer than 2 validation pairs" in text
    # the lone expert has no loss of its own; the others do
    last = model.history_[-1]
    assert last["train_loss_per_expert"][lone] is None and last["val_loss_per_expert"][lone] is None
    ax = sp.pl.expert_losses(model, show=False)
    assert len([line for line in ax.get_lines() if line.get_label().startswith("expert ")]) == 2
    assert f"expert {lone}" in ax.get_title()
    ax = sp.pl.expert_pairs(model, show=False)
    assert f"not trained: expert {lone}" in ax.get_title()

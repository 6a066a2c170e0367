"""Tests of slide-level gated attention MIL: spade_sc.tl.train_mil / attention, MILModel and the attention plots.

Offline, CPU, public API only.

The 40-slide synthetic cohort is tiled here from the image itself (saturation of a coarse level), not with
``pp.tile_tissue``: its tissue mask is still being tuned and is unreliable on small synthetic slides (see the tiles
tests). Tile features are per-tile colour and texture statistics of the H&E (10-d), a real image-derived feature that
keeps the tests fast; the encoder path of ``slide_embeddings`` is tested in test_slides.py.
"""

from __future__ import annotations

import copy
import json

import geopandas as gpd
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from anndata import AnnData
from matplotlib.image import imread
from safetensors import safe_open
from safetensors.torch import save_file
from spatialdata import SpatialData, get_pyramid_levels
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import Identity, get_transformation

import spade_sc as sp
from spade_sc.datasets import synthetic_regions
from spade_sc.pl import attention as pl_attention
from spade_sc.pl import top_patches
from spade_sc.tl import MILModel, MILResult, attention, train_mil

FEATURES = "X_stats"
FAST = {"hidden": 128, "attention_dim": 64, "lr": 1e-3, "max_epochs": 10}
TINY = {"hidden": 16, "attention_dim": 8, "lr": 1e-3, "max_epochs": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------
def _write_tiles(sdata: SpatialData, boxes: np.ndarray, rows, cols, features: np.ndarray | None, key: str, cs):
    """shapes "image_tiles" + table "image_tiles_table" in the layout of pp.tile_tissue."""
    n = len(boxes)
    ids = np.arange(n)
    gdf = gpd.GeoDataFrame(geometry=shapely.box(*boxes.T), index=pd.Index(ids, name="tile_id"))
    sdata.shapes["image_tiles"] = ShapesModel.parse(gdf, transformations={cs: Identity()})
    obs = pd.DataFrame(
        {
            "tile_id": ids,
            "row": np.asarray(rows),
            "col": np.asarray(cols),
            "x": (boxes[:, 0] + boxes[:, 2]) / 2,
            "y": (boxes[:, 1] + boxes[:, 3]) / 2,
            "region": pd.Categorical(["image_tiles"] * n),
        },
        index=[str(i) for i in ids],
    )
    adata = AnnData(obs=obs)
    adata.obsm["spatial"] = obs[["x", "y"]].to_numpy()
    if features is not None:
        adata.obsm[key] = features.astype(np.float32)
    adata.uns["tile_tissue"] = {"image_key": "image", "mpp": 1.0, "tile_size": 32}
    sdata.tables["image_tiles_table"] = TableModel.parse(
        adata, region="image_tiles", region_key="region", instance_key="tile_id"
    )


def _tile_and_describe(sdata: SpatialData, tile_px: int = 64) -> None:
    """Tile a synthetic slide (tissue = saturated pixels of level 1) and describe every tile (colour, texture)."""
    levels = get_pyramid_levels(sdata.images["image"])
    k = levels[0].sizes["x"] / levels[1].sizes["x"]
    img = np.asarray(levels[1].data.compute(), dtype=np.float32) / 255.0
    hi, lo = img.max(0), img.min(0)
    sat = (hi - lo) / np.maximum(hi, 1e-6)
    grey = img.mean(0)
    t = int(tile_px / k)
    boxes, rows, cols, feats = [], [], [], []
    for r in range(img.shape[1] // t):
        for c in range(img.shape[2] // t):
            sl = (slice(r * t, (r + 1) * t), slice(c * t, (c + 1) * t))
            if (sat[sl] > 0.1).mean() < 0.5:
                continue
            p = img[:, sl[0], sl[1]]
            g = grey[sl]
            texture = np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()
            feats.append([*p.mean((1, 2)), *p.std((1, 2)), sat[sl].mean(), sat[sl].std(), (g < 0.5).mean(), texture])
            boxes.append([c * tile_px, r * tile_px, (c + 1) * tile_px, (r + 1) * tile_px])
            rows.append(r)
            cols.append(c)
    cs = next(iter(get_transformation(sdata.images["image"], get_all=True)))
    _write_tiles(sdata, np.array(boxes, dtype=float), rows, cols, np.array(feats), FEATURES, cs)


def _fake_cohort(n_slides: int = 12, n_classes: int = 2, dim: int = 8, seed: int = 0) -> dict[str, SpatialData]:
    """Slides without images: tiles whose features carry the class in a few informative tiles."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_slides):
        label = i % n_classes
        n = int(rng.integers(15, 30))
        x = rng.normal(0, 1, (n, dim))
        x[: n // 3, label % dim] += 2.0
        side = int(np.ceil(np.sqrt(n)))
        r, c = np.divmod(np.arange(n), side)
        boxes = np.stack([c * 10, r * 10, c * 10 + 10, r * 10 + 10], 1).astype(float)
        s = SpatialData()
        _write_tiles(s, boxes, r, c, x, "X_feat", "global")
        s.attrs["spade_sc"] = {"slide": {"label": label, "group": "a"}}
        out[f"s{i}"] = s
    return out


def concordance_index(time, risk, event) -> float:
    """Harrell's C-index as train_mil computes it: the pooled out-of-fold metric of a survival MILResult."""
    predictions = pd.DataFrame({"time": time, "risk": risk, "event": event})
    result = MILResult(
        task="survival",
        protocol="cv",
        metrics=pd.DataFrame(),
        splits=[],
        predictions=predictions,
        models=[],
        model=None,
        labels=pd.DataFrame(),
    )
    return result.pooled_metrics()["c_index"]


# ---------------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort40():
    cohort = sp.datasets.synthetic(n_slides=40, image_size=1024, spots=False, seed=0)
    for s in cohort.values():
        _tile_and_describe(s)
    return cohort


@pytest.fixture(scope="module")
def cv_result(cohort40):
    return train_mil(cohort40, label_key="label", features_key=FEATURES, folds=5, seed=0, **FAST)


@pytest.fixture(scope="module")
def fake():
    return _fake_cohort()


# ---------------------------------------------------------------------------------------------------------------------
# C-index
# ---------------------------------------------------------------------------------------------------------------------
def test_concordance_index_by_hand():
    t = [1.0, 2.0, 3.0, 4.0]
    e = [1, 1, 1, 1]
    assert concordance_index(t, [4, 3, 2, 1], e) == 1.0
    assert concordance_index(t, [1, 2, 3, 4], e) == 0.0
    assert concordance_index(t, [1, 1, 1, 1], e) == 0.5
    # censoring: subject 2 (t=2) censored. Comparable pairs (shorter time has an event):
    # (0,1) (0,2) (0,3) (2,3); (1, .) not (censored). risks 3, 5, 2, 1: concordant (0,2) (0,3) (2,3); (0,1) not.
    assert concordance_index([1, 2, 3, 4], [3, 5, 2, 1], [1, 0, 1, 1]) == pytest.approx(3 / 4)
    # ties in time: two events at t=2 are not comparable; event vs censored at the same time is (event first).
    # pairs: (0,1) (0,2) (1,2: event at 2 vs censored at 2). risks 2, 1, 1 -> (0,1) c, (0,2) c, (1,2) tie 1/2.
    assert concordance_index([1, 2, 2], [2, 1, 1], [1, 1, 0]) == pytest.approx(2.5 / 3)
    assert concordance_index([1, 2, 2], [2, 1, 1], [1, 1, 1]) == pytest.approx(1.0)  # (1,2) not comparable
    assert np.isnan(concordance_index([1, 2], [1, 2], [0, 0]))


def test_concordance_index_matches_a_loop():
    rng = np.random.default_rng(1)
    t = rng.integers(1, 8, 40).astype(float)
    e = rng.integers(0, 2, 40)
    r = rng.integers(0, 5, 40).astype(float)
    num = den = 0.0
    for i in range(40):
        for j in range(40):
            if i == j or not e[i]:
                continue
            if t[i] < t[j] or (t[i] == t[j] and not e[j]):
                den += 1
                num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    assert concordance_index(t, r, e) == pytest.approx(num / den)


# ---------------------------------------------------------------------------------------------------------------------
# synthetic cohort: classification, attention, survival
# ---------------------------------------------------------------------------------------------------------------------
def test_abmil_classification_cv(cohort40, cv_result):
    res = cv_result
    assert isinstance(res, MILResult) and res.protocol == "cv" and res.task == "classification"
    assert list(res.metrics.columns)[:4] == ["split", "fold", "metric", "value"]
    assert set(res.metrics["metric"]) == {"auc", "f1"} and len(res.metrics) == 10
    summary = res.summary()
    assert {"mean", "sd", "n", "pooled"} <= set(summary.columns)
    # held-out AUC (mean over the 5 folds; each fold tests 8 unseen slides)
    assert summary.loc["auc", "mean"] >= 0.9, summary
    assert summary.loc["auc", "pooled"] >= 0.8, summary
    # every slide is tested exactly once, never by a model that saw it
    tested = [n for s in res.splits for n in s["test"]]
    assert sorted(tested) == sorted(cohort40)
    for s in res.splits:
        assert not set(s["train"]) & set(s["test"])
    assert list(res.predictions["slide"]) == list(cohort40)
    assert np.allclose(res.predictions[["prob_0", "prob_1"]].sum(1), 1)
    assert len(res.models) == 5 and res.model is res.models[-1]
    for name in ("slide0", "slide17"):
        assert name not in res.model_for(name).train_params_["train_slides"]


def test_attention_is_higher_in_tumour(cohort40, cv_result):
    inside, outside = [], []
    for name, sdata in cohort40.items():
        attention(sdata, cv_result.model_for(name))
        obs = sdata.tables["image_tiles_table"].obs
        assert {"spade_attention", "spade_attention_pct"} <= set(obs.columns)
        pct = obs["spade_attention_pct"].to_numpy()
        assert 0 < pct.min() and pct.max() == 1.0
        tumour = synthetic_regions(sdata, obs[["x", "y"]].to_numpy()) == "tumour"
        if tumour.any() and (~tumour).any():
            inside.append(pct[tumour].mean())
            outside.append(pct[~tumour].mean())
    inside, outside = np.array(inside), np.array(outside)
    # percentile ranks: 0.5 on average; tumour tiles rank clearly higher
    assert inside.mean() - outside.mean() > 0.15, (inside.mean(), outside.mean())
    assert (inside > outside).mean() >= 0.8


def test_survival_cindex(cohort40):
    names = list(cohort40)
    frac = np.array([cohort40[n].attrs["spade_sc"]["slide"]["tumour_fraction"] for n in names])
    rng = np.random.default_rng(0)
    beta = 30.0
    event_time = rng.exponential(1.0 / np.exp(beta * frac))  # rate exp(beta * tumour fraction)
    censor_time = rng.exponential(3 * np.median(event_time), len(names))
    labels = pd.DataFrame(
        {"os": np.minimum(event_time, censor_time), "dead": (event_time <= censor_time).astype(int)}, index=names
    )
    assert 0.3 < labels["dead"].mean() < 0.9
    res = train_mil(
        cohort40, task="survival", time_key="os", event_key="dead", labels=labels, features_key=FEATURES, seed=0, **FAST
    )
    assert res.task == "survival" and set(res.metrics["metric"]) == {"c_index"}
    assert res.summary().loc["c_index", "mean"] >= 0.75, res.summary()
    model = res.models[0]
    assert model.task == "survival" and len(model.bin_edges) == 5 and model.bin_edges[-1] == np.inf
    x = cohort40["slide0"].tables["image_tiles_table"].obsm[FEATURES]
    s = model.survival_function(x)
    assert s.shape == (4,) and np.all(np.diff(s) <= 0)
    assert model.predict(x) == pytest.approx(-s.sum(), rel=1e-5)
    assert {"time", "event", "risk"} <= set(res.predictions.columns)


# ---------------------------------------------------------------------------------------------------------------------
# protocols on a fast cohort
# ---------------------------------------------------------------------------------------------------------------------
def test_few_shot_draws(fake):
    res = train_mil(fake, label_key="label", features_key="X_feat", k_shot=2, n_repeats=4, seed=3, **TINY)
    assert res.protocol == "few_shot" and len(res.splits) == 4
    labels = res.labels["label"]
    for split in res.splits:
        assert split["split"] == "2-shot"
        assert not set(split["train"]) & set(split["test"])
        assert sorted(split["train"] + split["test"]) == sorted(fake)
        assert labels[split["train"]].value_counts().to_dict() == {0: 2, 1: 2}
    assert len({tuple(s["train"]) for s in res.splits}) > 1  # draws differ
    assert len(res.metrics) == 8 and set(res.metrics["fold"]) == {0, 1, 2, 3}
    assert set(res.summary().index) == {"auc", "f1"}
    with pytest.raises(ValueError, match="Pooled"):
        res.pooled_metrics()
    again = train_mil(fake, label_key="label", features_key="X_feat", k_shot=2, n_repeats=4, seed=3, **TINY)
    assert [s["train"] for s in again.splits] == [s["train"] for s in res.splits]


def test_same_seed_same_result(fake):
    a = train_mil(fake, label_key="label", features_key="X_feat", folds=3, seed=1, **TINY)
    b = train_mil(fake, label_key="label", features_key="X_feat", folds=3, seed=1, **TINY)
    pd.testing.assert_frame_equal(a.predictions, b.predictions)
    pd.testing.assert_frame_equal(a.metrics, b.metrics)


def test_multiclass_and_labels_frame():
    cohort = _fake_cohort(n_slides=12, n_classes=3, seed=2)
    labels = pd.DataFrame({"kind": [["x", "y", "z"][i % 3] for i in range(12)]}, index=list(cohort))
    res = train_mil(cohort, label_key="kind", labels=labels, features_key="X_feat", folds=2, seed=0, **TINY)
    assert res.params["classes"] == ["x", "y", "z"]
    assert {"prob_x", "prob_y", "prob_z"} <= set(res.predictions.columns)
    assert np.allclose(res.predictions[["prob_x", "prob_y", "prob_z"]].sum(1), 1)
    assert res.model.init_params_["n_classes"] == 3
    assert 0 <= res.summary().loc["auc", "mean"] <= 1


def test_folds_none_trains_on_all_and_round_trips(fake, tmp_path):
    res = train_mil(fake, label_key="label", features_key="X_feat", folds=None, **TINY)
    assert res.protocol == "full" and res.metrics.empty and res.predictions.empty
    assert sorted(res.splits[0]["train"]) == sorted(fake)
    model = res.model
    assert isinstance(model, MILModel) and model.in_dim == 8 and model.classes == [0, 1]
    x = fake["s0"].tables["image_tiles_table"].obsm["X_feat"]
    p = model.predict(x)
    assert p.shape == (2,) and p.sum() == pytest.approx(1)
    path = model.save(tmp_path / "mil")
    with pytest.raises(FileExistsError):
        model.save(path)
    back = MILModel.load(path)
    np.testing.assert_allclose(back.predict(x), p, rtol=1e-6)
    np.testing.assert_allclose(back.attention_scores(x), model.attention_scores(x), rtol=1e-6)


def _old_layout_folder(path, net, *, task, classes, bin_edges, mean, std):
    """A MIL model folder exactly as spade_sc wrote it before MILModel moved to spade_sc.model (format 1)."""
    tensors = {f"module.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    tensors["feature_mean"] = torch.from_numpy(mean)
    tensors["feature_std"] = torch.from_numpy(std)
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format_version": "1"})
    config = {
        "format_version": 1,
        "class": "MILModel",
        "init_params": {"in_dim": 8, "n_classes": net.n_classes, "hidden": 16, "attention_dim": 8, "dropout": 0.1},
        "features_key": "X_feat",
        "task": task,
        "classes": classes,
        "bin_edges": bin_edges,
        "standardised": True,
        "train_params": {"seed": 0, "loss_history": [1.0, 0.5]},
        "versions": {"spade_sc": "0.1.0", "torch": "2.14.1", "numpy": "2.4.6"},
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return tensors, config


def test_model_folder_of_the_previous_layout_loads(tmp_path):
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    mean, std = x.mean(0), x.std(0) + 0.5
    z = torch.from_numpy((x - mean) / std)

    net = sp.model.GatedABMIL(8, 4, 16, 8, 0.1).eval()
    tensors, config = _old_layout_folder(
        tmp_path / "surv", net, task="survival", classes=None, bin_edges=[0.0, 1.0, 2.0, 3.0, "inf"], mean=mean, std=std
    )
    model = MILModel.load(tmp_path / "surv")
    assert model.task == "survival" and model.bin_edges == [0.0, 1.0, 2.0, 3.0, np.inf] and model.in_dim == 8
    assert model.train_params_["loss_history"] == [1.0, 0.5]
    with torch.no_grad():
        logits, scores = net(z)
    s = torch.cumprod(1 - torch.sigmoid(logits), 0).numpy()
    np.testing.assert_allclose(model.survival_function(x), s, rtol=1e-6)
    assert model.predict(x) == pytest.approx(-s.sum(), rel=1e-6)
    np.testing.assert_allclose(model.attention_scores(x), scores.numpy(), rtol=1e-6)
    # saving again writes the same layout: tensor names, config fields, class name
    again = model.save(tmp_path / "again")
    new_config = json.loads((again / "config.json").read_text())
    assert set(new_config) == set(config) and new_config["class"] == "MILModel"
    assert new_config["bin_edges"] == config["bin_edges"]
    back = MILModel.load(again)
    np.testing.assert_allclose(back.attention_scores(x), model.attention_scores(x), rtol=1e-6)
    with safe_open(str(again / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(tensors)

    net = sp.model.GatedABMIL(8, 1, 16, 8, 0.1).eval()
    _old_layout_folder(tmp_path / "cls", net, task="classification", classes=[0, 1], bin_edges=None, mean=mean, std=std)
    model = MILModel.load(tmp_path / "cls")
    with torch.no_grad():
        p = float(torch.sigmoid(net(z)[0])[0])
    np.testing.assert_allclose(model.predict(x), [1 - p, p], rtol=1e-6)
    assert model.classes == [0, 1]


def test_slides_without_label_are_left_out(fake):
    labels = pd.DataFrame({"label": [0, 1, 0, 1, 0, 1, np.nan, np.nan]}, index=[f"s{i}" for i in range(8)])
    res = train_mil(fake, label_key="label", labels=labels, features_key="X_feat", folds=None, **TINY)
    assert sorted(res.labels.index) == [f"s{i}" for i in range(6)]


# ---------------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_labels(fake):
    with pytest.raises(KeyError, match="nope"):
        train_mil(fake, label_key="nope", features_key="X_feat")
    with pytest.raises(KeyError, match="nope"):
        train_mil(fake, label_key="nope", labels=pd.DataFrame({"label": [0]}, index=["s0"]), features_key="X_feat")
    with pytest.raises(ValueError, match="single class"):
        train_mil(fake, label_key="group", features_key="X_feat")
    with pytest.raises(ValueError, match="not in the cohort"):
        train_mil(fake, label_key="label", labels=pd.DataFrame({"label": [0, 1]}, index=["s0", "zz"]))
    with pytest.raises(ValueError, match="label_key"):
        train_mil(fake, features_key="X_feat")
    with pytest.raises(ValueError, match="time_key"):
        train_mil(fake, task="survival", event_key="label", features_key="X_feat")
    with pytest.raises(ValueError, match="event_key"):
        train_mil(fake, task="survival", time_key="label", features_key="X_feat")
    with pytest.raises(ValueError, match="task"):
        train_mil(fake, label_key="label", task="regression")
    several = {"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}
    with pytest.raises(ValueError, match="2 processes"):
        train_mil(fake, label_key="label", features_key="X_feat", folds=2, trainer_kwargs=several, **TINY)


def test_k_shot_larger_than_smallest_class(fake):
    with pytest.raises(ValueError, match=r"k_shot=6 .*smallest class"):
        train_mil(fake, label_key="label", features_key="X_feat", k_shot=6)
    with pytest.raises(ValueError, match="k_shot=9"):
        train_mil(fake, label_key="label", features_key="X_feat", k_shot=9)
    with pytest.raises(ValueError, match="folds=7"):
        train_mil(fake, label_key="label", features_key="X_feat", folds=7)


def test_slides_without_tiles_or_features(fake):
    cohort = dict(fake)
    cohort["bare"] = SpatialData(
        images={"image": sp.datasets.synthetic(1, image_size=128, spots=False)["slide0"]["image"]}
    )
    labels = pd.DataFrame({"label": [i % 2 for i in range(len(cohort))]}, index=list(cohort))
    with pytest.raises(KeyError, match=r"'bare' has no tiles.*slide_embeddings"):
        train_mil(cohort, label_key="label", labels=labels, features_key="X_feat")
    with pytest.raises(KeyError, match=r"'s0'.*obsm\['X_spade'\] is missing.*slide_embeddings"):
        train_mil(fake, label_key="label")


def test_attention_dimension_mismatch(fake):
    model = train_mil(fake, label_key="label", features_key="X_feat", folds=None, **TINY).model
    other = copy.deepcopy(fake["s1"])
    table = other.tables["image_tiles_table"]
    table.obsm["X_other"] = np.zeros((table.n_obs, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"5-d features, but the MIL model takes 8-d"):
        attention(other, model, features_key="X_other")
    assert "spade_attention" not in table.obs
    with pytest.raises(ValueError, match=r"5-d features, but the MIL model takes 8-d"):
        model.predict(table.obsm["X_other"])
    with pytest.raises(TypeError, match="MILModel"):
        attention(other, object())


# ---------------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------------
def test_attention_plots(cohort40, cv_result, tmp_path):
    sdata = cohort40["slide0"]
    attention(sdata, cv_result.model_for("slide0"))
    obs = sdata.tables["image_tiles_table"].obs
    obs["region_type"] = pd.Categorical(synthetic_regions(sdata, obs[["x", "y"]].to_numpy()))
    heat, bare = tmp_path / "heat.png", tmp_path / "bare.png"
    ax = pl_attention(sdata, outline="region_type", show=False, save=heat)
    assert ax is not None and ax.get_title() == "spade_attention_pct"
    # nothing is above 1: the thumbnail and the contours only, same layout
    pl_attention(sdata, outline="region_type", threshold=1.0, show=False, save=bare)
    plt.close("all")
    a, b = imread(heat)[..., :3], imread(bare)[..., :3]
    assert a.shape == b.shape and a.std() > 0.1
    assert (np.abs(a - b).max(-1) > 0.05).mean() > 0.08  # the heatmap changed a good part of the picture
    # red (high attention) pixels appear only in the heatmap
    red = lambda im: ((im[..., 0] > 0.7) & (im[..., 2] < 0.5)).mean()
    assert red(a) > red(b) + 0.01

    gallery = tmp_path / "top.png"
    axes = top_patches(sdata, n=12, ncols=6, show=False, save=gallery)
    assert axes.shape == (2, 6)
    scores = [float(x.get_title()) for x in axes.ravel()]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(obs["spade_attention"].max(), rel=1e-2)
    img = imread(gallery)[..., :3]
    assert img.std() > 0.1 and (img.mean(-1) < 0.6).mean() > 0.05  # dark nuclei in the tiles
    plt.close("all")


def test_plot_keys_never_written(fake, cohort40, cv_result):
    sdata = fake["s0"]
    with pytest.raises(KeyError, match=r"spade_attention_pct.*spade_sc\.tl\.attention"):
        pl_attention(sdata, key="spade_attention_pct", show=False)
    with pytest.raises(KeyError, match=r"spade_sc\.tl\.attention"):
        top_patches(sdata, key="my_attention", show=False)
    sdata = cohort40["slide39"]
    attention(sdata, cv_result.model_for("slide39"))
    with pytest.raises(KeyError, match="outline='nope'"):
        pl_attention(sdata, outline="nope", show=False)
    with pytest.raises(ValueError, match="categorical"):
        pl_attention(sdata, outline="x", show=False)
    plt.close("all")

"""Spatial context: pp.spatial_context, and tl.fit / tl.embed / tl.evaluate with a model trained in context."""

from __future__ import annotations

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from shapely.geometry import Point
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel

import spade_sc as sp
from spade_sc.model import SpadeModel

KEY = "X_efficientnet_lite0"


def _grid(xy: np.ndarray, feats: np.ndarray, order: np.ndarray | None = None) -> SpatialData:
    """Circle spots at ``xy`` (shapes in the given order), a table listing them in ``order``, features in obsm."""
    n = len(xy)
    order = np.arange(n) if order is None else order
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame({"radius": np.full(n, 1.0)}, geometry=[Point(x, y) for x, y in xy], index=np.arange(n))
    )
    obs = pd.DataFrame({"spot_id": order, "region": pd.Categorical(["spots"] * n)}, index=[f"s{i}" for i in order])
    table = TableModel.parse(
        ad.AnnData(X=sparse.csr_matrix((n, 1), dtype=np.float32), obs=obs),
        region="spots",
        region_key="region",
        instance_key="spot_id",
    )
    table.obsm["X"] = feats[order]
    return SpatialData(shapes={"spots": shapes}, tables={"table": table})


def test_context_is_the_mean_of_the_ring_of_neighbours():
    # a 4 x 3 square grid of spacing 10, one spot far away; table rows in another order than the shapes
    xy = np.array([[10.0 * i, 10.0 * j] for j in range(3) for i in range(4)] + [[500.0, 500.0]])
    feats = np.random.default_rng(0).normal(size=(len(xy), 5)).astype(np.float32)
    order = np.random.default_rng(1).permutation(len(xy))
    sdata = _grid(xy, feats, order)
    sp.pp.spatial_context(sdata, features_key="X")
    table = sdata.tables["table"]
    out = table.obsm["X_context"]
    assert out.shape == (len(xy), 10) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :5], feats[order])
    for row, i in enumerate(order):
        d = np.linalg.norm(xy - xy[i], axis=1)
        ring = (d > 0) & (d <= 16.0)  # 1.6 x the spacing: the 4 direct and 4 diagonal neighbours
        expected = feats[ring].mean(0) if ring.any() else feats[i]  # the lone spot is its own context
        np.testing.assert_allclose(out[row, 5:], expected, rtol=1e-5, atol=1e-6)
    rec = table.uns["X_context"]
    assert rec["features_key"] == "X" and rec["radius"] == 1.6 and rec["spacing"] == 10.0
    # a radius of 1.1 keeps the 4 direct neighbours only
    small = sp.pp.spatial_context(sdata, features_key="X", radius=1.1, inplace=False)
    corner = int(np.flatnonzero(order == 0)[0])  # spot (0, 0): neighbours (10, 0) and (0, 10)
    np.testing.assert_allclose(small[corner, 5:], feats[[1, 4]].mean(0), rtol=1e-5)


def test_bad_input_is_refused_by_name():
    xy = np.array([[0.0, 0.0], [1.0, 0.0]])
    sdata = _grid(xy, np.ones((2, 3), np.float32))
    with pytest.raises(KeyError, match="obsm\\['nope'\\]"):
        sp.pp.spatial_context(sdata, features_key="nope")
    with pytest.raises(ValueError, match="radius"):
        sp.pp.spatial_context(sdata, features_key="X", radius=0)
    sp.pp.spatial_context(sdata, features_key="X")
    with pytest.raises(ValueError, match=r"X_context.*overwrite"):
        sp.pp.spatial_context(sdata, features_key="X")
    with pytest.raises(ValueError, match="spatial-context radius"):
        sp.tl.fit(sdata, features_key="X", spatial_context=-1.0)


def test_fit_in_context_embeds_new_slides_the_same_way(her2st_with_features, tmp_path, one_torch_thread):
    cohort = her2st_with_features
    train = {k: cohort[k] for k in ("B4", "C2", "C3")}
    kw = {"features_key": KEY, "n_experts": 1, "max_epochs": 3, "batch_size": 128, "progress": False}
    model = sp.tl.fit(train, **kw)
    assert model.init_params_["spatial_context"] == 1.6
    assert model.init_params_["image_dim"] == 2 * cohort["B4"].tables["table"].obsm[KEY].shape[1]
    # embedding a training slide again gives what fit wrote; a held-out slide is embedded in its own context
    fitted = train["C2"].tables["table"].obsm["X_spade"].copy()
    emb, _ = sp.tl.embed(train["C2"], model, inplace=False)
    np.testing.assert_allclose(emb, fitted, rtol=1e-5, atol=1e-6)
    context = sp.pp.spatial_context(cohort["C5"], features_key=KEY, inplace=False)
    emb5, _ = sp.tl.embed(cohort["C5"], model, inplace=False)
    np.testing.assert_allclose(emb5, model.get_image_embedding(context)[0], rtol=1e-5, atol=1e-6)
    # the radius is saved with the model; a model without context records none
    model.save(tmp_path / "m")
    loaded = SpadeModel.load(tmp_path / "m")
    assert loaded.init_params_["spatial_context"] == 1.6
    np.testing.assert_allclose(sp.tl.embed(cohort["C5"], loaded, inplace=False)[0], emb5, rtol=1e-6)
    alone = sp.tl.fit(train, spatial_context=None, key_added="X_alone", **kw)
    assert (
        "spatial_context" not in alone.init_params_
        and alone.init_params_["image_dim"] == model.init_params_["image_dim"] // 2
    )


def test_context_pays_on_held_out_her2st(her2st_with_features, one_torch_thread):
    """On a held-out her2st section, SPADE in context predicts expression from 50 spots better than alone."""
    res = sp.tl.evaluate(
        her2st_with_features,
        features_key=KEY,
        representations=("base", "spade_soft"),
        tasks=("expression",),
        folds={"C5": ["C5"]},
        fit_kwargs={"n_experts": 1, "max_epochs": 30, "batch_size": 128, "spatial_context": None},
        gene_shots=(50,),
        n_draws=5,
        pca=(False,),
        progress=False,
    )
    res_ctx = sp.tl.evaluate(
        her2st_with_features,
        features_key=KEY,
        representations=("spade_soft",),
        tasks=("expression",),
        folds={"C5": ["C5"]},
        fit_kwargs={"n_experts": 1, "max_epochs": 30, "batch_size": 128},
        gene_shots=(50,),
        n_draws=5,
        pca=(False,),
        progress=False,
    )

    def score(r, rep):
        t = r.table
        return t[(t.representation == rep) & (t.shots == "50")]["value"].mean()

    alone, in_context, base = score(res, "spade_soft"), score(res_ctx, "spade_soft"), score(res, "base")
    assert in_context > alone > base
    assert res_ctx.protocol["folds"]["C5"]["spade"]["init_params"]["spatial_context"] == 1.6

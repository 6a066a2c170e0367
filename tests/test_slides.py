"""Tests of spade_sc.tl.slide_embeddings and of the slide-level path on real data (offline, CPU)."""

from __future__ import annotations

import copy

import geopandas as gpd
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from anndata import AnnData
from matplotlib.image import imread
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import Identity

import spade_sc as sp
from spade_sc.encoders import get_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _section(sdata: SpatialData, *, spots: bool) -> SpatialData:
    """A new SpatialData sharing the image of a session fixture section (never modified), with copied tables."""
    return SpatialData(
        images=dict(sdata.images),
        shapes=dict(sdata.shapes) if spots else {},
        tables={k: v.copy() for k, v in sdata.tables.items()} if spots else {},
        attrs=copy.deepcopy(sdata.attrs),
    )


def _tiled(n_tiles: int, dim: int, seed: int, *, features: bool = True) -> SpatialData:
    """A slide without image holding tiles (layout of pp.tile_tissue) and, optionally, their features."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n_tiles)
    gdf = gpd.GeoDataFrame(
        geometry=shapely.box(ids * 10.0, 0, ids * 10.0 + 10, 10), index=pd.Index(ids, name="tile_id")
    )
    obs = pd.DataFrame(
        {"tile_id": ids, "x": ids * 10 + 5.0, "y": 5.0, "region": pd.Categorical(["image_tiles"] * n_tiles)},
        index=[str(i) for i in ids],
    )
    adata = AnnData(obs=obs)
    if features:
        adata.obsm["X_feat"] = rng.normal(size=(n_tiles, dim)).astype(np.float32)
    adata.uns["tile_tissue"] = {"image_key": "image", "mpp": 1.0, "tile_size": 32}
    sdata = SpatialData(
        shapes={"image_tiles": ShapesModel.parse(gdf, transformations={"global": Identity()})},
        tables={
            "image_tiles_table": TableModel.parse(
                adata, region="image_tiles", region_key="region", instance_key="tile_id"
            )
        },
    )
    sdata.attrs["spade_sc"] = {"slide": {"organ": "lung", "score": float(seed), "layout": [1, 2]}}
    return sdata


def _changed(a: np.ndarray, b: np.ndarray, tol: float = 0.05) -> float:
    """Fraction of pixels of two same-size RGB images that differ by more than ``tol`` in some channel."""
    assert a.shape == b.shape
    return float((np.abs(a[..., :3] - b[..., :3]).max(-1) > tol).mean())


# ---------------------------------------------------------------------------------------------------------------------
# synthetic / fake slides
# ---------------------------------------------------------------------------------------------------------------------
def test_slide_embeddings_tiles_and_encodes():
    cohort = sp.datasets.synthetic(n_slides=3, image_size=1024, spots=False, seed=1)
    encoder = get_encoder(input_size=32, device="cpu")
    labels = pd.DataFrame({"grade": ["low", "high"]}, index=["slide0", "slide2"])
    adata = sp.tl.slide_embeddings(
        cohort,
        encoder=encoder,
        labels=labels,
        tile_kwargs={"mpp": 2.0, "tile_size": 32},
        feature_kwargs={"num_workers": 0},
        progress=False,
    )
    assert list(adata.obs_names) == ["slide0", "slide1", "slide2"]
    assert adata.obsm["X_efficientnet_lite0"].shape == (3, 1280)
    assert adata.uns["spade_slides"]["params"]["features_key"] == "X_efficientnet_lite0"
    assert adata.obs["grade"].tolist()[0] == "low" and pd.isna(adata.obs["grade"].iloc[1])
    # the synthetic ground truth is carried along (scalar entries of attrs["spade_sc"]["slide"])
    for name, sdata in cohort.items():
        assert adata.obs.loc[name, "label"] == sdata.attrs["spade_sc"]["slide"]["label"]
        assert "region_types" not in adata.obs
        tiles = sdata.tables["image_tiles_table"]
        assert sdata.shapes["image_tiles"].shape[0] == tiles.n_obs == adata.obs.loc[name, "n_tiles"] > 0
        assert tiles.uns["X_efficientnet_lite0"]["patch_size"] == 32 and tiles.uns["X_efficientnet_lite0"]["mpp"] == 2.0
        np.testing.assert_allclose(
            adata[name].obsm["X_efficientnet_lite0"][0], tiles.obsm["X_efficientnet_lite0"].mean(0), rtol=1e-5
        )
        row = sdata.tables["spade_slides"]
        assert row.n_obs == 1 and row.obs_names[0] == name
        assert "spatialdata_attrs" not in row.uns  # annotates no element
        np.testing.assert_array_equal(row.obsm["X_efficientnet_lite0"], adata[name].obsm["X_efficientnet_lite0"])
    # a second call reuses tiles and features (nothing recomputed; the slide tables are replaced)
    again = sp.tl.slide_embeddings(cohort, features_key="X_efficientnet_lite0", progress=False)
    np.testing.assert_array_equal(again.obsm["X_efficientnet_lite0"], adata.obsm["X_efficientnet_lite0"])


def test_slide_embeddings_existing_features():
    cohort = {"a": _tiled(5, 4, 0), "b": _tiled(8, 4, 1)}
    labels = pd.DataFrame({"label": [1, 0], "organ": ["liver", "liver"]}, index=["b", "a"])
    adata = sp.tl.slide_embeddings(cohort, features_key="X_feat", labels=labels, key_added="slides", progress=False)
    assert adata.obs["n_tiles"].tolist() == [5, 8]
    assert adata.obs["label"].tolist() == [0, 1]
    assert adata.obs["organ"].tolist() == ["liver", "liver"]  # labels win over attrs
    assert adata.obs["score"].tolist() == [0.0, 1.0] and "layout" not in adata.obs
    np.testing.assert_allclose(adata.obsm["X_feat"][1], cohort["b"].tables["image_tiles_table"].obsm["X_feat"].mean(0))
    assert "slides" in cohort["a"].tables and "spade_slides" not in cohort["a"].tables
    # a sequence gets ids slide0, slide1
    seq = sp.tl.slide_embeddings([cohort["a"], cohort["b"]], features_key="X_feat", progress=False)
    assert list(seq.obs_names) == ["slide0", "slide1"]


def test_slide_embeddings_errors():
    ok = _tiled(5, 4, 0)
    bare = _tiled(5, 4, 1, features=False)
    image_only = SpatialData(images={"image": sp.datasets.synthetic(1, image_size=128, spots=False)["slide0"]["image"]})
    snapshot = {k: set(s.tables) for k, s in {"ok": ok, "bare": bare}.items()}
    # tiles without features and nothing to compute them: the message says what to pass; nothing written
    with pytest.raises(ValueError, match=r"'bare' has tiles without obsm\['X_feat'\].*pass model=.*or encoder="):
        sp.tl.slide_embeddings({"ok": ok, "bare": bare}, features_key="X_feat", progress=False)
    with pytest.raises(ValueError, match=r"'img' has no tiles yet.*pass model="):
        sp.tl.slide_embeddings({"ok": ok, "img": image_only}, features_key="X_feat", progress=False)
    assert {k: set(s.tables) for k, s in {"ok": ok, "bare": bare}.items()} == snapshot
    assert not image_only.shapes
    with pytest.raises(KeyError, match="tiles=False"):
        sp.tl.slide_embeddings({"img": image_only}, features_key="X_feat", tiles=False, progress=False)
    with pytest.raises(ValueError, match="not in the cohort"):
        sp.tl.slide_embeddings({"ok": ok}, features_key="X_feat", labels=pd.DataFrame({"y": [1]}, index=["zz"]))
    with pytest.raises(ValueError, match="different dimensions"):
        sp.tl.slide_embeddings({"ok": ok, "other": _tiled(3, 6, 2)}, features_key="X_feat", progress=False)
    with pytest.raises(TypeError, match="SpadeModel"):
        sp.tl.slide_embeddings({"ok": ok}, model=object(), progress=False)
    with pytest.raises(ValueError, match=r"either model= .* or encoder="):
        sp.tl.slide_embeddings({"ok": ok}, model=_FakeModel(), encoder="efficientnet_lite0", progress=False)
    with pytest.raises(ValueError, match="already names an element"):
        sp.tl.slide_embeddings({"ok": ok}, features_key="X_feat", key_added="image_tiles", progress=False)
    with pytest.raises(ValueError, match="annotates elements"):
        sp.tl.slide_embeddings({"ok": ok}, features_key="X_feat", key_added="image_tiles_table", progress=False)
    assert "spade_slides" not in ok.tables and ok.tables["image_tiles_table"].n_obs == 5


class _FakeModel:
    features_key = "X_efficientnet_lite0"

    def get_image_embedding(self, x):  # pragma: no cover - never called
        raise AssertionError


# ---------------------------------------------------------------------------------------------------------------------
# her2st: tiles, SPADE tile embeddings, MIL attention and the plots
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def her2st_model(her2st):
    cohort = {sid: _section(her2st[sid], spots=True) for sid in ("C3", "C4")}
    model = sp.tl.fit(
        cohort,
        encoder=get_encoder(input_size=64, device="cpu"),
        feature_kwargs={"mpp": 2.0, "patch_size": 64, "num_workers": 0},
        n_experts=2,
        max_epochs=2,
        progress=False,
    )
    # fit leaves torch with 2 intra-op threads (its gene panel resets the OpenMP thread count), which is many times
    # slower for the encoder on 2 shared cores: back to one thread
    torch.set_num_threads(1)
    return model


@pytest.fixture(scope="module")
def her2st_slides(her2st, her2st_model):
    cohort = {sid: _section(her2st[sid], spots=False) for sid in ("C2", "C5")}
    labels = pd.DataFrame({"group": ["a", "b"]}, index=["C2", "C5"])
    adata = sp.tl.slide_embeddings(
        cohort,
        her2st_model,
        labels=labels,
        tile_kwargs={"mpp": 2.0, "tile_size": 112},
        feature_kwargs={"num_workers": 0},
        progress=False,
    )
    return cohort, adata


def test_her2st_slide_embeddings(her2st, her2st_slides, her2st_model):
    cohort, adata = her2st_slides
    assert list(adata.obs_names) == ["C2", "C5"] and adata.obsm["X_spade"].shape == (2, 256)
    assert adata.obs["group"].tolist() == ["a", "b"]
    assert adata.uns["spade_slides"]["params"]["model_fingerprint"] == her2st_model.fingerprint()
    for sid, sdata in cohort.items():
        tiles = sdata.tables[f"{sid}_image_tiles_table"]
        assert tiles.n_obs == adata.obs.loc[sid, "n_tiles"] > 20
        assert tiles.obsm["X_spade"].shape == (tiles.n_obs, 256) and "spade_expert" in tiles.obs
        assert tiles.uns["X_efficientnet_lite0"]["patch_size"] == 112  # patches = tiles
        assert "table" not in sdata.tables  # the spot table was not copied, the fixture is untouched
    assert "C2_image_tiles" not in her2st["C2"].shapes
    # the same slides with the base encoder features, computed on the way by tl.embed
    base = sp.tl.slide_embeddings(cohort, her2st_model, features_key=her2st_model.features_key, progress=False)
    assert base.obsm["X_efficientnet_lite0"].shape == (2, 1280)


def test_her2st_attention_and_plots(her2st_slides, tmp_path):
    cohort, adata = her2st_slides
    result = sp.tl.train_mil(
        cohort, label_key="group", labels=adata, folds=None, max_epochs=2, hidden=64, attention_dim=32
    )
    sdata = cohort["C2"]
    sp.tl.attention(sdata, result.model)
    tiles = sdata.tables["C2_image_tiles_table"]
    assert tiles.obs["spade_attention_pct"].between(0, 1).all()
    tiles.obs["top_decile"] = tiles.obs["spade_attention_pct"] > 0.9

    heat, bare = tmp_path / "heat.png", tmp_path / "bare.png"
    sp.pl.attention(sdata, outline="top_decile", threshold=0.0, show=False, save=heat)
    sp.pl.attention(sdata, outline="top_decile", threshold=1.0, show=False, save=bare)
    a, b = imread(heat), imread(bare)
    assert a[..., :3].std() > 0.08 and _changed(a, b) > 0.05

    gallery = tmp_path / "top.png"
    axes = sp.pl.top_patches(sdata, n=8, ncols=4, show=False, save=gallery)
    assert axes.shape == (2, 4)
    g = imread(gallery)[..., :3]
    assert g.std() > 0.08 and (g.mean(-1) < 0.85).mean() > 0.05  # stained tissue, not blank glass

    exp, exp_bare = tmp_path / "experts.png", tmp_path / "experts_bare.png"
    sp.pl.experts(sdata, show=False, save=exp)
    sp.pl.experts(sdata, fill_alpha=0.0, show=False, save=exp_bare)
    e, eb = imread(exp), imread(exp_bare)
    assert e[..., :3].std() > 0.08 and _changed(e, eb) > 0.05
    plt.close("all")

"""Tests of spade_sc.pp.tile_tissue (offline, CPU)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import shapely
import torch
from spatialdata import SpatialData, get_pyramid_levels
from spatialdata.models import Image2DModel, get_table_keys
from spatialdata.transformations import Identity, Scale, get_transformation
from torch import nn

import spade_sc as sp
from spade_sc.encoders import get_encoder


def _blob_image(size: int = 512, seed: int = 0) -> np.ndarray:
    """White glass with a pink-purple disc of tissue (radius size/4) in the middle, with some texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    img = np.full((3, size, size), 245, dtype=np.uint8)
    tissue = np.array([200, 120, 190])[:, None] + rng.integers(-20, 20, (3, int(disc.sum())))
    img[:, disc] = tissue.clip(0, 255)
    return img


def _make(img: np.ndarray, *, mpp: float = 0.5, transform=None, scale_factors=None) -> SpatialData:
    image = Image2DModel.parse(
        da.from_array(img, chunks=(3, 128, 128)),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=scale_factors,
        transformations={"global": transform or Identity()},
    )
    sdata = SpatialData(images={"slide": image})
    sp.pp.set_pixel_size(sdata, mpp, coordinate_system="global")
    return sdata


class _Flat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


# ---------------------------------------------------------------------------------------------------------------------
def test_tiles_cover_the_disc():
    img = _blob_image()
    sdata = _make(img, scale_factors=[2])
    sp.pp.tile_tissue(sdata, tile_size=32, mpp=0.5, min_tissue=0.5)
    tiles = sdata.shapes["slide_tiles"]
    table = sdata.tables["slide_tiles_table"]
    assert len(tiles) == table.n_obs > 0
    region, region_key, instance_key = get_table_keys(table)
    assert list(np.atleast_1d(region)) == ["slide_tiles"] and region_key == "region" and instance_key == "tile_id"
    assert table.X.shape == (len(tiles), 0)
    assert list(table.obs["tile_id"]) == list(tiles.index)
    # tiles are 32 x 32 px squares on a 32 px grid
    b = tiles.geometry.bounds.to_numpy()
    np.testing.assert_allclose(b[:, 2] - b[:, 0], 32)
    np.testing.assert_allclose(b[:, 0] % 32, 0)
    np.testing.assert_allclose(table.obs["x"], (b[:, 0] + b[:, 2]) / 2)
    np.testing.assert_allclose(table.obs["col"] * 32, b[:, 0])
    np.testing.assert_allclose(table.obs["row"] * 32, b[:, 1])
    # centres of kept tiles lie near the disc; the disc's area is covered
    r = np.hypot(table.obs["x"] - 256, table.obs["y"] - 256)
    assert (r < 128 + 16 * np.sqrt(2)).all()
    assert len(tiles) * 32 * 32 == pytest.approx(np.pi * 128**2, rel=0.15)
    assert (table.obs["tissue_fraction"] >= 0.5).all()
    uns = table.uns["tile_tissue"]
    assert uns["n_tiles"] == len(tiles) and uns["tile_size"] == 32 and uns["image_key"] == "slide"
    assert uns["tissue_fraction"] == pytest.approx(np.pi / 16, rel=0.1)


def test_min_tissue_and_overlap():
    sdata = _make(_blob_image())
    sp.pp.tile_tissue(sdata, tile_size=32, min_tissue=0.9, key_added="strict")
    sp.pp.tile_tissue(sdata, tile_size=32, min_tissue=0.1, key_added="loose")
    sp.pp.tile_tissue(sdata, tile_size=32, min_tissue=0.0, key_added="any")
    sp.pp.tile_tissue(sdata, tile_size=32, overlap=16, key_added="overlap")
    n = {k: len(sdata.shapes[k]) for k in ("strict", "loose", "any", "overlap")}
    assert n["strict"] < n["loose"] <= n["any"]
    assert n["any"] < (512 // 32) ** 2  # glass-only tiles are never kept
    assert n["overlap"] > 3 * len(sdata.shapes["loose"]) * 0.8 > 0
    b = sdata.shapes["overlap"].geometry.bounds.to_numpy()
    np.testing.assert_allclose(b[:, 2] - b[:, 0], 32)
    np.testing.assert_allclose(b[:, 0] % 16, 0)
    assert "overlap_table" in sdata.tables


def test_tiles_copy_the_image_transformations_and_follow_the_pixel_size():
    sdata = _make(_blob_image(), mpp=0.25, transform=Scale([2.0, 2.0], axes=("x", "y")))
    sp.pp.tile_tissue(sdata, tile_size=32, mpp=0.5)  # 0.5 um/px: 32 px of 0.5 um = 32 image pixels of 0.5 um
    tiles = sdata.shapes["slide_tiles"]
    assert get_transformation(tiles, get_all=True) == get_transformation(sdata.images["slide"], get_all=True)
    b = tiles.geometry.bounds.to_numpy()
    np.testing.assert_allclose(b[:, 2] - b[:, 0], 32)  # image pixel = 0.25 um/unit * 2 units = 0.5 um
    sp.pp.tile_tissue(sdata, tile_size=32, mpp=1.0, key_added="coarse")
    b = sdata.shapes["coarse"].geometry.bounds.to_numpy()
    np.testing.assert_allclose(b[:, 2] - b[:, 0], 64)


def test_tile_features_are_the_tiles(tmp_path):
    img = _blob_image(size=256)
    sdata = _make(img, scale_factors=[2])
    sp.pp.tile_tissue(sdata, tile_size=16, mpp=0.5)
    enc = get_encoder(_Flat(), input_size=16, mean=(0, 0, 0), std=(1, 1, 1), name="flat", device="cpu")
    sp.pp.image_features(sdata, encoder=enc, shapes_key="slide_tiles", mpp=0.5, patch_size=16, progress=False)
    table = sdata.tables["slide_tiles_table"]
    feats = np.rint(table.obsm["X_flat"].reshape(-1, 3, 16, 16) * 255).astype(int)
    bounds = sdata.shapes["slide_tiles"].geometry.bounds.to_numpy().astype(int)
    pos = sdata.shapes["slide_tiles"].index.get_indexer(table.obs["tile_id"])
    for f, (x0, y0, x1, y1) in zip(feats, bounds[pos], strict=True):
        np.testing.assert_array_equal(f, img[:, y0:y1, x0:x1])
    # by table_key alone too
    sp.pp.image_features(
        sdata, encoder=enc, table_key="slide_tiles_table", mpp=0.5, patch_size=16, progress=False, key_added="again"
    )
    np.testing.assert_array_equal(table.obsm["again"], table.obsm["X_flat"])
    sdata.write(tmp_path / "tiles.zarr")  # the elements and the parameters are storable


def test_lazy_40k_slide_is_tiled_without_reading_level_0():
    sdata = sp.datasets.synthetic(n_slides=1, image_size=40000, spots=False)["slide0"]
    node = sdata.images["image"]["scale0"]["image"]

    def boom(block_info=None):
        msg = "level 0 was read"
        raise AssertionError(msg)

    node.data = da.map_blocks(boom, dtype=np.uint8, chunks=node.data.chunks)
    sp.pp.tile_tissue(sdata)
    table = sdata.tables["image_tiles_table"]
    uns = table.uns["tile_tissue"]
    assert uns["mask_level"] > 0 and uns["mask_mpp"] <= 16
    # the synthetic tissue blob covers a sizeable part of the slide: thousands of 112 um tiles
    assert 2000 < table.n_obs < 179**2
    assert 0.1 < uns["tissue_fraction"] < 0.9
    b = sdata.shapes["image_tiles"].geometry.bounds.to_numpy()
    assert b.min() >= 0 and b.max() <= 40000 + 224


def test_her2st_tiles_on_tissue_not_glass(her2st, copy_slide):
    for sid in her2st:
        sdata = copy_slide(her2st[sid])
        sp.pp.tile_tissue(sdata, image_key=f"{sid}_image")
        tiles = sdata.shapes[f"{sid}_image_tiles"]
        assert len(tiles) > 50
        # most spot centres fall inside a tile
        spots = np.asarray(sdata.shapes[f"{sid}_spots"].geometry.values)
        tree = shapely.STRtree(np.asarray(tiles.geometry.values))
        hit = np.zeros(len(spots), dtype=bool)
        hit[np.unique(tree.query(spots, predicate="within")[0])] = True
        assert hit.mean() > 0.95, (sid, hit.mean())  # measured 0.98-1.0 (pale stroma of B4 needs the texture cue)
        # no tile at the corners (glass); tiles darker than the corners
        levels = get_pyramid_levels(sdata.images[f"{sid}_image"])
        thumb = np.asarray(levels[-1].data).astype(float)
        h0, w0 = levels[0].shape[1:]
        corners = shapely.points([[0, 0], [w0 - 1, 0], [0, h0 - 1], [w0 - 1, h0 - 1]])
        assert len(tree.query(corners, predicate="within")[0]) == 0
        k = thumb.shape[1] / h0
        table = sdata.tables[f"{sid}_image_tiles_table"]
        ty = np.clip((table.obs["y"] * k).astype(int), 0, thumb.shape[1] - 1)
        tx = np.clip((table.obs["x"] * k).astype(int), 0, thumb.shape[2] - 1)
        tiles_brightness = thumb[:, ty, tx].mean()
        c = 40
        corner_brightness = np.mean([thumb[:, :c, :c].mean(), thumb[:, :c, -c:].mean(), thumb[:, -c:, :c].mean()])
        assert tiles_brightness < corner_brightness - 20, (sid, tiles_brightness, corner_brightness)
        assert f"{sid}_image_tiles" not in her2st[sid].shapes


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"image_key": "nope"}, KeyError, "slide"),
        ({"min_tissue": 1.5}, ValueError, "min_tissue"),
        ({"min_tissue": -0.1}, ValueError, "min_tissue"),
        ({"tile_size": 8}, ValueError, "tile_size"),
        ({"tile_size": 32, "overlap": 32}, ValueError, "overlap"),
        ({"mpp": 0}, ValueError, "mpp"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    sdata = _make(_blob_image(128))
    with pytest.raises(exc, match=match):
        sp.pp.tile_tissue(sdata, **kwargs)
    assert not sdata.shapes and not sdata.tables


def test_existing_key_needs_overwrite():
    sdata = _make(_blob_image(256))
    sp.pp.tile_tissue(sdata, tile_size=32)
    n = len(sdata.shapes["slide_tiles"])
    with pytest.raises(ValueError, match="overwrite=True"):
        sp.pp.tile_tissue(sdata, tile_size=16)
    assert len(sdata.shapes["slide_tiles"]) == n
    sp.pp.tile_tissue(sdata, tile_size=16, overwrite=True)
    assert len(sdata.shapes["slide_tiles"]) > n
    assert sdata.tables["slide_tiles_table"].n_obs == len(sdata.shapes["slide_tiles"])
    with pytest.raises(ValueError, match="images"):
        sp.pp.tile_tissue(sdata, key_added="slide")


def test_no_tissue_raises_with_fraction():
    sdata = _make(np.full((3, 256, 256), 240, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"tissue mask covers 0\.00%"):
        sp.pp.tile_tissue(sdata, tile_size=32)
    assert not sdata.shapes and not sdata.tables


def test_mask_block_averages_a_fine_single_scale_image():
    sdata = _make(_blob_image(2048))  # one level at 0.5 um/px, mask wanted at ~1 um/px: 2x2 block average
    sp.pp.tile_tissue(sdata, tile_size=32)  # 32 px at 0.5 um/px: the mask is made for 16 um tiles
    info = sdata.tables["slide_tiles_table"].uns["tile_tissue"]
    # level 0 block-averaged 2x2: a 1024 x 1024 mask of the 2048 px image, at 1 um/px
    assert info["mask_level"] == 0 and info["mask_factor"] == 2 and info["mask_mpp"] == pytest.approx(1.0)
    assert info["tissue_fraction"] == pytest.approx(np.pi / 16, rel=0.05)

"""Tests of spade_sc.io (read_wsi, read_hest, read_visium) on fixtures the tests write (offline, CPU).

The slides are written here with tifffile from a crop of the her2st section C3 (pyramidal, tiled, JPEG, pixel
size in the TIFF resolution tags) and from the tiny Visium fixture; the HEST folder is written as HEST lays it out.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from scipy import sparse
from shapely.geometry import Point
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import Identity, get_transformation
from torch import nn

import spade_sc as sp
from spade_sc._image import image_levels, level_mpp
from spade_sc.encoders import get_encoder

SID = "C3"
X0, Y0, SIDE = 2000, 2000, 2400  # the crop of C3 written to the fixtures (46 spots, tissue throughout)
MARGIN = 150  # spots kept at least this far (px) inside the crop: their 0.5 um/px patches lie inside it


def _available(backend: str) -> bool:
    try:
        __import__(backend)
    except (ImportError, OSError):
        return False
    return True


#: the slide backends installed here (openslide needs openslide-python + openslide-bin)
BACKENDS = [b for b in ("tiffslide", "openslide") if _available(b)]


# ---------------------------------------------------------------------------------------------------------------------
# fixture writers
# ---------------------------------------------------------------------------------------------------------------------
def write_pyramid(path: Path, rgb: np.ndarray, mpp: float | None, *, n_levels: int = 4, tile: int = 256) -> None:
    """A tiled pyramidal TIFF (levels as successive pages, 2x apart, box-filtered) with JPEG tiles."""
    levels = [rgb]
    img = Image.fromarray(rgb)
    for k in range(1, n_levels):
        size = (rgb.shape[1] // 2**k, rgb.shape[0] // 2**k)
        levels.append(np.asarray(img.resize(size, Image.Resampling.BOX)))
    with tifffile.TiffWriter(path) as tw:
        for k, lv in enumerate(levels):
            fy, fx = rgb.shape[0] / lv.shape[0], rgb.shape[1] / lv.shape[1]
            extra = {} if mpp is None else {"resolution": (1e4 / (mpp * fx), 1e4 / (mpp * fy))}
            tw.write(
                lv,
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                resolutionunit="CENTIMETER" if mpp is not None else None,
                subfiletype=0 if k == 0 else 1,
                metadata=None,
                **extra,
            )


class _Mean(nn.Module):
    """Features = mean colour of the patch (in 0..1 with mean=0, std=1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def mean_encoder():
    return get_encoder(_Mean(), input_size=32, mean=(0, 0, 0), std=(1, 1, 1), name="mean", device="cpu")


@pytest.fixture(scope="module")
def encoder(one_torch_thread):
    return get_encoder("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="module")
def c3(data_root):
    """The her2st section C3 through the her2st loader."""
    return sp.datasets.her2st(data_root / "her2st", sections=[SID])[SID]


@pytest.fixture(scope="module")
def crop(c3):
    """(RGB crop (h, w, 3) of the original JPEG, its pixel size, the loader's table of the spots inside it)."""
    lv0 = image_levels(c3.images[f"{SID}_image"])[0]
    rgb = np.moveaxis(np.asarray(lv0.data[:, Y0 : Y0 + SIDE, X0 : X0 + SIDE]), 0, -1)
    table = c3.tables["table"]
    xy = table.obsm["spatial"]
    inside = (xy[:, 0] > X0 + MARGIN) & (xy[:, 0] < X0 + SIDE - MARGIN)
    inside &= (xy[:, 1] > Y0 + MARGIN) & (xy[:, 1] < Y0 + SIDE - MARGIN)
    return rgb, sp.pp.pixel_size(c3), table[inside].copy()


@pytest.fixture(scope="module")
def tiff(crop, tmp_path_factory) -> Path:
    rgb, mpp, _ = crop
    path = tmp_path_factory.mktemp("wsi") / "c3_crop.tif"
    write_pyramid(path, rgb, mpp)
    return path


@pytest.fixture(scope="module")
def ref_features(c3, crop, encoder):
    """Features of the crop's spots from the her2st loader's SpatialData."""
    _, _, sub = crop
    ids = sub.obs["spot_id"].to_numpy()
    ref = SpatialData(
        images={"img": c3.images[f"{SID}_image"]},
        shapes={"spots": c3.shapes[f"{SID}_spots"].loc[ids]},
        tables={"table": _table(sub, "spots")},
    )
    ref.attrs.update(c3.attrs)
    return sp.pp.image_features(ref, encoder=encoder, inplace=False, progress=False)


def _table(sub: ad.AnnData, region: str) -> ad.AnnData:
    t = sub.copy()
    t.uns.pop("spatialdata_attrs", None)
    t.obs["region"] = pd.Categorical([region] * t.n_obs)
    return TableModel.parse(t, region=region, region_key="region", instance_key="spot_id")


def _with_spots(sdata: SpatialData, cs: str, sub: ad.AnnData, radius: np.ndarray, offset=(X0, Y0)) -> SpatialData:
    """Add the crop's spots (shifted into the crop's pixels) and their table to a slide read from the TIFF."""
    xy = sub.obsm["spatial"] - np.asarray(offset, dtype=float)
    circles = pd.DataFrame({"radius": radius}, index=sub.obs["spot_id"].to_numpy())
    import geopandas as gpd

    gdf = gpd.GeoDataFrame(circles, geometry=[Point(x, y) for x, y in xy])
    sdata.shapes["spots"] = ShapesModel.parse(gdf, transformations={cs: Identity()})
    sdata.tables["table"] = _table(sub, "spots")
    return sdata


def _corr_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)])


# ---------------------------------------------------------------------------------------------------------------------
# read_wsi
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_wsi_levels_pixel_size_patch(tiff, crop, backend):
    rgb, mpp, _ = crop
    sdata = sp.io.read_wsi(tiff, backend=backend)
    assert list(sdata.images) == ["c3_crop_image"]
    image = sdata.images["c3_crop_image"]
    levels = image_levels(image)
    assert [lv.shape for lv in levels] == [(3, SIDE >> k, SIDE >> k) for k in range(4)]
    assert all(lv.dtype == np.uint8 and hasattr(lv.data, "dask") for lv in levels)
    assert all(lv.data.chunksize[1] < SIDE for lv in levels[:2])  # lazy chunks, never the whole level
    assert list(levels[0].coords["c"].values) == ["r", "g", "b"]
    assert sp.pp.pixel_size(sdata) == pytest.approx(mpp, rel=1e-6)
    assert level_mpp(levels, sp.pp.pixel_size(sdata)) == pytest.approx([mpp * 2**k for k in range(4)])
    # each level carries its scale to level 0 in the slide's coordinate system
    for k, name in enumerate(image.keys()):
        tf = get_transformation(image[name]["image"], to_coordinate_system="c3_crop")
        m = tf.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        assert np.diag(m)[:2] == pytest.approx([2**k, 2**k])
    info = sdata.attrs["spade_sc"]["wsi"]
    assert info["backend"] == backend and info["file_mpp"] == pytest.approx(mpp, rel=1e-6)
    assert info["level_shapes"][3] == [SIDE // 8, SIDE // 8]
    # a patch equals the same patch of the original JPEG, up to the JPEG error of the TIFF's tiles
    patch = np.asarray(levels[0].data[:, 700:956, 500:756]).astype(float)
    orig = np.moveaxis(rgb[700:956, 500:756], -1, 0).astype(float)
    assert np.abs(patch - orig).mean() < 2.0
    coarse = np.asarray(levels[2].data[:, 100:140, 100:140]).astype(float)
    orig_coarse = np.moveaxis(rgb[400:560, 400:560], -1, 0).reshape(3, 40, 4, 40, 4).mean((2, 4))
    assert np.abs(coarse - orig_coarse).mean() < 8.0  # JPEG error grows with the detail per pixel
    assert np.corrcoef(coarse.ravel(), orig_coarse.ravel())[0, 1] > 0.98


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_wsi_features_match_her2st_loader(tiff, crop, ref_features, encoder, backend):
    _, mpp, sub = crop
    sdata = sp.io.read_wsi(tiff, backend=backend, name="slide")
    _with_spots(sdata, "slide", sub, np.full(sub.n_obs, 50.0 / mpp))
    feats = sp.pp.image_features(sdata, encoder=encoder, image_key="slide_image", inplace=False, progress=False)
    corr = _corr_rows(feats, ref_features)
    assert corr.min() > 0.97, corr.min()
    assert np.median(corr) > 0.99


def test_tile_and_embed_straight_from_tiff(tiff, crop, mean_encoder):
    rgb, mpp, _ = crop
    sdata = sp.io.read_wsi(tiff, name="slide")
    assert not sdata.is_backed()  # no zarr in between
    sp.pp.tile_tissue(sdata, mpp=2.0, tile_size=64)
    params = sdata.tables["slide_image_tiles_table"].uns["tile_tissue"]
    assert params["mask_level"] > 0  # the tissue mask came from a coarse level of the file's own pyramid
    n = sdata.tables["slide_image_tiles_table"].n_obs
    assert n > 20
    sp.pp.image_features(
        sdata, encoder=mean_encoder, shapes_key="slide_image_tiles", mpp=2.0, patch_size=64, progress=False
    )
    table = sdata.tables["slide_image_tiles_table"]
    feats = table.obsm["X_mean"]
    assert feats.shape == (n, 3) and np.isfinite(feats).all()
    # the feature of a tile is the mean colour of the original image under it (up to JPEG and resampling error)
    side = round(64 * 2.0 / mpp)
    x0 = np.round(table.obs["x"].to_numpy() - side / 2).astype(int)
    y0 = np.round(table.obs["y"].to_numpy() - side / 2).astype(int)
    inside = np.flatnonzero((np.minimum(x0, y0) >= 0) & (np.maximum(x0, y0) + side <= SIDE))
    assert len(inside) >= 10
    for i in inside[:: max(1, len(inside) // 8)]:
        window = rgb[y0[i] : y0[i] + side, x0[i] : x0[i] + side].reshape(-1, 3).mean(0) / 255
        assert feats[i] == pytest.approx(window, abs=0.02)


def test_patches_on_the_pixel_grid_are_the_pixels(tiff):
    """A patch at the level's own pixel size, aligned to its pixel grid, is a copy of the level's pixels (the
    resampler's copy path), equal to what its arithmetic gives on the same window (a float window takes that path)."""
    from spade_sc._image import LevelReader, PatchSampler, _separable, _taps

    level = image_levels(sp.io.read_wsi(tiff, name="slide").images["slide_image"])[0]
    reader = LevelReader(level.data, [0, 1, 2], 1.0)
    centres = np.array([[300.0, 400.0], [1000.0, 517.0], [5.0, 7.0], [300.5, 400.0]])  # the third: partly outside
    patches = PatchSampler(reader, 64, 64, 64)(centres)
    assert np.array_equal(patches[0], np.asarray(level.data[:, 368:432, 268:332]))
    assert (patches[2][:, :25, :] == 255).all()  # outside the image: white
    for (cx, cy), patch in zip(centres, patches, strict=True):
        y0, y1, iy, wy = _taps(cy - 32, 1.0, 64)
        x0, x1, ix, wx = _taps(cx - 32, 1.0, 64)
        window = reader.read([(y0, y1, x0, x1)])[0]
        assert window.dtype == np.float32
        assert np.array_equal(patch, np.clip(np.rint(_separable(window, iy, wy, ix, wx)), 0, 255))


def test_read_wsi_mpp_argument_and_mismatch(tiff, crop):
    _, mpp, _ = crop
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdata = sp.io.read_wsi(tiff, mpp=mpp * 1.03)  # within 5 %: no warning
    assert sp.pp.pixel_size(sdata) == pytest.approx(mpp * 1.03)
    with pytest.warns(UserWarning, match="differs by 20%"):
        sdata = sp.io.read_wsi(tiff, mpp=mpp * 1.2)
    assert sp.pp.pixel_size(sdata) == pytest.approx(mpp * 1.2)
    assert sdata.attrs["spade_sc"]["wsi"]["mpp_source"] == "mpp argument"


def test_read_wsi_pixel_size_sources(tmp_path, crop):
    rgb = crop[0][:512, :512]
    # no pixel size in the file and none given: a clear error naming the file and mpp=
    write_pyramid(tmp_path / "nompp.tif", rgb, None, n_levels=2)
    with pytest.raises(ValueError, match=r"nompp\.tif records no pixel size.*mpp="):
        sp.io.read_wsi(tmp_path / "nompp.tif")
    assert sp.pp.pixel_size(sp.io.read_wsi(tmp_path / "nompp.tif", mpp=0.5)) == 0.5
    # a 72 dpi default is not a pixel size
    tifffile.imwrite(tmp_path / "dpi72.tif", rgb, tile=(256, 256), resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(ValueError, match="records no pixel size"):
        sp.io.read_wsi(tmp_path / "dpi72.tif")
    # OME-TIFF: PhysicalSizeX / Y (here in nm), pyramid in SubIFDs
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 250.0}
        meta["PhysicalSizeYUnit"] = "nm"
        tw.write(rgb, tile=(256, 256), photometric="rgb", subifds=1, metadata=meta, compression="jpeg")
        tw.write(rgb[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1, compression="jpeg")
    sdata = sp.io.read_wsi(path, backend="tiffslide")
    assert list(sdata.images) == ["slide_image"]  # .ome.tif stripped from the name
    assert sp.pp.pixel_size(sdata) == pytest.approx(0.25)
    assert [lv.shape[1] for lv in image_levels(sdata.images["slide_image"])] == [512, 256]


def test_read_wsi_bad_files(tmp_path, tiff):
    with pytest.raises(FileNotFoundError, match=r"nope\.svs does not exist"):
        sp.io.read_wsi(tmp_path / "nope.svs")
    text = tmp_path / "notes.tif"
    text.write_text("not a slide\n" * 10)
    with pytest.raises(ValueError, match=r"notes\.tif is not a slide image"):
        sp.io.read_wsi(text)
    truncated = tmp_path / "truncated.tif"
    data = tiff.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for backend in ("auto", *BACKENDS):
        with pytest.raises(ValueError, match=r"truncated\.tif"):
            sp.io.read_wsi(truncated, backend=backend)
    with pytest.raises(ValueError, match="backend="):
        sp.io.read_wsi(tiff, backend="pillow")
    with pytest.raises(ValueError, match="name="):
        sp.io.read_wsi(tiff, name="a/b")
    with pytest.raises(ValueError, match="mpp must be a positive"):
        sp.io.read_wsi(tiff, mpp=-1)
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, np.zeros((300, 300), np.uint8), tile=(256, 256), resolution=(2e4, 2e4), resolutionunit=3)
    with pytest.raises(ValueError, match=r"gray\.tif .*single-channel"):
        sp.io.read_wsi(gray)


def test_read_wsi_plain_jpeg(tmp_path, crop, mean_encoder):
    rgb = crop[0][:600, :500]
    path = tmp_path / "plain.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    with pytest.raises(ValueError, match=r"plain\.jpg records no pixel size.*mpp="):
        sp.io.read_wsi(path)
    for backend in ("auto", *BACKENDS):
        sdata = sp.io.read_wsi(path, mpp=0.7, backend=backend)
        levels = image_levels(sdata.images["plain_image"])
        assert len(levels) == 1 and levels[0].shape == (3, 600, 500)
        assert np.abs(np.asarray(levels[0].data).astype(float) - np.moveaxis(rgb, -1, 0)).mean() < 3


def test_read_wsi_single_level_huge_tiff_is_lazy(tmp_path):
    # 12,000 x 256 px: wider than the warning threshold, tiled, one level
    path = tmp_path / "flat.tif"
    img = np.full((256, 12_000, 3), 230, np.uint8)
    img[:, ::7] = 90
    tifffile.imwrite(path, img, tile=(256, 256), compression="jpeg", resolution=(2e4, 2e4), resolutionunit=3)
    for backend in BACKENDS:
        with pytest.warns(UserWarning, match="has no pyramid"):
            sdata = sp.io.read_wsi(path, backend=backend)
        (level,) = image_levels(sdata.images["flat_image"])
        assert level.shape == (3, 256, 12_000)
        assert max(level.data.chunksize) <= 1024  # read chunk by chunk, never whole
        assert sp.pp.pixel_size(sdata) == pytest.approx(0.5)
    # an uncompressed contiguous TIFF (one strip for tifffile) is memory-mapped, not read whole
    tifffile.imwrite(tmp_path / "raw.tif", img, resolution=(2e4, 2e4), resolutionunit=3)
    with pytest.warns(UserWarning, match="has no pyramid"):
        sdata = sp.io.read_wsi(tmp_path / "raw.tif", backend="tiffslide")
    (level,) = image_levels(sdata.images["raw_image"])
    assert max(level.data.chunksize) <= 1024
    assert np.array_equal(np.asarray(level.data[:, :5, 10:20]), np.moveaxis(img[:5, 10:20], -1, 0))


def test_read_wsi_rgba_and_16bit(tmp_path, crop, mean_encoder):
    rgb = crop[0][:512, :512]
    rgba = np.concatenate([rgb, np.full((512, 512, 1), 255, np.uint8)], axis=-1)
    tifffile.imwrite(
        tmp_path / "rgba.tif", rgba, tile=(256, 256), photometric="rgb", extrasamples=[2],
        resolution=(2e4, 2e4), resolutionunit=3,
    )  # fmt: skip
    tifffile.imwrite(
        tmp_path / "deep.tif", rgb.astype(np.uint16) * 257, tile=(256, 256), photometric="rgb",
        resolution=(2e4, 2e4), resolutionunit=3,
    )  # fmt: skip
    feats = {}
    for name in ("rgba", "deep"):
        sdata = sp.io.read_wsi(tmp_path / f"{name}.tif", backend="tiffslide")
        level = image_levels(sdata.images[f"{name}_image"])[0]
        assert level.shape[0] == (4 if name == "rgba" else 3)
        assert level.dtype == (np.uint8 if name == "rgba" else np.uint16)
        xy = np.array([[128.0, 128.0], [300.0, 200.0], [400.0, 400.0]])
        sub = ad.AnnData(obs=pd.DataFrame({"spot_id": np.arange(3)}, index=list("abc")))
        sub.obsm["spatial"] = xy
        _with_spots(sdata, name, sub, np.full(3, 20.0), offset=(0, 0))
        feats[name] = sp.pp.image_features(sdata, encoder=mean_encoder, mpp=1.0, inplace=False, progress=False)
    # the alpha channel is dropped and 16-bit values rescaled: both give the colours of the 8-bit RGB image
    assert feats["rgba"] == pytest.approx(feats["deep"], abs=1e-3)
    if "openslide" not in BACKENDS:
        return
    # the openslide backend composites RGBA onto white and gives 8-bit RGB
    level = image_levels(sp.io.read_wsi(tmp_path / "rgba.tif", backend="openslide").images["rgba_image"])[0]
    assert level.shape[0] == 3 and level.dtype == np.uint8


# ---------------------------------------------------------------------------------------------------------------------
# read_hest
# ---------------------------------------------------------------------------------------------------------------------
def write_hest_sample(root: Path, sid: str, rgb: np.ndarray, mpp: float, sub: ad.AnnData, **meta_extra) -> None:
    """One HEST-1k sample as HEST lays it out: st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json."""
    for d in ("st", "wsis", "metadata", "patches"):
        (root / d).mkdir(parents=True, exist_ok=True)
    xy = sub.obsm["spatial"] - np.array([X0, Y0], dtype=float)
    obs = pd.DataFrame(
        {
            "in_tissue": 1,
            "array_row": sub.obs["array_y"].to_numpy(),
            "array_col": sub.obs["array_x"].to_numpy(),
            "pxl_col_in_fullres": xy[:, 0],
            "pxl_row_in_fullres": xy[:, 1],
        },
        index=[f"{x}x{y}" for x, y in zip(sub.obs["array_x"], sub.obs["array_y"], strict=True)],
    )
    adata = ad.AnnData(X=sparse.csr_matrix(sub.X, dtype=np.float32), obs=obs, var=pd.DataFrame(index=sub.var_names))
    adata.obsm["spatial"] = xy
    adata.write_h5ad(root / "st" / f"{sid}.h5ad")
    write_pyramid(root / "wsis" / f"{sid}.tif", rgb, mpp)
    meta = {
        "dataset_title": "her2st crop written by the tests",
        "id": sid,
        "organ": "Breast",
        "species": "Homo sapiens",
        "oncotree_code": "IDC",
        "st_technology": "Spatial Transcriptomics",
        "spot_diameter": 100.0,
        "inter_spot_dist": 200.0,
        "pixel_size_um_embedded": mpp,
        "pixel_size_um_estimated": mpp,
        "magnification": "20x",
        "fullres_px_width": rgb.shape[1],
        "fullres_px_height": rgb.shape[0],
        "spots_under_tissue": adata.n_obs,
    }
    meta.update(meta_extra)
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def hest_root(crop, tmp_path_factory) -> Path:
    rgb, mpp, sub = crop
    root = tmp_path_factory.mktemp("hest")
    write_hest_sample(root, "SPA1", rgb, mpp, sub)
    # a second, smaller sample of another organ (a 1024 px corner of the crop, its spots only)
    xy = sub.obsm["spatial"] - np.array([X0, Y0])
    small = sub[(xy < 1024 - 60).all(1)].copy()
    write_hest_sample(root, "SPA2", rgb[:1024, :1024], mpp, small, organ="Bowel", st_technology="Visium")
    return root


def test_read_hest_matches_her2st_loader(hest_root, crop, ref_features, encoder):
    _, mpp, sub = crop
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cohort = sp.io.read_hest(hest_root)
    assert list(cohort) == ["SPA1", "SPA2"]
    sdata = cohort["SPA1"]
    assert set(sdata.images) == {"SPA1_image"} and set(sdata.shapes) == {"SPA1_spots"}
    assert sp.pp.pixel_size(sdata) == pytest.approx(mpp)
    table = sdata.tables["table"]
    assert table.n_obs == sub.n_obs and sparse.issparse(table.X)
    assert (table.X != sparse.csr_matrix(sub.X, dtype=np.float32)).nnz == 0  # same spots, same counts
    assert list(table.var_names) == list(sub.var_names)
    assert table.obs["organ"].iloc[0] == "Breast" and isinstance(table.obs["organ"].dtype, pd.CategoricalDtype)
    assert table.obs_names[0].startswith("SPA1_")
    np.testing.assert_allclose(table.obsm["spatial"], sub.obsm["spatial"] - [X0, Y0])
    circles = sdata.shapes["SPA1_spots"]
    assert circles["radius"].to_numpy() == pytest.approx(50.0 / mpp)
    attrs = sdata.attrs["spade_sc"]
    assert attrs["hest"]["st_technology"] == "Spatial Transcriptomics"
    assert attrs["slide"]["organ"] == "Breast" and attrs["slide"]["sample"] == "SPA1"
    assert len(image_levels(sdata.images["SPA1_image"])) == 4
    feats = sp.pp.image_features(sdata, encoder=encoder, inplace=False, progress=False)
    # HEST table rows are in the h5ad's order, which is the loader's order of the crop's spots
    corr = _corr_rows(feats, ref_features)
    assert corr.min() > 0.97, corr.min()
    # organ in obs across samples (what tl.fit(tissue_key="organ") reads)
    organs = {sid: s.tables["table"].obs["organ"].iloc[0] for sid, s in cohort.items()}
    assert organs == {"SPA1": "Breast", "SPA2": "Bowel"}


def test_read_hest_select_and_filter(hest_root):
    assert list(sp.io.read_hest(hest_root, "SPA2")) == ["SPA2"]
    assert list(sp.io.read_hest(hest_root, metadata_filter={"organ": "bowel"})) == ["SPA2"]
    assert list(sp.io.read_hest(hest_root, metadata_filter={"st_technology": ["Visium", "Xenium"]})) == ["SPA2"]
    assert list(sp.io.read_hest(hest_root, metadata_filter=lambda m: m["spots_under_tissue"] > 30)) == ["SPA1"]
    assert sp.io.read_hest(hest_root, metadata_filter={"organ": "Brain"}) == {}
    with pytest.raises(ValueError, match=r"Unknown HEST sample id\(s\) \['NOPE'\].*\['SPA1', 'SPA2'\]"):
        sp.io.read_hest(hest_root, ["SPA1", "NOPE"])
    with pytest.raises(ValueError, match="fields present"):
        sp.io.read_hest(hest_root, metadata_filter={"organs": "Breast"})


def test_read_hest_bad_input(hest_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sp.io.read_hest(tmp_path / "nope")
    (tmp_path / "st").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing the folder\(s\) \['wsis', 'metadata'\]"):
        sp.io.read_hest(tmp_path)
    root = tmp_path / "hest"
    shutil.copytree(hest_root, root)
    # a sample whose slide is missing is skipped with one warning, never loaded half
    (root / "wsis" / "SPA2.tif").unlink()
    with pytest.warns(UserWarning, match=r"'SPA2' .* skipped: its slide \(wsis/\) is missing"):
        cohort = sp.io.read_hest(root)
    assert list(cohort) == ["SPA1"]
    (root / "st" / "SPA2.h5ad").unlink()
    (root / "metadata" / "SPA2.json").unlink()
    # metadata without any pixel size
    meta_path = root / "metadata" / "SPA1.json"
    meta = json.loads(meta_path.read_text())
    bad = {k: v for k, v in meta.items() if not k.startswith("pixel_size")}
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"SPA1\.json has no pixel size"):
        sp.io.read_hest(root)
    meta_path.write_text(json.dumps(meta))
    # obsm["spatial"] missing, then outside the slide
    h5 = root / "st" / "SPA1.h5ad"
    adata = ad.read_h5ad(h5)
    xy = adata.obsm.pop("spatial")
    adata.write_h5ad(h5)
    with pytest.raises(ValueError, match=r"SPA1\.h5ad has no obsm\['spatial'\]"):
        sp.io.read_hest(root)
    adata.obsm["spatial"] = xy * 4  # e.g. coordinates of another resolution
    adata.write_h5ad(h5)
    with pytest.raises(ValueError, match=r"spots of .*SPA1\.h5ad fall outside the slide"):
        sp.io.read_hest(root)


# ---------------------------------------------------------------------------------------------------------------------
# read_visium
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def visium_fullres(data_root, tmp_path_factory) -> Path:
    """A full-resolution TIFF for the tiny Visium fixture: its lowres image upsampled, written tile by tile."""
    folder = data_root / "visium_heart_tiny"
    factors = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    low = np.asarray(Image.open(folder / "spatial" / "tissue_lowres_image.png").convert("RGB"))
    scale = factors["tissue_lowres_scalef"]
    height, width = int(low.shape[0] / scale) // 1024 * 1024, int(low.shape[1] / scale) // 1024 * 1024
    mpp = 55.0 / factors["spot_diameter_fullres"]
    path = tmp_path_factory.mktemp("visium") / "fullres.tif"
    tile = 512

    def tiles(h: int, w: int, factor: int):
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                yy = np.minimum(((np.arange(y, y + tile) + 0.5) * factor * scale).astype(int), low.shape[0] - 1)
                xx = np.minimum(((np.arange(x, x + tile) + 0.5) * factor * scale).astype(int), low.shape[1] - 1)
                yield low[yy[:, None], xx[None, :]]

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k in range(3):
            f = 4**k
            h, w = height // f, width // f
            tw.write(
                tiles(h, w, f), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                photometric="rgb", resolution=(1e4 / (mpp * f),) * 2, resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1,
            )  # fmt: skip
    return path


def test_read_visium_fullres(data_root, visium_fullres, mean_encoder):
    folder = data_root / "visium_heart_tiny"
    sdata = sp.io.read_visium(folder, fullres_image_file=visium_fullres)
    key = "visium_heart_tiny_full_image"
    assert set(sdata.images) == {key, "visium_heart_tiny_hires_image", "visium_heart_tiny_lowres_image"}
    levels = image_levels(sdata.images[key])
    assert len(levels) == 3 and levels[0].shape[1] > 11_000
    assert levels[1].shape[1] == levels[0].shape[1] // 4  # the file's own levels, 4x apart
    mpp = 55.0 / 89.42751063343188
    assert sp.pp.pixel_size(sdata, key) == pytest.approx(mpp)
    assert sp.pp.pixel_size(sdata, "visium_heart_tiny_lowres_image") == pytest.approx(mpp / 0.045004502, rel=1e-3)
    assert sdata.attrs["spade_sc"]["wsi"]["file_mpp"] == pytest.approx(mpp, rel=1e-4)
    # patches from the full-resolution image and from the lowres image show the same colours
    full = sp.pp.image_features(sdata, encoder=mean_encoder, image_key=key, mpp=4.0, inplace=False, progress=False)
    low = sp.pp.image_features(
        sdata, encoder=mean_encoder, image_key="visium_heart_tiny_lowres_image", mpp=4.0, inplace=False,
        progress=False,
    )  # fmt: skip
    assert full.shape == (100, 3)
    assert np.corrcoef(full.ravel(), low.ravel())[0, 1] > 0.95
    # without the full-resolution image: what datasets.visium gives (its alias)
    plain = sp.datasets.visium(folder)
    assert set(plain.images) == {"visium_heart_tiny_hires_image", "visium_heart_tiny_lowres_image"}
    assert sp.pp.pixel_size(plain, "visium_heart_tiny_lowres_image") == pytest.approx(mpp / 0.045004502, rel=1e-3)


def test_read_visium_bad_fullres(data_root, tmp_path, crop):
    folder = data_root / "visium_heart_tiny"
    with pytest.raises(FileNotFoundError, match=r"full-resolution image .*missing\.tif does not exist"):
        sp.io.read_visium(folder, fullres_image_file=tmp_path / "missing.tif")
    small = tmp_path / "small.tif"
    write_pyramid(small, crop[0][:1024, :1024], 55.0 / 89.42751063343188, n_levels=2)
    with pytest.raises(ValueError, match=r"100 of 100 spots fall outside the full-resolution image .*small\.tif"):
        sp.io.read_visium(folder, fullres_image_file=small)


# ---------------------------------------------------------------------------------------------------------------------
# wsidata / LazySlide
# ---------------------------------------------------------------------------------------------------------------------
def test_wsidata_slide_works_downstream(tiff, crop, mean_encoder):
    wsidata = pytest.importorskip("wsidata")
    from wsidata import TileSpec
    from wsidata.io import add_tiles

    _, mpp, _ = crop
    # save_images=True keeps the slide among the elements (wsidata otherwise hides it from sdata["wsi"])
    wsi = wsidata.open_wsi(str(tiff), store=None, attach_images=True, save_images=True)
    assert isinstance(wsi, SpatialData)
    assert wsi.properties.mpp == pytest.approx(mpp)
    # wsidata keeps its pixel size in wsi.properties; spade_sc reads it once recorded (or through image_mpp=)
    sp.pp.set_pixel_size(wsi, wsi.properties.mpp)
    sp.pp.tile_tissue(wsi, image_key="wsi", mpp=2.0, tile_size=64)
    sp.pp.image_features(wsi, encoder=mean_encoder, shapes_key="wsi_tiles", mpp=2.0, patch_size=64, progress=False)
    ours = sp.io.read_wsi(tiff, name="slide")
    sp.pp.tile_tissue(ours, mpp=2.0, tile_size=64)
    sp.pp.image_features(
        ours, encoder=mean_encoder, shapes_key="slide_image_tiles", mpp=2.0, patch_size=64, progress=False
    )
    a, b = wsi.tables["wsi_tiles_table"], ours.tables["slide_image_tiles_table"]
    assert a.n_obs == b.n_obs
    np.testing.assert_allclose(a.obsm["X_mean"], b.obsm["X_mean"], atol=2e-3)
    # tiles as LazySlide writes them (wsidata.io.add_tiles: level-0 boxes in "tiles"), with a table annotating them
    spec = TileSpec.from_wsidata(wsi, tile_px=64, mpp=2.0)
    xy = b.obsm["spatial"] - spec.base_width / 2
    add_tiles(wsi, "tiles", xy, spec, np.zeros(len(xy), int), transformations={"global": Identity()})
    obs = pd.DataFrame({"tile_id": np.arange(len(xy)), "library_id": pd.Categorical(["tiles"] * len(xy))})
    obs.index = obs.index.astype(str)
    wsi.tables["tiles_table"] = TableModel.parse(
        ad.AnnData(obs=obs), region="tiles", region_key="library_id", instance_key="tile_id"
    )
    feats = sp.pp.image_features(
        wsi, encoder=mean_encoder, shapes_key="tiles", mpp=2.0, patch_size=64, inplace=False, progress=False
    )
    np.testing.assert_allclose(feats, b.obsm["X_mean"], atol=5e-3)


def test_wsidata_slide_embed_slide_embeddings_and_attention(tiff, crop, mean_encoder, one_torch_thread, tmp_path):
    """tl.embed, tl.slide_embeddings, tl.attention and pl.attention on slides opened by wsidata.open_wsi."""
    wsidata = pytest.importorskip("wsidata")
    from matplotlib.image import imread

    _, mpp, sub = crop
    # a tiny SPADE model on the crop's spots (mean-colour features, one expert, one epoch)
    train = sp.io.read_wsi(tiff, name="slide")
    _with_spots(train, "slide", sub, np.full(sub.n_obs, 50.0 / mpp))
    model = sp.tl.fit(
        train,
        encoder=mean_encoder,
        feature_kwargs={"mpp": 2.0, "patch_size": 64, "num_workers": 0},
        n_experts=1,
        n_top_genes=20,
        max_epochs=1,
        progress=False,
    )
    torch.set_num_threads(1)
    slides = {}
    for sid in ("a", "b"):
        wsi = wsidata.open_wsi(str(tiff), store=None, attach_images=True, save_images=True)
        sp.pp.set_pixel_size(wsi, wsi.properties.mpp)
        sp.pp.tile_tissue(wsi, image_key="wsi", mpp=2.0, tile_size=64)
        # the model's encoder is a test nn.Module that cannot be rebuilt from its spec: features computed here
        sp.pp.image_features(wsi, encoder=mean_encoder, shapes_key="wsi_tiles", mpp=2.0, patch_size=64, progress=False)
        slides[sid] = wsi
    # tl.embed on the tiles table of a wsidata slide
    sp.tl.embed(slides["a"], model, table_key="wsi_tiles_table", progress=False)
    tiles = slides["a"].tables["wsi_tiles_table"]
    assert tiles.obsm["X_spade"].shape[0] == tiles.n_obs > 20 and np.isfinite(tiles.obsm["X_spade"]).all()
    assert tiles.obsm["X_mean"].shape == (tiles.n_obs, 3)
    # tl.slide_embeddings over both (slide b is embedded here, slide a's tiles are pooled as they are)
    labels = pd.DataFrame({"group": ["x", "y"]}, index=["a", "b"])
    adata = sp.tl.slide_embeddings(slides, model, labels=labels, progress=False)
    assert list(adata.obs_names) == ["a", "b"]
    np.testing.assert_allclose(adata.obsm["X_spade"][0], tiles.obsm["X_spade"].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adata.obsm["X_spade"][0], adata.obsm["X_spade"][1], atol=1e-4)  # the same slide
    # MIL attention over the tiles, and its heatmap over the wsidata image
    result = sp.tl.train_mil(
        slides, label_key="group", labels=adata, folds=None, max_epochs=1, hidden=16, attention_dim=8
    )
    sp.tl.attention(slides["a"], result.model)
    assert tiles.obs["spade_attention_pct"].between(0, 1).all()
    heat, bare = tmp_path / "heat.png", tmp_path / "bare.png"
    sp.pl.attention(slides["a"], threshold=0.0, show=False, save=heat)
    sp.pl.attention(slides["a"], threshold=1.0, show=False, save=bare)
    a, b = imread(heat)[..., :3], imread(bare)[..., :3]
    assert a.shape == b.shape and (np.abs(a - b).max(-1) > 0.05).mean() > 0.02
    # LazySlide's own tiles (wsidata.io.add_tiles: level-0 boxes in "tiles") embedded, attended and drawn
    from wsidata import TileSpec
    from wsidata.io import add_tiles

    wsi = slides["b"]
    spec = TileSpec.from_wsidata(wsi, tile_px=64, mpp=2.0)
    xy = wsi.tables["wsi_tiles_table"].obsm["spatial"] - spec.base_width / 2
    add_tiles(wsi, "tiles", xy, spec, np.zeros(len(xy), int), transformations={"global": Identity()})
    obs = pd.DataFrame({"tile_id": np.arange(len(xy)), "library_id": pd.Categorical(["tiles"] * len(xy))})
    obs.index = obs.index.astype(str)
    wsi.tables["tiles_table"] = TableModel.parse(
        ad.AnnData(obs=obs), region="tiles", region_key="library_id", instance_key="tile_id"
    )
    sp.pp.image_features(wsi, encoder=mean_encoder, shapes_key="tiles", mpp=2.0, patch_size=64, progress=False)
    sp.tl.embed(wsi, model, shapes_key="tiles", table_key="tiles_table", progress=False)
    lazy = wsi.tables["tiles_table"]
    np.testing.assert_allclose(lazy.obsm["X_spade"], wsi.tables["wsi_tiles_table"].obsm["X_spade"], atol=5e-3)
    sp.tl.attention(wsi, result.model, tiles_key="tiles")
    assert lazy.obs["spade_attention_pct"].between(0, 1).all()
    sp.pl.attention(wsi, tiles_key="tiles", image_key="wsi", threshold=0.0, show=False)
    import matplotlib.pyplot as plt

    plt.close("all")


# ---------------------------------------------------------------------------------------------------------------------
# Visium HD
# ---------------------------------------------------------------------------------------------------------------------
def _write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> None:
    """A count matrix as Space Ranger writes filtered_feature_bc_matrix.h5 (CSC, genes x barcodes)."""
    import h5py

    x = sparse.csc_matrix(counts.T)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"], m["indices"] = x.data.astype(np.int32), x.indices.astype(np.int64)
        m["indptr"], m["shape"] = x.indptr.astype(np.int64), np.array(x.shape, dtype=np.int32)
        ft = m.create_group("features")
        ft["id"] = ft["name"] = np.array(genes, dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        ft["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
        ft["_all_tag_keys"] = np.array([b"genome"])


def write_visium_hd(root: Path, tiff: Path, mpp: float, bin_size: int = 16, n: int = 8, start: float = 400.0) -> None:
    """A Visium HD outs/ folder (feature_slice.h5, one bin size, the TIFF as microscope image) as Space Ranger lays
    it out: an n x n grid of bins from ``start`` px."""
    import h5py

    root.mkdir(parents=True)
    layout = {"file_format": "1.0", "transform": np.eye(3).ravel().tolist()}
    with h5py.File(root / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps(layout)})
    bins = root / "binned_outputs" / f"square_{bin_size:03d}um"
    (bins / "spatial").mkdir(parents=True)
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    barcodes = [f"s_{bin_size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
    counts = np.random.default_rng(0).poisson(3, size=(len(barcodes), 12))
    _write_10x_h5(bins / "filtered_feature_bc_matrix.h5", counts, barcodes, [f"g{i}" for i in range(12)])
    factors = {
        "bin_size_um": float(bin_size),
        "spot_diameter_fullres": bin_size / mpp,
        "microns_per_pixel": mpp,
        "tissue_hires_scalef": 0.2,
        "tissue_lowres_scalef": 0.05,
    }
    (bins / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
    side = bin_size / mpp
    positions = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": start + rows * side,
            "pxl_col_in_fullres": start + cols * side,
        }
    )
    positions.to_parquet(bins / "spatial" / "tissue_positions.parquet")
    (root / "microscope_image").mkdir()
    shutil.copy(tiff, root / "microscope_image" / "image.tif")


@pytest.mark.filterwarnings("ignore:No image path found containing the (hires|lowres)")
def test_read_visium_hd_bins_as_spots(tiff, crop, mean_encoder, one_torch_thread, tmp_path):
    pytest.importorskip("pyarrow")
    rgb, mpp, _ = crop
    write_visium_hd(tmp_path / "outs", tiff, mpp)
    sdata = sp.io.read_visium_hd(tmp_path / "outs", dataset_id="hd")
    assert sp.pp.pixel_size(sdata) == pytest.approx(mpp)
    assert "hd_full_image" in sdata.images and sdata.attrs["spade_sc"]["wsi"]["mpp"] == pytest.approx(mpp)
    table = sdata.tables["square_016um"]
    assert table.n_obs == 64 and sparse.issparse(table.X) and "hd_square_016um" in sdata.shapes
    # the bins are SPADE's spots: the feature of a bin is the mean colour of the image around its centre
    feats = sp.pp.image_features(
        sdata, encoder=mean_encoder, image_key="hd_full_image", mpp=2.0, patch_size=16, inplace=False, progress=False
    )
    side = round(16 * 2.0 / mpp)
    for i in (0, 27, 63):
        x, y = table.obsm["spatial"][i]
        x0, y0 = round(x - side / 2), round(y - side / 2)
        window = rgb[y0 : y0 + side, x0 : x0 + side].reshape(-1, 3).mean(0) / 255
        assert feats[i] == pytest.approx(window, abs=0.02)
    # and tl.fit takes them as they are (a tiny fit)
    kwargs = {"image_key": "hd_full_image", "mpp": 2.0, "patch_size": 16, "num_workers": 0}
    sp.tl.fit(sdata, encoder=mean_encoder, feature_kwargs=kwargs, n_experts=1, max_epochs=1, progress=False)
    torch.set_num_threads(1)
    assert table.obsm["X_spade"].shape[0] == 64 and np.isfinite(table.obsm["X_spade"]).all()


@pytest.mark.filterwarnings("ignore:No image path found containing the (hires|lowres)")
def test_read_visium_hd_bad_input(tiff, crop, tmp_path):
    pytest.importorskip("pyarrow")
    _, mpp, _ = crop
    write_visium_hd(tmp_path / "outs", tiff, mpp)
    with pytest.raises(FileNotFoundError, match=r"square_008um.*present: \['square_016um'\]"):
        sp.io.read_visium_hd(tmp_path / "outs", bin_size=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sp.io.read_visium_hd(tmp_path / "nothing")
    shutil.rmtree(tmp_path / "outs" / "microscope_image")
    with pytest.warns(UserWarning, match="no full-resolution image"):
        sdata = sp.io.read_visium_hd(tmp_path / "outs", dataset_id="hd")
    assert "hd_full_image" not in sdata.images
    assert sdata.attrs["spade_sc"]["microns_per_unit"]["hd"] == pytest.approx(mpp)
    write_visium_hd(tmp_path / "far", tiff, mpp, start=50_000.0)
    with pytest.raises(ValueError, match="fall outside the full-resolution image"):
        sp.io.read_visium_hd(tmp_path / "far")

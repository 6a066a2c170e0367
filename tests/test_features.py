"""Tests of spade_sc.pp.image_features (offline, CPU; real data through the conftest fixtures)."""

from __future__ import annotations

import anndata as ad
import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse
from shapely.geometry import Point
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, Sequence, Translation, get_transformation
from torch import nn

import spade_sc as sp
from spade_sc.encoders import get_encoder

P = 16  # patch side of the pixel-exact tests
CS = "global"


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------
class _Flat(nn.Module):
    """Features = the patch's pixels (x in [0, 1] because mean=0, std=1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@pytest.fixture(scope="module")
def flat() -> object:
    return get_encoder(_Flat(), input_size=P, mean=(0, 0, 0), std=(1, 1, 1), name="flat", device="cpu")


def _patches(feats: np.ndarray, size: int = P) -> np.ndarray:
    """(N, 3, size, size) uint8 patches back from the features of the flat encoder."""
    return np.rint(feats.reshape(len(feats), 3, size, size) * 255).astype(np.int64)


def _image(seed: int = 0, size: int = 128, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 250, (channels, size, size), dtype=np.uint8)


def _make(
    img: np.ndarray,
    xy: np.ndarray,
    *,
    c_coords=None,
    image_tf=None,
    shapes_tf=None,
    scale_factors=None,
    mpp: float | None = 1.0,
    chunks: int = 32,
    ids: np.ndarray | None = None,
) -> SpatialData:
    """A SpatialData with one image, circle spots at ``xy`` (shapes intrinsic coords) and a table annotating them.

    ``img`` may be a dask array, used as it is (its own chunks).
    """
    n = len(xy)
    ids = np.arange(n) if ids is None else np.asarray(ids)
    c_coords = c_coords if c_coords is not None else ["r", "g", "b", "a"][: img.shape[0]]
    data = img if isinstance(img, da.Array) else da.from_array(img, chunks=(img.shape[0], chunks, chunks))
    image = Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=c_coords,
        scale_factors=scale_factors,
        transformations={CS: image_tf or Identity()},
    )
    circles = gpd.GeoDataFrame({"radius": np.full(n, 4.0)}, geometry=[Point(x, y) for x, y in xy], index=ids)
    shapes = ShapesModel.parse(circles, transformations={CS: shapes_tf or Identity()})
    obs = pd.DataFrame({"spot_id": ids, "region": pd.Categorical(["spots"] * n)}, index=[f"s{i}" for i in ids])
    table = TableModel.parse(
        ad.AnnData(X=sparse.csr_matrix((n, 2), dtype=np.float32), obs=obs),
        region="spots",
        region_key="region",
        instance_key="spot_id",
    )
    sdata = SpatialData(images={"img": image}, shapes={"spots": shapes}, tables={"table": table})
    if mpp is not None:
        sp.pp.set_pixel_size(sdata, mpp, coordinate_system=CS)
    return sdata


# ---------------------------------------------------------------------------------------------------------------------
# pixel-exact patches
# ---------------------------------------------------------------------------------------------------------------------
def test_patches_are_exact_crops(flat):
    img = _image()
    # centres on pixel corners + P/2 -> the patch is exactly img[:, y-8:y+8, x-8:x+8]
    xy = np.array([[40.0, 30.0], [64.0, 100.0], [100.0, 50.0], [8.0, 8.0]])
    sdata = _make(img, xy)
    feats = sp.pp.image_features(sdata, encoder=flat, mpp=1.0, patch_size=P, inplace=False, progress=False)
    assert feats.shape == (4, 3 * P * P) and feats.dtype == np.float32
    got = _patches(feats)
    for (x, y), patch in zip(xy.astype(int), got, strict=True):
        np.testing.assert_array_equal(patch, img[:, y - 8 : y + 8, x - 8 : x + 8])
    assert "X_flat" not in sdata.tables["table"].obsm  # inplace=False writes nothing


@pytest.mark.parametrize("views", [2, 4, 8])
def test_views_average_the_dihedral_orientations(flat, views):
    """views=V: the mean of the features of the patch in its first V dihedral orientations (exact with pixels)."""
    img = _image()
    xy = np.array([[40.0, 30.0], [64.0, 100.0], [100.0, 50.0]])
    sdata = _make(img, xy)
    kw = {"encoder": flat, "mpp": 1.0, "patch_size": P, "progress": False}
    one = _patches(sp.pp.image_features(sdata, inplace=False, **kw)).astype(float) / 255
    turns = {2: [(0, False), (0, True)], 4: [(k, False) for k in range(4)]}
    turns[8] = turns[4] + [(k, True) for k in range(4)]
    expected = np.mean(
        [
            np.flip(np.rot90(one, k, axes=(-2, -1)), -1) if m else np.rot90(one, k, axes=(-2, -1))
            for k, m in turns[views]
        ],
        axis=0,
    )
    sp.pp.image_features(sdata, views=views, **kw)
    got = sdata.tables["table"].obsm["X_flat"].reshape(expected.shape)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert sdata.tables["table"].uns["X_flat"]["views"] == views
    with pytest.raises(ValueError, match="views must be one of"):
        sp.pp.image_features(sdata, views=3, inplace=False, **kw)


def test_border_patches_are_filled_white(flat):
    img = _image()
    sdata = _make(img, np.array([[4.0, 4.0], [126.0, 64.0]]))
    got = _patches(sp.pp.image_features(sdata, encoder=flat, mpp=1.0, patch_size=P, inplace=False, progress=False))
    np.testing.assert_array_equal(got[0][:, :4, :], 255)  # rows above the image
    np.testing.assert_array_equal(got[0][:, :, :4], 255)
    np.testing.assert_array_equal(got[0][:, 4:, 4:], img[:, :12, :12])
    np.testing.assert_array_equal(got[1][:, :, 10:], 255)  # columns right of the image
    np.testing.assert_array_equal(got[1][:, :, :10], img[:, 56:72, 118:128])


def test_resampling_at_half_resolution(flat):
    """Downsampling 2x: a triangle filter of half-width 2 centred between pixel pairs, weights (1, 3, 3, 1) / 8."""
    img = _image(size=128)
    sdata = _make(img, np.array([[64.0, 64.0]]))
    got = _patches(sp.pp.image_features(sdata, encoder=flat, mpp=2.0, patch_size=P, inplace=False, progress=False))
    # output j covers pixels 48 + 2j, 49 + 2j; the filter also reaches 47 + 2j and 50 + 2j
    w = np.zeros((P, 128))
    for j in range(P):
        w[j, 47 + 2 * j : 51 + 2 * j] = np.array([1, 3, 3, 1]) / 8
    expected = np.einsum("yh,chw,xw->cyx", w, img.astype(float), w)
    np.testing.assert_allclose(got[0], expected, atol=0.5 + 1e-3)


def test_channels_rgba_bgr_uint16_float(flat):
    img = _image(channels=3)
    xy = np.array([[40.0, 30.0]])
    ref = _patches(sp.pp.image_features(_make(img, xy), encoder=flat, mpp=1.0, patch_size=P, inplace=False))
    rgba = np.concatenate([img, np.zeros_like(img[:1])])
    cases = {
        "rgba": _make(rgba, xy),
        "bgr": _make(img[::-1].copy(), xy, c_coords=["b", "g", "r"]),
        "ints": _make(img, xy, c_coords=[0, 1, 2]),
        "uint16": _make(img.astype(np.uint16) * 257, xy),
        "float01": _make(img.astype(np.float32) / 255, xy),
        "float255": _make(img.astype(np.float64), xy),
    }
    for name, sdata in cases.items():
        got = _patches(sp.pp.image_features(sdata, encoder=flat, mpp=1.0, patch_size=P, inplace=False, progress=False))
        np.testing.assert_array_equal(got, ref, err_msg=name)


def test_level_choice_and_uns(flat):
    img = _image(size=256)
    sdata = _make(img, np.array([[128.0, 128.0], [60.0, 200.0]]), scale_factors=[2, 2], chunks=64)
    table = sdata.tables["table"]
    sp.pp.image_features(sdata, encoder=flat, mpp=2.0, patch_size=P, progress=False)
    uns = table.uns["X_flat"]
    assert uns["level"] == 1 and uns["level_mpp"] == pytest.approx(2.0)
    assert uns["image_key"] == "img" and uns["shapes_key"] == "spots" and uns["fill"] == 255
    assert uns["mpp"] == 2.0 and uns["patch_size"] == P and uns["encoder"]["name"] == "flat"
    assert uns["image_mpp"] == 1.0 and uns["coordinate_system"] == CS and "spade_sc_version" in uns
    assert uns["precision"] == "fp32"
    # levels at 1, 2 and 4 um/px: the coarsest level not coarser than the target (10 % tolerance) is read.
    # 1.05 um/px is within the tolerance of level 0 (1 um/px) ... 3 um/px uses level 1 (2 um/px), 4.2 -> level 2
    for target, level in [(0.5, 0), (1.0, 0), (1.05, 0), (1.95, 1), (3.0, 1), (4.2, 2)]:
        sp.pp.image_features(sdata, encoder=flat, mpp=target, patch_size=P, progress=False, key_added=f"X_{target}")
        assert table.uns[f"X_{target}"]["level"] == level, target


def test_row_order_follows_instances(flat, copy_slide):
    img = _image()
    rng = np.random.default_rng(1)
    xy = rng.uniform(10, 118, (25, 2))
    ids = rng.permutation(np.arange(100, 125))
    sdata = _make(img, xy, ids=ids)
    ref = sp.pp.image_features(sdata, encoder=flat, mpp=1.0, patch_size=P, inplace=False, progress=False)
    perm = rng.permutation(25)
    shuffled = copy_slide(sdata)
    shuffled.tables["table"] = sdata.tables["table"][perm].copy()
    sp.pp.image_features(shuffled, encoder=flat, mpp=1.0, patch_size=P, progress=False, batch_size=4)
    np.testing.assert_array_equal(shuffled.tables["table"].obsm["X_flat"], ref[perm])
    # the shapes in another order change nothing
    reordered = copy_slide(sdata)
    reordered.shapes["spots"] = sdata.shapes["spots"].iloc[::-1]
    got = sp.pp.image_features(reordered, encoder=flat, mpp=1.0, patch_size=P, inplace=False, progress=False)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
    "case",
    ["scale_translation_shapes", "scaled_image", "sequence_both"],
)
def test_transformations(flat, case):
    img = _image()
    xy = np.array([[40.0, 30.0], [64.5, 100.25], [90.0, 57.7]])
    ref = sp.pp.image_features(_make(img, xy), encoder=flat, mpp=1.0, patch_size=P, inplace=False, progress=False)
    if case == "scale_translation_shapes":
        s, t = np.array([2.0, 0.5]), np.array([-7.0, 13.0])  # (x, y)
        tf = Sequence([Scale(s, axes=("x", "y")), Translation(t, axes=("x", "y"))])
        sdata = _make(img, (xy - t) / s, shapes_tf=tf)
    elif case == "scaled_image":
        # the image is registered at 3 units per pixel; spots live in those units; the unit is 1/3 um
        sdata = _make(img, xy * 3, image_tf=Scale([3.0, 3.0], axes=("x", "y")), mpp=1 / 3)
    else:
        img_tf = Sequence([Scale([2.0, 2.0], axes=("x", "y")), Translation([5.0, -3.0], axes=("x", "y"))])
        sh_tf = Translation([1.0, 2.0], axes=("x", "y"))
        sdata = _make(img, xy * 2 + np.array([5.0, -3.0]) - np.array([1.0, 2.0]), image_tf=img_tf, shapes_tf=sh_tf)
        sp.pp.set_pixel_size(sdata, 0.5, coordinate_system=CS)
    got = sp.pp.image_features(sdata, encoder=flat, mpp=1.0, patch_size=P, inplace=False, progress=False)
    np.testing.assert_allclose(got, ref, atol=1.01 / 255)


def test_polygons_use_centroids(flat):
    from shapely.geometry import box

    img = _image()
    sdata = _make(img, np.array([[40.0, 30.0]]))
    squares = gpd.GeoDataFrame(geometry=[box(32, 22, 48, 38)], index=[0])
    sdata.shapes["spots"] = ShapesModel.parse(squares, transformations={CS: Identity()})
    got = _patches(sp.pp.image_features(sdata, encoder=flat, mpp=1.0, patch_size=P, inplace=False, progress=False))
    np.testing.assert_array_equal(got[0], img[:, 22:38, 32:48])


def test_workers_batches_and_cache_agree(flat):
    img = _image(size=256)
    xy = np.random.default_rng(2).uniform(0, 256, (37, 2))
    sdata = _make(img, xy, chunks=32)
    kw = {"encoder": flat, "mpp": 1.0, "patch_size": P, "inplace": False, "progress": False}
    ref = sp.pp.image_features(sdata, num_workers=0, batch_size=64, **kw)
    for workers, bs in [(1, 5), (3, 7), (2, 1)]:
        np.testing.assert_array_equal(sp.pp.image_features(sdata, num_workers=workers, batch_size=bs, **kw), ref)


def _counting(shape: tuple[int, int, int], chunk: int, pixel) -> tuple[da.Array, list[tuple[int, int]]]:
    """A lazy uint8 image of ``pixel(c, y, x)`` values and the list of the (row, col) chunks computed so far."""
    calls: list[tuple[int, int]] = []

    def block(block_info=None):
        (c0, c1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        calls.append((y0 // chunk, x0 // chunk))
        return pixel(np.arange(c0, c1)[:, None, None], np.arange(y0, y1)[None, :, None], np.arange(x0, x1))

    chunks = da.core.normalize_chunks((shape[0], chunk, chunk), shape)
    return da.map_blocks(block, dtype=np.uint8, chunks=chunks), calls


def test_only_the_chunks_under_the_patches_are_read_once(flat):
    img = _image(size=256)
    lazy, calls = _counting(img.shape, 32, lambda c, y, x: img[c, y, x])
    # three patches inside two of the 64 chunks: (2, 2), and (4, 6) twice (read once, then from the cache)
    xy = np.array([[80.0, 80.0], [208.0, 144.0], [212.0, 148.0]])
    sdata = _make(lazy, xy)
    for workers, bs in [(0, 64), (0, 1), (2, 1)]:
        calls.clear()
        got = _patches(
            sp.pp.image_features(
                sdata,
                encoder=flat,
                mpp=1.0,
                patch_size=P,
                inplace=False,
                progress=False,
                num_workers=workers,
                batch_size=bs,
            )
        )
        assert sorted(calls) == [(2, 2), (4, 6)], (workers, bs, calls)
        for (x, y), patch in zip(xy.astype(int), got, strict=True):
            np.testing.assert_array_equal(patch, img[:, y - 8 : y + 8, x - 8 : x + 8])


def test_patches_are_right_when_the_chunks_outgrow_the_cache(flat):
    """Six 48 MiB chunks in one batch: more than the reader's chunk cache holds (256 MiB); windows stay exact."""

    def pixel(c, y, x):
        return (x % 256).astype(np.uint8) + (2 * y % 256).astype(np.uint8) + np.uint8(85) * c.astype(np.uint8)

    side = 4096
    lazy, calls = _counting((3, side, 6 * side), side, pixel)
    xy = np.array([[k * side + 1000.0 + 300 * k, 2000.0 - 200 * k] for k in range(6)])
    got = _patches(
        sp.pp.image_features(
            _make(lazy, xy), encoder=flat, mpp=1.0, patch_size=P, inplace=False, progress=False, num_workers=0
        )
    )
    assert sorted(calls) == [(0, k) for k in range(6)]  # each chunk read once, no other
    for (x, y), patch in zip(xy.astype(int), got, strict=True):
        c, yy, xx = np.ogrid[:3, y - 8 : y + 8, x - 8 : x + 8]
        np.testing.assert_array_equal(patch, pixel(c, yy, xx), err_msg=f"{x}, {y}")


def test_multi_region_table_rows_of_other_regions_are_nan(flat):
    img = _image()
    sdata = _make(img, np.array([[40.0, 30.0], [60.0, 60.0]]))
    other = gpd.GeoDataFrame({"radius": [3.0]}, geometry=[Point(10, 10)], index=[0])
    sdata.shapes["other"] = ShapesModel.parse(other, transformations={CS: Identity()})
    obs = pd.DataFrame(
        {"spot_id": [0, 0, 1], "region": pd.Categorical(["spots", "other", "spots"])}, index=["a", "b", "c"]
    )
    table = TableModel.parse(
        ad.AnnData(X=np.zeros((3, 1), dtype=np.float32), obs=obs),
        region=["spots", "other"],
        region_key="region",
        instance_key="spot_id",
    )
    del sdata.tables["table"]
    sdata.tables["table"] = table
    sp.pp.image_features(sdata, encoder=flat, mpp=1.0, patch_size=P, shapes_key="spots", progress=False)
    x = table.obsm["X_flat"]
    assert np.isnan(x[1]).all() and np.isfinite(x[[0, 2]]).all()


# ---------------------------------------------------------------------------------------------------------------------
# errors: raised before anything is written
# ---------------------------------------------------------------------------------------------------------------------
def _bad_cases():
    img = _image()
    xy = np.array([[40.0, 30.0], [60.0, 60.0]])

    def two_channels():
        return _make(img[:2].copy(), xy, c_coords=["r", "g"]), {}, "2 channel"

    def unknown_channels():
        return _make(img, xy, c_coords=["dapi", "cd3", "cd8"]), {}, "dapi"

    def no_shared_cs():
        sdata = _make(img, xy)
        sdata.shapes["spots"] = ShapesModel.parse(
            gpd.GeoDataFrame({"radius": [4.0, 4.0]}, geometry=[Point(*p) for p in xy], index=[0, 1]),
            transformations={"elsewhere": Identity()},
        )
        return sdata, {}, "share no coordinate system"

    def table_not_annotating():
        sdata = _make(img, xy)
        sdata.shapes["spots2"] = ShapesModel.parse(
            gpd.GeoDataFrame({"radius": [4.0]}, geometry=[Point(5, 5)], index=[0]),
            transformations={CS: Identity()},
        )
        return sdata, {"shapes_key": "spots2", "table_key": "table"}, "does not annotate"

    def no_pixel_size():
        return _make(img, xy, mpp=None), {}, "pixel size"

    def small_patch():
        return _make(img, xy), {"patch_size": 8}, "patch_size"

    def bad_mpp():
        return _make(img, xy), {"mpp": 0.0}, "mpp"

    def outside():
        return _make(img, xy + 1000), {}, "inside image 'img'"

    def empty_shapes():
        sdata = _make(img, xy)
        gdf = sdata.shapes["spots"]  # spatialdata refuses to store an empty element: empty it in place
        gdf.drop(index=gdf.index, inplace=True)
        return sdata, {}, "empty"

    def missing_instances():
        sdata = _make(img, xy)
        sdata.shapes["spots"] = sdata.shapes["spots"].iloc[:1]
        return sdata, {}, "absent from shapes"

    def unknown_encoder():
        return _make(img, xy), {"encoder": "no_such_encoder_xyz"}, "Unknown encoder"

    def unknown_image_key():
        return _make(img, xy), {"image_key": "nope"}, "nope"

    return [
        two_channels,
        unknown_channels,
        no_shared_cs,
        table_not_annotating,
        no_pixel_size,
        small_patch,
        bad_mpp,
        outside,
        empty_shapes,
        missing_instances,
        unknown_encoder,
        unknown_image_key,
    ]


@pytest.mark.parametrize("make_case", _bad_cases(), ids=lambda f: f.__name__)
def test_bad_inputs_raise_before_writing(flat, make_case):
    sdata, kwargs, match = make_case()
    table = sdata.tables["table"]
    before = (set(table.obsm), set(table.uns), set(sdata.tables), set(sdata.shapes))
    kw = {"encoder": flat, "mpp": 1.0, "patch_size": P, "progress": False} | kwargs
    with pytest.raises((ValueError, KeyError), match=match):
        sp.pp.image_features(sdata, **kw)
    assert (set(table.obsm), set(table.uns), set(sdata.tables), set(sdata.shapes)) == before


def test_existing_key_needs_overwrite(flat):
    sdata = _make(_image(), np.array([[40.0, 30.0]]))
    table = sdata.tables["table"]
    table.obsm["X_flat"] = np.zeros((1, 3))
    with pytest.raises(ValueError, match="overwrite=True"):
        sp.pp.image_features(sdata, encoder=flat, mpp=1.0, patch_size=P, progress=False)
    assert table.obsm["X_flat"].shape == (1, 3) and "X_flat" not in table.uns
    with pytest.raises(ValueError, match="overwrite=True"):
        sp.pp.image_features(sdata, encoder=flat, mpp=1.0, patch_size=P, progress=False, key_added="X_flat")
    sp.pp.image_features(sdata, encoder=flat, mpp=1.0, patch_size=P, progress=False, overwrite=True)
    assert table.obsm["X_flat"].shape == (1, 3 * P * P)


def test_partly_outside_warns(flat, caplog):
    sdata = _make(_image(), np.array([[40.0, 30.0], [-50.0, 30.0]]))
    with caplog.at_level("WARNING", logger="spade_sc"):
        got = sp.pp.image_features(sdata, encoder=flat, mpp=1.0, patch_size=P, inplace=False, progress=False)
    assert "outside image" in caplog.text
    assert (got[1] == 1.0).all()


# ---------------------------------------------------------------------------------------------------------------------
# the allocator scope around the encoder loop (glibc's thresholds, set within, restored after)
# ---------------------------------------------------------------------------------------------------------------------
def _glibc_or_skip():
    from spade_sc import _malloc

    if _malloc.malloc_tuning_available() is not None:
        pytest.skip(f"allocator tuning unavailable here: {_malloc.malloc_tuning_available()}")
    return _malloc


def _mmapped(size: int) -> bool:
    """Whether glibc serves a block of ``size`` bytes by mmap right now (mallinfo2's count of mmapped blocks)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks".split()]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblks
    ptr = libc.malloc(size)
    try:
        return libc.mallinfo2().hblks > before
    finally:
        libc.free(ptr)


def test_malloc_scope_keeps_large_blocks_in_the_heap_and_restores():
    """Within the block a 200 MB allocation comes from the heap (no mmap, no page faults on reuse); after it, glibc
    maps it again (thresholds set back); nested blocks leave it to the outermost; the switches turn it off."""
    _malloc = _glibc_or_skip()
    big = 200 * 2**20
    assert _mmapped(big)
    with _malloc.keep_freed_memory() as tuned:
        assert tuned is True
        assert not _mmapped(big)
        with _malloc.keep_freed_memory(False) as inner:
            assert inner is True  # the outermost block decides and restores
        assert not _mmapped(big)
    assert _mmapped(big)
    with _malloc.keep_freed_memory(False) as tuned:
        assert tuned is False and _mmapped(big)


def test_malloc_scope_switched_off_or_unavailable(monkeypatch):
    """SPADE_SC_TUNE_MALLOC=0, a user's own MALLOC_* settings or a C library that is not glibc: nothing changes and
    the block still runs."""
    from spade_sc import _malloc

    monkeypatch.setenv("SPADE_SC_TUNE_MALLOC", "0")
    with _malloc.keep_freed_memory() as tuned:
        assert tuned is False
    with _malloc.keep_freed_memory(True) as tuned:  # the argument wins over the variable
        assert tuned is (_malloc.malloc_tuning_available() is None)
    monkeypatch.delenv("SPADE_SC_TUNE_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert "environment" in _malloc.malloc_tuning_available()
    with _malloc.keep_freed_memory(True) as tuned:
        assert tuned is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setattr(_malloc, "_libc", None)  # as on macOS / Windows / musl
    assert "glibc" in _malloc.malloc_tuning_available()
    ran = False
    with _malloc.keep_freed_memory(True) as tuned:
        ran = True
    assert ran and tuned is False


def test_tune_malloc_leaves_features_unchanged(flat):
    """image_features with and without the allocator scope: the same features, bit for bit."""
    img = _image(size=256)
    rng = np.random.default_rng(3)
    sdata = _make(img, rng.uniform(20, 236, (40, 2)), chunks=64)
    kw = {"encoder": flat, "mpp": 1.0, "patch_size": P, "inplace": False, "progress": False, "batch_size": 8}
    on = sp.pp.image_features(sdata, tune_malloc=True, **kw)
    off = sp.pp.image_features(sdata, tune_malloc=False, **kw)
    np.testing.assert_array_equal(on, off)


# ---------------------------------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------------------------------
def test_visium_tiny_default_encoder(visium_tiny, tmp_path, copy_slide):
    sdata = copy_slide(visium_tiny)
    sp.pp.image_features(sdata, image_key="visium_heart_tiny_lowres_image", progress=False)
    table = sdata.tables["table"]
    x = table.obsm["X_efficientnet_lite0"]
    assert x.shape == (100, 1280) and x.dtype == np.float32 and np.isfinite(x).all()
    assert x.std(0).mean() > 0  # spots differ
    uns = table.uns["X_efficientnet_lite0"]
    assert uns["level"] == 0 and uns["shapes_key"] == "visium_heart_tiny"
    assert uns["coordinate_system"] == "visium_heart_tiny"  # through the Scale(22.2) transform of the image
    assert "X_efficientnet_lite0" not in visium_tiny.tables["table"].obsm
    table.write_h5ad(tmp_path / "t.h5ad")  # the parameters are storable
    back = ad.read_h5ad(tmp_path / "t.h5ad")
    assert back.uns["X_efficientnet_lite0"]["encoder"]["name"] == "efficientnet_lite0"


def test_visium_spots_land_on_the_right_pixels(visium_tiny, flat):
    """Spots in full-res pixels, lowres image with Scale 22.2: centres go through both transformations."""
    from scipy import ndimage

    key = "visium_heart_tiny_lowres_image"
    mpp0 = sp.pp.pixel_size(visium_tiny, key)
    got = sp.pp.image_features(
        visium_tiny, encoder=flat, image_key=key, mpp=mpp0, patch_size=P, inplace=False, progress=False
    )
    factor = get_transformation(visium_tiny.images[key], to_coordinate_system="visium_heart_tiny").scale[0]
    shapes = visium_tiny.shapes["visium_heart_tiny"]
    full = np.stack([g.coords[0] for g in shapes.geometry])[
        shapes.index.get_indexer(visium_tiny.tables["table"].obs["spot_id"])
    ]
    img = np.asarray(visium_tiny.images[key].data).astype(float)
    patches = _patches(got)
    offsets = np.arange(P) + 0.5 - P / 2
    for i in range(0, 100, 7):
        x, y = full[i] / factor  # continuous lowres pixel coordinates
        yy, xx = np.meshgrid(y + offsets, x + offsets, indexing="ij")
        # bilinear interpolation between pixel centres (pixel k is centred at k + 0.5)
        expected = np.stack([ndimage.map_coordinates(c, [yy - 0.5, xx - 0.5], order=1) for c in img])
        np.testing.assert_allclose(patches[i], expected, atol=0.5 + 1e-3)


def test_every_her2st_section_cheaply(her2st, flat):
    """Every section runs (flat encoder, 112 um patches at 7 um/px: read from a coarse level); spots are tissue."""
    for sid, sdata in her2st.items():
        table = sdata.tables["table"]
        before = set(table.obsm)
        feats = sp.pp.image_features(sdata, encoder=flat, mpp=7.0, patch_size=P, inplace=False, progress=False)
        assert feats.shape == (table.n_obs, 3 * P * P) and np.isfinite(feats).all(), sid
        assert set(table.obsm) == before
        # spot patches are darker than white glass, and differ from spot to spot
        assert feats.mean() < 0.85 and feats.mean(1).std() > 0.01, sid


@pytest.fixture(scope="session")
def her2st_c_features(her2st, her2st_features):
    """Default-encoder features of her2st C2-C5 (shared session fixture) with the region labels."""
    feats, params = her2st_features
    assert params["encoder"]["name"] == "efficientnet_lite0" and params["patch_size"] == 224
    return {
        sid: (feats[sid], her2st[sid].tables["table"].obs["label"].astype(object).to_numpy())
        for sid in ("C2", "C3", "C4", "C5")
    }


def test_her2st_probe_balanced_accuracy(her2st_c_features):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = {}
    for sid, (x, y) in her2st_c_features.items():
        assert x.shape[1] == 1280 and np.isfinite(x).all()
        keep = pd.notna(y)
        data[sid] = (x[keep], y[keep].astype(str))
    scores = {}
    for held in data:
        xtr = np.concatenate([data[s][0] for s in data if s != held])
        ytr = np.concatenate([data[s][1] for s in data if s != held])
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
        clf.fit(xtr, ytr)
        scores[held] = balanced_accuracy_score(data[held][1], clf.predict(data[held][0]))
    mean = float(np.mean(list(scores.values())))
    print(f"her2st C2-C5 leave-one-section-out balanced accuracy: {mean:.3f} {scores}")
    assert mean >= 0.30, scores

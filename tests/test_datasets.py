import gzip
import shutil

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
import xarray as xr
from scipy import sparse
from spatialdata.transformations import get_transformation_between_coordinate_systems

import spade_sc as sp

EXPECTED_SPOTS = {"B4": 283, "C2": 187, "C3": 180, "C4": 184, "C5": 181}


def test_import_is_light():
    import subprocess
    import sys

    heavy = "('torch', 'timm', 'squidpy', 'spatialdata_plot')"
    code = f"import sys, spade_sc; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_her2st_sections_and_spots(her2st):
    assert sorted(her2st) == sorted(EXPECTED_SPOTS)
    for sid, sdata in her2st.items():
        table = sdata.tables["table"]
        assert table.n_obs == EXPECTED_SPOTS[sid]
        assert table.n_vars > 15_000
        assert sparse.issparse(table.X)
        assert np.issubdtype(table.X.dtype, np.integer)
        assert table.X.min() >= 0 and table.X.sum() > 0
        assert set(table.obs["section"]) == {sid}
        assert set(table.obs["patient"]) == {sid[0]}
        assert table.obs[["array_x", "array_y"]].notna().all().all()
        assert len(sdata.shapes[f"{sid}_spots"]) == table.n_obs
        assert sdata.images[f"{sid}_image"]["scale0"]["image"].dtype == np.uint8


def test_her2st_labels_joined_and_named(her2st):
    c2 = her2st["C2"].tables["table"].obs
    assert c2["label"].notna().mean() > 0.95
    assert "cancer 1" in set(c2["label"].dropna())
    assert "immune : APC, B-cell, T-cell" in set(c2["label"].dropna())
    b4 = her2st["B4"].tables["table"].obs
    assert "breast glands 1" in set(b4["label"].dropna())
    # label ids are per patient: the same id means different regions in B and C
    name_b = b4.loc[b4["label_id"] == 2, "label"].iloc[0]
    name_c = c2.loc[c2["label_id"] == 2, "label"].iloc[0]
    assert name_b != name_c


def test_her2st_pixel_size_and_coordinate_systems(her2st):
    systems = [tuple(s.coordinate_systems) for s in her2st.values()]
    assert systems == [(sid,) for sid in her2st]
    for sid, sdata in her2st.items():
        mpp = sp.pp.pixel_size(sdata)
        assert 0.6 < mpp < 0.8, (sid, mpp)
        radius = sdata.shapes[f"{sid}_spots"]["radius"].iloc[0]
        assert radius * 2 * mpp == pytest.approx(100.0)


def test_her2st_alignment_spots_on_tissue(her2st):
    """Spot centres are on stained tissue (dark) and the corners on glass (bright): fails if coordinates are off."""
    for sid, sdata in her2st.items():
        level = sdata.images[f"{sid}_image"]["scale2"]["image"]  # 4x downsampled
        img = level.data.compute().astype(float).mean(0)
        f = sdata.images[f"{sid}_image"]["scale0"]["image"].sizes["y"] / level.sizes["y"]
        xy = np.array([(p.x, p.y) for p in sdata.shapes[f"{sid}_spots"].geometry]) / f
        at_spots = np.median(img[xy[:, 1].astype(int), xy[:, 0].astype(int)])
        c = 60
        corners = np.median(
            np.concatenate([img[:c, :c].ravel(), img[:c, -c:].ravel(), img[-c:, :c].ravel(), img[-c:, -c:].ravel()])
        )
        assert at_spots < corners - 25, (sid, at_spots, corners)
        shifted = np.median(img[(xy[:, 1] * 0.3).astype(int), (xy[:, 0] * 0.3).astype(int)])
        assert shifted > at_spots


def test_her2st_section_subset_and_errors(data_root, tmp_path):
    one = sp.datasets.her2st(data_root / "her2st", sections=["C3"])
    assert list(one) == ["C3"]
    with pytest.raises(ValueError, match="available"):
        sp.datasets.her2st(data_root / "her2st", sections=["Z9"])
    with pytest.raises(FileNotFoundError, match="almaan/her2st"):
        sp.datasets.her2st(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sp.datasets.her2st(tmp_path / "nope")


def _copy_section(data_root, tmp_path, sid="C3", as_sid=None):
    """A her2st folder holding one section (renamed ``as_sid`` when given), without labels."""
    src = data_root / "her2st"
    dst = tmp_path / "her2st"
    new = as_sid or sid
    for sub in ("data/ST-cnts", "data/ST-spotfiles", f"data/ST-imgs/{new[0]}", "res/ST-cluster/lbl"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(src / f"data/ST-cnts/{sid}.tsv.gz", dst / f"data/ST-cnts/{new}.tsv.gz")
    shutil.copy(src / f"data/ST-spotfiles/{sid}_selection.tsv", dst / f"data/ST-spotfiles/{new}_selection.tsv")
    shutil.copytree(src / f"data/ST-imgs/{sid[0]}/{sid}", dst / f"data/ST-imgs/{new[0]}/{new}")
    return dst


def test_her2st_bad_counts_and_spots(data_root, tmp_path):
    root = _copy_section(data_root, tmp_path)
    counts = pd.read_csv(root / "data/ST-cnts/C3.tsv.gz", sep="\t", index_col=0)
    bad = counts.copy()
    bad.iloc[0, 0] = -3
    bad.to_csv(root / "data/ST-cnts/C3.tsv.gz", sep="\t")
    with pytest.raises(ValueError, match="negative"):
        sp.datasets.her2st(root)
    bad = counts.astype(object)
    bad.iloc[0, 0] = "abc"
    bad.to_csv(root / "data/ST-cnts/C3.tsv.gz", sep="\t")
    with pytest.raises(ValueError, match="non-numeric"):
        sp.datasets.her2st(root)
    counts.to_csv(root / "data/ST-cnts/C3.tsv.gz", sep="\t")
    spots = pd.read_csv(root / "data/ST-spotfiles/C3_selection.tsv", sep="\t")
    spots["x"] += 1000
    spots.to_csv(root / "data/ST-spotfiles/C3_selection.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="shares no spot"):
        sp.datasets.her2st(root)


def test_her2st_section_without_image_is_skipped(data_root, tmp_path, caplog):
    root = _copy_section(data_root, tmp_path)
    with gzip.open(root / "data/ST-cnts/C9.tsv.gz", "wt") as fh:
        fh.write("\tA\n1x1\t1\n")
    out = sp.datasets.her2st(root)
    assert list(out) == ["C3"]
    assert "C9" in caplog.text and "no H&E image" in caplog.text
    with pytest.raises(FileNotFoundError, match="C9"):
        sp.datasets.her2st(root, sections=["C9"])


def _label_names(obs: pd.DataFrame) -> dict[int, str]:
    """Region name of each label id of a section's spots."""
    return obs.dropna(subset=["label"]).groupby("label_id", observed=True)["label"].first().astype(str).to_dict()


def test_motivation_parsing(her2st, data_root, tmp_path):
    # names hold unquoted commas ("immune : APC, B-cell, T-cell"), up to the "Marker genes" text or an empty field
    assert _label_names(her2st["C2"].tables["table"].obs)[5] == "immune : APC, B-cell, T-cell"
    assert _label_names(her2st["B4"].tables["table"].obs)[0] == "unknown"
    # patient G: section C3 with its labels, renamed G3, gets the names of patient G
    root = _copy_section(data_root, tmp_path, "C3", as_sid="G3")
    shutil.copy(data_root / "her2st/res/ST-cluster/motivation.csv", root / "res/ST-cluster/motivation.csv")
    lbl = "res/ST-cluster/lbl/{}-cluster-annotation.tsv.gz"
    shutil.copy(data_root / "her2st" / lbl.format("C3"), root / lbl.format("G3"))
    assert _label_names(sp.datasets.her2st(root)["G3"].tables["table"].obs)[1] == "immune : B/plasma cells"


def test_visium_tiny(visium_tiny):
    table = visium_tiny.tables["table"]
    assert table.shape == (100, 100)
    mpp = sp.pp.pixel_size(visium_tiny, "visium_heart_tiny_lowres_image")
    assert mpp == pytest.approx(55 / 89.42751063343188 / 0.045004502, rel=1e-3)
    # spot centres (full-res pixels) fall inside the lowres image once mapped through the transforms
    to_image = get_transformation_between_coordinate_systems(
        visium_tiny,
        visium_tiny.shapes["visium_heart_tiny"],
        visium_tiny.images["visium_heart_tiny_lowres_image"],
        intermediate_coordinate_systems="visium_heart_tiny",
    )
    m = to_image.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    xy = np.array([(p.x, p.y) for p in visium_tiny.shapes["visium_heart_tiny"].geometry])
    px = (m @ np.c_[xy, np.ones(len(xy))].T).T[:, :2]
    assert (px >= 0).all() and (px < 600).all()


def test_visium_errors(data_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sp.datasets.visium(tmp_path / "nope")
    shutil.copytree(data_root / "visium_heart_tiny", tmp_path / "v")
    (tmp_path / "v/spatial/scalefactors_json.json").unlink()
    with pytest.raises(FileNotFoundError, match="scale factors"):
        sp.datasets.visium(tmp_path / "v")
    (tmp_path / "v/filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(FileNotFoundError, match="count matrix"):
        sp.datasets.visium(tmp_path / "v")


def _level0(image):
    """Level 0 of a single- or multiscale image element."""
    return sd.get_pyramid_levels(image, n=0) if isinstance(image, xr.DataTree) else image


def test_synthetic_deterministic_and_programs():
    a = sp.datasets.synthetic(n_slides=2, n_spots=120, image_size=512, seed=3)
    b = sp.datasets.synthetic(n_slides=2, n_spots=120, image_size=512, seed=3)
    c = sp.datasets.synthetic(n_slides=2, n_spots=120, image_size=512, seed=4)
    ta, tb = a["slide1"].tables["table"], b["slide1"].tables["table"]
    assert (ta.X != tb.X).nnz == 0
    img_a, img_b, img_c = (_level0(x["slide1"].images["image"]).data.compute() for x in (a, b, c))
    assert np.array_equal(img_a, img_b)
    assert not np.array_equal(img_a, img_c)
    # gene programs differ by tissue type: per-type mean log expression is far apart on marker genes
    x = np.log1p(ta.X.toarray())
    types = ta.obs["tissue_type"].to_numpy()
    means = {t: x[types == t].mean(0) for t in np.unique(types) if (types == t).sum() > 5}
    assert len(means) >= 3
    keys = list(means)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert np.abs(means[keys[i]] - means[keys[j]]).max() > 1.0
    # the image differs by tissue type too: nuclei (dark purple) density at spot centres
    info = a["slide1"].attrs["spade_sc"]["slide"]
    assert set(info) >= {"organ", "tumour_fraction", "label"}
    xy = ta.obsm["spatial"]
    assert (sp.datasets.synthetic_regions(a["slide1"], xy) == types).all()


def test_synthetic_organ_programs():
    kw = dict(n_slides=4, n_spots=150, image_size=512, tissue_types=("tumour", "stroma"), seed=2)
    shared = sp.datasets.synthetic(**kw)
    mixed = sp.datasets.synthetic(**kw, organ_programs=True)
    # the first organ keeps its image and its expression; the second gets its own stain hue
    first = [_level0(c["slide0"].images["image"]).data.compute() for c in (shared, mixed)]
    assert np.array_equal(*first)
    assert (shared["slide0"].tables["table"].X != mixed["slide0"].tables["table"].X).nnz == 0
    second = [_level0(c["slide1"].images["image"]).data.compute().astype(float) for c in (shared, mixed)]
    tissue = second[0].mean(0) < 230
    assert abs(second[1][2][tissue].mean() / second[0][2][tissue].mean() - 1.12) < 0.03  # bluer (x 1.12)

    def type_means(cohort, organ):
        tables = [s.tables["table"] for s in cohort.values() if s.tables["table"].obs["organ"].iloc[0] == organ]
        x = np.concatenate([np.log1p(t.X.toarray()) for t in tables])
        types = np.concatenate([t.obs["tissue_type"].to_numpy() for t in tables])
        return {t: x[types == t].mean(0) for t in ("tumour", "stroma")}

    # shared programs: the tumour of both organs expresses the same program; organ programs: the tumour of the
    # second organ expresses the stroma program of the first
    for cohort, swapped in ((shared, False), (mixed, True)):
        breast, lung = type_means(cohort, "breast"), type_means(cohort, "lung")
        other = "stroma" if swapped else "tumour"
        assert (
            np.corrcoef(
                lung["tumour"] - lung["stroma"], breast[other] - breast["stroma" if other == "tumour" else "tumour"]
            )[0, 1]
            > 0.8
        )


def test_synthetic_morphology_differs_by_type():
    cohort = sp.datasets.synthetic(n_slides=1, n_spots=200, image_size=1024, seed=1)
    s = cohort["slide0"]
    img = s.images["image"]["scale0"]["image"].data.compute().astype(float)
    t = s.tables["table"]
    dark = {}
    for ty in t.obs["tissue_type"].cat.categories:
        sel = (t.obs["tissue_type"] == ty).to_numpy()
        vals = []
        for x, y in t.obsm["spatial"][sel].astype(int):
            patch = img[:, max(y - 20, 0) : y + 20, max(x - 20, 0) : x + 20]
            vals.append((patch.mean(0) < 110).mean())
        if vals:
            dark[ty] = np.mean(vals)
    assert dark["tumour"] > 2 * dark["stroma"]


def test_synthetic_large_lazy_image():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    big = sp.datasets.synthetic(n_slides=1, image_size=40_000, spots=False)
    image = big["slide0"].images["image"]
    level0 = image["scale0"]["image"]
    assert level0.shape == (3, 40_000, 40_000)
    coarse = image[sorted(image.keys())[-1]]["image"].data.compute()
    corner = level0.data[:, :256, :256].compute()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert (after - before) * 1024 < 500e6  # 40k x 40k x 3 would be 4.8 GB
    assert coarse.shape[1] < 1000
    assert corner.mean() > 220  # glass in the corner
    assert coarse.mean() < corner.mean()


def test_zarr_round_trip(her2st, synthetic_cohort, tmp_path):
    for name, sdata in [("C5", her2st["C5"]), ("slide0", synthetic_cohort["slide0"])]:
        path = tmp_path / f"{name}.zarr"
        sdata.write(path)
        back = sd.read_zarr(path)
        assert set(back.images) == set(sdata.images)
        assert set(back.shapes) == set(sdata.shapes)
        assert back.attrs["spade_sc"]["microns_per_unit"] == sdata.attrs["spade_sc"]["microns_per_unit"]
        for k in sdata.images:
            a = sdata.images[k]["scale1"]["image"].data.compute()
            assert np.array_equal(a, back.images[k]["scale1"]["image"].data.compute())
        for k in sdata.shapes:
            assert back.shapes[k].geometry.equals(sdata.shapes[k].geometry)
            assert np.allclose(back.shapes[k]["radius"], sdata.shapes[k]["radius"])
        ta, tb = sdata.tables["table"], back.tables["table"]
        assert (ta.X != tb.X).nnz == 0
        pd.testing.assert_frame_equal(ta.obs, tb.obs)
        assert list(ta.var_names) == list(tb.var_names)

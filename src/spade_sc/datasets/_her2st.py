"""Reader for the public her2st repository layout (Andersson et al., Nat. Commun. 2021)."""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._sdata import set_microns_per_unit
from .._validation import as_ids, check_key_name, file_errors

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

HER2ST_SOURCE = "https://github.com/almaan/her2st (data: Zenodo record 3957257)"
SPOT_DIAMETER_UM = 100.0
SPOT_SPACING_UM = 200.0
DATA_ENV = "SPADE_SC_DATA"


def data_root(root: str | os.PathLike | None, name: str) -> Path:
    """``root`` or ``$SPADE_SC_DATA/<name>``."""
    if root is not None:
        return Path(root)
    env = os.environ.get(DATA_ENV)
    if not env:
        msg = f"No data folder given: pass root= or set {DATA_ENV} to the folder that holds {name}/."
        raise FileNotFoundError(msg)
    return Path(env) / name


def _check_layout(root: Path) -> None:
    needed = ["data/ST-cnts", "data/ST-spotfiles", "data/ST-imgs"]
    missing = [p for p in needed if not (root / p).is_dir()]
    if missing:
        msg = (
            f"{root} does not hold the her2st layout: missing {missing} (expected data/ST-cnts/<sid>.tsv.gz, "
            f"data/ST-spotfiles/<sid>_selection.tsv, data/ST-imgs/<patient>/<sid>/*.jpg). "
            f"The public source is {HER2ST_SOURCE}."
        )
        raise FileNotFoundError(msg)


def _available_sections(root: Path) -> list[str]:
    return sorted(p.name.split(".")[0] for p in (root / "data" / "ST-cnts").glob("*.tsv*"))


def _valid_id(sid: str) -> bool:
    try:
        check_key_name(sid, "section id")
    except ValueError:
        return False
    return True


def _image_path(root: Path, sid: str) -> Path | None:
    folder = root / "data" / "ST-imgs" / sid[0] / sid
    images = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    return images[0] if images else None


def read_motivation(path: Path) -> dict[tuple[str, int], str]:
    """(patient, cluster) -> region name, from ``res/ST-cluster/motivation.csv``.

    The file is comma-separated but its ``annotated as`` column holds unquoted commas
    ("immune : APC, B-cell, T-cell"): that column runs until the ``based on`` text (which starts with
    "Marker genes") or an empty field.
    """
    names: dict[tuple[str, int], str] = {}
    if not path.is_file():
        return names
    with file_errors(path, "region names file"), path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    for row in rows[1:]:
        if len(row) < 3 or not row[1].strip().isdigit():
            continue
        parts = []
        for field in row[2:]:
            if not field.strip() or field.strip().lower().startswith("marker genes"):
                break
            parts.append(field.strip())
        names[(row[0].strip(), int(row[1]))] = ", ".join(parts) or "unknown"
    return names


def _read_counts(path: Path, sid: str) -> pd.DataFrame:
    where = f"her2st section {sid!r}"
    with file_errors(path, "counts file", where=where):
        counts = pd.read_csv(path, sep="\t", index_col=0, low_memory=False)
    if counts.shape[0] == 0 or counts.shape[1] == 0:
        msg = f"{where}: the counts file {path} holds no spots or no genes (shape {counts.shape})."
        raise ValueError(msg)
    counts.index = counts.index.astype(str)
    bad = [c for c in counts.columns if not pd.api.types.is_numeric_dtype(counts[c])]
    if bad:
        msg = f"Counts file {path} holds non-numeric values in columns {bad[:5]}."
        raise ValueError(msg)
    values = counts.to_numpy()
    if not np.isfinite(values).all():
        msg = f"Counts file {path} holds NaN or infinite values."
        raise ValueError(msg)
    if (values < 0).any():
        msg = f"Counts file {path} holds negative values; raw counts are expected."
        raise ValueError(msg)
    if not np.allclose(values, np.round(values)):
        msg = f"Counts file {path} holds non-integer values; raw counts are expected."
        raise ValueError(msg)
    return counts


def _pixel_size(spots: pd.DataFrame, sid: str) -> float:
    """Micrometres per image pixel from the 200 um spot grid (least squares of pixel vs array position)."""
    slopes = []
    for arr, pix in (("new_x", "pixel_x"), ("new_y", "pixel_y")):
        a = spots[arr].to_numpy(float)
        p = spots[pix].to_numpy(float)
        if len(np.unique(a)) < 2:
            msg = (
                f"her2st section {sid!r}: the spot file places every spot in one array column {arr!r}; the pixel size "
                "is measured from the 200 um spot grid and needs spots in at least two rows and two columns."
            )
            raise ValueError(msg)
        slopes.append(np.polyfit(a, p, 1)[0])
    px_per_step = float(np.mean(np.abs(slopes)))
    if not np.isfinite(px_per_step) or px_per_step <= 0:
        msg = f"her2st section {sid!r}: the spot file's pixel positions do not follow its array positions."
        raise ValueError(msg)
    return SPOT_SPACING_UM / px_per_step


def _spot_key(df: pd.DataFrame) -> pd.Series:
    """``"<x>x<y>"`` spot keys from the integer array positions in columns ``x`` and ``y``."""
    return df["x"].astype(int).astype(str) + "x" + df["y"].astype(int).astype(str)


def _read_spots(root: Path, sid: str, counts: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.Index]:
    """(counts, spot file rows) of the spots present in both, in the same order, and their keys."""
    where = f"her2st section {sid!r}"
    spot_path = root / "data" / "ST-spotfiles" / f"{sid}_selection.tsv"
    if not spot_path.is_file():
        msg = f"Spot file {spot_path} is missing for section {sid!r}."
        raise FileNotFoundError(msg)
    with file_errors(spot_path, "spot file", where=where):
        spots = pd.read_csv(spot_path, sep="\t")
    need = {"x", "y", "new_x", "new_y", "pixel_x", "pixel_y"}
    if not need <= set(spots.columns):
        msg = f"Spot file {spot_path} lacks the columns {sorted(need - set(spots.columns))}."
        raise ValueError(msg)
    bad = [c for c in sorted(need) if not pd.api.types.is_numeric_dtype(spots[c]) or not spots[c].notna().all()]
    if bad:
        msg = f"Spot file {spot_path} of section {sid!r} holds missing or non-numeric values in the columns {bad}."
        raise ValueError(msg)
    spots.index = _spot_key(spots)
    spots = spots[~spots.index.duplicated()]
    shared = counts.index.intersection(spots.index)
    if len(shared) == 0:
        msg = (
            f"Spot file {spot_path} shares no spot with the counts of section {sid!r} "
            f"(counts index like {list(counts.index[:3])}, spots like {list(spots.index[:3])})."
        )
        raise ValueError(msg)
    return counts.loc[shared], spots.loc[shared], shared


def _region_labels(root: Path, sid: str, shared: pd.Index) -> pd.array:
    """Region cluster number of every spot (``Int64``, missing where unlabelled or without a label file)."""
    lbl_path = root / "res" / "ST-cluster" / "lbl" / f"{sid}-cluster-annotation.tsv.gz"
    if not lbl_path.is_file():
        logger.info("her2st: no region labels for section %s (%s missing)", sid, lbl_path)
        return pd.array([pd.NA] * len(shared), dtype="Int64")
    with file_errors(lbl_path, "region label file", where=f"her2st section {sid!r}"):
        lbl = pd.read_csv(lbl_path, sep="\t")
        lbl_map = pd.Series(lbl["label"].to_numpy(), index=_spot_key(lbl))
        lbl_map = lbl_map[~lbl_map.index.duplicated()]
        return pd.array(lbl_map.reindex(shared).to_numpy(), dtype="Int64")


def _read_image(image_path: Path, sid: str, cs: str) -> Any:
    """The H&E of a section as a 4-level multiscale image element (levels box-filtered by PIL, once)."""
    import dask.array as da
    from PIL import Image
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    Image.MAX_IMAGE_PIXELS = None
    with file_errors(image_path, "H&E image", where=f"her2st section {sid!r}"), Image.open(image_path) as img:
        pil = img.convert("RGB")
    rgb = np.asarray(pil)
    arr = da.from_array(np.moveaxis(rgb, -1, 0), chunks=(3, 1024, 1024))
    image = Image2DModel.parse(
        arr, dims=("c", "y", "x"), c_coords=["r", "g", "b"], scale_factors=[2, 2, 2], transformations={cs: Identity()}
    )
    # spatialdata builds the coarser levels as lazy coarsenings of level 0, recomputed at every read; the
    # decoded JPEG is in memory anyway, so compute each level once with PIL's box filter instead.
    for k in range(1, 4):
        node = image[f"scale{k}"]["image"]
        small = np.asarray(pil.resize((node.sizes["x"], node.sizes["y"]), Image.Resampling.BOX))
        node.data = da.from_array(np.moveaxis(small, -1, 0), chunks=(3, 1024, 1024))
    return image


def _read_section(root: Path, sid: str, image_path: Path, labels: dict[tuple[str, int], str]) -> SpatialData:
    from anndata import AnnData
    from geopandas import GeoDataFrame
    from scipy import sparse
    from shapely.geometry import Point
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    check_key_name(sid, "section id", where=f"her2st counts file {root / 'data' / 'ST-cnts' / sid}.tsv.gz")
    counts = _read_counts(root / "data" / "ST-cnts" / f"{sid}.tsv.gz", sid)
    counts, spots, shared = _read_spots(root, sid, counts)
    mpp = _pixel_size(spots, sid)
    patient = sid[0]

    obs = pd.DataFrame(index=[f"{sid}_{i}" for i in shared])
    obs["section"] = pd.Categorical([sid] * len(shared))
    obs["patient"] = pd.Categorical([patient] * len(shared))
    obs["array_x"] = spots["x"].to_numpy(int)
    obs["array_y"] = spots["y"].to_numpy(int)
    obs["label_id"] = _region_labels(root, sid, shared)
    obs["label"] = pd.Categorical(
        [None if pd.isna(v) else labels.get((patient, int(v)), f"cluster {int(v)}") for v in obs["label_id"]]
    )
    obs["region"] = pd.Categorical([f"{sid}_spots"] * len(shared))
    obs["spot_id"] = np.arange(len(shared))

    X = sparse.csr_matrix(counts.to_numpy().astype(np.int32))
    table = AnnData(X=X, obs=obs, var=pd.DataFrame(index=counts.columns.astype(str)))
    table.var_names_make_unique()
    xy = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    table.obsm["spatial"] = xy
    table.uns["her2st"] = {"section": sid, "patient": patient, "image_file": image_path.name}

    cs = sid
    image = _read_image(image_path, sid, cs)
    circles = GeoDataFrame(
        {"radius": np.full(len(shared), SPOT_DIAMETER_UM / 2 / mpp)},
        geometry=[Point(x, y) for x, y in xy],
        index=obs["spot_id"].to_numpy(),
    )
    shapes = ShapesModel.parse(circles, transformations={cs: Identity()})
    table = TableModel.parse(table, region=f"{sid}_spots", region_key="region", instance_key="spot_id")
    sdata = SpatialData(images={f"{sid}_image": image}, shapes={f"{sid}_spots": shapes}, tables={"table": table})
    set_microns_per_unit(sdata, cs, mpp)
    return sdata


def her2st(root: str | os.PathLike | None = None, sections: Sequence[str] | None = None) -> dict[str, SpatialData]:
    """Load the HER2-positive breast cancer ST sections of Andersson et al. (2021).

    Reads the layout of the public repository ``almaan/her2st`` unchanged (``data/ST-cnts``,
    ``data/ST-spotfiles``, ``data/ST-imgs``, ``res/ST-cluster``). Only spots present in both the counts and
    the spot file are kept; sections without an H&E image are skipped with a warning.

    Parameters
    ----------
    root
        The repository folder. Defaults to ``$SPADE_SC_DATA/her2st``.
    sections
        Section ids (``"B4"``, ``"C2"``, ...): one id or a sequence of them. Defaults to every section that has
        counts and an image.

    Returns
    -------
    dict[str, SpatialData]
        ``{section id: SpatialData}``; each SpatialData holds

        - ``images["<sid>_image"]``: the H&E as a dask-backed multiscale image (c, y, x; uint8, 4 levels);
        - ``shapes["<sid>_spots"]``: the spots as circles of 100 um diameter (radius in image pixels);
        - ``tables["table"]``: raw integer counts (sparse CSR) annotating the spots, with ``obs`` columns
          ``section``, ``patient``, ``array_x``, ``array_y``, ``label_id`` (cluster number, per patient) and
          ``label`` (its name from ``res/ST-cluster/motivation.csv``; missing where the spot has no label),
          ``obsm["spatial"]`` (pixel centres) and ``uns["her2st"]``;
        - ``attrs["spade_sc"]["microns_per_unit"][<sid>]``: the pixel size in um, measured from the 200 um spot
          grid. Every element lives in its own coordinate system named after the section (image pixels).
    """
    base = data_root(root, "her2st")
    if not base.exists():
        msg = f"The her2st folder {base} does not exist. The public source is {HER2ST_SOURCE}."
        raise FileNotFoundError(msg)
    _check_layout(base)
    available = _available_sections(base)
    if sections is None:
        wanted = [sid for sid in available if _valid_id(sid)]
        if len(wanted) < len(available):
            logger.warning(
                "her2st: skipping counts file(s) of %s, whose names cannot name a section (letters, digits, '_', "
                "'-', '.').",
                sorted(set(available) - set(wanted)),
            )
    else:
        wanted = as_ids(sections, "sections")
        unknown = [s for s in wanted if s not in available]
        if unknown:
            msg = f"Unknown her2st section(s) {unknown}; available in {base}: {available}."
            raise ValueError(msg)
    images = {sid: _image_path(base, sid) for sid in wanted}
    missing = [sid for sid, p in images.items() if p is None]
    if missing and sections is not None:
        msg = f"her2st section(s) {missing} have no H&E image under {base / 'data' / 'ST-imgs'}."
        raise FileNotFoundError(msg)
    if missing:
        logger.warning("her2st: skipping section(s) %s, which have no H&E image.", missing)
    labels = read_motivation(base / "res" / "ST-cluster" / "motivation.csv")
    out = {}
    for sid in wanted:
        if images[sid] is None:
            continue
        if not re.fullmatch(r"[A-Z]\d+", sid):
            logger.warning("her2st: section id %r does not look like <patient letter><number>.", sid)
        out[sid] = _read_section(base, sid, images[sid], labels)
    return out

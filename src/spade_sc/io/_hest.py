"""HEST-1k samples (Jaume et al., 2024; ``mahmoodlab/HEST``) as SpatialData: slide, spots, counts, metadata."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import Keys
from .._sdata import set_microns_per_unit
from .._validation import as_ids, json_safe, read_json
from ._wsi import safe_name, slide_image

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

HEST_SOURCE = "https://huggingface.co/datasets/MahmoodLab/hest (layout: github.com/mahmoodlab/HEST)"
#: Metadata fields giving the pixel size (um per level-0 pixel), in order of preference (HEST's own loader
#: uses the estimated one).
PIXEL_SIZE_FIELDS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
#: Metadata fields copied to every spot's ``obs`` and to ``attrs["spade_sc"]["slide"]``.
OBS_FIELDS = ("organ", "st_technology", "species", "oncotree_code", "disease_state", "tissue")
#: Spot diameter (um) by technology, used when the metadata has no ``spot_diameter``.
DEFAULT_SPOT_DIAMETER = {"visium": 55.0, "spatial transcriptomics": 100.0, "st": 100.0, "xenium": 55.0}
_WSI_SUFFIXES = (".tif", ".tiff", ".btf", ".ome.tif", ".svs", ".ndpi")


def read_hest(
    root: str | os.PathLike,
    sample_ids: str | Sequence[str] | None = None,
    *,
    metadata_filter: Mapping[str, Any] | Callable[[dict[str, Any]], bool] | None = None,
    backend: str = "auto",
) -> dict[str, SpatialData]:
    """Read HEST-1k samples: whole-slide image, spots, raw counts and metadata of each.

    The layout is HEST's own (a download of the ``MahmoodLab/hest`` dataset, or a subset of it): ``st/<id>.h5ad``
    (counts, ``obsm["spatial"]`` = spot centres in full-resolution pixels), ``wsis/<id>.tif`` (pyramidal TIFF),
    ``metadata/<id>.json``. Other folders (``patches/``, ``thumbnails/``, ``tissue_seg/``, ...) are not read:
    patches are cut from the slide by :func:`spade_sc.pp.image_features` at any pixel size and encoder.

    Parameters
    ----------
    root
        The HEST folder (holding ``st/``, ``wsis/`` and ``metadata/``).
    sample_ids
        Sample ids (e.g. ``"TENX95"``). Default: every sample present in any of the three folders. Samples whose
        h5ad, slide or metadata file is missing are skipped with one warning each.
    metadata_filter
        Keep only samples whose metadata match: a mapping ``{field: value}`` (a list / tuple / set of values
        matches any of them), e.g. ``{"organ": "Bowel", "st_technology": ["Visium", "Xenium"]}``, or a function of
        the metadata dict returning True to keep a sample (the role of HEST's own query on its metadata table).
    backend
        Slide backend of :func:`read_wsi`.

    Returns
    -------
    dict[str, SpatialData]
        ``{sample id: SpatialData}``; each SpatialData holds

        - ``images["<id>_image"]``: the slide, a lazy pyramid as :func:`read_wsi` makes it;
        - ``shapes["<id>_spots"]``: the spots as circles of the recorded ``spot_diameter`` (radius in level-0 px);
        - ``tables["table"]``: raw counts (sparse CSR, float32 as in the h5ad or integer) annotating the spots
          (``region_key="region"``, ``instance_key="spot_id"``); ``obs``: the h5ad's columns plus ``sample``,
          ``organ``, ``st_technology``, ``species``, ``oncotree_code``, ``disease_state``, ``tissue`` (those the
          metadata has; categorical, so ``tl.fit(tissue_key="organ")`` works across samples), ``region``,
          ``spot_id``; ``obs_names`` are ``"<id>_<barcode>"``; ``obsm["spatial"]``: spot centres (level-0 px);
        - ``attrs["spade_sc"]["microns_per_unit"][<id>]``: the pixel size from ``pixel_size_um_estimated`` (else
          ``pixel_size_um_embedded``); ``attrs["spade_sc"]["hest"]``: the metadata JSON;
          ``attrs["spade_sc"]["slide"]``: the ``obs`` fields above plus ``sample``; ``attrs["spade_sc"]["wsi"]``:
          the slide record of :func:`read_wsi`.

    Raises
    ------
    FileNotFoundError
        When ``root``, ``st/``, ``wsis/`` or ``metadata/`` is missing.
    ValueError
        For an unknown sample id (the message lists the available ones), metadata without a pixel size, an h5ad
        without ``obsm["spatial"]`` or whose spots fall outside the slide, or a slide that cannot be read.
    """
    base = Path(root)
    _check_layout(base)
    available = _available_samples(base)
    if sample_ids is None:
        wanted = available
    else:
        wanted = as_ids(sample_ids, "sample_ids")
        unknown = [s for s in wanted if s not in available]
        if unknown:
            msg = f"Unknown HEST sample id(s) {unknown}; available in {base}: {available}."
            raise ValueError(msg)
    complete = []
    for sid in wanted:
        files = _sample_files(base, sid)
        missing = [_LABELS[what] for what, p in files.items() if p is None]
        if missing:
            warnings.warn(
                f"HEST sample {sid!r} in {base} is skipped: its {' and '.join(missing)} is missing "
                "(expected st/<id>.h5ad, wsis/<id>.tif and metadata/<id>.json).",
                UserWarning,
                stacklevel=2,
            )
            continue
        complete.append((sid, files, _read_metadata(files["metadata"])))
    if isinstance(metadata_filter, Mapping) and complete:
        _check_filter_fields(metadata_filter, [meta for _, _, meta in complete], base)
    selected = [(sid, f, meta) for sid, f, meta in complete if _keep(meta, metadata_filter)]
    out = {}
    for sid, files, meta in selected:
        out[sid] = _read_sample(sid, files, meta, backend)
    if not out:
        logger.info("read_hest: no sample of %s matched (requested %s, filter %s)", base, wanted, metadata_filter)
    return out


# --------------------------------------------------------------------------------------------------------------------
# layout and metadata
# --------------------------------------------------------------------------------------------------------------------
def _check_layout(base: Path) -> None:
    if not base.is_dir():
        msg = f"The HEST folder {base} does not exist. The public source is {HEST_SOURCE}."
        raise FileNotFoundError(msg)
    missing = [d for d in ("st", "wsis", "metadata") if not (base / d).is_dir()]
    if missing:
        msg = (
            f"{base} does not hold the HEST-1k layout: missing the folder(s) {missing} (expected st/<id>.h5ad, "
            f"wsis/<id>.tif, metadata/<id>.json). The public source is {HEST_SOURCE}."
        )
        raise FileNotFoundError(msg)


def _wsi_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(_WSI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _available_samples(base: Path) -> list[str]:
    ids = {p.stem for p in (base / "st").glob("*.h5ad")}
    ids |= {p.stem for p in (base / "metadata").glob("*.json")}
    ids |= {_wsi_stem(p) for p in (base / "wsis").iterdir() if p.is_file() and not p.name.startswith(".")}
    return sorted(ids)


_LABELS = {"h5ad": "h5ad (st/)", "wsi": "slide (wsis/)", "metadata": "metadata (metadata/)"}


def _sample_files(base: Path, sid: str) -> dict[str, Path | None]:
    h5ad = base / "st" / f"{sid}.h5ad"
    meta = base / "metadata" / f"{sid}.json"
    wsi = next((base / "wsis" / f"{sid}{s}" for s in _WSI_SUFFIXES if (base / "wsis" / f"{sid}{s}").is_file()), None)
    return {"h5ad": h5ad if h5ad.is_file() else None, "wsi": wsi, "metadata": meta if meta.is_file() else None}


def _read_metadata(path: Path) -> dict[str, Any]:
    return read_json(path, "HEST metadata file")


def _matches(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, list | tuple | set | frozenset):
        return any(_matches(value, w) for w in wanted)
    if isinstance(value, str) and isinstance(wanted, str):
        return value.strip().casefold() == wanted.strip().casefold()
    return bool(value == wanted)


def _keep(meta: dict[str, Any], metadata_filter: Any) -> bool:
    if metadata_filter is None:
        return True
    if callable(metadata_filter):
        return bool(metadata_filter(dict(meta)))
    if not isinstance(metadata_filter, Mapping):
        msg = f"metadata_filter must be a mapping {{field: value}} or a function, got {type(metadata_filter).__name__}."
        raise TypeError(msg)
    return all(key in meta and _matches(meta[key], want) for key, want in metadata_filter.items())


def _check_filter_fields(metadata_filter: Mapping[str, Any], metas: list[dict[str, Any]], base: Path) -> None:
    fields = set().union(*(m.keys() for m in metas)) if metas else set()
    unknown = [k for k in metadata_filter if k not in fields]
    if unknown:
        msg = f"metadata_filter fields {unknown} are in no metadata file of {base}; fields present: {sorted(fields)}."
        raise ValueError(msg)


def _pixel_size(meta: dict[str, Any], path: Path) -> float:
    for key in PIXEL_SIZE_FIELDS:
        value = meta.get(key)
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    msg = (
        f"The HEST metadata file {path} has no pixel size: none of {list(PIXEL_SIZE_FIELDS)} is a positive number "
        f"(values: {[meta.get(k) for k in PIXEL_SIZE_FIELDS]})."
    )
    raise ValueError(msg)


def _spot_diameter(meta: dict[str, Any], path: Path) -> float:
    try:
        value = float(meta.get("spot_diameter"))
    except (TypeError, ValueError):
        value = float("nan")
    if math.isfinite(value) and value > 0:
        return value
    tech = str(meta.get("st_technology", "")).strip().casefold()
    if tech in DEFAULT_SPOT_DIAMETER:
        logger.info("%s: no spot_diameter; using %s um for %s", path, DEFAULT_SPOT_DIAMETER[tech], tech)
        return DEFAULT_SPOT_DIAMETER[tech]
    msg = (
        f"The HEST metadata file {path} has no positive 'spot_diameter' (um) and its st_technology "
        f"{meta.get('st_technology')!r} has no known default ({sorted(DEFAULT_SPOT_DIAMETER)})."
    )
    raise ValueError(msg)


# --------------------------------------------------------------------------------------------------------------------
# one sample
# --------------------------------------------------------------------------------------------------------------------
def _read_sample(sid: str, files: dict[str, Path | None], meta: dict[str, Any], backend: str) -> SpatialData:
    from geopandas import GeoDataFrame
    from shapely.geometry import Point
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    meta_path, h5ad_path, wsi_path = files["metadata"], files["h5ad"], files["wsi"]
    mpp = _pixel_size(meta, meta_path)
    diameter_um = _spot_diameter(meta, meta_path)
    cs = safe_name(sid)
    image, info = slide_image(wsi_path, mpp=mpp, coordinate_system=cs, backend=backend)
    height, width = info["level_shapes"][0]
    table = _read_table(h5ad_path, sid, cs, meta, (height, width), diameter_um / mpp)
    xy = table.obsm["spatial"]
    n = table.n_obs
    circles = GeoDataFrame(
        {"radius": np.full(n, diameter_um / 2 / mpp)},
        geometry=[Point(x, y) for x, y in xy],
        index=np.arange(n),
    )
    shapes = ShapesModel.parse(circles, transformations={cs: Identity()})
    table = TableModel.parse(table, region=f"{cs}_spots", region_key="region", instance_key="spot_id")
    sdata = SpatialData(images={f"{cs}_image": image}, shapes={f"{cs}_spots": shapes}, tables={"table": table})
    set_microns_per_unit(sdata, cs, mpp)
    store = sdata.attrs[Keys.ATTRS]
    store[Keys.HEST] = json_safe(meta)
    slide = {"sample": sid}
    slide.update({k: meta[k] for k in OBS_FIELDS if isinstance(meta.get(k), str | int | float)})
    store[Keys.SLIDE] = slide
    store[Keys.WSI] = info
    return sdata


def _read_table(
    path: Path, sid: str, cs: str, meta: dict[str, Any], hw: tuple[int, int], diameter_px: float
) -> AnnData:
    import anndata as ad
    from scipy import sparse

    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py / anndata raise many types on broken files
        msg = f"The HEST h5ad file {path} cannot be read ({type(err).__name__}: {err})."
        raise ValueError(msg) from err
    if "spatial" not in adata.obsm:
        msg = (
            f"The HEST h5ad file {path} has no obsm['spatial'] (spot centres in full-resolution pixels); "
            f"obsm holds {sorted(adata.obsm)}."
        )
        raise ValueError(msg)
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    if xy.ndim != 2 or xy.shape[1] < 2 or xy.shape[0] != adata.n_obs or not np.isfinite(xy[:, :2]).all():
        msg = f"The HEST h5ad file {path} has obsm['spatial'] of shape {xy.shape} with non-finite values or no (x, y)."
        raise ValueError(msg)
    xy = xy[:, :2]
    height, width = hw
    out = (xy[:, 0] < -diameter_px) | (xy[:, 0] > width + diameter_px)
    out |= (xy[:, 1] < -diameter_px) | (xy[:, 1] > height + diameter_px)
    if out.any():
        msg = (
            f"{int(out.sum())} of {len(xy)} spots of {path} fall outside the slide ({width} x {height} px): "
            f"obsm['spatial'] spans x {xy[:, 0].min():.0f}..{xy[:, 0].max():.0f}, y {xy[:, 1].min():.0f}.."
            f"{xy[:, 1].max():.0f}. HEST stores full-resolution pixel (x, y) centres; is the slide the right one, or "
            "are the coordinates scaled or swapped?"
        )
        raise ValueError(msg)
    x = adata.X
    if x is None:
        msg = f"The HEST h5ad file {path} has no X (counts)."
        raise ValueError(msg)
    x = sparse.csr_matrix(x)
    obs = adata.obs.copy()
    for col in ("region", "spot_id", "sample"):
        if col in obs.columns:
            obs = obs.rename(columns={col: f"hest_{col}"})
    obs.insert(0, "sample", pd.Categorical([sid] * adata.n_obs))
    for key in OBS_FIELDS:
        if isinstance(meta.get(key), str | int | float):
            obs[key] = pd.Categorical([meta[key]] * adata.n_obs)
    obs["region"] = pd.Categorical([f"{cs}_spots"] * adata.n_obs)
    obs["spot_id"] = np.arange(adata.n_obs)
    obs.index = [f"{sid}_{b}" for b in adata.obs_names]
    table = ad.AnnData(X=x, obs=obs, var=adata.var.copy())
    table.var_names = table.var_names.astype(str)
    table.var_names_make_unique()
    table.obsm["spatial"] = xy
    table.uns["hest"] = {"sample": sid, "h5ad": path.name}
    return table

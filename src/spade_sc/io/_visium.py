"""10x Visium and Visium HD (Space Ranger ``outs/``) through spatialdata-io, the full-resolution H&E as a pyramid."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import Keys
from .._sdata import set_microns_per_unit
from .._validation import check_key_name, file_errors, read_json
from ._wsi import safe_name, slide_image

if TYPE_CHECKING:
    from spatialdata import SpatialData

VISIUM_SPOT_DIAMETER_UM = 55.0
#: file name given to spatialdata-io so that it does not decode the full-resolution image itself (read_wsi reads it)
_NO_IMAGE = "__spade_sc_reads_the_fullres_image__"


def read_visium(
    path: str | os.PathLike,
    *,
    dataset_id: str | None = None,
    fullres_image_file: str | os.PathLike | None = None,
    backend: str = "auto",
    **kwargs: Any,
) -> SpatialData:
    """Read a Space Ranger output folder, with the full-resolution H&E that was scanned when it is given.

    Counts, spots and the hires / lowres PNGs come from :func:`spatialdata_io.visium`; the full-resolution image
    (the TIFF / JPEG given to Space Ranger) is read by :func:`read_wsi` as a lazy pyramid of the file's own levels
    (never decoded whole when the file is tiled), registered to the spots' coordinate system (full-resolution
    pixels), so that :func:`spade_sc.pp.image_features` cuts patches from it at any pixel size. The hires / lowres
    images stay for plots.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (``filtered_feature_bc_matrix.h5`` and ``spatial/``).
    dataset_id
        Name used for the elements and the coordinate system; defaults to the folder name.
    fullres_image_file
        The full-resolution H&E: a path, or a file name inside ``path``. Without it only the hires / lowres images
        are read (patches at 0.5 um/px are then upsampled from a ~3-10 um/px image).
    backend
        Slide backend of :func:`read_wsi` for the full-resolution image.
    **kwargs
        Passed to :func:`spatialdata_io.visium` (e.g. ``counts_file``, ``tissue_positions_file``,
        ``scalefactors_file``).

    Returns
    -------
    SpatialData
        The SpatialData of :func:`spatialdata_io.visium` (images ``"<id>_hires_image"`` / ``"<id>_lowres_image"``,
        circles ``"<id>"`` in full-resolution pixels, table ``"table"`` with counts in ``X``), plus

        - ``images["<id>_full_image"]`` (with ``fullres_image_file``): the full-resolution H&E, a lazy multiscale
          image (identity to the coordinate system ``<id>``), as :func:`read_wsi` makes it;
        - ``attrs["spade_sc"]["microns_per_unit"][<id>]``: micrometres per full-resolution pixel,
          ``55 / spot_diameter_fullres`` (a pixel size recorded in the image file that differs by more than 5 % is
          warned about);
        - ``attrs["spade_sc"]["wsi"]`` (with ``fullres_image_file``): the slide record of :func:`read_wsi`.
    """
    import spatialdata_io

    folder = Path(path)
    if not folder.is_dir():
        msg = f"The Visium folder {folder} does not exist."
        raise FileNotFoundError(msg)
    counts = folder / kwargs.get("counts_file", "filtered_feature_bc_matrix.h5")
    if not counts.is_file():
        msg = f"The Visium folder {folder} has no count matrix {counts.name}."
        raise FileNotFoundError(msg)
    scalefactors = Path(kwargs.get("scalefactors_file") or folder / "spatial" / "scalefactors_json.json")
    if not scalefactors.is_absolute() and not scalefactors.is_file():
        scalefactors = folder / scalefactors
    if not scalefactors.is_file():
        msg = f"The Visium folder {folder} has no scale factors file {scalefactors}."
        raise FileNotFoundError(msg)
    factors = read_json(scalefactors, "scale factors file")
    diameter = factors.get("spot_diameter_fullres")
    if isinstance(diameter, bool) or not isinstance(diameter, int | float) or not 0 < diameter < float("inf"):
        msg = f"{scalefactors} has no positive 'spot_diameter_fullres'; the pixel size cannot be derived."
        raise ValueError(msg)
    for key in ("tissue_hires_scalef", "tissue_lowres_scalef"):
        value = factors.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
            msg = (
                f"{scalefactors} has no positive {key!r} (got {value!r}); it is not a Space Ranger scale factors file."
            )
            raise ValueError(msg)
    mpp = VISIUM_SPOT_DIAMETER_UM / float(diameter)
    full = _fullres_path(folder, fullres_image_file)
    dataset_id = safe_name(folder.name) if dataset_id is None else dataset_id
    dataset_id = check_key_name(dataset_id, "dataset_id", where=f"Visium folder {folder}")
    barcodes = _check_counts_file(counts)
    _check_positions(folder, kwargs.get("tissue_positions_file"), barcodes)
    with file_errors(folder, "Space Ranger folder"):
        sdata = spatialdata_io.visium(folder, dataset_id=dataset_id, **kwargs)
    set_microns_per_unit(sdata, dataset_id, mpp)
    if full is not None:
        image, info = slide_image(full, mpp=mpp, coordinate_system=dataset_id, backend=backend)
        _check_spots_inside(sdata, dataset_id, info, full)
        sdata.images[f"{dataset_id}_full_image"] = image
        sdata.attrs[Keys.ATTRS][Keys.WSI] = info
    return sdata


def read_visium_hd(
    path: str | os.PathLike,
    *,
    bin_size: int = 16,
    dataset_id: str | None = None,
    fullres_image_file: str | os.PathLike | None = None,
    backend: str = "auto",
    **kwargs: Any,
) -> SpatialData:
    """Read a Visium HD Space Ranger output folder at one bin size, with the full-resolution H&E as a lazy pyramid.

    The bins of one size are SPADE's spots (pseudo-spots): counts, bins and the hires / lowres PNGs come from
    :func:`spatialdata_io.visium_hd` (``bin_size`` only; segmentations only when ``kwargs`` ask for them); the
    full-resolution image (``fullres_image_file``, else the single file in ``microscope_image/`` or
    ``[<prefix>_]tissue_image.*``) is read by :func:`read_wsi` from the file's own pyramid levels (spatialdata-io is
    kept from decoding it), registered to the bins' coordinate system (full-resolution pixels). Patches are cut around
    each bin's centre at the pixel size and patch size of :func:`spade_sc.pp.image_features`, whatever the bin size.

    Which bin size: 16 um (the default) is the one to start with. A Visium spot is a 55 um disc (~2,400 um^2); a
    16 um bin covers about a ninth of that and an 8 um bin a thirty-seventh, with UMI counts in proportion, so 8 um
    bins give many more, much sparser pairs (2 um bins are too sparse to pair on their own). Either works with
    :func:`spade_sc.tl.fit` as spots; mind the numbers: a whole 6.5 mm capture area holds ~165,000 16 um bins and
    ~660,000 8 um bins, every one a training pair and a patch to encode (the default 224 px patch at 0.5 um/px covers
    112 um: its bin's neighbourhood; neighbouring patches overlap heavily).

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (``feature_slice.h5``, ``binned_outputs/square_<size>um/``).
    bin_size
        Bin size in micrometres; ``binned_outputs/square_<size>um`` must exist (Space Ranger writes 2, 8 and 16).
    dataset_id
        Name used for the elements and the coordinate system; defaults to the folder name.
    fullres_image_file
        The full-resolution H&E: a path, or a file name inside ``path``. Without it, and without one image in
        ``microscope_image/``, only the hires / lowres images are read (with a warning: patches are then upsampled).
    backend
        Slide backend of :func:`read_wsi` for the full-resolution image.
    **kwargs
        Passed to :func:`spatialdata_io.visium_hd` (e.g. ``filtered_counts_file``, ``bins_as_squares``).

    Returns
    -------
    SpatialData
        The SpatialData of :func:`spatialdata_io.visium_hd` for that bin size: table ``"square_<size>um"`` (counts
        in ``X``, ``obsm["spatial"]`` in full-resolution pixels) annotating the bins ``"<id>_square_<size>um"``
        (squares by default), images ``"<id>_hires_image"`` / ``"<id>_lowres_image"`` when present, plus

        - ``images["<id>_full_image"]``: the full-resolution H&E, a lazy multiscale image as :func:`read_wsi`
          makes it (identity to the coordinate system ``<id>``);
        - ``attrs["spade_sc"]["microns_per_unit"][<id>]``: ``microns_per_pixel`` of the bins' scale factors;
        - ``attrs["spade_sc"]["wsi"]``: the slide record of :func:`read_wsi` (with a full-resolution image).

        With several images, pass ``image_key="<id>_full_image"`` to :func:`spade_sc.pp.image_features` /
        ``feature_kwargs`` of :func:`spade_sc.tl.fit`; with segmentations loaded too, pass
        ``table_key="square_<size>um"`` and ``shapes_key="<id>_square_<size>um"``.
    """
    import spatialdata_io

    folder = Path(path)
    if not folder.is_dir():
        msg = f"The Visium HD folder {folder} does not exist."
        raise FileNotFoundError(msg)
    bins = _hd_bin_folder(folder, bin_size)
    factors = read_json(bins / "spatial" / "scalefactors_json.json", "scale factors file")
    mpp = factors.get("microns_per_pixel")
    if isinstance(mpp, bool) or not isinstance(mpp, int | float) or not 0 < mpp < float("inf"):
        msg = f"{bins / 'spatial' / 'scalefactors_json.json'} has no positive 'microns_per_pixel'."
        raise ValueError(msg)
    full = _fullres_path(folder, fullres_image_file) if fullres_image_file is not None else _hd_fullres(folder)
    dataset_id = safe_name(folder.name) if dataset_id is None else dataset_id
    dataset_id = check_key_name(dataset_id, "dataset_id", where=f"Visium HD folder {folder}")
    kwargs.setdefault("load_segmentations_only", False)
    with file_errors(folder, "Visium HD folder"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{_NO_IMAGE}.*")
        sdata = spatialdata_io.visium_hd(
            folder, dataset_id=dataset_id, bin_size=bin_size, fullres_image_file=folder / _NO_IMAGE, **kwargs
        )
    set_microns_per_unit(sdata, dataset_id, float(mpp))
    if full is None:
        warnings.warn(
            f"The Visium HD folder {folder} has no full-resolution image (microscope_image/ or tissue_image.*): "
            "patches will be upsampled from the hires image; pass fullres_image_file=.",
            UserWarning,
            stacklevel=2,
        )
        return sdata
    image, info = slide_image(full, mpp=float(mpp), coordinate_system=dataset_id, backend=backend)
    _check_spots_inside(sdata, f"{dataset_id}_{bins.name}", info, full)
    sdata.images[f"{dataset_id}_full_image"] = image
    sdata.attrs[Keys.ATTRS][Keys.WSI] = info
    return sdata


def _hd_bin_folder(folder: Path, bin_size: int) -> Path:
    """``binned_outputs/square_<size>um`` of a Visium HD folder, with an error listing the bin sizes present."""
    if isinstance(bin_size, bool) or not isinstance(bin_size, int | np.integer) or bin_size <= 0:
        msg = f"bin_size must be a positive integer number of micrometres (2, 8 or 16), got {bin_size!r}."
        raise ValueError(msg)
    found = sorted(p for p in folder.rglob("square_*um") if p.is_dir() and p.parent.name == "binned_outputs")
    wanted = [p for p in found if p.name == f"square_{int(bin_size):03d}um"]
    if not wanted:
        present = [p.name for p in found] or "none (is it a Visium HD outs/ folder?)"
        msg = f"The Visium HD folder {folder} has no binned_outputs/square_{int(bin_size):03d}um; present: {present}."
        raise FileNotFoundError(msg)
    return wanted[0]


def _hd_fullres(folder: Path) -> Path | None:
    """The full-resolution image of a Visium HD folder (``microscope_image/*`` or ``*tissue_image.*``), or None."""
    candidates = sorted(p for p in (folder / "microscope_image").glob("*") if p.is_file())
    candidates = candidates or sorted(p for p in folder.glob("*tissue_image.*") if p.is_file())
    if len(candidates) > 1:
        msg = f"Several full-resolution images in {folder}: {[p.name for p in candidates]}; pass fullres_image_file=."
        raise ValueError(msg)
    return candidates[0] if candidates else None


def _check_counts_file(path: Path) -> list[str] | None:
    """The count matrix opens as HDF5 (a truncated or foreign file is an error naming it); its spot barcodes."""
    if path.suffix != ".h5":
        return None
    import h5py

    with file_errors(path, "count matrix (HDF5)"), h5py.File(path, "r") as h5:
        if "matrix" not in h5:
            msg = f"The count matrix {path} has no 'matrix' group: not a Space Ranger filtered_feature_bc_matrix.h5."
            raise ValueError(msg)
        if "barcodes" not in h5["matrix"]:
            return None
        raw = h5["matrix"]["barcodes"][:]
        return [b.decode() if isinstance(b, bytes) else str(b) for b in raw]


#: The columns of a Space Ranger tissue positions file, after the barcode.
_POSITION_COLUMNS = ("in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
_POSITION_FILES = ("tissue_positions_list.csv", "tissue_positions.csv")


def _positions_path(folder: Path, given: str | os.PathLike | None) -> Path:
    """The tissue positions file spatialdata-io will read (``spatial/tissue_positions_list.csv`` first)."""
    if given is not None:
        path = folder / given
        if Path(given).name not in _POSITION_FILES:
            msg = (
                f"tissue_positions_file={str(given)!r}: spatialdata-io reads a tissue positions file named "
                f"{' or '.join(_POSITION_FILES)} only."
            )
            raise ValueError(msg)
        if not path.is_file():
            msg = f"The Visium folder {folder} has no tissue positions file {path}."
            raise FileNotFoundError(msg)
        return path
    for name in _POSITION_FILES:
        if (folder / "spatial" / name).is_file():
            return folder / "spatial" / name
    parquet = folder / "spatial" / "tissue_positions.parquet"
    if parquet.is_file():
        msg = (
            f"The Visium folder {folder} has its tissue positions only in {parquet}, which spatialdata-io does not "
            "read: write it as spatial/tissue_positions.csv (pandas: read_parquet(...).to_csv(..., index=False))."
        )
        raise ValueError(msg)
    msg = f"The Visium folder {folder} has no tissue positions file (spatial/{' or spatial/'.join(_POSITION_FILES)})."
    raise FileNotFoundError(msg)


def _check_positions(folder: Path, given: str | os.PathLike | None, barcodes: list[str] | None) -> None:
    """The tissue positions file parses, has Space Ranger's columns, and a finite pixel position for every spot.

    Read as spatialdata-io reads it (``tissue_positions_list.csv`` without a header unless it has one), so that a
    malformed, truncated or edited file is an error naming it before spatialdata-io sees it.
    """
    import pandas as pd

    path = _positions_path(folder, given)
    what = "tissue positions file"
    with file_errors(path, what):
        frame = pd.read_csv(path, header=None, index_col=0)
        if path.name == _POSITION_FILES[1] or (len(frame) and "in_tissue" in frame.iloc[0].tolist()):
            frame = pd.read_csv(path, header=0, index_col=0)
        elif frame.shape[1] == len(_POSITION_COLUMNS):
            frame.columns = list(_POSITION_COLUMNS)
    if frame.empty:
        msg = f"The {what} {path} holds no spot."
        raise ValueError(msg)
    missing = [c for c in _POSITION_COLUMNS if c not in frame.columns]
    if missing:
        got = [str(c) for c in frame.columns] if frame.columns.dtype == object else f"{frame.shape[1]} columns"
        msg = (
            f"The {what} {path} lacks the columns {missing} (got {got}); Space Ranger writes a barcode and "
            f"{list(_POSITION_COLUMNS)}."
        )
        raise ValueError(msg)
    if not frame.index.is_unique:
        dup = frame.index[frame.index.duplicated()].unique().tolist()
        msg = f"The {what} {path} lists the barcodes {dup[:5]} more than once."
        raise ValueError(msg)
    if barcodes is not None:
        absent = [b for b in barcodes if b not in frame.index]
        if absent:
            msg = (
                f"The {what} {path} has no position for {len(absent)} of the {len(barcodes)} spots of the count "
                f"matrix (e.g. {absent[:3]}): is it truncated, or from another run?"
            )
            raise ValueError(msg)
        frame = frame.loc[barcodes]
    pixels = frame[["pxl_row_in_fullres", "pxl_col_in_fullres"]].apply(pd.to_numeric, errors="coerce")
    bad = ~np.isfinite(pixels.to_numpy(dtype=float)).all(axis=1)
    if bad.any():
        msg = (
            f"The {what} {path} has no finite pixel position (pxl_row_in_fullres, pxl_col_in_fullres) for "
            f"{int(bad.sum())} spot(s) (e.g. {frame.index[bad][:3].tolist()}): is it truncated or edited?"
        )
        raise ValueError(msg)


def _fullres_path(folder: Path, fullres_image_file: str | os.PathLike | None) -> Path | None:
    if fullres_image_file is None:
        return None
    given = Path(fullres_image_file)
    for candidate in (given, folder / given):
        if candidate.is_file():
            return candidate
    msg = f"The full-resolution image {given} does not exist (looked for {given} and {folder / given})."
    raise FileNotFoundError(msg)


def _check_spots_inside(sdata: SpatialData, dataset_id: str, info: dict[str, Any], image_path: Path) -> None:
    """Error when the spot centres (full-resolution px) fall outside the full-resolution image."""
    shapes = sdata.shapes[dataset_id]
    centres = shapes.geometry.centroid  # circles are points; Visium HD bins are squares
    xy = np.stack([centres.x.to_numpy(), centres.y.to_numpy()], axis=1)
    height, width = info["level_shapes"][0]
    margin = 2 * float(shapes["radius"].max()) if "radius" in shapes else 0.0
    out = (xy[:, 0] < -margin) | (xy[:, 0] > width + margin) | (xy[:, 1] < -margin) | (xy[:, 1] > height + margin)
    if out.any():
        msg = (
            f"{int(out.sum())} of {len(xy)} spots fall outside the full-resolution image {image_path} ({width} x "
            f"{height} px; spots span x {xy[:, 0].min():.0f}..{xy[:, 0].max():.0f}, y {xy[:, 1].min():.0f}.."
            f"{xy[:, 1].max():.0f}): is it the image Space Ranger was given, at full resolution?"
        )
        raise ValueError(msg)

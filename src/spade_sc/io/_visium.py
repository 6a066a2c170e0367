"""10x Visium (Space Ranger ``outs/``) through spatialdata-io, with the full-resolution H&E as a lazy pyramid."""

from __future__ import annotations

import os
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
    mpp = VISIUM_SPOT_DIAMETER_UM / float(diameter)
    full = _fullres_path(folder, fullres_image_file)
    dataset_id = safe_name(folder.name) if dataset_id is None else dataset_id
    dataset_id = check_key_name(dataset_id, "dataset_id", where=f"Visium folder {folder}")
    _check_counts_file(counts)
    with file_errors(folder, "Space Ranger folder"):
        sdata = spatialdata_io.visium(folder, dataset_id=dataset_id, **kwargs)
    set_microns_per_unit(sdata, dataset_id, mpp)
    if full is not None:
        image, info = slide_image(full, mpp=mpp, coordinate_system=dataset_id, backend=backend)
        _check_spots_inside(sdata, dataset_id, info, full)
        sdata.images[f"{dataset_id}_full_image"] = image
        sdata.attrs[Keys.ATTRS][Keys.WSI] = info
    return sdata


def _check_counts_file(path: Path) -> None:
    """The count matrix opens as HDF5 (a truncated or foreign file is an error naming it)."""
    if path.suffix != ".h5":
        return
    import h5py

    with file_errors(path, "count matrix (HDF5)"), h5py.File(path, "r") as h5:
        if "matrix" not in h5:
            msg = f"The count matrix {path} has no 'matrix' group: not a Space Ranger filtered_feature_bc_matrix.h5."
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
    xy = np.stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()], axis=1)
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

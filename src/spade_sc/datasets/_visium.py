"""10x Visium through spatialdata-io, plus the pixel-size record spade_sc reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._sdata import set_microns_per_unit

if TYPE_CHECKING:
    from spatialdata import SpatialData

VISIUM_SPOT_DIAMETER_UM = 55.0


def visium(path: str | os.PathLike, *, dataset_id: str | None = None, **kwargs: Any) -> SpatialData:
    """Read a Space Ranger output folder with :func:`spatialdata_io.visium` and record its pixel size.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (``filtered_feature_bc_matrix.h5`` and ``spatial/``).
    dataset_id
        Name used for the elements; defaults to the folder name.
    **kwargs
        Passed to :func:`spatialdata_io.visium`.

    Returns
    -------
    SpatialData
        The SpatialData of :func:`spatialdata_io.visium` (images ``"<id>_hires_image"`` / ``"<id>_lowres_image"``,
        shapes ``"<id>"``, table ``"table"`` with counts in ``X``), plus
        ``attrs["spade_sc"]["microns_per_unit"][<id>]``: micrometres per full-resolution pixel,
        ``55 / spot_diameter_fullres``.
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
    if not scalefactors.is_file():
        msg = f"The Visium folder {folder} has no scale factors file {scalefactors}."
        raise FileNotFoundError(msg)
    factors = json.loads(scalefactors.read_text())
    diameter = factors.get("spot_diameter_fullres")
    if not diameter or diameter <= 0:
        msg = f"{scalefactors} has no positive 'spot_diameter_fullres'; the pixel size cannot be derived."
        raise ValueError(msg)
    dataset_id = dataset_id or folder.name
    sdata = spatialdata_io.visium(folder, dataset_id=dataset_id, **kwargs)
    set_microns_per_unit(sdata, dataset_id, VISIUM_SPOT_DIAMETER_UM / float(diameter))
    return sdata

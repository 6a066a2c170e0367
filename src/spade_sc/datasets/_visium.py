"""10x Visium: :func:`spade_sc.datasets.visium` is :func:`spade_sc.io.read_visium` (kept for existing code)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..io._visium import VISIUM_SPOT_DIAMETER_UM, read_visium

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["VISIUM_SPOT_DIAMETER_UM", "visium"]


def visium(path: str | os.PathLike, *, dataset_id: str | None = None, **kwargs: Any) -> SpatialData:
    """Read a Space Ranger output folder: an alias of :func:`spade_sc.io.read_visium`.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (``filtered_feature_bc_matrix.h5`` and ``spatial/``).
    dataset_id
        Name used for the elements; defaults to the folder name.
    **kwargs
        Passed to :func:`spade_sc.io.read_visium` (``fullres_image_file``, ``backend``) and on to
        :func:`spatialdata_io.visium`.

    Returns
    -------
    SpatialData
        What :func:`spade_sc.io.read_visium` returns: images ``"<id>_hires_image"`` / ``"<id>_lowres_image"`` (and
        ``"<id>_full_image"`` with ``fullres_image_file``), shapes ``"<id>"``, table ``"table"`` with counts in
        ``X``, and ``attrs["spade_sc"]["microns_per_unit"][<id>]`` = ``55 / spot_diameter_fullres``.
    """
    return read_visium(path, dataset_id=dataset_id, **kwargs)

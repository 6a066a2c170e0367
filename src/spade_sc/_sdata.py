"""SpatialData helpers shared by every namespace: key resolution, pixel size, cohorts, image levels.

Pixel size convention
---------------------
spade_sc records the physical size of the units of a **coordinate system** (micrometres per unit) in
``sdata.attrs["spade_sc"]["microns_per_unit"][<coordinate system>]``. The pixel size of any image (or of
any pyramid level) then follows from the image's transformation to that coordinate system, so it stays
right when images are rescaled or registered. The loaders in :mod:`spade_sc.datasets` write it; for other
data call :func:`spade_sc.pp.set_pixel_size`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import xarray as xr
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

ATTRS_KEY = "spade_sc"
MPU_KEY = "microns_per_unit"
_KINDS = ("images", "shapes", "tables", "labels", "points")


def resolve_key(sdata: SpatialData, kind: str, key: str | None, *, what: str | None = None) -> str:
    """Return ``key`` after checking it exists, or the only element of ``kind`` when ``key`` is None."""
    if kind not in _KINDS:
        msg = f"Unknown element kind {kind!r}; expected one of {_KINDS}."
        raise ValueError(msg)
    elements = getattr(sdata, kind)
    arg = what or f"{kind.rstrip('s')}_key"
    if key is not None:
        if key not in elements:
            msg = f"{arg}={key!r} is not among the {kind} of this SpatialData: {sorted(elements)}."
            raise KeyError(msg)
        return key
    if len(elements) == 1:
        return next(iter(elements))
    if len(elements) == 0:
        msg = f"This SpatialData has no {kind}; one is needed here."
        raise ValueError(msg)
    msg = f"This SpatialData has several {kind} {sorted(elements)}: pass {arg}= to choose one."
    raise ValueError(msg)


def annotating_tables(sdata: SpatialData, element_key: str) -> list[str]:
    """Names of the tables that annotate ``element_key``."""
    out = []
    for name, table in sdata.tables.items():
        if "spatialdata_attrs" not in table.uns:
            continue
        if element_key in table_region(table)[0]:
            out.append(name)
    return out


def resolve_table(sdata: SpatialData, table_key: str | None, shapes_key: str | None = None) -> str:
    """Return the table annotating ``shapes_key`` (or the only table), checking the annotation."""
    if table_key is not None:
        resolve_key(sdata, "tables", table_key)
        if shapes_key is not None and table_key not in annotating_tables(sdata, shapes_key):
            msg = (
                f"Table {table_key!r} does not annotate the shapes element {shapes_key!r}; "
                f"tables that do: {annotating_tables(sdata, shapes_key)}."
            )
            raise ValueError(msg)
        return table_key
    if shapes_key is None:
        return resolve_key(sdata, "tables", None)
    candidates = annotating_tables(sdata, shapes_key)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        msg = f"No table annotates the shapes element {shapes_key!r}; tables present: {sorted(sdata.tables)}."
        raise ValueError(msg)
    msg = f"Several tables annotate {shapes_key!r}: {candidates}; pass table_key=."
    raise ValueError(msg)


def table_region(table: AnnData) -> tuple[list[str], str, str]:
    """(regions, region_key, instance_key) of a table that annotates elements."""
    from spatialdata.models import get_table_keys

    region, region_key, instance_key = get_table_keys(table)
    regions = [region] if isinstance(region, str) else list(region)
    return regions, region_key, instance_key


def set_microns_per_unit(sdata: SpatialData, coordinate_system: str, microns: float) -> None:
    """Record the physical size (um) of one unit of ``coordinate_system``."""
    microns = float(microns)
    if not np.isfinite(microns) or microns <= 0:
        msg = f"The pixel size must be a positive number of micrometres, got {microns!r}."
        raise ValueError(msg)
    store = sdata.attrs.setdefault(ATTRS_KEY, {})
    store.setdefault(MPU_KEY, {})[coordinate_system] = microns


def microns_per_unit(sdata: SpatialData, coordinate_system: str) -> float | None:
    """The recorded size (um) of one unit of ``coordinate_system``, or None."""
    value = sdata.attrs.get(ATTRS_KEY, {}).get(MPU_KEY, {}).get(coordinate_system)
    return None if value is None else float(value)


def element_coordinate_systems(element: Any) -> list[str]:
    """Coordinate systems an element is registered in."""
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True))


def shared_coordinate_system(sdata: SpatialData, *keys: str) -> str:
    """A coordinate system shared by all elements ``keys``; one with a recorded pixel size first."""
    sets = [element_coordinate_systems(sdata[k]) for k in keys]
    shared = [cs for cs in sets[0] if all(cs in s for s in sets[1:])]
    if not shared:
        msg = f"The elements {list(keys)} share no coordinate system (theirs: {dict(zip(keys, sets, strict=True))})."
        raise ValueError(msg)
    with_size = [cs for cs in shared if microns_per_unit(sdata, cs) is not None]
    return (with_size or shared)[0]


def _xy_affine(element: Any, coordinate_system: str) -> np.ndarray:
    """3x3 affine matrix of ``element``'s transformation to ``coordinate_system``, on the (x, y) axes."""
    from spatialdata.transformations import get_transformation

    return get_transformation(element, to_coordinate_system=coordinate_system).to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )


def to_pixels_matrix(sdata: SpatialData, element_key: str, image_key: str, coordinate_system: str) -> np.ndarray:
    """3x3 affine matrix mapping ``element_key``'s intrinsic (x, y) to the level-0 pixels of ``image_key``."""
    el = _xy_affine(sdata[element_key], coordinate_system)
    im = _xy_affine(sdata[image_key], coordinate_system)
    return np.linalg.inv(im) @ el


def image_pixel_size(
    sdata: SpatialData, image_key: str, coordinate_system: str | None = None, image_mpp: float | None = None
) -> float:
    """Micrometres per level-0 pixel of ``image_key``.

    ``image_mpp`` wins when given; otherwise it follows from the recorded size of a coordinate system the
    image lives in and the image's transformation to it.
    """
    if image_mpp is not None:
        if not np.isfinite(image_mpp) or image_mpp <= 0:
            msg = f"image_mpp must be positive, got {image_mpp!r}."
            raise ValueError(msg)
        return float(image_mpp)
    systems = [coordinate_system] if coordinate_system else element_coordinate_systems(sdata[image_key])
    for cs in systems:
        mpu = microns_per_unit(sdata, cs)
        if mpu is None:
            continue
        m = _xy_affine(sdata[image_key], cs)
        return mpu * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    msg = (
        f"The pixel size of image {image_key!r} is unknown: no size is recorded for its coordinate systems "
        f"{systems} in sdata.attrs['{ATTRS_KEY}']['{MPU_KEY}']. Pass image_mpp= or call "
        "spade_sc.pp.set_pixel_size(sdata, ...)."
    )
    raise ValueError(msg)


def image_levels(image: Any) -> list[xr.DataArray]:
    """The pyramid levels (finest first) of a single- or multiscale image element."""
    import xarray as xr

    if isinstance(image, xr.DataArray):
        return [image]
    levels = []
    for name in sorted(image.keys(), key=lambda s: int(s.replace("scale", "") or 0)):
        node = image[name]
        levels.append(next(iter(node.data_vars.values())) if hasattr(node, "data_vars") else node)
    return levels


def level_mpp(levels: Sequence[xr.DataArray], p0: float) -> list[float]:
    """Micrometres per pixel of each level, from ``p0`` (level 0) and its downsampling (mean over y and x)."""
    h0, w0 = levels[0].sizes["y"], levels[0].sizes["x"]
    return [p0 * float(np.mean([h0 / lv.sizes["y"], w0 / lv.sizes["x"]])) for lv in levels]


def as_cohort(cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData]) -> dict[str, SpatialData]:
    """A ``{slide id: SpatialData}`` dict from one SpatialData, a mapping or a sequence."""
    from spatialdata import SpatialData

    if isinstance(cohort, SpatialData):
        return {"slide0": cohort}
    if isinstance(cohort, Mapping):
        out = dict(cohort)
    elif isinstance(cohort, Sequence) and not isinstance(cohort, str):
        out = {f"slide{i}": s for i, s in enumerate(cohort)}
    else:
        msg = f"Expected a SpatialData, a mapping or a sequence of them, got {type(cohort).__name__}."
        raise TypeError(msg)
    if not out:
        msg = "The cohort is empty."
        raise ValueError(msg)
    for name, s in out.items():
        if not isinstance(s, SpatialData):
            msg = f"Cohort entry {name!r} is a {type(s).__name__}, not a SpatialData."
            raise TypeError(msg)
    return out

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

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._constants import Keys

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

ATTRS_KEY = Keys.ATTRS
MPU_KEY = Keys.MICRONS_PER_UNIT
#: ``attrs`` entry where wsidata (LazySlide) keeps the properties of its slide (``mpp``: level-0 pixel size).
WSIDATA_PROPERTIES = "slide_properties"
_KINDS = ("images", "shapes", "tables", "labels", "points")
#: The argument naming an element of each kind, in messages.
_KEY_ARGS = {
    "images": "image_key",
    "shapes": "shapes_key",
    "tables": "table_key",
    "labels": "labels_key",
    "points": "points_key",
}


def resolve_key(sdata: SpatialData, kind: str, key: str | None, *, what: str | None = None) -> str:
    """Return ``key`` after checking it exists, or the only element of ``kind`` when ``key`` is None."""
    if kind not in _KINDS:
        msg = f"Unknown element kind {kind!r}; expected one of {_KINDS}."
        raise ValueError(msg)
    elements = getattr(sdata, kind)
    arg = what or _KEY_ARGS[kind]
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


def element(sdata: SpatialData, key: str) -> Any:
    """The image, shapes, labels or points element ``key``, looked up by kind.

    Objects built on SpatialData, such as wsidata's ``WSIData``, may hide elements from ``sdata[key]``.
    """
    for kind in ("images", "shapes", "labels", "points"):
        elements = getattr(sdata, kind)
        if key in elements:
            return elements[key]
    msg = f"{key!r} is not an element of this SpatialData."
    raise KeyError(msg)


def element_coordinate_systems(element: Any) -> list[str]:
    """Coordinate systems an element is registered in."""
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True))


def shared_coordinate_system(sdata: SpatialData, *keys: str) -> str:
    """A coordinate system shared by all elements ``keys``; one with a recorded pixel size first."""
    sets = [element_coordinate_systems(element(sdata, k)) for k in keys]
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
    el = _xy_affine(element(sdata, element_key), coordinate_system)
    im = _xy_affine(element(sdata, image_key), coordinate_system)
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
    image = element(sdata, image_key)
    systems = [coordinate_system] if coordinate_system else element_coordinate_systems(image)
    for cs in systems:
        mpu = microns_per_unit(sdata, cs)
        if mpu is None:
            continue
        m = _xy_affine(image, cs)
        return mpu * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    # wsidata (LazySlide) records the level-0 pixel size of its slide, whose units are those of "global"
    props = sdata.attrs.get(WSIDATA_PROPERTIES)
    wsi_mpp = props.get("mpp") if isinstance(props, Mapping) else getattr(props, "mpp", None)
    if wsi_mpp and "global" in element_coordinate_systems(image):
        m = _xy_affine(image, "global")
        return float(wsi_mpp) * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    msg = (
        f"The pixel size of image {image_key!r} is unknown: no size is recorded for its coordinate systems "
        f"{systems} in sdata.attrs['{ATTRS_KEY}']['{MPU_KEY}']. Pass image_mpp= or call "
        "spade_sc.pp.set_pixel_size(sdata, ...)."
    )
    raise ValueError(msg)


def check_same_dimension(dims: Mapping[str, int], features_key: str) -> None:
    """Features of one key must have one dimension on every slide (``dims``: slide id -> dimension)."""
    if len(set(dims.values())) > 1:
        msg = f"obsm[{features_key!r}] has different dimensions across slides: {dict(dims)}."
        raise ValueError(msg)


# --------------------------------------------------------------------------------------------------------------------
# spots: which table, which shapes, which row is which shape; their features
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spots:
    """The spots (or tiles) of one slide: a shapes element and the table annotating it, both checked."""

    sdata: SpatialData
    table_key: str
    shapes_key: str

    @property
    def table(self) -> AnnData:
        """The table annotating the shapes."""
        return self.sdata.tables[self.table_key]

    @property
    def shapes(self) -> Any:
        """The shapes element (GeoDataFrame)."""
        return self.sdata.shapes[self.shapes_key]

    def instances(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the table annotating the shapes, position in the shapes of each of those rows)."""
        return rows_to_shapes(self.table, self.table_key, self.shapes, self.shapes_key)


def resolve_spots(sdata: SpatialData, table_key: str | None = None, shapes_key: str | None = None) -> Spots:
    """The spots of a slide: ``shapes_key`` and the table annotating it, each found when it is the only candidate.

    With ``table_key`` alone, the shapes are the one region that table annotates.
    """
    if shapes_key is None and table_key is not None:
        table = sdata.tables[resolve_key(sdata, "tables", table_key)]
        regions = table_region(table)[0] if "spatialdata_attrs" in table.uns else []
        if len(regions) != 1:
            msg = f"Table {table_key!r} annotates the regions {regions}: pass shapes_key= to choose one."
            raise ValueError(msg)
        shapes_key = regions[0]
    shapes_key = resolve_key(sdata, "shapes", shapes_key)
    return Spots(sdata, resolve_table(sdata, table_key, shapes_key), shapes_key)


def features_matrix(
    table: AnnData,
    key: str,
    *,
    where: str,
    dim: int | None = None,
    expected: str = "",
    hint: str = "",
    finite: bool = True,
) -> np.ndarray:
    """The (n, d) float32 features ``table.obsm[key]``, checked: present, 2-D and non-empty, ``dim`` wide, finite.

    ``where`` starts every message (the slide and table); ``expected`` says where ``dim`` comes from; ``hint`` says
    how to compute missing features; ``finite=False`` leaves the values to :func:`check_finite`.
    """
    if key not in table.obsm:
        msg = f"{where}: obsm[{key!r}] is missing (present: {sorted(table.obsm)}).{' ' + hint if hint else ''}"
        raise KeyError(msg)
    x = np.asarray(table.obsm[key], dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        msg = f"{where}: obsm[{key!r}] has shape {x.shape}; a non-empty (n, d) matrix is expected."
        raise ValueError(msg)
    if dim is not None and x.shape[1] != dim:
        msg = f"{where}: obsm[{key!r}] has shape {x.shape}, but {expected or 'the caller'} takes {dim}-d features."
        raise ValueError(msg)
    return check_finite(x, key, where=where) if finite else x


def check_finite(x: np.ndarray, key: str, *, where: str) -> np.ndarray:
    """``x`` (the features ``obsm[key]``) after checking that every value is finite."""
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        msg = f"{where}: obsm[{key!r}] holds NaN or infinite values in {int(bad.sum())} row(s) of {len(x)}."
        raise ValueError(msg)
    return x


def shape_centres(shapes: Any, shapes_key: str) -> np.ndarray:
    """(N, 2) intrinsic (x, y) centres: circle centres or polygon centroids."""
    import shapely

    geoms = np.asarray(shapes.geometry.values)
    types = set(shapely.get_type_id(geoms).tolist())
    allowed = {0, 3, 6}  # Point, Polygon, MultiPolygon
    if not types <= allowed:
        names = sorted({shapely.get_type_id(g) for g in geoms} - allowed)
        msg = f"Shapes {shapes_key!r} hold geometries of type ids {names}; circles (points) or polygons are expected."
        raise ValueError(msg)
    cent = shapely.centroid(geoms)
    xy = np.stack([shapely.get_x(cent), shapely.get_y(cent)], axis=1).astype(float)
    if not np.isfinite(xy).all():
        msg = f"Shapes {shapes_key!r} hold {int((~np.isfinite(xy).all(1)).sum())} empty or invalid geometries."
        raise ValueError(msg)
    return xy


def rows_to_shapes(table: Any, table_key: str, shapes: Any, shapes_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows of the table annotating ``shapes_key``, position in ``shapes`` of each of those rows)."""
    import pandas as pd

    _, region_key, instance_key = table_region(table)
    rows = np.flatnonzero((table.obs[region_key].astype(str) == shapes_key).to_numpy())
    if len(rows) == 0:
        msg = f"Table {table_key!r} has no rows for region {shapes_key!r} (column {region_key!r})."
        raise ValueError(msg)
    index = shapes.index
    if not index.is_unique:
        msg = f"The index of shapes {shapes_key!r} has duplicated values; instances must be unique."
        raise ValueError(msg)
    ids = table.obs[instance_key].to_numpy()[rows]
    pos = index.get_indexer(pd.Index(ids))
    if (pos < 0).any():
        alt = pd.Index(index.astype(str)).get_indexer(pd.Index(pd.Index(ids).astype(str)))
        if (alt >= 0).all():
            pos = alt
    missing = pos < 0
    if missing.any():
        msg = (
            f"{int(missing.sum())} row(s) of table {table_key!r} refer to instances absent from shapes {shapes_key!r} "
            f"(obs[{instance_key!r}] values {list(ids[missing][:5])}...; shapes index like {list(index[:5])})."
        )
        raise ValueError(msg)
    return rows, pos


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


# --------------------------------------------------------------------------------------------------------------------
# cohorts all-or-nothing: cheap checks first, computations into a working copy, written at the end
# --------------------------------------------------------------------------------------------------------------------
def check_patch_source(spots: Spots, name: str, *, image_key: str | None = None, image_mpp: float | None = None) -> str:
    """The image the patches of ``spots`` come from, after the cheap checks of :func:`spade_sc.pp.image_features`.

    Run on every slide of a cohort before features are computed on any: the image exists (or is the only one), is
    RGB(A) of a known dtype, has a pixel size, and shares a coordinate system with the spots; the spots are not
    empty. Nothing is read but a small sample of float images. Errors name the slide ``name``.
    """
    from ._image import image_levels, rgb_channels, value_scale
    from ._validation import named_errors

    with named_errors(name):
        key = resolve_key(spots.sdata, "images", image_key, what="image_key")
        if len(spots.shapes) == 0:
            msg = f"Slide {name!r}: the shapes element {spots.shapes_key!r} is empty."
            raise ValueError(msg)
        levels = image_levels(spots.sdata.images[key])
        rgb_channels(levels[0], key)
        value_scale(levels, key)
        image_pixel_size(spots.sdata, key, image_mpp=image_mpp)
        shared_coordinate_system(spots.sdata, key, spots.shapes_key)
    return key


def staged(spots: Spots) -> Spots:
    """A working copy of a slide's spots, for computations that must not touch the slide until a cohort is done.

    The copy is a new SpatialData sharing the slide's images and the spots' shapes (never changed by the
    computations), with a light copy of the table: ``obs`` copied, ``obsm`` and ``uns`` new dicts holding the same
    values, no ``X``. Compute into it (``image_features``, ``embed``), then :func:`commit` what it gained into the
    slide, once every slide of the cohort has succeeded.
    """
    from anndata import AnnData
    from spatialdata import SpatialData

    table = spots.table
    light = AnnData(obs=table.obs.copy(), obsm=dict(table.obsm), uns=dict(table.uns))
    work = SpatialData(
        images=dict(spots.sdata.images), shapes={spots.shapes_key: spots.shapes}, tables={spots.table_key: light}
    )
    try:
        work.attrs.update(copy.deepcopy(dict(spots.sdata.attrs)))
    except Exception:  # attrs a library keeps may not deep-copy; the readers only need the values
        work.attrs.update(dict(spots.sdata.attrs))
    return Spots(work, spots.table_key, spots.shapes_key)


def commit(work: Spots, spots: Spots) -> None:
    """Write into ``spots``' table what its working copy ``work`` (from :func:`staged`) gained or replaced.

    ``obsm`` and ``uns`` entries that are new or were replaced by another object, and ``obs`` columns that are new or
    changed.
    """
    src, dst = work.table, spots.table
    for key, value in src.obsm.items():
        if key not in dst.obsm or dst.obsm[key] is not value:
            dst.obsm[key] = value
    for col in src.obs.columns:
        if col not in dst.obs.columns or not src.obs[col].equals(dst.obs[col]):
            dst.obs[col] = src.obs[col].values  # same rows in the same order; categoricals stay categorical
    for key, value in src.uns.items():
        if key not in dst.uns or dst.uns[key] is not value:
            dst.uns[key] = value

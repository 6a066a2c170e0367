"""Tissue mask and a grid of tissue tiles for whole slides without spots."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import Keys
from .._image import (
    MIN_PATCH_SIZE,
    choose_level,
    image_levels,
    level_mpp,
    read_level_rgb,
    rgb_channels,
    value_scale,
)
from .._sdata import image_pixel_size, resolve_key
from .._validation import check_fraction, check_int, check_key_name, check_mpp
from .._version import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence

    import xarray as xr
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

#: The mask is made at a pixel size of at most this many micrometres ...
MASK_MAX_UM = 16.0
#: ... with at least this many pixels on the long side of the image ...
MASK_MIN_SIDE = 1000
#: ... and at most this many (larger levels are block-averaged lazily, chunk by chunk, before being computed).
MASK_MAX_SIDE = 4096
#: ... and at least this many mask pixels across one tile.
MASK_PX_PER_TILE = 4
#: Lowest saturation threshold: glass is never called tissue, whatever Otsu finds on an all-glass image.
MIN_SATURATION = 0.05
#: Lowest texture threshold (Sobel gradient magnitude of the grey image, 0..255 units): smooth glass is not tissue.
MIN_TEXTURE = 10.0


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of ``values``; their maximum when they are (nearly) constant."""
    from skimage.filters import threshold_otsu

    if float(values.max() - values.min()) < 1e-6:
        return float(values.max())
    return float(threshold_otsu(values))


def _remove_small(mask: np.ndarray, size: int, *, holes: bool) -> np.ndarray:
    """Call remove_small_objects / remove_small_holes of scikit-image across its API change (min_size -> max_size)."""
    from skimage import morphology

    func = morphology.remove_small_holes if holes else morphology.remove_small_objects
    if size < 1:
        return mask
    try:
        return func(mask, max_size=size)
    except TypeError:  # scikit-image < 0.26
        kw = "area_threshold" if holes else "min_size"
        return func(mask, **{kw: size + 1})


def _mask_level(level_mpp: list[float], sizes: list[tuple[int, int]], tile_um: float) -> tuple[int, int]:
    """(level, integer block-average factor) for the tissue mask."""
    p0 = level_mpp[0]
    long_um = max(sizes[0]) * p0
    target = min(MASK_MAX_UM, tile_um / MASK_PX_PER_TILE, long_um / MASK_MIN_SIDE)
    target = max(target, long_um / MASK_MAX_SIDE, p0)
    level = choose_level(level_mpp, target)
    factor = max(1, math.floor(target / level_mpp[level] + 1e-9))
    return level, factor


def tissue_mask(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    tile_um: float = 112.0,
    image_mpp: float | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A boolean tissue mask of an image at low resolution, and how it was made.

    The mask is computed on the coarsest pyramid level that has a pixel size of at most ``min(16 um,
    tile_um / 4, long side / 1000 px)`` (and that keeps the mask under 4096 px on its long side, block-averaging
    a finer level lazily when needed), so level 0 of a large slide is never read. Tissue is where the image is
    stained or textured: the HSV saturation (smoothed with a 1-px Gaussian) exceeds its Otsu threshold (at least
    0.05), or the texture (Sobel gradient magnitude of the smoothed grey image) exceeds its Otsu threshold on a log
    scale (at least 10 grey levels). Saturation alone misses pale, greyish stroma and fat; texture alone misses
    smooth, strongly stained tissue at coarse resolution; neither fires on smooth glass, even tinted by stain.
    Objects and holes smaller than a quarter of a tile are then removed.

    Parameters
    ----------
    sdata
        The SpatialData holding the image.
    image_key
        The image; may be omitted when there is only one.
    tile_um
        Side of the tiles the mask is for, in micrometres (sets the resolution and the size of removed specks).
    image_mpp
        Micrometres per level-0 pixel, overriding the recorded pixel size.

    Returns
    -------
    The (h, w) boolean mask and a dict with ``level``, ``factor`` (block average of that level), ``mask_mpp``,
    ``scale`` ((y, x) level-0 pixels per mask pixel), ``threshold`` (saturation), ``texture_threshold`` and
    ``tissue_fraction`` (of the whole image).
    """
    image_key = resolve_key(sdata, "images", image_key)
    mask, info, _, _ = _image_mask(sdata, image_key, tile_um, image_mpp)
    return mask, info


def _tissue_mask(
    levels: Sequence[xr.DataArray], p0: float, rgb: Sequence[int], scale: float, tile_um: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`tissue_mask` of checked image levels with level-0 pixel size ``p0``."""
    from scipy import ndimage

    sizes = [(int(lv.sizes["y"]), int(lv.sizes["x"])) for lv in levels]
    level, factor = _mask_level(level_mpp(levels, p0), sizes, tile_um)
    rgb_img = read_level_rgb(levels[level], rgb, scale, factor)
    hi = rgb_img.max(axis=0)
    lo = rgb_img.min(axis=0)
    sat = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)
    sat = ndimage.gaussian_filter(sat, sigma=1.0)
    threshold = max(_otsu(sat), MIN_SATURATION)
    grey = ndimage.gaussian_filter(rgb_img.mean(axis=0), sigma=1.0)
    texture = ndimage.gaussian_filter(np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1)), sigma=1.0)
    tex_threshold = max(float(np.expm1(_otsu(np.log1p(texture)))), MIN_TEXTURE)
    mask = (sat > threshold) | (texture > tex_threshold)
    h0, w0 = sizes[0]
    sy, sx = h0 / mask.shape[0], w0 / mask.shape[1]
    mask_mpp = p0 * math.sqrt(sy * sx)
    min_px = int((0.5 * tile_um / mask_mpp) ** 2)
    mask = _remove_small(mask, min_px, holes=False)
    mask = _remove_small(mask, min_px, holes=True)
    info = {
        "level": int(level),
        "factor": int(factor),
        "mask_mpp": float(mask_mpp),
        "scale": (float(sy), float(sx)),
        "threshold": float(threshold),
        "texture_threshold": float(tex_threshold),
        "tissue_fraction": float(mask.mean()),
    }
    return mask, info


def _box_fraction(mask: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """Mean of ``mask`` over continuous boxes in mask pixel coordinates (outside the mask counts as 0).

    Uses the summed-area table, bilinearly interpolated: exact for a piecewise-constant mask.
    """
    from scipy import ndimage

    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)
    h, w = mask.shape

    def at(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(sat, [np.clip(y, 0, h), np.clip(x, 0, w)], order=1, mode="nearest")

    total = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)
    area = (y1 - y0) * (x1 - x0)
    return np.clip(total / area, 0.0, 1.0)


def tile_tissue(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    mpp: float = 0.5,
    tile_size: int = 224,
    overlap: int = 0,
    min_tissue: float = 0.5,
    image_mpp: float | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
) -> None:
    """Cover the tissue of a whole-slide image with a grid of square tiles.

    A tissue mask is made at low resolution (see :func:`tissue_mask`: Otsu thresholds on the HSV saturation and
    on the texture of a coarse pyramid level; level 0 is never read). A grid of square tiles of side
    ``tile_size * mpp`` um, with a step of ``(tile_size - overlap) * mpp`` um, starts at the image's top-left corner
    and covers the whole image (the last row and column may extend past the border). A tile is kept when at least
    ``min_tissue`` of its area is tissue (and at least some of it is); area outside the image counts as glass.
    Embed the tiles with ``spade_sc.pp.image_features(sdata, shapes_key="<image>_tiles", mpp=mpp,
    patch_size=tile_size)``: with the same ``mpp`` and ``tile_size`` each patch is exactly its tile.

    Parameters
    ----------
    sdata
        The SpatialData holding the image (changed in place).
    image_key
        The image; may be omitted when there is only one.
    mpp
        Micrometres per pixel at which tiles are ``tile_size`` px wide.
    tile_size
        Tile side in pixels at ``mpp`` (at least 16).
    overlap
        Overlap of neighbouring tiles in pixels at ``mpp`` (0 <= overlap < tile_size).
    min_tissue
        Fraction of a tile's area that must be tissue, in [0, 1].
    image_mpp
        Micrometres per level-0 pixel of the image, overriding the recorded pixel size.
    key_added
        Name of the shapes element; default ``"<image_key>_tiles"``. The table is ``"<key_added>_table"``
        (spatialdata needs distinct names for a shapes element and a table).
    overwrite
        Replace existing elements of these names.

    Returns
    -------
    None; writes

    - ``shapes["<image>_tiles"]``: the kept tiles as square polygons in the image's level-0 pixel coordinates, with
      the image's transformations (they overlay the image in every coordinate system); index ``tile_id``
      (0..n-1);
    - ``tables["<image>_tiles_table"]``: a table annotating those shapes (``region_key="region"``,
      ``instance_key="tile_id"``), with an empty (n_tiles x 0) ``X``; ``obs`` columns ``tile_id``, ``row``,
      ``col`` (grid position), ``tissue_fraction``, ``x``, ``y`` (tile centre in level-0 pixels); ``obsm["spatial"]``
      (the centres); ``uns["tile_tissue"]``: the parameters (``image_key``, ``mpp``, ``tile_size``, ``overlap``,
      ``min_tissue``, ``image_mpp``, ``tile_px``, ``step_px`` (level-0 pixels), ``grid_shape``, ``mask_level``,
      ``mask_factor`` (block average of that level), ``mask_mpp``, ``threshold``, ``texture_threshold``,
      ``tissue_fraction`` of the
      image, ``n_tiles``, ``spade_sc_version``).
    """
    tiles = tile_elements(
        sdata,
        image_key=image_key,
        mpp=mpp,
        tile_size=tile_size,
        overlap=overlap,
        min_tissue=min_tissue,
        image_mpp=image_mpp,
        key_added=key_added,
        overwrite=overwrite,
    )
    write_tiles(sdata, tiles)


@dataclass(frozen=True)
class Tiles:
    """The elements :func:`tile_tissue` writes into a slide: the tiles' shapes and the table annotating them."""

    image_key: str
    shapes_key: str
    table_key: str
    shapes: Any
    table: AnnData


def tile_elements(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    mpp: float = 0.5,
    tile_size: int = 224,
    overlap: int = 0,
    min_tissue: float = 0.5,
    image_mpp: float | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
) -> Tiles:
    """The tiles of :func:`tile_tissue` (same arguments), made but not written: every check and the tissue mask.

    Cohort functions make the tiles of every slide first and write them (:func:`write_tiles`) only when all slides
    have succeeded.
    """
    tile_size = check_int(tile_size, "tile_size", low=MIN_PATCH_SIZE)
    overlap = check_int(overlap, "overlap", low=0, high=tile_size, why=f" (below tile_size = {tile_size})")
    mpp = check_mpp(mpp)
    min_tissue = check_fraction(min_tissue, "min_tissue", closed_high=True)
    image_key = resolve_key(sdata, "images", image_key)
    shapes_key, table_key = tiles_keys(image_key, key_added)
    for what, name in (("key_added", shapes_key), ("the tiles table name", table_key)):
        check_key_name(name, what)
    _check_names(sdata, shapes_key, table_key, overwrite=overwrite)

    tile_um = tile_size * mpp
    mask, info, p0, (h0, w0) = _image_mask(sdata, image_key, tile_um, image_mpp)
    grid = _grid(mask, info, (h0, w0), side=tile_um / p0, step=(tile_size - overlap) * mpp / p0)
    keep = (grid.frac >= min_tissue) & (grid.frac > 0)
    if not keep.any():
        msg = (
            f"No tile of image {image_key!r} has at least {min_tissue:.0%} tissue: the tissue mask covers "
            f"{info['tissue_fraction']:.2%} of the image (saturation threshold {info['threshold']:.3f}, texture "
            f"threshold {info['texture_threshold']:.1f}, mask level {info['level']} at {info['mask_mpp']:.2f} "
            "um/px). Lower min_tissue or check the image."
        )
        raise ValueError(msg)
    grid = grid.subset(keep)
    params = {
        "image_key": image_key,
        "mpp": mpp,
        "tile_size": tile_size,
        "overlap": overlap,
        "min_tissue": min_tissue,
        "image_mpp": float(p0),
        "tile_px": float(grid.side),
        "step_px": float(grid.step),
        "grid_shape": list(grid.shape),
        "mask_level": info["level"],
        "mask_factor": info["factor"],
        "mask_mpp": info["mask_mpp"],
        "threshold": info["threshold"],
        "texture_threshold": info["texture_threshold"],
        "tissue_fraction": info["tissue_fraction"],
        "n_tiles": len(grid.rows),
    }
    shapes = _tiles_shapes(grid, sdata.images[image_key])
    return Tiles(image_key, shapes_key, table_key, shapes, _tiles_table(grid, shapes_key, params))


def write_tiles(sdata: SpatialData, tiles: Tiles) -> None:
    """Write the tiles made by :func:`tile_elements` into ``sdata``, replacing elements of the same names."""
    if tiles.table_key in sdata.tables:
        del sdata.tables[tiles.table_key]
    if tiles.shapes_key in sdata.shapes:
        del sdata.shapes[tiles.shapes_key]
    sdata.shapes[tiles.shapes_key] = tiles.shapes
    sdata.tables[tiles.table_key] = tiles.table
    params = tiles.table.uns[Keys.TILING]
    logger.info(
        "tile_tissue: %d tiles of %d px at %.3g um/px on %r (tissue %.1f%% of the image, mask level %d)",
        params["n_tiles"],
        params["tile_size"],
        params["mpp"],
        tiles.image_key,
        100 * params["tissue_fraction"],
        params["mask_level"],
    )


# --------------------------------------------------------------------------------------------------------------------
# steps of tile_tissue
# --------------------------------------------------------------------------------------------------------------------
def tiles_keys(image_key: str, key_added: str | None = None) -> tuple[str, str]:
    """(shapes key, table key) of the tiles of ``image_key`` (``key_added`` names the shapes when given).

    The default names are :meth:`Keys.tiles` and :meth:`Keys.tiles_table`; the table of shapes named ``key_added``
    is ``"<key_added>_table"`` (spatialdata needs distinct names for a shapes element and a table).
    """
    if key_added is None:
        return Keys.tiles(image_key), Keys.tiles_table(image_key)
    return key_added, Keys.table_of(key_added)


def _check_names(sdata: SpatialData, shapes_key: str, table_key: str, *, overwrite: bool) -> None:
    """The tiles' names must not name other kinds of elements, nor existing tiles unless ``overwrite``."""
    for name, kinds in (
        (shapes_key, ("images", "labels", "points", "tables")),
        (table_key, ("images", "labels", "points", "shapes")),
    ):
        other = [k for k in kinds if name in getattr(sdata, k)]
        if other:
            msg = f"{name!r} already names an element of sdata.{other[0]}; choose another key_added."
            raise ValueError(msg)
    if not overwrite:
        exists = [f"shapes[{shapes_key!r}]"] if shapes_key in sdata.shapes else []
        exists += [f"tables[{table_key!r}]"] if table_key in sdata.tables else []
        if exists:
            msg = f"{' and '.join(exists)} already exist(s); pass overwrite=True to replace."
            raise ValueError(msg)


def _image_mask(
    sdata: SpatialData, image_key: str, tile_um: float, image_mpp: float | None
) -> tuple[np.ndarray, dict[str, Any], float, tuple[int, int]]:
    """:func:`tissue_mask` of a resolved image, with the level-0 pixel size and (height, width)."""
    levels = image_levels(sdata.images[image_key])
    p0 = image_pixel_size(sdata, image_key, image_mpp=image_mpp)
    rgb = rgb_channels(levels[0], image_key)
    scale = value_scale(levels, image_key)
    mask, info = _tissue_mask(levels, p0, rgb, scale, tile_um)
    return mask, info, p0, (int(levels[0].sizes["y"]), int(levels[0].sizes["x"]))


@dataclass(frozen=True)
class _Grid:
    """Square tiles of ``side`` level-0 pixels every ``step`` pixels: grid position, corner and tissue fraction."""

    side: float
    step: float
    shape: tuple[int, int]  # (rows, columns) of the whole grid
    rows: np.ndarray
    cols: np.ndarray
    y0: np.ndarray
    x0: np.ndarray
    frac: np.ndarray

    def subset(self, keep: np.ndarray) -> _Grid:
        """The tiles where ``keep`` is True."""
        picked = {k: getattr(self, k)[keep] for k in ("rows", "cols", "y0", "x0", "frac")}
        return _Grid(side=self.side, step=self.step, shape=self.shape, **picked)


def _grid(mask: np.ndarray, info: dict[str, Any], size: tuple[int, int], *, side: float, step: float) -> _Grid:
    """The grid from the image's top-left corner covering the whole image, with each tile's tissue fraction."""
    h0, w0 = size
    n_rows = max(1, math.ceil(max(h0 - side, 0) / step) + 1)
    n_cols = max(1, math.ceil(max(w0 - side, 0) / step) + 1)
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    y0, x0 = rows * step, cols * step
    sy, sx = info["scale"]
    frac = _box_fraction(mask, y0 / sy, (y0 + side) / sy, x0 / sx, (x0 + side) / sx)
    return _Grid(side=side, step=step, shape=(int(n_rows), int(n_cols)), rows=rows, cols=cols, y0=y0, x0=x0, frac=frac)


def _tiles_shapes(grid: _Grid, image: Any) -> Any:
    """The tiles as square polygons in the image's level-0 pixels, with the image's transformations."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    transforms = {cs: copy.deepcopy(t) for cs, t in get_transformation(image, get_all=True).items()}
    geoms = shapely.box(grid.x0, grid.y0, grid.x0 + grid.side, grid.y0 + grid.side)
    gdf = gpd.GeoDataFrame(geometry=geoms, index=pd.Index(np.arange(len(grid.rows)), name="tile_id"))
    return ShapesModel.parse(gdf, transformations=transforms)


def _tiles_table(grid: _Grid, shapes_key: str, params: dict[str, Any]) -> AnnData:
    """The table annotating the tiles: grid position, tissue fraction, centre; ``uns["tile_tissue"]``."""
    from anndata import AnnData
    from scipy import sparse
    from spatialdata.models import TableModel

    n = len(grid.rows)
    ids = np.arange(n)
    cx, cy = grid.x0 + grid.side / 2, grid.y0 + grid.side / 2
    obs = pd.DataFrame(
        {
            "tile_id": ids,
            "row": grid.rows.astype(np.int64),
            "col": grid.cols.astype(np.int64),
            "tissue_fraction": grid.frac.astype(np.float32),
            "x": cx,
            "y": cy,
            "region": pd.Categorical([shapes_key] * n),
        },
        index=pd.Index([str(i) for i in ids]),
    )
    adata = AnnData(X=sparse.csr_matrix((n, 0), dtype=np.float32), obs=obs)
    adata.obsm["spatial"] = np.stack([cx, cy], axis=1)
    adata.uns[Keys.TILING] = {**params, "spade_sc_version": __version__}
    return TableModel.parse(adata, region=shapes_key, region_key="region", instance_key="tile_id")

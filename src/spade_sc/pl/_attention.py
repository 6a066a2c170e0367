"""Attention heatmaps over the H&E thumbnail and galleries of the highest-attention tiles.

Both read what :func:`spade_sc.tl.attention` wrote on a slide's tiles table and compute nothing else: the heatmap
reads one coarse pyramid level only (block-averaged lazily when even the coarsest level is large), the gallery reads
the pixels under the top tiles only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import WRITERS, Keys
from .._image import (
    LevelReader,
    choose_level,
    image_levels,
    level_mpp,
    read_level_rgb,
    rgb_channels,
    value_scale,
)
from .._sdata import (
    image_pixel_size,
    resolve_key,
    rows_to_shapes,
    shared_coordinate_system,
    to_pixels_matrix,
)
from .._validation import check_fraction, check_int
from ._spatial import finish, shapes_with_column

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from spatialdata import SpatialData

#: Long side (pixels) the heatmap's thumbnail aims for: the coarsest pyramid level at least this large is read.
THUMBNAIL_SIDE = 1024


def _attention_table(sdata: SpatialData, key: str, tiles_key: str | None) -> tuple[str, str]:
    """(table key, tiles key) of the table holding ``obs[key]``, with an error naming the writer."""
    try:
        return shapes_with_column(sdata, key, shapes_key=tiles_key)
    except KeyError as err:
        if key in WRITERS:
            raise
        msg = (
            f"No table of this SpatialData has obs[{key!r}]; attention scores are written by spade_sc.tl.attention "
            f"(obs[key_added] and obs[key_added + '_pct'], default {Keys.ATTENTION!r} / {Keys.ATTENTION_PCT!r})."
        )
        raise KeyError(msg) from err


def _image_for(sdata: SpatialData, table: Any, image_key: str | None) -> str:
    if image_key is None:
        recorded = table.uns.get(Keys.TILING, {}).get("image_key")
        if recorded in sdata.images and len(sdata.images) > 1:
            return str(recorded)
    return resolve_key(sdata, "images", image_key, what="image_key")


def _tile_boxes(sdata: SpatialData, table: Any, tiles_key: str, image_key: str) -> np.ndarray:
    """(n_rows, 4) level-0 pixel boxes ``x0, y0, x1, y1`` of the tiles of every table row (table order)."""
    import shapely

    shapes = sdata.shapes[tiles_key]
    rows, pos = rows_to_shapes(table, "tiles table", shapes, tiles_key)
    if len(rows) != table.n_obs:
        msg = f"The table annotating {tiles_key!r} also annotates other elements; plot it through its own table."
        raise ValueError(msg)
    cs = shared_coordinate_system(sdata, image_key, tiles_key)
    m = to_pixels_matrix(sdata, tiles_key, image_key, cs)
    geoms = np.asarray(shapes.geometry.values)[pos]
    moved = shapely.transform(geoms, lambda xy: xy @ m[:2, :2].T + m[:2, 2])
    boxes = shapely.bounds(moved)
    if "radius" in shapes.columns:  # circles: points with a radius (in intrinsic units)
        r = shapes["radius"].to_numpy(dtype=float)[pos] * math.sqrt(abs(np.linalg.det(m[:2, :2])))
        is_point = shapely.get_type_id(geoms) == 0
        boxes[is_point] += np.stack([-r, -r, r, r], 1)[is_point]
    out = np.empty_like(boxes)
    out[rows] = boxes
    return out


def _thumbnail(sdata: SpatialData, image_key: str, side: int) -> tuple[np.ndarray, float, float]:
    """RGB uint8 (h, w, 3) thumbnail from a coarse level and its (sy, sx) level-0 pixels per thumbnail pixel."""
    levels = image_levels(sdata.images[image_key])
    rgb = rgb_channels(levels[0], image_key)
    scale = value_scale(levels, image_key)
    h0, w0 = int(levels[0].sizes["y"]), int(levels[0].sizes["x"])
    big = [lv for lv in levels if max(lv.sizes["y"], lv.sizes["x"]) >= side]
    level = big[-1] if big else levels[0]
    factor = max(1, int(max(level.sizes["y"], level.sizes["x"]) // (2 * side)))
    arr = read_level_rgb(level, rgb, scale, factor, align_chunks=False).astype(np.uint8)
    thumb = np.moveaxis(arr, 0, -1)
    return thumb, h0 / thumb.shape[0], w0 / thumb.shape[1]


def _rasterise(boxes: np.ndarray, values: np.ndarray, shape: tuple[int, int], *, mean: bool) -> np.ndarray:
    """Paint ``values`` over the thumbnail pixels covered by each box (mean of overlaps, or the last one)."""
    h, w = shape
    x0 = np.clip(np.floor(boxes[:, 0]).astype(int), 0, w)
    y0 = np.clip(np.floor(boxes[:, 1]).astype(int), 0, h)
    x1 = np.clip(np.maximum(np.ceil(boxes[:, 2]).astype(int), x0 + 1), 0, w)
    y1 = np.clip(np.maximum(np.ceil(boxes[:, 3]).astype(int), y0 + 1), 0, h)
    if mean:
        total = np.zeros(shape)
        count = np.zeros(shape)
        for i in range(len(values)):
            total[y0[i] : y1[i], x0[i] : x1[i]] += values[i]
            count[y0[i] : y1[i], x0[i] : x1[i]] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)
    out = np.full(shape, -1, dtype=np.int64)
    for i in range(len(values)):
        out[y0[i] : y1[i], x0[i] : x1[i]] = values[i]
    return out


def _outline_codes(table: Any, outline: str) -> tuple[np.ndarray, list[str]]:
    """Region code of every tile (-1: none) and the region names, from a categorical, string or boolean column."""
    col = table.obs[outline]
    if pd.api.types.is_bool_dtype(col):
        return np.where(col.to_numpy(dtype=bool), 0, -1), [outline]
    if (
        isinstance(col.dtype, pd.CategoricalDtype)
        or pd.api.types.is_object_dtype(col)
        or pd.api.types.is_string_dtype(col)
    ):
        cat = pd.Categorical(col)
        return cat.codes.astype(np.int64), [str(c) for c in cat.categories]
    msg = f"outline={outline!r} must be a categorical, string or boolean column, got dtype {col.dtype}."
    raise ValueError(msg)


def _draw_outline(ax: Axes, raster: np.ndarray, categories: Sequence[str], title: str) -> None:
    """Contour of each region of a rasterised code image, with a legend below the Axes."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    palette = colormaps["tab10" if len(categories) <= 10 else "tab20"]
    handles = []
    for k, name in enumerate(categories):
        mask = raster == k
        if not mask.any():
            continue
        colour = palette(k % palette.N)
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
        handles.append(Line2D([], [], color=colour, lw=1.5, label=name))
    if handles:
        ax.legend(
            handles=handles,
            title=title,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncols=min(len(handles), 5),
            frameon=False,
        )


def attention(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    tiles_key: str | None = None,
    key: str = Keys.ATTENTION_PCT,
    threshold: float | None = 0.55,
    cmap: str = "coolwarm",
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    outline: str | None = None,
    thumbnail_side: int = THUMBNAIL_SIDE,
    colorbar: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes | None:
    """Attention heatmap of a slide blended over its H&E thumbnail (CLAM-style).

    The thumbnail is the coarsest pyramid level whose long side is at least ``thumbnail_side`` pixels (block-averaged
    lazily when it is more than twice that), so level 0 of a whole slide is never read. Every tile is painted with its
    value over the thumbnail pixels it covers (overlapping tiles are averaged); tiles whose value is at most
    ``threshold`` stay transparent, so the tissue shows through; the others are coloured by ``cmap`` and blended
    with opacity ``alpha``.

    Parameters
    ----------
    sdata
        A slide whose tiles table holds ``obs[key]`` (written by :func:`spade_sc.tl.attention`).
    image_key
        The H&E image; default the one the tiles were made on, or the only one.
    tiles_key
        The tiles shapes element, when several tables hold ``obs[key]``.
    key
        The ``obs`` column to paint: the percentile rank ``"spade_attention_pct"`` (default) or the raw score
        ``"spade_attention"``.
    threshold
        Values at or below it are not drawn (None: draw all).
    cmap
        Colormap of the heatmap.
    alpha
        Opacity of the heatmap over the image.
    vmin, vmax
        Colour range; default [0, 1] when the values lie in it, else their range.
    outline
        An ``obs`` column of the tiles table (categorical, string or boolean; e.g. a region label) whose regions are
        drawn as contours (for booleans, the True region).
    thumbnail_side
        Target long side of the thumbnail in pixels.
    colorbar
        Draw a colour bar.
    title
        Axes title; default ``key``.
    ax
        Axes to draw into.
    show
        Show the figure (default: when not saving and matplotlib is interactive).
    save
        File to save the figure to.

    Returns
    -------
    The Axes when not shown.
    """
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    alpha = check_fraction(alpha, "alpha", closed_high=True)
    tkey, skey = _attention_table(sdata, key, tiles_key)
    table = sdata.tables[tkey]
    if outline is not None and outline not in table.obs:
        msg = f"outline={outline!r} is not an obs column of the tiles table {tkey!r}: {list(table.obs.columns)}."
        raise KeyError(msg)
    values = pd.to_numeric(table.obs[key], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(values).any():
        msg = f"tables[{tkey!r}].obs[{key!r}] holds no finite value."
        raise ValueError(msg)
    codes, categories = _outline_codes(table, outline) if outline is not None else (None, None)
    image_key = _image_for(sdata, table, image_key)
    boxes = _tile_boxes(sdata, table, skey, image_key)

    thumb, sy, sx = _thumbnail(sdata, image_key, int(thumbnail_side))
    tboxes = boxes / np.array([sx, sy, sx, sy])
    finite = np.isfinite(values)
    heat = _rasterise(tboxes[finite], values[finite], thumb.shape[:2], mean=True)
    lo = vmin if vmin is not None else (0.0 if np.nanmin(values) >= 0 and np.nanmax(values) <= 1 else np.nanmin(values))
    hi = vmax if vmax is not None else (1.0 if np.nanmin(values) >= 0 and np.nanmax(values) <= 1 else np.nanmax(values))
    norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    colours = colormaps[cmap]
    overlay = colours(norm(np.nan_to_num(heat, nan=lo)))
    shown = (
        np.isfinite(heat) if threshold is None else np.isfinite(heat) & (np.nan_to_num(heat, nan=-np.inf) > threshold)
    )
    overlay[..., 3] = np.where(shown, alpha, 0.0)

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(thumb, interpolation="antialiased")
    ax.imshow(overlay, interpolation="nearest")
    if codes is not None:
        _draw_outline(ax, _rasterise(tboxes, codes, thumb.shape[:2], mean=False), categories, outline)
    if colorbar:
        mappable = ScalarMappable(norm=norm, cmap=colours)
        cb = ax.figure.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02)
        cb.set_label(key)
        if threshold is not None and lo < threshold < hi:
            cb.ax.axhline(threshold, color="k", lw=0.8)
    ax.set_title(title if title is not None else key)
    ax.set_axis_off()
    return finish(ax, show, save)


def _gallery_reader(sdata: SpatialData, image_key: str, mpp: float | None) -> tuple[LevelReader, tuple[float, float]]:
    """Reader of the level the tiles are cut from, and its (y, x) downsampling from level 0.

    The coarsest level whose pixel size is at most the tiling's ``mpp``; level 0 when it or the pixel size is unknown.
    """
    levels = image_levels(sdata.images[image_key])
    rgb = rgb_channels(levels[0], image_key)
    scale = value_scale(levels, image_key)
    level = 0
    if mpp is not None:
        try:
            p0 = image_pixel_size(sdata, image_key)
        except ValueError:
            p0 = None
        if p0 is not None:
            level = choose_level(level_mpp(levels, p0), float(mpp))
    lv = levels[level]
    data = lv.data
    if np.dtype(data.dtype).kind == "f":  # the gallery scales float images in float32, not in their own dtype
        data = data.astype(np.float32, copy=False)
    k = (levels[0].sizes["y"] / lv.sizes["y"], levels[0].sizes["x"] / lv.sizes["x"])
    return LevelReader(data, rgb, scale), k


def top_patches(
    sdata: SpatialData,
    *,
    n: int = 50,
    key: str = Keys.ATTENTION,
    ncols: int = 10,
    image_key: str | None = None,
    tiles_key: str | None = None,
    ax: Sequence[Axes] | np.ndarray | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> np.ndarray | None:
    """Gallery of the tiles with the highest attention, cut from the image and titled with their score.

    Each tile is read lazily (only its pixels): from the coarsest pyramid level whose pixel size is at most the
    tiling's ``mpp`` (so the patch looks as the encoder saw it), or from level 0 when the tiles do not record it.

    Parameters
    ----------
    sdata
        A slide whose tiles table holds ``obs[key]`` (written by :func:`spade_sc.tl.attention`).
    n
        Number of tiles (at most the number of tiles).
    key
        ``obs`` column ranking the tiles: ``"spade_attention"`` (raw score, default) or ``"spade_attention_pct"``.
    ncols
        Columns of the gallery.
    image_key
        The H&E image; default the one the tiles were made on, or the only one.
    tiles_key
        The tiles shapes element, when several tables hold ``obs[key]``.
    ax
        At least ``n`` Axes to draw into (a sequence or an array); default a new figure.
    show
        Show the figure.
    save
        File to save the figure to.

    Returns
    -------
    The array of Axes when not shown.
    """
    import matplotlib.pyplot as plt

    n = check_int(n, "n")
    ncols = check_int(ncols, "ncols")
    tkey, skey = _attention_table(sdata, key, tiles_key)
    table = sdata.tables[tkey]
    values = pd.to_numeric(table.obs[key], errors="coerce").to_numpy(dtype=float)
    ok = np.flatnonzero(np.isfinite(values))
    if len(ok) == 0:
        msg = f"tables[{tkey!r}].obs[{key!r}] holds no finite value."
        raise ValueError(msg)
    n = int(min(n, len(ok)))
    top = ok[np.argsort(-values[ok], kind="stable")[:n]]
    image_key = _image_for(sdata, table, image_key)
    boxes = _tile_boxes(sdata, table, skey, image_key)[top]
    reader, (ky, kx) = _gallery_reader(sdata, image_key, table.uns.get(Keys.TILING, {}).get("mpp"))

    if ax is None:
        ncols = int(min(ncols, n))
        nrows = math.ceil(n / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.8 * nrows), squeeze=False)
        axes = np.asarray(axes)
    else:
        axes = np.asarray(ax, dtype=object)
        if axes.ndim == 0 or axes.size < n:
            msg = f"top_patches draws one Axes per tile: pass at least n={n} Axes (got {axes.size})."
            raise ValueError(msg)
    flat = axes.ravel()
    windows = [
        (int(np.floor(y0 / ky)), int(np.ceil(y1 / ky)), int(np.floor(x0 / kx)), int(np.ceil(x1 / kx)))
        for x0, y0, x1, y1 in boxes
    ]
    for i, win in enumerate(reader.read(windows)):
        ax_i = flat[i]
        ax_i.imshow(np.moveaxis(win, 0, -1).astype(np.uint8))
        ax_i.set_title(f"{values[top[i]]:.3g}", fontsize=8)
        ax_i.set_axis_off()
    for ax_i in flat[n:]:
        ax_i.set_axis_off()
    if ax is None:
        fig.suptitle(f"top {n} tiles by {key}", fontsize=10)
    out = finish(list(flat), show, save)
    return None if out is None else axes

"""Patch features: H&E patches around spots (or tiles) -> frozen encoder -> ``tables[t].obsm["X_<encoder>"]``.

How patches are made
--------------------
- **Centres.** Circles give their centre, polygons (e.g. the tiles of :func:`spade_sc.pp.tile_tissue`) their
  centroid. Centres are mapped from the shapes' intrinsic coordinates to the level-0 pixels of the image through
  the spatialdata transformations of both elements to a coordinate system they share.
- **Pyramid level.** The level read is the *coarsest level whose pixel size is at most the target* ``mpp``
  (within :data:`LEVEL_TOLERANCE`, 10 %), so patches are never upsampled when a fine enough level exists and no
  more pixels than needed are read. When even level 0 is coarser than the target, level 0 is read and upsampled.
- **Resampling.** Each patch covers ``patch_size * mpp`` um, centred on the spot with sub-pixel accuracy, and is
  resampled to exactly ``patch_size x patch_size`` px with a separable triangle filter (bilinear interpolation when
  upsampling, an antialiasing triangle of width ``2 * scale`` when downsampling: the filter of PIL / torch's
  ``antialias=True``). Pixels outside the image are filled with :data:`FILL` (255: white, i.e. glass).
- **Reading.** Only the dask chunks under the patches are read, chunk by chunk, through a small LRU cache shared by
  the reader threads (patches are processed in a space-filling (Morton) order of their chunks, so each chunk is
  usually read once); the whole image is never materialised. A thread pool prepares the next batches while the
  encoder runs on the current one.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import TYPE_CHECKING, Any

import numpy as np

from .._sdata import (
    image_levels,
    image_pixel_size,
    level_mpp,
    resolve_key,
    resolve_table,
    shared_coordinate_system,
    table_region,
    to_pixels_matrix,
)

if TYPE_CHECKING:
    import xarray as xr
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

#: Value of pixels outside the image (uint8): white, like glass.
FILL = 255
#: A level is used without upsampling when its pixel size is at most ``mpp * (1 + LEVEL_TOLERANCE)``.
LEVEL_TOLERANCE = 0.1
#: Bytes of decoded image chunks kept in the reader's LRU cache.
CACHE_BYTES = 256 * 2**20
#: Images whose dask chunks are larger than this are read window by window instead of chunk by chunk.
MAX_CHUNK_BYTES = 64 * 2**20
#: Side of the window sampled to decide the value range of float images.
FLOAT_SAMPLE_SIDE = 512
MIN_PATCH_SIZE = 16

_RGB_NAMES = {"r": "r", "red": "r", "g": "g", "green": "g", "b": "b", "blue": "b", "a": "a", "alpha": "a"}


# --------------------------------------------------------------------------------------------------------------------
# image checks (shared with tile_tissue)
# --------------------------------------------------------------------------------------------------------------------
def rgb_channels(level: xr.DataArray, image_key: str) -> list[int]:
    """Indices of the R, G, B channels of an image level (c, y, x); alpha is dropped.

    Channel coordinates may be ``r/g/b(/a)`` (or ``red/green/blue(/alpha)``, any case, any order) or the integers
    ``0, 1, 2(, 3)`` (taken as R, G, B(, A)). Anything else is an error naming the coordinates.
    """
    if "c" not in level.dims:
        msg = f"Image {image_key!r} has no channel dimension 'c' (dims {tuple(level.dims)}); an RGB image is needed."
        raise ValueError(msg)
    n = int(level.sizes["c"])
    coords = list(level.coords["c"].values) if "c" in level.coords else list(range(n))
    if n not in (3, 4):
        msg = (
            f"Image {image_key!r} has {n} channel(s) (c coords {coords}); an RGB (3) or RGBA (4, alpha dropped) "
            "H&E image is needed."
        )
        raise ValueError(msg)
    names = [str(c).strip().lower() for c in coords]
    if all(s in _RGB_NAMES for s in names):
        canon = [_RGB_NAMES[s] for s in names]
        if sorted(canon) in (["b", "g", "r"], ["a", "b", "g", "r"]):
            return [canon.index("r"), canon.index("g"), canon.index("b")]
    if all(s.isdigit() for s in names) and sorted(int(s) for s in names) == list(range(n)):
        ints = [int(s) for s in names]
        return [ints.index(0), ints.index(1), ints.index(2)]
    msg = (
        f"Image {image_key!r} has channels {coords}, which are not in a known RGB order; expected c coords "
        "'r', 'g', 'b' (optionally 'a') or 0, 1, 2 (optionally 3)."
    )
    raise ValueError(msg)


def value_scale(levels: Sequence[xr.DataArray], image_key: str) -> float:
    """Factor turning the image's values into 0..255.

    uint8: 1. uint16: 1/257 (65535 -> 255). Float: decided from a small sample (a central window of at most
    :data:`FLOAT_SAMPLE_SIDE` px of the coarsest level): values in [0, 1] (sample max <= 1) -> 255, otherwise
    assumed to be in [0, 255] -> 1. The whole image is never scanned. Other dtypes are an error.
    """
    dtype = np.dtype(levels[0].dtype)
    if dtype == np.uint8:
        return 1.0
    if dtype == np.uint16:
        return 1.0 / 257.0
    if np.issubdtype(dtype, np.floating):
        lv = levels[-1]
        h, w = int(lv.sizes["y"]), int(lv.sizes["x"])
        y0, x0 = max(0, (h - FLOAT_SAMPLE_SIDE) // 2), max(0, (w - FLOAT_SAMPLE_SIDE) // 2)
        sample = np.asarray(lv.data[:, y0 : y0 + FLOAT_SAMPLE_SIDE, x0 : x0 + FLOAT_SAMPLE_SIDE])
        top = float(np.nanmax(sample)) if np.isfinite(sample).any() else 1.0
        return 255.0 if top <= 1.0 else 1.0
    msg = f"Image {image_key!r} has dtype {dtype}; uint8, uint16 or float RGB values are expected."
    raise ValueError(msg)


def read_level_rgb(
    level: xr.DataArray, rgb: Sequence[int], scale: float, factor: int, *, align_chunks: bool = True
) -> np.ndarray:
    """Float32 (3, h, w) RGB in 0..255 of a whole image level, block-averaged by ``factor`` (NaN -> 255).

    With ``factor > 1`` the level is cropped to a multiple of ``factor`` and averaged lazily, chunk by chunk; with
    ``align_chunks`` its chunks are first made multiples of ``factor`` (otherwise dask aligns them itself, which
    can change float sums in the last bits).
    """
    data = level.data[rgb]
    if factor > 1:
        import dask.array as da

        if not hasattr(data, "dask"):
            data = da.from_array(np.asarray(data))
        h, w = data.shape[1] // factor * factor, data.shape[2] // factor * factor
        data = data[:, :h, :w].astype(np.float32)
        if align_chunks:
            cy = max(factor, data.chunksize[1] // factor * factor)
            cx = max(factor, data.chunksize[2] // factor * factor)
            data = data.rechunk((3, cy, cx))
        data = da.coarsen(np.mean, data, {1: factor, 2: factor})
    out = np.asarray(data.compute() if hasattr(data, "compute") else data, dtype=np.float32) * scale
    return np.nan_to_num(out, nan=255.0).clip(0, 255)


def choose_level(level_mpp: Sequence[float], target: float, tolerance: float = LEVEL_TOLERANCE) -> int:
    """Coarsest level with pixel size <= ``target * (1 + tolerance)``; the finest level when none is that fine."""
    ok = [i for i, p in enumerate(level_mpp) if p <= target * (1.0 + tolerance)]
    if ok:
        return max(ok, key=lambda i: level_mpp[i])
    return int(np.argmin(level_mpp))


# --------------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------------
class _Entry:
    __slots__ = ("error", "event", "value")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value: np.ndarray | None = None
        self.error: BaseException | None = None


class LevelReader:
    """Reads rectangular windows of one image level (c, y, x) as float32 RGB in 0..255, padded with ``fill``.

    Chunk mode (chunks <= :data:`MAX_CHUNK_BYTES`): the dask chunks under the requested windows are computed (one
    ``dask.compute`` call per request, synchronous scheduler) and kept in a thread-safe LRU cache of
    ``cache_bytes``; a chunk that another thread is already reading is waited for, not read twice. Window mode
    (larger chunks): each window is read directly.
    """

    def __init__(
        self,
        data: Any,
        rgb: Sequence[int],
        scale: float,
        *,
        fill: float = FILL,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.data = data
        self.rgb = list(rgb)
        self.scale = float(scale)
        self.fill = float(fill)
        self.height, self.width = int(data.shape[1]), int(data.shape[2])
        self.is_dask = hasattr(data, "dask")
        if self.is_dask:
            self.ybounds = np.cumsum((0, *data.chunks[1]))
            self.xbounds = np.cumsum((0, *data.chunks[2]))
            chunk_bytes = data.shape[0] * max(data.chunks[1]) * max(data.chunks[2]) * data.dtype.itemsize
        else:
            self.ybounds = np.array([0, self.height])
            self.xbounds = np.array([0, self.width])
            chunk_bytes = 0
        self.chunk_mode = self.is_dask and chunk_bytes <= min(MAX_CHUNK_BYTES, cache_bytes // 2)
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple[int, int], _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.chunks_read = 0

    # chunk grid --------------------------------------------------------------------------------------------------
    def chunk_index(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Chunk row / column holding the (clipped) pixel positions ``y``, ``x``."""
        yi = np.clip(np.floor(y), 0, self.height - 1)
        xi = np.clip(np.floor(x), 0, self.width - 1)
        cy = np.searchsorted(self.ybounds, yi, side="right") - 1
        cx = np.searchsorted(self.xbounds, xi, side="right") - 1
        return cy, cx

    def _chunks_of(self, box: tuple[int, int, int, int]) -> list[tuple[int, int]]:
        y0, y1, x0, x1 = box
        cy0 = int(np.searchsorted(self.ybounds, y0, side="right") - 1)
        cy1 = int(np.searchsorted(self.ybounds, y1 - 1, side="right") - 1)
        cx0 = int(np.searchsorted(self.xbounds, x0, side="right") - 1)
        cx1 = int(np.searchsorted(self.xbounds, x1 - 1, side="right") - 1)
        return [(cy, cx) for cy in range(cy0, cy1 + 1) for cx in range(cx0, cx1 + 1)]

    def _get_chunks(self, keys: set[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        import dask

        owned: dict[tuple[int, int], _Entry] = {}
        waiting: dict[tuple[int, int], _Entry] = {}
        with self._lock:
            for key in keys:
                entry = self._cache.get(key)
                if entry is None:
                    entry = _Entry()
                    self._cache[key] = entry
                    owned[key] = entry
                else:
                    self._cache.move_to_end(key)
                    waiting[key] = entry
        out: dict[tuple[int, int], np.ndarray] = {}
        if owned:
            order = list(owned)
            parts = []
            for cy, cx in order:
                parts.append(
                    self.data[
                        :,
                        self.ybounds[cy] : self.ybounds[cy + 1],
                        self.xbounds[cx] : self.xbounds[cx + 1],
                    ]
                )
            try:
                values = dask.compute(*parts, scheduler="synchronous")
            except BaseException as err:
                with self._lock:
                    for key, entry in owned.items():
                        entry.error = err
                        self._cache.pop(key, None)
                        entry.event.set()
                raise
            with self._lock:
                for key, value in zip(order, values, strict=True):
                    value = np.asarray(value)[self.rgb]
                    entry = owned[key]
                    entry.value = value
                    out[key] = value
                    self._bytes += value.nbytes
                    entry.event.set()
                self.chunks_read += len(order)
                self._evict()
        for key, entry in waiting.items():
            entry.event.wait()
            if entry.error is not None:
                raise entry.error
            out[key] = entry.value  # type: ignore[assignment]
        return out

    def _evict(self) -> None:
        while self._bytes > self.cache_bytes and len(self._cache) > 1:
            for key, entry in self._cache.items():  # noqa: B007 - used after the loop
                if entry.event.is_set():
                    break
            else:  # pragma: no cover - every entry is in flight
                return
            self._cache.pop(key)
            if entry.value is not None:
                self._bytes -= entry.value.nbytes

    # windows -----------------------------------------------------------------------------------------------------
    def read(self, boxes: Sequence[tuple[int, int, int, int]]) -> list[np.ndarray]:
        """Float32 (3, y1 - y0, x1 - x0) windows for ``(y0, y1, x0, x1)`` boxes (any extent; outside -> fill)."""
        clipped = []
        for y0, y1, x0, x1 in boxes:
            cy0, cy1 = max(y0, 0), min(y1, self.height)
            cx0, cx1 = max(x0, 0), min(x1, self.width)
            clipped.append((cy0, cy1, cx0, cx1) if cy1 > cy0 and cx1 > cx0 else None)
        pieces = self._read_clipped([c for c in clipped if c is not None])
        out = []
        it = iter(pieces)
        for (y0, y1, x0, x1), c in zip(boxes, clipped, strict=True):
            win = np.full((3, y1 - y0, x1 - x0), self.fill, dtype=np.float32)
            if c is not None:
                piece = next(it)
                dst = win[:, c[0] - y0 : c[1] - y0, c[2] - x0 : c[3] - x0]
                np.multiply(piece, self.scale, out=dst, casting="unsafe")
                if piece.dtype.kind == "f":
                    np.nan_to_num(dst, copy=False, nan=self.fill)
                    np.clip(dst, 0.0, 255.0, out=dst)
            out.append(win)
        return out

    def _read_clipped(self, boxes: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
        if not boxes:
            return []
        if not self.is_dask:
            return [np.asarray(self.data[:, y0:y1, x0:x1])[self.rgb] for y0, y1, x0, x1 in boxes]
        if not self.chunk_mode:
            import dask

            parts = [self.data[:, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes]
            return [np.asarray(v)[self.rgb] for v in dask.compute(*parts, scheduler="synchronous")]
        needed: set[tuple[int, int]] = set()
        per_box = [self._chunks_of(b) for b in boxes]
        for keys in per_box:
            needed.update(keys)
        chunks = self._get_chunks(needed)
        out = []
        for (y0, y1, x0, x1), keys in zip(boxes, per_box, strict=True):
            dtype = chunks[keys[0]].dtype
            piece = np.empty((3, y1 - y0, x1 - x0), dtype=dtype)
            for cy, cx in keys:
                by0, bx0 = int(self.ybounds[cy]), int(self.xbounds[cx])
                chunk = chunks[(cy, cx)]
                sy0, sy1 = max(y0, by0), min(y1, by0 + chunk.shape[1])
                sx0, sx1 = max(x0, bx0), min(x1, bx0 + chunk.shape[2])
                piece[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = chunk[
                    :, sy0 - by0 : sy1 - by0, sx0 - bx0 : sx1 - bx0
                ]
            out.append(piece)
        return out


def _taps(start: float, step: float, n_out: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Triangle-filter taps for output pixels starting at ``start`` with spacing ``step`` (input pixel units).

    Output pixel j is centred at ``u_j = start + (j + 0.5) * step``; input pixel i is centred at ``i + 0.5``. The
    filter is ``max(0, 1 - |u - c| / r)`` with half-width ``r = max(step, 1)``: bilinear interpolation when
    upsampling, an antialiasing triangle when downsampling (the filter of PIL and of torch's ``antialias=True``),
    normalised to sum to 1. An open interval of length ``2 r`` holds at most ``ceil(2 r)`` pixel centres, so each
    output pixel has that many taps.

    Returns the first input index of the window, one past its last, the (n_out, taps) indices relative to the
    window start and the (n_out, taps) weights.
    """
    r = max(step, 1.0)
    u = start + (np.arange(n_out) + 0.5) * step
    first = np.floor(u - r - 0.5).astype(np.int64) + 1
    taps = max(1, math.ceil(2 * r - 1e-9))
    idx = first[:, None] + np.arange(taps)
    w = np.maximum(0.0, 1.0 - np.abs(u[:, None] - (idx + 0.5)) / r)
    w /= w.sum(axis=1, keepdims=True)
    lo = int(idx[0, 0])
    return lo, int(idx[-1, -1]) + 1, idx - lo, w.astype(np.float32)


class PatchSampler:
    """Cuts square patches of ``side`` level pixels around centres (level pixels) and resamples them to ``size``."""

    def __init__(self, reader: LevelReader, side_y: float, side_x: float, size: int) -> None:
        self.reader = reader
        self.side_y, self.side_x = float(side_y), float(side_x)
        self.size = int(size)

    def __call__(self, centres: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, size, size) patches around ``centres`` (N, 2) given as (x, y) level pixels."""
        plans = []
        boxes = []
        for cx, cy in centres:
            y0, y1, iy, wy = _taps(cy - self.side_y / 2, self.side_y / self.size, self.size)
            x0, x1, ix, wx = _taps(cx - self.side_x / 2, self.side_x / self.size, self.size)
            plans.append((iy, wy, ix, wx))
            boxes.append((y0, y1, x0, x1))
        windows = self.reader.read(boxes)
        out = np.empty((len(centres), 3, self.size, self.size), dtype=np.uint8)
        for i, (win, plan) in enumerate(zip(windows, plans, strict=True)):
            patch = _separable(win, *plan)
            np.clip(np.rint(patch, out=patch), 0, 255, out=patch)
            out[i] = patch
        return out


def _separable(win: np.ndarray, iy: np.ndarray, wy: np.ndarray, ix: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """Apply the taps of :func:`_taps` along y then x to a (3, h, w) window: (3, n_out_y, n_out_x) float32."""
    acc = wy[None, :, 0, None] * win[:, iy[:, 0], :]
    for t in range(1, iy.shape[1]):
        acc += wy[None, :, t, None] * win[:, iy[:, t], :]
    out = wx[None, None, :, 0] * acc[:, :, ix[:, 0]]
    for t in range(1, ix.shape[1]):
        out += wx[None, None, :, t] * acc[:, :, ix[:, t]]
    return out


def morton_order(cy: np.ndarray, cx: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Order of points by the Morton (Z) code of their chunk, then y, then x: neighbours share chunks."""
    code = np.zeros(len(cy), dtype=np.uint64)
    cyu, cxu = cy.astype(np.uint64), cx.astype(np.uint64)
    for bit in range(32):
        b = np.uint64(bit)
        code |= ((cxu >> b) & np.uint64(1)) << np.uint64(2 * bit)
        code |= ((cyu >> b) & np.uint64(1)) << np.uint64(2 * bit + 1)
    return np.lexsort((x, y, code))


def prefetch(make: Any, batches: Sequence[Any], num_workers: int) -> Generator[tuple[Any, Any], None, None]:
    """Yield ``(batch, make(batch))`` in order, computing up to ``num_workers + 1`` batches ahead in threads."""
    if num_workers <= 0:
        for b in batches:
            yield b, make(b)
        return
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="spade_sc-patches")
    try:
        pending: deque = deque()
        it = iter(batches)
        for b in it:
            pending.append((b, pool.submit(make, b)))
            if len(pending) > num_workers:
                break
        while pending:
            b, fut = pending.popleft()
            result = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(make, nxt)))
            yield b, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) // 2))


# --------------------------------------------------------------------------------------------------------------------
# shapes <-> table
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------------
def image_features(
    sdata: SpatialData,
    *,
    encoder: Any = "efficientnet_lite0",
    mpp: float = 0.5,
    patch_size: int = 224,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    image_mpp: float | None = None,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
    progress: bool = True,
) -> np.ndarray | None:
    """Embed the H&E patch around every spot (or tile) with a frozen encoder.

    For each row of the table annotating ``shapes_key``, a square patch of ``patch_size * mpp`` um centred on the
    instance (circle centre or polygon centroid) is read from the image and resampled to exactly
    ``patch_size x patch_size`` px at ``mpp`` um/px, then passed through the encoder.

    - Centres go through the spatialdata transformations of the shapes and the image to a coordinate system they
      share (spots and image need not share pixels).
    - The pyramid level read is the coarsest one whose pixel size is at most ``mpp`` (10 % tolerance); if even
      level 0 is coarser, level 0 is upsampled. Resampling is a separable triangle filter (bilinear when
      upsampling, antialiased when downsampling) positioned with sub-pixel accuracy.
    - Parts of a patch outside the image are filled with white (255, glass).
    - RGBA images: alpha is dropped. uint16 values are divided by 257; float values are taken to be in [0, 1] when
      a small central sample of the coarsest level is <= 1, otherwise in [0, 255].
    - Only the chunks under the patches are read (never the whole image), in batches prepared by background
      threads while the encoder runs.
    - Polygons (e.g. ``shapes_key="<image>_tiles"`` from :func:`spade_sc.pp.tile_tissue`) are embedded like spots;
      with the same ``mpp`` and ``patch_size`` as the tiling, the patch is exactly the tile.

    Parameters
    ----------
    sdata
        The SpatialData holding the image, the shapes and a table annotating them.
    encoder
        What :func:`spade_sc.encoders.get_encoder` understands (``"efficientnet_lite0"``, a timm name,
        ``"hf-hub:<org>/<repo>"``, ...), or an :class:`~spade_sc.encoders.Encoder`: pass one to reuse it across calls,
        or to use your own ``nn.Module`` (``get_encoder(module, input_size=..., mean=..., std=..., name=...)``).
    mpp
        Micrometres per pixel of the patches given to the encoder.
    patch_size
        Patch side in pixels (at least 16). Patches are resized by the encoder if its input size differs.
    image_key
        The image; may be omitted when there is only one.
    shapes_key
        The spots or tiles; may be omitted when there is only one shapes element or when ``table_key`` is given
        (the shapes it annotates).
    table_key
        The table annotating ``shapes_key``; found automatically when exactly one does.
    image_mpp
        Micrometres per level-0 pixel of the image, overriding the recorded pixel size
        (``sdata.attrs["spade_sc"]["microns_per_unit"]``, see :func:`spade_sc.pp.set_pixel_size`).
    batch_size
        Patches per encoder call.
    device
        Torch device for the encoder (``"auto"``: CUDA when available).
    num_workers
        Threads reading and resampling the next batches while the encoder runs (each reads its dask chunks with the
        synchronous scheduler); 0 reads in the calling thread. Default: half the CPU cores, between 1 and 4.
    key_added
        Key of the features; default ``"X_<encoder name>"``.
    overwrite
        Replace existing features under ``key_added``.
    inplace
        Write into ``sdata`` (return None) or return the features and write nothing.
    progress
        Show a progress bar over batches.

    Returns
    -------
    With ``inplace=False``, the (n_obs, dim) float32 features in table row order (rows of other regions of a
    multi-region table are NaN). Otherwise None, and writes

    - ``tables[t].obsm["X_<encoder name>"]``: the (n_obs, dim) float32 features, in table row order (row i is the
      instance ``obs[instance_key][i]`` of the shapes);
    - ``tables[t].uns["X_<encoder name>"]``: ``encoder`` (the encoder's spec dict), ``mpp``, ``patch_size``,
      ``level`` (pyramid level read), ``level_mpp``, ``image_mpp`` (level 0), ``image_key``, ``shapes_key``,
      ``coordinate_system``, ``fill``, ``n_outside`` (instances whose centre is outside the image) and
      ``spade_sc_version``.
    """
    # ---- arguments ------------------------------------------------------------------------------------------------
    if isinstance(patch_size, bool) or not isinstance(patch_size, int | np.integer) or patch_size < MIN_PATCH_SIZE:
        msg = f"patch_size must be an integer >= {MIN_PATCH_SIZE}, got {patch_size!r}."
        raise ValueError(msg)
    patch_size = int(patch_size)
    if isinstance(mpp, bool) or not isinstance(mpp, int | float | np.number) or not np.isfinite(mpp) or mpp <= 0:
        msg = f"mpp must be a positive number of micrometres per pixel, got {mpp!r}."
        raise ValueError(msg)
    mpp = float(mpp)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        msg = f"batch_size must be a positive integer, got {batch_size!r}."
        raise ValueError(msg)
    if num_workers is None:
        num_workers = _default_workers()
    if isinstance(num_workers, bool) or not isinstance(num_workers, int | np.integer) or num_workers < 0:
        msg = f"num_workers must be a non-negative integer or None, got {num_workers!r}."
        raise ValueError(msg)

    # ---- elements -------------------------------------------------------------------------------------------------
    image_key = resolve_key(sdata, "images", image_key)
    if shapes_key is None and table_key is not None:
        resolve_key(sdata, "tables", table_key)
        regions = table_region(sdata.tables[table_key])[0] if "spatialdata_attrs" in sdata.tables[table_key].uns else []
        if len(regions) != 1:
            msg = f"Table {table_key!r} annotates the regions {regions}: pass shapes_key= to choose one."
            raise ValueError(msg)
        shapes_key = regions[0]
    shapes_key = resolve_key(sdata, "shapes", shapes_key)
    table_key = resolve_table(sdata, table_key, shapes_key)
    table = sdata.tables[table_key]
    shapes = sdata.shapes[shapes_key]
    if len(shapes) == 0:
        msg = f"The shapes element {shapes_key!r} is empty."
        raise ValueError(msg)

    levels = image_levels(sdata.images[image_key])
    rgb = rgb_channels(levels[0], image_key)
    scale = value_scale(levels, image_key)
    cs = shared_coordinate_system(sdata, image_key, shapes_key)
    p0 = image_pixel_size(sdata, image_key, image_mpp=image_mpp)

    rows, pos = rows_to_shapes(table, table_key, shapes, shapes_key)
    matrix = to_pixels_matrix(sdata, shapes_key, image_key, cs)
    xy = shape_centres(shapes, shapes_key)[pos]
    px = xy @ matrix[:2, :2].T + matrix[:2, 2]  # level-0 pixels (x, y)
    h0, w0 = int(levels[0].sizes["y"]), int(levels[0].sizes["x"])
    inside = (px[:, 0] >= 0) & (px[:, 0] < w0) & (px[:, 1] >= 0) & (px[:, 1] < h0)
    if not inside.any():
        lo, hi = px.min(0), px.max(0)
        msg = (
            f"No centre of the {len(px)} instances of shapes {shapes_key!r} falls inside image {image_key!r} "
            f"({w0} x {h0} px): they span x {lo[0]:.0f}..{hi[0]:.0f}, y {lo[1]:.0f}..{hi[1]:.0f} image pixels in "
            f"coordinate system {cs!r}. Check the transformations of both elements."
        )
        raise ValueError(msg)
    n_outside = int((~inside).sum())
    if n_outside:
        logger.warning(
            "image_features: %d of %d centres of %r lie outside image %r; their patches are mostly fill (white).",
            n_outside,
            len(px),
            shapes_key,
            image_key,
        )
    if key_added is not None and key_added in table.obsm and not overwrite:
        msg = f"tables[{table_key!r}].obsm[{key_added!r}] exists; pass overwrite=True to replace it."
        raise ValueError(msg)

    # ---- level --------------------------------------------------------------------------------------------------
    mpps = level_mpp(levels, p0)
    level = choose_level(mpps, mpp)
    lv = levels[level]
    ky = h0 / lv.sizes["y"]
    kx = w0 / lv.sizes["x"]
    side0 = patch_size * mpp / p0  # level-0 pixels
    _check_polygon_size(shapes, shapes_key, matrix, side0, pos)

    # ---- encoder --------------------------------------------------------------------------------------------------
    from ..encoders import get_encoder

    enc = get_encoder(encoder, device=device)
    key = key_added or f"X_{enc.name}"
    if not key_added and key in table.obsm and not overwrite:  # a given key_added was checked above
        msg = f"tables[{table_key!r}].obsm[{key!r}] exists; pass overwrite=True to replace it."
        raise ValueError(msg)
    logger.info(
        "image_features: %d patches of %d px at %.3g um/px from level %d (%.3g um/px) of %r, encoder %r",
        len(rows),
        patch_size,
        mpp,
        level,
        mpps[level],
        image_key,
        enc.name,
    )

    # ---- run ----------------------------------------------------------------------------------------------------
    reader = LevelReader(lv.data, rgb, scale)
    sampler = PatchSampler(reader, side0 / ky, side0 / kx, patch_size)
    centres = np.stack([px[:, 0] / kx, px[:, 1] / ky], axis=1)
    cy, cx = reader.chunk_index(centres[:, 1], centres[:, 0])
    order = morton_order(cy, cx, centres[:, 1], centres[:, 0])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    feats = _run(enc, sampler, centres, batches, num_workers, progress, desc=f"image_features {image_key}")

    out = np.full((table.n_obs, enc.dim), np.nan, dtype=np.float32)
    out[rows] = feats
    if not inplace:
        return out
    from .. import __version__

    table.obsm[key] = out
    table.uns[key] = {
        "encoder": enc.spec,
        "mpp": mpp,
        "patch_size": patch_size,
        "level": int(level),
        "level_mpp": float(mpps[level]),
        "image_mpp": float(p0),
        "image_key": image_key,
        "shapes_key": shapes_key,
        "coordinate_system": cs,
        "fill": FILL,
        "n_outside": n_outside,
        "spade_sc_version": __version__,
    }
    return None


def _run(
    enc: Any,
    sampler: PatchSampler,
    centres: np.ndarray,
    batches: list[np.ndarray],
    num_workers: int,
    progress: bool,
    desc: str,
) -> np.ndarray:
    import torch
    from tqdm.auto import tqdm

    feats = np.empty((len(centres), enc.dim), dtype=np.float32)
    make = lambda idx: sampler(centres[idx])
    batches_iter = prefetch(make, batches, num_workers)
    with closing(batches_iter), tqdm(total=len(batches), desc=desc, unit="batch", disable=not progress) as bar:
        for idx, patches in batches_iter:
            feats[idx] = enc(torch.from_numpy(patches)).numpy()
            bar.update(1)
    return feats


def _check_polygon_size(shapes: Any, shapes_key: str, matrix: np.ndarray, side0: float, pos: np.ndarray) -> None:
    """Warn when polygon footprints (e.g. tiles) differ from the patch size."""
    import shapely

    geoms = np.asarray(shapes.geometry.values)[pos[: min(len(pos), 1000)]]
    poly = shapely.get_type_id(geoms) != 0
    if not poly.any():
        return
    area = np.median(shapely.area(geoms[poly])) * abs(np.linalg.det(matrix[:2, :2]))
    side = math.sqrt(area)
    if side > 0 and abs(side / side0 - 1) > 0.05:
        logger.warning(
            "image_features: polygons of %r are about %.0f px across but patches are %.0f px (level 0): patches are "
            "centred on the polygons' centroids and do not match their footprint.",
            shapes_key,
            side,
            side0,
        )

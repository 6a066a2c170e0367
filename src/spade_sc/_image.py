"""Reading H&E images: levels of a pyramid, RGB channels and value range, chunked patch reads, resampling.

Used by :func:`spade_sc.pp.image_features` (patches), :func:`spade_sc.pp.tile_tissue` (tissue mask) and
:mod:`spade_sc.pl` (thumbnails, tile galleries). Pyramid levels come from a single- or multiscale image element;
only the dask chunks under what is read are ever computed.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import xarray as xr

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
    def read(self, boxes: Sequence[tuple[int, int, int, int]], *, as_float: bool = True) -> list[np.ndarray]:
        """Float32 (3, y1 - y0, x1 - x0) windows for ``(y0, y1, x0, x1)`` boxes (any extent; outside -> fill).

        With ``as_float=False``, uint8 images (scale 1, integer fill) give uint8 windows of the same values: a
        quarter of the bytes, for callers whose arithmetic promotes them to float32 exactly (as the resampling does).
        """
        clipped = []
        for y0, y1, x0, x1 in boxes:
            cy0, cy1 = max(y0, 0), min(y1, self.height)
            cx0, cx1 = max(x0, 0), min(x1, self.width)
            clipped.append((cy0, cy1, cx0, cx1) if cy1 > cy0 and cx1 > cx0 else None)
        pieces = self._read_clipped([c for c in clipped if c is not None])
        raw = not as_float and self.scale == 1.0 and self.fill == int(self.fill) and 0 <= self.fill <= 255
        out = []
        it = iter(pieces)
        for (y0, y1, x0, x1), c in zip(boxes, clipped, strict=True):
            piece = next(it) if c is not None else None
            keep = raw and (piece is None or piece.dtype == np.uint8)
            win = np.full((3, y1 - y0, x1 - x0), self.fill, dtype=np.uint8 if keep else np.float32)
            if piece is not None:
                dst = win[:, c[0] - y0 : c[1] - y0, c[2] - x0 : c[3] - x0]
                if keep:
                    dst[...] = piece
                    out.append(win)
                    continue
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

    Taps whose weight is 0 for every output pixel are dropped (adding ``0 * x`` changes no sum): a patch aligned
    to the pixel grid at the level's own pixel size keeps one tap of weight 1, which :func:`_separable` reads as a
    plain copy.

    Returns the first input index of the window, one past its last, the (n_out, taps) indices relative to the
    window start and the (n_out, taps) weights.
    """
    r = max(step, 1.0)
    u = start + (np.arange(n_out) + 0.5) * step
    first = np.floor(u - r - 0.5).astype(np.int64) + 1
    taps = max(1, math.ceil(2 * r - 1e-9))
    idx = first[:, None] + np.arange(taps)
    w = np.maximum(0.0, 1.0 - np.abs(u[:, None] - (idx + 0.5)) / r)
    used = (w > 0).any(axis=0)
    if not used.all():
        idx, w = idx[:, used], w[:, used]
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
        windows = self.reader.read(boxes, as_float=False)
        out = np.empty((len(centres), 3, self.size, self.size), dtype=np.uint8)
        for i, (win, plan) in enumerate(zip(windows, plans, strict=True)):
            patch = _separable(win, *plan)
            if patch.dtype != np.uint8:
                np.clip(np.rint(patch, out=patch), 0, 255, out=patch)
            out[i] = patch
        return out


def _take(idx: np.ndarray) -> np.ndarray | slice:
    """``idx`` as a slice when it is an arithmetic progression with a positive step, else as it is.

    Taps of integer scale factors are such progressions: a slice reads the same elements as a view, not a copy.
    """
    n = len(idx)
    if n > 1:
        step = int(idx[1] - idx[0])
        if step > 0 and idx[-1] - idx[0] == step * (n - 1) and np.array_equal(np.diff(idx), np.full(n - 1, step)):
            return slice(int(idx[0]), int(idx[-1]) + 1, step)
    return idx


def _separable(win: np.ndarray, iy: np.ndarray, wy: np.ndarray, ix: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """Apply the taps of :func:`_taps` along y then x to a (3, h, w) window: (3, n_out_y, n_out_x) float32.

    ``win`` may be float32 or uint8 (promoted exactly); taps that are slices are read as views. A uint8 window
    whose taps are single weights of 1 (the patch aligned to the pixel grid, at the level's pixel size) gives its
    picked pixels as uint8: the values the arithmetic would give, without it.
    """
    if win.dtype == np.uint8 and iy.shape[1] == ix.shape[1] == 1 and (wy == 1).all() and (wx == 1).all():
        return win[:, _take(iy[:, 0]), :][:, :, _take(ix[:, 0])]
    acc = wy[None, :, 0, None] * win[:, _take(iy[:, 0]), :]
    for t in range(1, iy.shape[1]):
        acc += wy[None, :, t, None] * win[:, _take(iy[:, t]), :]
    out = wx[None, None, :, 0] * acc[:, :, _take(ix[:, 0])]
    for t in range(1, ix.shape[1]):
        out += wx[None, None, :, t] * acc[:, :, _take(ix[:, t])]
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

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
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import Keys
from .._image import (
    FILL,
    FLOAT_SAMPLE_SIDE,
    MIN_PATCH_SIZE,
    LevelReader,
    PatchSampler,
    _default_workers,
    choose_level,
    image_levels,
    level_mpp,
    morton_order,
    prefetch,
    rgb_channels,
    value_scale,
)
from .._malloc import keep_freed_memory
from .._sdata import (
    Spots,
    image_pixel_size,
    resolve_key,
    resolve_spots,
    shape_centres,
    shared_coordinate_system,
    to_pixels_matrix,
)
from .._validation import check_int, check_mpp
from .._version import __version__

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")


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
    tune_malloc: bool | None = None,
    views: int = 1,
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
    - The encoder's memory format, tracing and precision are its own (:func:`spade_sc.encoders.get_encoder`:
      channels-last and a frozen TorchScript trace for convolutional models on CPU, fp32); build the encoder
      yourself to choose them.
    - Polygons (e.g. ``shapes_key="<image>_tiles"`` from :func:`spade_sc.pp.tile_tissue`) are embedded like spots;
      with the same ``mpp`` and ``patch_size`` as the tiling, the patch is exactly the tile.
    - ``views=8`` embeds each patch in its 8 dihedral orientations (4 rotations, each also mirrored) and keeps the
      mean (test-time augmentation): tissue has no orientation, so the mean is a feature of the tissue rather than
      of how the section lies on the slide. It costs 8 encoder passes. :func:`spade_sc.tl.fit` computes missing
      features so: on held-out her2st sections the 8-view mean predicted expression better than one view, from
      the base features and from SPADE alike (``benchmarks/README.md``).

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
        Write into ``sdata`` (return None) or return the features and write nothing (an existing ``key_added`` is
        then no obstacle).
    progress
        Show a progress bar over batches.
    tune_malloc
        Keep freed activation memory in the heap for reuse while the encoder runs (Linux with glibc; see
        :mod:`spade_sc._malloc`), so that each batch does not map, page-fault and zero its activations anew: about
        1.5x faster on CPU. Freed memory is returned to the system and glibc's thresholds are set back when the
        loop ends. None (default): on, unless the environment variable ``SPADE_SC_TUNE_MALLOC`` is ``0``; False:
        leave the allocator alone. Without glibc (macOS, Windows, musl) or with jemalloc / tcmalloc loaded nothing
        is changed.
    views
        Orientations of each patch whose features are averaged: 1 (the patch as it is), 2 (also mirrored), 4 (the
        four rotations) or 8 (the four rotations, each also mirrored).

    Returns
    -------
    With ``inplace=False``, the (n_obs, dim) float32 features in table row order (rows of other regions of a
    multi-region table are NaN). Otherwise None, and writes

    - ``tables[t].obsm["X_<encoder name>"]``: the (n_obs, dim) float32 features, in table row order (row i is the
      instance ``obs[instance_key][i]`` of the shapes);
    - ``tables[t].uns["X_<encoder name>"]``: ``encoder`` (the encoder's spec dict), ``mpp``, ``patch_size``,
      ``level`` (pyramid level read), ``level_mpp``, ``image_mpp`` (level 0), ``image_key``, ``shapes_key``,
      ``coordinate_system``, ``fill``, ``n_outside`` (instances whose centre is outside the image), ``precision``
      (``"fp32"``, ``"bf16"`` or ``"fp16"``: the encoder's arithmetic), ``views`` and ``spade_sc_version``.
    """
    patch_size = check_int(patch_size, "patch_size", low=MIN_PATCH_SIZE)
    mpp = check_mpp(mpp)
    batch_size = check_int(batch_size, "batch_size")
    num_workers = check_int(num_workers, "num_workers", low=0, none_ok=True)
    views = check_int(views, "views")
    if views not in VIEWS:
        msg = f"views must be one of {VIEWS} (dihedral orientations of each patch), got {views!r}."
        raise ValueError(msg)
    if num_workers is None:
        num_workers = _default_workers()

    image_key = resolve_key(sdata, "images", image_key)
    spots = resolve_spots(sdata, table_key, shapes_key)
    if len(spots.shapes) == 0:
        msg = f"The shapes element {spots.shapes_key!r} is empty."
        raise ValueError(msg)
    levels = image_levels(sdata.images[image_key])
    rgb = rgb_channels(levels[0], image_key)
    scale = value_scale(levels, image_key)
    _warn_no_values(levels, image_key)
    cs = shared_coordinate_system(sdata, image_key, spots.shapes_key)
    p0 = image_pixel_size(sdata, image_key, image_mpp=image_mpp)
    centres = _locate(sdata, image_key, spots, levels, cs)
    if key_added is not None and inplace:  # inplace=False writes nothing: an existing key is no obstacle
        _check_free(spots, key_added, overwrite)
    mpps = level_mpp(levels, p0)
    level = choose_level(mpps, mpp)
    side0 = patch_size * mpp / p0  # patch side in level-0 pixels
    _check_polygon_size(spots.shapes, spots.shapes_key, centres.matrix, side0, centres.pos)

    from ..encoders import get_encoder

    enc = get_encoder(encoder, device=device)
    key = key_added or Keys.features(enc.name)
    if not key_added and inplace:  # a given key_added was checked above
        _check_free(spots, key, overwrite)
    logger.info(
        "image_features: %d patches of %d px at %.3g um/px from level %d (%.3g um/px) of %r, encoder %r",
        len(centres.rows),
        patch_size,
        mpp,
        level,
        mpps[level],
        image_key,
        enc.name,
    )
    reader = LevelReader(levels[level].data, rgb, scale)
    desc = f"image_features {image_key}"
    enc.warm_up()  # one-off tracing outside the allocator scope, whose heap would keep its transient buffers
    with keep_freed_memory(tune_malloc):
        feats = _extract(
            _ViewMean(enc, views) if views > 1 else enc,
            reader,
            centres.px,
            levels,
            level,
            side0,
            patch_size,
            batch_size,
            num_workers,
            progress,
            desc,
        )
    out = np.full((spots.table.n_obs, enc.dim), np.nan, dtype=np.float32)
    out[centres.rows] = feats
    if not inplace:
        return out
    spots.table.obsm[key] = out
    spots.table.uns[key] = _record(
        enc,
        mpp=mpp,
        patch_size=patch_size,
        level=level,
        level_mpp=mpps[level],
        image_mpp=p0,
        image_key=image_key,
        shapes_key=spots.shapes_key,
        coordinate_system=cs,
        n_outside=centres.n_outside,
        views=views,
    )
    return None


# --------------------------------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------------------------------
#: Numbers of dihedral views of a patch that ``image_features(views=)`` averages.
VIEWS = (1, 2, 4, 8)


class _ViewMean:
    """The encoder applied to ``views`` dihedral orientations of each patch, features averaged.

    Orientation ``v``: rotation by ``v % 4`` quarter turns, mirrored (left-right) when ``v >= 4``; ``views=2`` is the
    patch and its mirror image. Each orientation is one encoder call on the whole batch.
    """

    def __init__(self, encoder: Any, views: int) -> None:
        self.encoder, self.views, self.dim = encoder, views, encoder.dim
        self.turns = [0, 0] if views == 2 else [v % 4 for v in range(views)]
        self.mirror = [False, True] if views == 2 else [v >= 4 for v in range(views)]

    def __call__(self, x: Any) -> Any:
        import torch

        total = None
        for turns, mirror in zip(self.turns, self.mirror, strict=True):
            y = torch.rot90(x, turns, dims=(-2, -1)) if turns else x
            y = torch.flip(y, dims=(-1,)) if mirror else y
            f = self.encoder(y.contiguous())
            total = f if total is None else total + f
        return total / self.views


@dataclass(frozen=True)
class _Centres:
    """Where the patches go: the table rows embedded and their centres in the image's level-0 pixels."""

    rows: np.ndarray  # rows of the table annotating the shapes
    pos: np.ndarray  # position in the shapes of each of those rows
    px: np.ndarray  # (n, 2) level-0 pixel (x, y) centre of each of those rows
    matrix: np.ndarray  # 3x3 affine: shapes' intrinsic (x, y) -> level-0 pixels
    n_outside: int  # centres outside the image


def _locate(sdata: SpatialData, image_key: str, spots: Spots, levels: Sequence[Any], cs: str) -> _Centres:
    """The centres of the instances in the image's level-0 pixels (through ``cs``); none inside is an error."""
    rows, pos = spots.instances()
    matrix = to_pixels_matrix(sdata, spots.shapes_key, image_key, cs)
    xy = shape_centres(spots.shapes, spots.shapes_key)[pos]
    px = xy @ matrix[:2, :2].T + matrix[:2, 2]  # level-0 pixels (x, y)
    h0, w0 = int(levels[0].sizes["y"]), int(levels[0].sizes["x"])
    inside = (px[:, 0] >= 0) & (px[:, 0] < w0) & (px[:, 1] >= 0) & (px[:, 1] < h0)
    if not inside.any():
        lo, hi = px.min(0), px.max(0)
        msg = (
            f"No centre of the {len(px)} instances of shapes {spots.shapes_key!r} falls inside image {image_key!r} "
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
            spots.shapes_key,
            image_key,
        )
    return _Centres(rows=rows, pos=pos, px=px, matrix=matrix, n_outside=n_outside)


def _warn_no_values(levels: Sequence[Any], image_key: str) -> None:
    """Warn when a float image holds no finite value (checked on a central window of its coarsest level).

    NaN pixels are read as white glass: an all-NaN image would give the features of blank glass without a word.
    """
    import warnings

    if not np.issubdtype(np.dtype(levels[0].dtype), np.floating):
        return
    lv = levels[-1]
    h, w = int(lv.sizes["y"]), int(lv.sizes["x"])
    side = FLOAT_SAMPLE_SIDE
    y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    sample = np.asarray(lv.data[:, y0 : y0 + side, x0 : x0 + side])
    if sample.size and not np.isfinite(sample).any():
        warnings.warn(
            f"Image {image_key!r} holds only NaN or infinite values (central {min(side, h)} x {min(side, w)} px of its "
            "coarsest level): its patches are read as white glass, and their features are those of blank glass.",
            UserWarning,
            stacklevel=3,
        )


def _check_free(spots: Spots, key: str, overwrite: bool) -> None:
    """Refuse to replace ``obsm[key]`` of the spots' table unless ``overwrite``."""
    if key in spots.table.obsm and not overwrite:
        msg = f"tables[{spots.table_key!r}].obsm[{key!r}] exists; pass overwrite=True to replace it."
        raise ValueError(msg)


def _extract(
    enc: Any,
    reader: LevelReader,
    px: np.ndarray,
    levels: Sequence[Any],
    level: int,
    side0: float,
    patch_size: int,
    batch_size: int,
    num_workers: int,
    progress: bool,
    desc: str,
) -> np.ndarray:
    """(n, dim) features of the patches of side ``side0`` level-0 pixels around ``px``, read from ``level``."""
    lv = levels[level]
    ky = levels[0].sizes["y"] / lv.sizes["y"]
    kx = levels[0].sizes["x"] / lv.sizes["x"]
    sampler = PatchSampler(reader, side0 / ky, side0 / kx, patch_size)
    centres = np.stack([px[:, 0] / kx, px[:, 1] / ky], axis=1)
    cy, cx = reader.chunk_index(centres[:, 1], centres[:, 0])
    order = morton_order(cy, cx, centres[:, 1], centres[:, 0])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return _run(enc, sampler, centres, batches, num_workers, progress, desc=desc)


def _record(
    enc: Any,
    *,
    mpp: float,
    patch_size: int,
    level: int,
    level_mpp: float,
    image_mpp: float,
    image_key: str,
    shapes_key: str,
    coordinate_system: str,
    n_outside: int,
    views: int = 1,
) -> dict[str, Any]:
    """The ``uns`` record of the features: the encoder's spec, how the patches were made, the version."""
    return {
        "encoder": enc.spec,
        "mpp": mpp,
        "patch_size": patch_size,
        "level": int(level),
        "level_mpp": float(level_mpp),
        "image_mpp": float(image_mpp),
        "image_key": image_key,
        "shapes_key": shapes_key,
        "coordinate_system": coordinate_system,
        "fill": FILL,
        "n_outside": n_outside,
        "precision": enc.precision or "fp32",
        "views": int(views),
        "spade_sc_version": __version__,
    }


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

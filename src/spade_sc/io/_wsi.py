"""Whole-slide images as lazy multiscale image elements, read through a slide library (tiffslide or OpenSlide).

A slide becomes one image element (c, y, x) whose pyramid levels are the file's own levels, each a dask array
whose chunks decode only the tiles under them; nothing is read when the SpatialData is made (except one small
probe of the coarsest level, which checks that the file decodes). Each level carries the scale transformation
from its shape to level 0, so :func:`spade_sc._image.level_mpp` gives its pixel size, as for a zarr pyramid.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import Keys
from .._sdata import set_microns_per_unit
from .._validation import check_choice, check_int

if TYPE_CHECKING:
    import dask.array
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

#: Slide libraries :func:`read_wsi` can read through (``"auto"``: tiffslide, then OpenSlide).
BACKENDS = ("auto", "tiffslide", "openslide")
#: A given ``mpp`` that differs from the file's by more than this fraction is warned about.
MPP_MISMATCH = 0.05
#: A slide without a pyramid whose longer side exceeds this many pixels is warned about (slow coarse reads).
SINGLE_LEVEL_WARN_PX = 10_000
#: Pixel sizes (um) outside this range are not taken from a file: e.g. 72 dpi (352.8 um) is a screen default.
PLAUSIBLE_MPP = (0.01, 50.0)
#: Micrometres per unit of the TIFF ``ResolutionUnit`` / OME ``PhysicalSizeXUnit`` values.
_UNIT_UM = {
    "INCH": 25400.0,
    "CENTIMETER": 1e4,
    "MILLIMETER": 1e3,
    "MICROMETER": 1.0,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,
    "um": 1.0,
    "\u03bcm": 1.0,
    "nm": 1e-3,
    "m": 1e6,
}
_NAME_OK = re.compile(r"[^0-9A-Za-z_.-]")


@dataclass
class Slide:
    """An opened slide: its levels as lazy (c, y, x) dask arrays (finest first) and what the file says."""

    path: Path
    backend: str
    levels: list[dask.array.Array]
    channels: list[str]
    mpp_xy: tuple[float, float] | None
    mpp_source: str
    vendor: str
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def file_mpp(self) -> float | None:
        """Micrometres per level-0 pixel recorded in the file (mean of x and y), or None."""
        return None if self.mpp_xy is None else float(np.mean(self.mpp_xy))


# --------------------------------------------------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------------------------------------------------
def read_wsi(
    path: str | os.PathLike,
    *,
    mpp: float | None = None,
    name: str | None = None,
    backend: str = "auto",
    chunk_size: int = 1024,
) -> SpatialData:
    """Read a whole-slide image as a lazy, multiscale image element with its pixel size recorded.

    The pyramid is the file's own (never recomputed) and no level is loaded: every level is a dask array whose
    chunks decode only the file's tiles under them, so :func:`spade_sc.pp.image_features` and
    :func:`spade_sc.pp.tile_tissue` read the level nearest to the requested um/px exactly as they do from zarr.

    Backends and the formats they open:

    - ``"tiffslide"`` (pure Python: tifffile + zarr): TIFF-based slides: generic tiled pyramidal TIFF (levels
      as successive pages or as SubIFDs), OME-TIFF, Aperio ``.svs``, Leica ``.scn``, Ventana ``.bif``,
      Philips TIFF, Hamamatsu ``.ndpi`` (partly); plain JPEG / PNG / single-level TIFF (no pyramid: decoded whole
      or strip by strip).
    - ``"openslide"`` (``openslide-python`` + ``openslide-bin``): Aperio ``.svs``, DICOM, Hamamatsu ``.ndpi`` /
      ``.vms`` / ``.vmu``, Leica ``.scn``, MIRAX ``.mrxs``, Philips TIFF, Sakura ``.svslide``, Trestle, Ventana
      ``.bif``, Zeiss ``.czi``, generic tiled TIFF (levels as successive pages; SubIFD pyramids show level 0 only).
      Transparent (unscanned) areas are composited onto white.
    - ``"auto"``: tiffslide, then OpenSlide when tiffslide cannot open the file or when the file is not a TIFF.

    Slides opened by wsidata / LazySlide (``wsidata.open_wsi(path, attach_images=True, save_images=True)``) are
    SpatialData objects as well: once their pixel size is recorded (``spade_sc.pp.set_pixel_size(wsi,
    wsi.properties.mpp)``) they go through ``pp.tile_tissue``, ``pp.image_features``, ``tl.embed``,
    ``tl.slide_embeddings``, ``tl.train_mil``, ``tl.attention`` and ``pl.attention`` unchanged, LazySlide's own
    tiles (``"tiles"``, once a table annotates them) included through ``shapes_key=`` / ``tiles_key="tiles"``.

    Parameters
    ----------
    path
        The slide file.
    mpp
        Micrometres per level-0 pixel. Default: read from the file (``openslide.mpp-x`` / ``-y``, vendor metadata,
        TIFF ``XResolution`` / ``YResolution`` with ``ResolutionUnit``, OME ``PhysicalSizeX`` / ``Y``); a file
        without one is an error asking for ``mpp=``. A given value wins; when it differs from the file's by more
        than 5 %, a warning says so.
    name
        Name of the coordinate system and prefix of the element; default: the file name without its extensions
        (characters other than letters, digits, ``_ - .`` become ``_``).
    backend
        One of ``"auto"``, ``"tiffslide"``, ``"openslide"``.
    chunk_size
        Target side (px) of the dask chunks, rounded to a multiple of the file's tile size.

    Returns
    -------
    SpatialData
        With

        - ``images["<name>_image"]``: the slide (c, y, x), a multiscale image (``scale0`` ... one per file level)
          when the file has a pyramid, else a single-scale one; dtype and channels as in the file (uint8 RGB for
          almost all slides; RGBA keeps its alpha as channel ``"a"``, 16-bit stays uint16:
          :func:`spade_sc.pp.image_features` drops alpha and rescales 16-bit values). Registered with an identity
          to the coordinate system ``<name>`` (level-0 pixels); coarser levels carry their scale to level 0;
        - ``attrs["spade_sc"]["microns_per_unit"][<name>]``: the pixel size (um per level-0 pixel), read by
          :func:`spade_sc.pp.pixel_size`;
        - ``attrs["spade_sc"]["wsi"]``: ``path``, ``backend``, ``vendor``, ``mpp`` (used), ``file_mpp`` (from the
          file, or None), ``mpp_source``, ``level_shapes`` ((height, width) per level), ``level_downsamples``.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        When the file is not a slide either backend can open, is truncated, is not an RGB(A) image, or has no
        pixel size and ``mpp`` is not given.
    """
    from spatialdata import SpatialData

    name = slide_name(Path(path), name)
    image, info = slide_image(path, mpp=mpp, coordinate_system=name, backend=backend, chunk_size=chunk_size)
    sdata = SpatialData(images={f"{name}_image": image})
    set_microns_per_unit(sdata, name, info["mpp"])
    sdata.attrs[Keys.ATTRS][Keys.WSI] = info
    return sdata


# --------------------------------------------------------------------------------------------------------------------
# shared with read_hest / read_visium
# --------------------------------------------------------------------------------------------------------------------
def safe_name(text: str) -> str:
    """``text`` with characters other than letters, digits, ``_ - .`` replaced by ``_`` (a valid element name)."""
    return _NAME_OK.sub("_", str(text)).lstrip("_.") or "slide"


def slide_name(path: Path, name: str | None) -> str:
    """``name`` checked as a spatialdata element name, or one made from the file name."""
    if name is None:
        stem = path.stem if path.suffix else path.name
        if stem.lower().endswith(".ome") and len(stem) > 4:  # slide.ome.tif
            stem = stem[:-4]
        name = safe_name(stem)
    if not isinstance(name, str) or not name or _NAME_OK.search(name) or name.startswith(("__", ".")):
        msg = f"name={name!r} cannot name a spatialdata element: use letters, digits, '_', '-' and '.' only."
        raise ValueError(msg)
    return name


def slide_image(
    path: str | os.PathLike,
    *,
    mpp: float | None,
    coordinate_system: str,
    backend: str = "auto",
    chunk_size: int = 1024,
) -> tuple[Any, dict[str, Any]]:
    """(image element, ``attrs["spade_sc"]["wsi"]`` record) of a slide file; see :func:`read_wsi`."""
    backend = check_choice(backend, "backend", BACKENDS)
    chunk_size = check_int(chunk_size, "chunk_size", low=64)
    if mpp is not None:
        try:
            mpp = float(mpp)
        except (TypeError, ValueError):
            mpp = float("nan")
        if not (math.isfinite(mpp) and mpp > 0):
            msg = f"mpp must be a positive number of micrometres per level-0 pixel, got {mpp!r}."
            raise ValueError(msg)
    slide = open_slide(path, backend=backend, chunk_size=chunk_size)
    used = _resolve_mpp(slide, mpp)
    _warn_single_level(slide)
    image = multiscale_image(slide.levels, slide.channels, coordinate_system)
    h0, w0 = slide.levels[0].shape[1:]
    info = {
        "path": str(slide.path),
        "backend": slide.backend,
        "vendor": slide.vendor,
        "mpp": used,
        "file_mpp": slide.file_mpp,
        "mpp_source": slide.mpp_source if mpp is None else "mpp argument",
        "level_shapes": [[int(lv.shape[1]), int(lv.shape[2])] for lv in slide.levels],
        "level_downsamples": [float(np.mean([h0 / lv.shape[1], w0 / lv.shape[2]])) for lv in slide.levels],
    }
    return image, info


def open_slide(path: str | os.PathLike, *, backend: str = "auto", chunk_size: int = 1024) -> Slide:
    """Open a slide file with ``backend``; errors name the file and what was expected."""
    path = Path(path)
    if not path.exists():
        msg = f"The slide file {path} does not exist."
        raise FileNotFoundError(msg)
    if not path.is_file():
        msg = f"{path} is not a file; pass the slide file itself (for MIRAX, the .mrxs file beside its folder)."
        raise ValueError(msg)
    errors: dict[str, str] = {}
    order = ["tiffslide", "openslide"] if backend == "auto" else [backend]
    if backend == "auto" and not _is_tiff(path) and _has_openslide():
        order = ["openslide", "tiffslide"]
    for name in order:
        try:
            slide = _open_tiffslide(path, chunk_size) if name == "tiffslide" else _open_openslide(path, chunk_size)
        except _NotOpened as err:
            errors[name] = str(err)
            continue
        _check_slide(slide)
        return slide
    why = "; ".join(f"{k}: {v}" for k, v in errors.items())
    msg = (
        f"{path} is not a slide image that {' or '.join(order)} can open ({why}). Expected a whole-slide image "
        "(pyramidal TIFF, OME-TIFF, .svs, .ndpi, .mrxs, ...) or a plain RGB image."
    )
    raise ValueError(msg)


def multiscale_image(levels: list[dask.array.Array], channels: list[str], coordinate_system: str) -> Any:
    """An Image2DModel element from (c, y, x) dask levels (finest first): a DataTree when there are several."""
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, set_transformation

    if len(levels) == 1:
        return Image2DModel.parse(
            levels[0], dims=("c", "y", "x"), c_coords=channels, transformations={coordinate_system: Identity()}
        )
    h0, w0 = levels[0].shape[1:]
    nodes = {}
    for i, level in enumerate(levels):
        h, w = level.shape[1:]
        # pixel centres in level-0 units, as spatialdata's compute_coordinates gives them for a pyramid
        coords = {
            "c": channels,
            "y": np.linspace(0, h0, h + 1)[:-1] + h0 / h / 2,
            "x": np.linspace(0, w0, w + 1)[:-1] + w0 / w / 2,
        }
        nodes[f"scale{i}"] = xr.Dataset({"image": xr.DataArray(level, dims=("c", "y", "x"), coords=coords)})
    tree = xr.DataTree.from_dict(nodes)
    set_transformation(tree, {coordinate_system: Identity()}, set_all=True)
    Image2DModel().validate(tree)
    return tree


# --------------------------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------------------------
class _NotOpened(Exception):
    """The backend cannot open this file (the next backend may)."""


def _has_openslide() -> bool:
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _is_tiff(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(4)
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _chunk(tile: int | None, target: int) -> int:
    """A multiple of the file's ``tile`` side near ``target`` (``target`` when untiled)."""
    if not tile or tile <= 0:
        return target
    return int(tile) * max(1, round(target / int(tile)))


def _open_tiffslide(path: Path, chunk_size: int) -> Slide:
    try:
        import tiffslide
    except ImportError as err:
        msg = "tiffslide is not installed (pip install tiffslide)"
        raise _NotOpened(msg) from err
    import dask.array as da

    try:
        if _is_tiff(path):
            _check_tiff_complete(path)
            ts = tiffslide.TiffSlide(path)
        else:
            ts = tiffslide.NotTiffSlide(path)
        props = dict(ts.properties)
        group = ts.zarr_group
    except ValueError as err:  # truncated TIFF, found by _check_tiff_complete
        if "truncated" in str(err):
            raise
        raise _NotOpened(f"{type(err).__name__}: {err}") from err
    except Exception as err:  # tifffile / imagecodecs raise many types on files they cannot parse
        raise _NotOpened(f"{type(err).__name__}: {err}") from err
    axes = props.get("tiffslide.series-axes", "YXS")
    if axes not in ("YXS", "CYX"):
        msg = f"{path} holds a single-channel (axes {axes!r}) image; an RGB H&E slide is expected."
        raise ValueError(msg)
    levels = []
    for i in range(ts.level_count):
        c = _chunk(props.get(f"tiffslide.level[{i}].tile-height"), chunk_size)
        lazy = _memmap_level(ts, path, c) if ts.level_count == 1 else None
        if lazy is None:
            arr = group[str(i)]
            shape = (c, c, arr.shape[2]) if axes == "YXS" else (arr.shape[0], c, c)
            lazy = da.from_zarr(arr, chunks=shape, name=f"tiffslide-{_token(path)}-{i}")
            lazy = lazy.transpose(2, 0, 1) if axes == "YXS" else lazy
        levels.append(lazy)
    channels = _channel_names(path, int(levels[0].shape[0]))
    mpp_xy, source = _mpp_pair(props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")), "tiffslide.mpp-x/y"
    if mpp_xy is None and _is_tiff(path):
        mpp_xy, source = _ome_mpp(ts.ts_tifffile), "OME PhysicalSizeX/Y"
    vendor = str(props.get("tiffslide.vendor") or ("generic-tiff" if _is_tiff(path) else "image"))
    keep = {k: v for k, v in props.items() if isinstance(v, int | float | str) and not k.startswith("tiff.Image")}
    return Slide(path, "tiffslide", levels, channels, mpp_xy, source, vendor, keep)


def _memmap_level(ts: Any, path: Path, chunk: int) -> dask.array.Array | None:
    """An uncompressed, contiguous single-level TIFF as a memory map (tifffile would read it as one chunk)."""
    import dask.array as da

    if not _is_tiff(path):
        return None
    import tifffile

    page = ts.ts_tifffile.series[0].levels[0].keyframe
    if not getattr(page, "is_memmappable", False) or page.axes not in ("YXS", "YX") or len(page.dataoffsets) > 1:
        return None
    data = tifffile.memmap(path, mode="r")
    if data.ndim != 3:
        return None
    return da.from_array(data, chunks=(chunk, chunk, data.shape[2]), name=f"memmap-{_token(path)}").transpose(2, 0, 1)


def _open_openslide(path: Path, chunk_size: int) -> Slide:
    try:
        import openslide
    except (ImportError, OSError) as err:
        msg = "openslide is not available (pip install openslide-python openslide-bin)"
        raise _NotOpened(msg) from err
    try:
        if _is_tiff(path):
            _check_tiff_complete(path)
        slide = openslide.open_slide(str(path))
        props = dict(slide.properties)
    except ValueError as err:
        if "truncated" in str(err):
            raise
        raise _NotOpened(f"{type(err).__name__}: {err}") from err
    except Exception as err:  # OpenSlideUnsupportedFormatError, OpenSlideError, PIL errors
        raise _NotOpened(f"{type(err).__name__}: {err}") from err
    levels = []
    for i, (w, h) in enumerate(slide.level_dimensions):
        tile = props.get(f"openslide.level[{i}].tile-height")
        c = _chunk(int(tile) if tile else None, chunk_size)
        levels.append(_openslide_level(slide, i, int(h), int(w), c, f"openslide-{_token(path)}-{i}"))
    mpp_xy = _mpp_pair(props.get("openslide.mpp-x"), props.get("openslide.mpp-y"))
    vendor = str(props.get("openslide.vendor") or type(slide).__name__)
    keep = {k: v for k, v in props.items() if len(str(v)) < 200}
    return Slide(path, "openslide", levels, ["r", "g", "b"], mpp_xy, "openslide.mpp-x/y", vendor, keep)


def _openslide_level(slide: Any, level: int, h: int, w: int, chunk: int, name: str) -> dask.array.Array:
    """Level ``level`` of an OpenSlide slide as a lazy (3, h, w) uint8 array (transparent -> white)."""
    import dask.array as da

    downsample = float(slide.level_downsamples[level])

    def block(block_info: dict | None = None) -> np.ndarray:
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        region = slide.read_region((round(x0 * downsample), round(y0 * downsample)), level, (x1 - x0, y1 - y0))
        rgba = np.asarray(region, dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.moveaxis(np.rint(rgb).astype(np.uint8), -1, 0)

    chunks = da.core.normalize_chunks((3, chunk, chunk), (3, h, w))
    return da.map_blocks(block, dtype=np.uint8, chunks=chunks, name=name, meta=np.empty((0, 0, 0), np.uint8))


def _token(path: Path) -> str:
    from dask.base import tokenize

    st = path.stat()
    return tokenize(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _channel_names(path: Path, n: int) -> list[str]:
    if n == 3:
        return ["r", "g", "b"]
    if n == 4:
        return ["r", "g", "b", "a"]
    msg = f"{path} has {n} channel(s); an RGB (or RGBA) H&E slide is expected."
    raise ValueError(msg)


# --------------------------------------------------------------------------------------------------------------------
# checks and pixel size
# --------------------------------------------------------------------------------------------------------------------
def _check_tiff_complete(path: Path) -> None:
    """Error when a TIFF's image data reaches past the end of the file (a truncated copy or download)."""
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tf:
            for page in tf.pages:
                offsets = np.asarray(getattr(page, "dataoffsets", ()), dtype=np.int64)
                counts = np.asarray(getattr(page, "databytecounts", ()), dtype=np.int64)
                if len(offsets) and len(counts) == len(offsets) and int((offsets + counts).max()) > size:
                    msg = (
                        f"{path} is truncated: its image data reaches byte {int((offsets + counts).max())} but the "
                        f"file has {size} bytes (an incomplete copy or download?)."
                    )
                    raise ValueError(msg)
    except tifffile.TiffFileError as err:
        msg = f"{path} is not a readable TIFF ({err}); it may be truncated or corrupt."
        raise ValueError(msg) from err


def _check_slide(slide: Slide) -> None:
    """Decode a small corner of the coarsest level, so that a broken file fails here, naming itself."""
    level = slide.levels[-1]
    try:
        np.asarray(level[:, : min(16, level.shape[1]), : min(16, level.shape[2])].compute(scheduler="synchronous"))
    except Exception as err:
        why = f"{type(err).__name__}: {err}"
        msg = f"{slide.path} opened with {slide.backend} but its pixels cannot be decoded ({why})."
        raise ValueError(msg) from err
    if not np.issubdtype(level.dtype, np.integer) and not np.issubdtype(level.dtype, np.floating):
        msg = f"{slide.path} has pixels of dtype {level.dtype}; integer or float RGB values are expected."
        raise ValueError(msg)


def _mpp_pair(x: Any, y: Any) -> tuple[float, float] | None:
    """(mpp x, mpp y) from property values, None when missing or implausible (e.g. a 72 dpi default)."""
    try:
        fx = float(x)
        fy = float(y) if y not in (None, "") else fx
    except (TypeError, ValueError):
        return None
    lo, hi = PLAUSIBLE_MPP
    if not all(math.isfinite(v) and lo <= v <= hi for v in (fx, fy)):
        return None
    return fx, fy


def _ome_mpp(tf: Any) -> tuple[float, float] | None:
    """Pixel size from OME-XML ``PhysicalSizeX`` / ``PhysicalSizeY`` (with their units; default um)."""
    xml = getattr(tf, "ome_metadata", None)
    if not xml:
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
            out = []
            for ax in ("X", "Y"):
                value = el.attrib.get(f"PhysicalSize{ax}", el.attrib["PhysicalSizeX"])
                unit = el.attrib.get(f"PhysicalSize{ax}Unit", "µm")
                factor = _UNIT_UM.get(unit)
                if factor is None:
                    return None
                out.append(float(value) * factor)
            return _mpp_pair(*out)
    return None


def _resolve_mpp(slide: Slide, mpp: float | None) -> float:
    """The pixel size to record: ``mpp`` when given (warning on a > 5 % mismatch with the file), else the file's."""
    file_mpp = slide.file_mpp
    if slide.mpp_xy is not None:
        mx, my = slide.mpp_xy
        if abs(mx - my) > MPP_MISMATCH * min(mx, my):
            warnings.warn(
                f"{slide.path}: the pixel width ({mx:.4g} um) and height ({my:.4g} um) differ by more than "
                f"{MPP_MISMATCH:.0%}; spade_sc uses square pixels of their mean, {file_mpp:.4g} um.",
                UserWarning,
                stacklevel=4,
            )
    if mpp is not None:
        if file_mpp is not None and abs(mpp - file_mpp) > MPP_MISMATCH * file_mpp:
            warnings.warn(
                f"mpp={mpp:.4g} differs by {abs(mpp - file_mpp) / file_mpp:.0%} from the pixel size recorded in "
                f"{slide.path} ({file_mpp:.4g} um, {slide.mpp_source}); using mpp={mpp:.4g}.",
                UserWarning,
                stacklevel=4,
            )
        return float(mpp)
    if file_mpp is None:
        msg = (
            f"{slide.path} records no pixel size (checked: openslide.mpp-x/y, vendor metadata, TIFF resolution tags "
            "in cm/mm/um/inch, OME PhysicalSizeX/Y; resolutions coarser than "
            f"{PLAUSIBLE_MPP[1]:g} um/px such as 72 dpi are ignored). Pass it in micrometres per level-0 pixel, e.g. "
            "read_wsi(path, mpp=0.25) for a 40x scan or mpp=0.5 for 20x."
        )
        raise ValueError(msg)
    return file_mpp


def _warn_single_level(slide: Slide) -> None:
    h, w = slide.levels[0].shape[1:]
    if len(slide.levels) == 1 and max(h, w) > SINGLE_LEVEL_WARN_PX:
        warnings.warn(
            f"{slide.path} has no pyramid (one level of {w} x {h} px): it is read lazily, but every read at a coarse "
            "pixel size (tissue detection, thumbnails) decodes full-resolution data and will be slow. A pyramidal "
            "copy reads much faster, e.g. `vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`.",
            UserWarning,
            stacklevel=4,
        )

"""A procedural cohort that behaves like H&E + spatial transcriptomics, at any image size, lazily.

Every pixel is a pure function of (seed, slide, x, y), so the image can be rendered chunk by chunk (dask)
and every pyramid level is rendered directly at its own resolution: a 40,000 x 40,000 px slide costs
nothing until a region of it is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import Keys
from .._sdata import ATTRS_KEY, set_microns_per_unit
from .._validation import as_ids, check_int

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

SYNTHETIC_MPP = 0.5

# Morphology of each region type: nuclei per cell probability, nucleus radius (um), cell side (um),
# arrangement ("clustered" | "regular" | "scattered"), stroma colour (RGB 0..1), nucleus colour.
_MORPHOLOGY = {
    "tumour": dict(
        density=0.85, radius=4.2, cell=11.0, jitter=0.15, stroma=(0.86, 0.62, 0.78), nucleus=(0.30, 0.13, 0.42)
    ),
    "stroma": dict(
        density=0.18, radius=2.4, cell=14.0, jitter=0.9, stroma=(0.95, 0.68, 0.78), nucleus=(0.42, 0.25, 0.55)
    ),
    "immune": dict(
        density=0.95, radius=2.6, cell=7.0, jitter=0.5, stroma=(0.90, 0.70, 0.82), nucleus=(0.20, 0.10, 0.38)
    ),
    "normal": dict(
        density=0.5, radius=3.2, cell=10.0, jitter=0.1, stroma=(0.97, 0.76, 0.84), nucleus=(0.40, 0.22, 0.55)
    ),
    "necrosis": dict(
        density=0.35, radius=1.6, cell=6.0, jitter=1.0, stroma=(0.93, 0.55, 0.68), nucleus=(0.55, 0.30, 0.58)
    ),
}
_BACKGROUND = np.array([0.96, 0.95, 0.97])
#: Stain hue of each organ with ``organ_programs=True`` (multiplies the tissue colours; organs cycle through them).
_ORGAN_TINTS = ((1.0, 1.0, 1.0), (0.88, 1.03, 1.12), (1.10, 0.94, 0.86), (0.94, 1.10, 0.94))


def _hash(*arrays: np.ndarray) -> np.ndarray:
    """Counter-based hash of integer arrays to uniform floats in [0, 1) (splitmix64)."""
    h = np.uint64(0x9E3779B97F4A7C15)
    out = np.zeros(np.broadcast(*arrays).shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for a in arrays:
            out = out ^ (
                np.asarray(a).astype(np.int64).astype(np.uint64) + h + (out << np.uint64(6)) + (out >> np.uint64(2))
            )
            z = out + np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            out = z ^ (z >> np.uint64(31))
    return (out >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass
class _Slide:
    """Layout of one synthetic slide in micrometres."""

    seed: int
    size_um: float
    types: tuple[str, ...]
    centres: np.ndarray  # (R, 2) Voronoi centres of regions, um (x, y)
    region_type: np.ndarray  # (R,) index into types
    tissue_centre: np.ndarray
    tissue_radius: float
    wobble: np.ndarray  # (4, 2) amplitude/phase of the boundary
    prolif: np.ndarray  # (3, 4) sinusoid parameters of the proliferation field
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # stain hue of the organ (multiplies the tissue colours)

    def region(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Region type index at (x, y) um."""
        d = (x[..., None] - self.centres[:, 0]) ** 2 + (y[..., None] - self.centres[:, 1]) ** 2
        return self.region_type[np.argmin(d, axis=-1)]

    def tissue(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue mask at (x, y) um: a blob with a wavy boundary."""
        dx, dy = x - self.tissue_centre[0], y - self.tissue_centre[1]
        r = np.hypot(dx, dy)
        ang = np.arctan2(dy, dx)
        k = np.arange(2, 6)
        rad = self.tissue_radius * (1 + (self.wobble[:, 0] * np.sin(k * ang[..., None] + self.wobble[:, 1])).sum(-1))
        return r < rad

    def proliferation(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """A smooth field in [0, 1]."""
        s = np.zeros(np.broadcast(x, y).shape)
        for fx, fy, ph, amp in self.prolif:
            s = s + amp * np.sin(2 * np.pi * (fx * x + fy * y) / self.size_um + ph)
        return 0.5 + 0.5 * np.tanh(s)


def _make_slide(seed: int, slide: int, size_um: float, types: Sequence[str], tumour_weight: float) -> _Slide:
    rng = np.random.default_rng([seed, slide, 17])
    n_regions = int(rng.integers(8, 16))
    centres = rng.uniform(0.1 * size_um, 0.9 * size_um, size=(n_regions, 2))
    p = np.ones(len(types))
    if "tumour" in types:
        p[types.index("tumour")] = tumour_weight
    p = p / p.sum()
    region_type = rng.choice(len(types), size=n_regions, p=p)
    region_type[: min(len(types), n_regions)] = rng.permutation(len(types))[: min(len(types), n_regions)]
    if "tumour" in types and tumour_weight == 0:
        region_type[region_type == types.index("tumour")] = (types.index("tumour") + 1) % len(types)
    wobble = np.stack([rng.uniform(0.02, 0.07, 4), rng.uniform(0, 2 * np.pi, 4)], axis=1)
    prolif = np.stack(
        [rng.uniform(0.5, 2.5, 3), rng.uniform(0.5, 2.5, 3), rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.4, 0.9, 3)],
        axis=1,
    )
    return _Slide(
        seed=seed * 1000 + slide,
        size_um=size_um,
        types=tuple(types),
        centres=centres,
        region_type=region_type,
        tissue_centre=np.array([size_um / 2, size_um / 2]) + rng.normal(0, 0.02 * size_um, 2),
        tissue_radius=0.40 * size_um,
        wobble=wobble,
        prolif=prolif,
    )


def _render(slide: _Slide, y0: int, x0: int, h: int, w: int, mpp: float) -> np.ndarray:
    """RGB uint8 block (3, h, w) of the slide at ``mpp`` um/px whose top-left pixel is (y0, x0)."""
    ys = (y0 + np.arange(h) + 0.5) * mpp
    xs = (x0 + np.arange(w) + 0.5) * mpp
    X, Y = np.meshgrid(xs, ys)
    region = slide.region(X, Y)
    tissue = slide.tissue(X, Y)
    prolif = slide.proliferation(X, Y)
    rgb = np.empty((h, w, 3))
    # Stroma: pink with fibre streaks and grain.
    fibre = 0.5 + 0.5 * np.sin(0.35 * X + 0.8 * np.sin(0.05 * Y) + 0.2 * Y)
    grain = _hash(np.floor(X / 1.5).astype(np.int64), np.floor(Y / 1.5).astype(np.int64), slide.seed)
    nucleus = np.zeros((h, w), dtype=bool)
    ncol = np.zeros((h, w, 3))
    for t, name in enumerate(slide.types):
        m = _MORPHOLOGY[name]
        sel = region == t
        if not sel.any():
            continue
        rgb[sel] = np.array(m["stroma"]) * (0.93 + 0.07 * fibre[sel, None]) - 0.04 * grain[sel, None]
        cell = m["cell"]
        ci = np.floor(X[sel] / cell).astype(np.int64)
        cj = np.floor(Y[sel] / cell).astype(np.int64)
        u = _hash(ci, cj, slide.seed, t, 1)
        density = m["density"] * (0.55 + 0.9 * prolif[sel]) if name in ("tumour", "normal") else m["density"]
        present = u < np.minimum(density, 1.0)
        radius = m["radius"] * (0.75 + 0.5 * _hash(ci, cj, slide.seed, t, 2))
        if name == "tumour":
            radius = radius * (0.85 + 0.4 * prolif[sel])
        slack = np.maximum(cell / 2 - radius, 0) * m["jitter"]
        cx = (ci + 0.5) * cell + (2 * _hash(ci, cj, slide.seed, t, 3) - 1) * slack
        cy = (cj + 0.5) * cell + (2 * _hash(ci, cj, slide.seed, t, 4) - 1) * slack
        inside = present & ((X[sel] - cx) ** 2 + (Y[sel] - cy) ** 2 < radius**2)
        idx = np.flatnonzero(sel.ravel())[inside]
        nucleus.ravel()[idx] = True
        ncol.reshape(-1, 3)[idx] = np.array(m["nucleus"])
    rgb[nucleus] = ncol[nucleus] * (0.9 + 0.2 * grain[nucleus, None])
    if slide.tint != (1.0, 1.0, 1.0):
        rgb *= np.asarray(slide.tint)
    rgb[~tissue] = _BACKGROUND - 0.02 * grain[~tissue, None]
    return np.moveaxis(np.clip(rgb * 255, 0, 255).astype(np.uint8), -1, 0)


def _lazy_level(slide: _Slide, size_px: int, mpp: float, chunk: int):
    import dask.array as da

    def block(block_info=None):
        (c0, c1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return _render(slide, y0, x0, y1 - y0, x1 - x0, mpp)[c0:c1]

    chunks = (3, chunk, chunk)
    return da.map_blocks(block, dtype=np.uint8, chunks=da.core.normalize_chunks(chunks, (3, size_px, size_px)))


def _gene_programs(
    rng: np.random.Generator, n_genes: int, types: Sequence[str], organs: Sequence[str], organ_programs: bool
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Gene names, base log-profile, log-fold changes of each type in each organ (O x T x G), organ shifts (O x G).

    With ``organ_programs``, organ ``o`` gives region type ``t`` the program of type ``(t + o) % T``.
    """
    names = [f"GENE{i:04d}" for i in range(n_genes)]
    base = rng.normal(0.0, 1.0, n_genes)
    n_markers = max(3, n_genes // (2 * len(types) + 2))
    programs = np.zeros((len(types), n_genes))
    order = rng.permutation(n_genes)
    for t in range(len(types)):
        markers = order[t * n_markers : (t + 1) * n_markers]
        programs[t, markers] = rng.uniform(1.5, 3.0, len(markers))
    organ_shift = rng.normal(0.0, 0.3, (len(organs), n_genes))
    rolls = [o if organ_programs else 0 for o in range(len(organs))]
    per_organ = np.stack([np.roll(programs, -r, axis=0) for r in rolls])
    return names, base, per_organ, organ_shift


def synthetic(
    n_slides: int = 4,
    n_spots: int = 300,
    image_size: int = 2048,
    tissue_types: Sequence[str] = ("tumour", "stroma", "immune", "normal"),
    organs: Sequence[str] = ("breast", "lung"),
    n_genes: int = 200,
    *,
    spots: bool = True,
    chunk_size: int = 1024,
    seed: int = 0,
    organ_programs: bool = False,
    organ_tints: bool = True,
) -> dict[str, SpatialData]:
    """A deterministic synthetic cohort of H&E-like slides with spot expression.

    Each slide is a tissue blob on white glass, split into regions of ``tissue_types``. Each region type has its
    own morphology (nuclei density, size and arrangement over a pink stroma texture) and its own gene program,
    so the image carries information about the expression, as in real data. A smooth "proliferation" field
    changes tumour/normal nuclei density and size and scales a proliferation gene set, so that expression also
    varies continuously within a region. Every pixel is rendered on demand: large images stay lazy.

    Parameters
    ----------
    n_slides
        Number of slides.
    n_spots
        Approximate number of spots per slide (spots lie on a square grid over the tissue).
    image_size
        Side of the square image in pixels at 0.5 um/px.
    tissue_types
        Region types (one name or a sequence), any of ``"tumour"``, ``"stroma"``, ``"immune"``, ``"normal"``,
        ``"necrosis"``.
    organs
        Organ of each slide (one name or a sequence), assigned round-robin; shifts expression a little per organ.
    n_genes
        Genes in the counts table.
    spots
        When False, slides get no spots and no table (whole slides, for tiling and MIL).
    chunk_size
        Dask chunk side of the image.
    seed
        Random seed; the same seed gives the same cohort.
    organ_programs
        When True, the organs differ in how morphology maps to expression, as tissues of different organs do: the
        same region morphology carries another gene program in each organ (organ ``o`` gives region type ``t`` the
        program of type ``t + o``, cyclically: the tumour of the second organ expresses what the stroma of the
        first does), and each organ has its own stain hue, so the organ is visible in the image. No single linear
        map from image to expression holds for every organ; one data expert per organ can learn each map. False
        (default): every organ shares the programs, shifted a little.
    organ_tints
        With ``organ_programs``: give each organ its own stain hue (default). False: the organs look alike, so the
        image alone cannot tell which map holds; only the organ, known from elsewhere, can (``tl.fit(tissue_key=
        "organ", tissue_experts=True)``).

    Returns
    -------
    dict[str, SpatialData]
        ``{"slide<i>": SpatialData}``; each SpatialData holds

        - ``images["image"]``: an RGB uint8 multiscale image (c, y, x), dask-backed and rendered lazily, levels
          downsampled by 1, 2, 4, 8, ... down to about 512 px;
        - ``shapes["spots"]`` (when ``spots``): spot circles on the tissue (55 um diameter, smaller when the grid
          is denser than the 100 um Visium spacing);
        - ``tables["table"]`` (when ``spots``): raw counts (sparse) annotating the spots, ``obs`` columns
          ``slide``, ``organ``, ``tissue_type`` (region type at the spot centre, the ground truth),
          ``proliferation`` (field value at the centre);
        - ``attrs["spade_sc"]["microns_per_unit"]["<slide>"]`` = 0.5 and
          ``attrs["spade_sc"]["slide"]``: ``organ``, ``tumour_fraction`` (of the tissue area) and ``label``
          (1 when the tumour fraction exceeds the cohort median, else 0), the slide-level ground truth, and the
          region layout (``region_centres_px``, ``region_types``: each pixel belongs to the region of its nearest
          centre; see :func:`synthetic_regions`).
    """
    from spatialdata import SpatialData

    types, organs = _check_arguments(n_slides, n_spots, image_size, tissue_types, organs, n_genes, chunk_size, seed)
    rng = np.random.default_rng(seed)
    names, base, programs, organ_shift = _gene_programs(rng, n_genes, types, organs, bool(organ_programs))
    genes = _Genes(names, base, programs, organ_shift, prolif=rng.permutation(n_genes)[: max(3, n_genes // 20)])
    size_um = image_size * SYNTHETIC_MPP
    layouts = [
        _make_slide(seed, i, size_um, types, float(np.random.default_rng([seed, i, 3]).uniform(0.0, 3.0)))
        for i in range(n_slides)
    ]
    if organ_programs and organ_tints:
        for i, layout in enumerate(layouts):
            layout.tint = _ORGAN_TINTS[(i % len(organs)) % len(_ORGAN_TINTS)]
    fractions = [_tumour_fraction(layout) for layout in layouts]
    threshold = float(np.median(fractions))

    out = {}
    for i, layout in enumerate(layouts):
        name = f"slide{i}"
        organ = organs[i % len(organs)]
        elements: dict = {"images": {"image": _slide_image(layout, name, image_size, chunk_size)}}
        if spots:
            elements.update(
                _slide_spots(layout, name, organ, i % len(organs), genes, n_spots, np.random.default_rng([seed, i, 7]))
            )
        sdata = SpatialData(**elements)
        set_microns_per_unit(sdata, name, SYNTHETIC_MPP)
        sdata.attrs[ATTRS_KEY][Keys.SLIDE] = {
            "organ": organ,
            "tumour_fraction": fractions[i],
            "label": int(fractions[i] > threshold),
            "region_centres_px": (layout.centres / SYNTHETIC_MPP).tolist(),
            "region_types": [types[r] for r in layout.region_type],
        }
        out[name] = sdata
    return out


# --------------------------------------------------------------------------------------------------------------------
# steps of synthetic
# --------------------------------------------------------------------------------------------------------------------
def _check_arguments(
    n_slides: Any,
    n_spots: Any,
    image_size: Any,
    tissue_types: str | Sequence[str],
    organs: str | Sequence[str],
    n_genes: Any,
    chunk_size: Any,
    seed: Any,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The tissue types and organs as tuples (a single string is one), after checking every argument."""
    types = as_ids(tissue_types, "tissue_types")
    unknown = [t for t in types if t not in _MORPHOLOGY]
    if unknown or not types:
        msg = f"Unknown tissue_types {unknown or types}; choose among {sorted(_MORPHOLOGY)}."
        raise ValueError(msg)
    check_int(n_slides, "n_slides")
    check_int(n_spots, "n_spots")
    check_int(image_size, "image_size", low=64)
    check_int(n_genes, "n_genes")
    check_int(chunk_size, "chunk_size")
    check_int(seed, "seed", low=0)
    organs = [organs] if isinstance(organs, str) else list(organs)  # repeats allowed: organs go round-robin
    if not organs or not all(isinstance(o, str) and o for o in organs):
        msg = f"synthetic() needs at least one organ, each a non-empty string; got {organs!r}."
        raise ValueError(msg)
    return tuple(types), tuple(organs)


@dataclass(frozen=True)
class _Genes:
    """The expression model of a cohort: gene names, base log-profile, per-type programs, per-organ shifts."""

    names: list[str]
    base: np.ndarray  # (G,)
    programs: np.ndarray  # (O, T, G) log-fold changes of each region type in each organ
    organ_shift: np.ndarray  # (O, G)
    prolif: np.ndarray  # indices of the proliferation gene set


def _tumour_fraction(layout: _Slide) -> float:
    """Tumour fraction of the tissue of a slide, from a coarse 96 x 96 grid."""
    g = (np.arange(96) + 0.5) * layout.size_um / 96
    GX, GY = np.meshgrid(g, g)
    inside = layout.tissue(GX, GY)
    if "tumour" not in layout.types or not inside.any():
        return 0.0
    return float((layout.region(GX, GY)[inside] == layout.types.index("tumour")).mean())


def _slide_image(layout: _Slide, name: str, image_size: int, chunk_size: int) -> Any:
    """The lazy RGB multiscale image of a slide: each level is rendered at its own resolution."""
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    n_levels = 1
    while image_size // (2**n_levels) >= 512:
        n_levels += 1
    level0 = _lazy_level(layout, image_size, SYNTHETIC_MPP, chunk_size)
    image = Image2DModel.parse(
        level0,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2] * (n_levels - 1) or None,
        transformations={name: Identity()},
        chunks=(3, chunk_size, chunk_size),  # keep the render blocks: smaller chunks would re-render each block
    )
    if isinstance(image, xr.DataTree):
        for k in range(1, n_levels):
            node = image[f"scale{k}"]["image"]
            size = node.sizes["y"]
            node.data = _lazy_level(layout, size, SYNTHETIC_MPP * image_size / size, chunk_size)
    return image


def _slide_spots(
    layout: _Slide, name: str, organ: str, organ_index: int, genes: _Genes, n_spots: int, srng: np.random.Generator
) -> dict[str, dict[str, Any]]:
    """``{"shapes": ..., "tables": ...}`` of a slide: spots on a square grid over the tissue and their counts."""
    from geopandas import GeoDataFrame
    from shapely.geometry import Point
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    spacing = np.sqrt(np.pi * (0.40 * layout.size_um) ** 2 / n_spots)
    grid = np.arange(spacing / 2, layout.size_um, spacing)
    sx, sy = np.meshgrid(grid, grid)
    sx, sy = sx.ravel(), sy.ravel()
    keep = layout.tissue(sx, sy)
    sx, sy = sx[keep], sy[keep]
    table = _spot_table(layout, name, organ, organ_index, genes, sx, sy, srng)
    px = table.obsm["spatial"]
    circles = GeoDataFrame(
        {"radius": np.full(len(px), min(27.5, 0.45 * spacing) / SYNTHETIC_MPP)},
        geometry=[Point(x, y) for x, y in px],
        index=np.arange(len(px)),
    )
    return {
        "shapes": {"spots": ShapesModel.parse(circles, transformations={name: Identity()})},
        "tables": {"table": TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")},
    }


def _spot_table(
    layout: _Slide,
    name: str,
    organ: str,
    organ_index: int,
    genes: _Genes,
    sx: np.ndarray,
    sy: np.ndarray,
    srng: np.random.Generator,
) -> AnnData:
    """Raw counts of the spots centred at (sx, sy) um: region program, organ shift, proliferation, noise."""
    from anndata import AnnData
    from scipy import sparse

    region = layout.region(sx, sy)
    prolif = layout.proliferation(sx, sy)
    logmu = genes.base[None, :] + genes.programs[organ_index][region] + genes.organ_shift[organ_index][None, :]
    logmu[:, genes.prolif] += 2.5 * prolif[:, None]
    logmu += srng.normal(0, 0.25, logmu.shape)
    mu = np.exp(logmu)
    mu = mu / mu.sum(1, keepdims=True) * srng.lognormal(np.log(3000), 0.3, len(sx))[:, None]
    counts = srng.poisson(srng.gamma(5.0, mu / 5.0))
    n = len(sx)
    obs = pd.DataFrame(
        {
            "slide": pd.Categorical([name] * n),
            "organ": pd.Categorical([organ] * n),
            "tissue_type": pd.Categorical([layout.types[r] for r in region], categories=list(layout.types)),
            "proliferation": prolif,
            "region": pd.Categorical(["spots"] * n),
            "spot_id": np.arange(n),
        },
        index=[f"{name}_spot{j}" for j in range(n)],
    )
    table = AnnData(X=sparse.csr_matrix(counts.astype(np.int32)), obs=obs, var=pd.DataFrame(index=genes.names))
    table.obsm["spatial"] = np.stack([sx, sy], 1) / SYNTHETIC_MPP
    return table


def synthetic_regions(sdata: SpatialData, xy: np.ndarray) -> np.ndarray:
    """Ground-truth region type at level-0 pixel positions of a slide made by :func:`synthetic`.

    Parameters
    ----------
    sdata
        One slide of :func:`synthetic`.
    xy
        (N, 2) pixel coordinates (x, y).

    Returns
    -------
    numpy.ndarray
        (N,) array of region type names.
    """
    info = sdata.attrs.get(ATTRS_KEY, {}).get("slide", {})
    if "region_centres_px" not in info:
        msg = "This SpatialData was not made by spade_sc.datasets.synthetic (no attrs['spade_sc']['slide'])."
        raise ValueError(msg)
    centres = np.asarray(info["region_centres_px"], dtype=float)
    xy = np.asarray(xy, dtype=float)
    d = ((xy[:, None, :] - centres[None]) ** 2).sum(-1)
    return np.asarray(info["region_types"])[np.argmin(d, axis=1)]

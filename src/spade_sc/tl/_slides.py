"""Slide-level embeddings: tile every slide, embed every tile, mean-pool the tiles into one vector per slide.

Where the cohort-level table lives
----------------------------------
A cohort is several ``SpatialData`` objects, so no single one of them can hold a table of all slides. Each slide's
``SpatialData`` gets a non-annotating table ``tables["spade_slides"]`` holding its own single row, and
:func:`slide_embeddings` returns the cohort-level :class:`~anndata.AnnData` (one row per slide), which is what slide
level analyses (MIL, classifiers, plots) use. Concatenating the per-slide tables gives the same rows back.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import Keys
from .._sdata import (
    _KINDS,
    ATTRS_KEY,
    Spots,
    as_cohort,
    check_patch_source,
    check_same_dimension,
    commit,
    features_matrix,
    resolve_key,
    resolve_table,
    staged,
    table_region,
)
from .._validation import named_errors, uns_safe
from .._version import __version__
from ..pp import image_features
from ..pp._tiles import Tiles, tile_elements, tiles_keys, write_tiles
from ._spade import embed

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

#: Suffix of the tiles shapes element written by :func:`spade_sc.pp.tile_tissue` (``"<image>_tiles"``).
TILES_SUFFIX = Keys.TILES_SUFFIX
#: Default embedding key.
SPADE_KEY = Keys.SPADE
#: How to compute tile features that are missing (appended to the error).
_FEATURES_HINT = (
    "Compute it with spade_sc.tl.slide_embeddings(cohort, model) (SPADE embedding) or "
    "spade_sc.tl.slide_embeddings(cohort, encoder=...) (base encoder features), or with spade_sc.tl.embed / "
    "spade_sc.pp.image_features on the tiles."
)


# --------------------------------------------------------------------------------------------------------------------
# helpers shared with tl._mil and pl._attention
# --------------------------------------------------------------------------------------------------------------------
def find_tiles(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    tiles_key: str | None = None,
    where: str = "This slide",
) -> tuple[str, str] | None:
    """``(tiles shapes key, tiles table key)`` of a slide, or None when it has no tiles yet.

    ``tiles_key`` names the shapes element; by default it is ``"<image>_tiles"`` (the name
    :func:`spade_sc.pp.tile_tissue` writes), where the image may be omitted when the slide holds one image, or when
    exactly one table made by ``tile_tissue`` is present.
    """
    if tiles_key is None:
        if image_key is None and len(sdata.images) != 1:
            made = [
                table_region(t)[0][0]
                for t in sdata.tables.values()
                if Keys.TILING in t.uns and "spatialdata_attrs" in t.uns and len(table_region(t)[0]) == 1
            ]
            if len(made) == 1:
                tiles_key = made[0]
            else:
                image_key = resolve_key(sdata, "images", None, what="image_key")
        if tiles_key is None:
            tiles_key = Keys.tiles(resolve_key(sdata, "images", image_key, what="image_key"))
    if tiles_key not in sdata.shapes:
        return None
    try:
        table_key = resolve_table(sdata, None, tiles_key)
    except ValueError as err:
        msg = f"{where}: the tiles {tiles_key!r} have no table: {err}"
        raise ValueError(msg) from err
    return tiles_key, table_key


def require_tiles(
    sdata: SpatialData, *, image_key: str | None = None, tiles_key: str | None = None, where: str = "This slide"
) -> tuple[str, str]:
    """Like :func:`find_tiles`, but a slide without tiles is an error saying how to make them."""
    found = find_tiles(sdata, image_key=image_key, tiles_key=tiles_key, where=where)
    if found is None:
        name = tiles_key or Keys.tiles(resolve_key(sdata, "images", image_key, what="image_key"))
        msg = (
            f"{where} has no tiles (no shapes element {name!r}; shapes present: {sorted(sdata.shapes)}). Tile it "
            "with spade_sc.pp.tile_tissue, or run spade_sc.tl.slide_embeddings(cohort, model) which tiles and embeds "
            "every slide."
        )
        raise KeyError(msg)
    return found


def tile_features(table: AnnData, features_key: str, *, where: str) -> np.ndarray:
    """The (n_tiles, d) float32 features of a tiles table, checked (present, 2-D, finite, non-empty)."""
    return features_matrix(table, features_key, where=f"{where}, tiles table", hint=_FEATURES_HINT)


def slide_info(sdata: SpatialData) -> dict[str, Any]:
    """Scalar slide-level annotations in ``sdata.attrs["spade_sc"]["slide"]`` (e.g. written by ``synthetic``)."""
    info = sdata.attrs.get(ATTRS_KEY, {}).get(Keys.SLIDE, {}) or {}
    return {
        str(k): (v.item() if isinstance(v, np.generic) else v)
        for k, v in info.items()
        if isinstance(v, str | int | float | bool | np.generic)
    }


def labels_frame(labels: Any, cohort_ids: Sequence[str], *, arg: str = "labels") -> pd.DataFrame:
    """``labels`` (DataFrame or AnnData, indexed by slide id) as a DataFrame; ids outside the cohort are an error."""
    from anndata import AnnData

    if isinstance(labels, AnnData):
        labels = labels.obs
    if not isinstance(labels, pd.DataFrame):
        msg = f"{arg} must be a pandas DataFrame indexed by slide id (or an AnnData), got {type(labels).__name__}."
        raise TypeError(msg)
    frame = labels.copy()
    frame.index = frame.index.astype(str)
    if not frame.index.is_unique:
        dup = frame.index[frame.index.duplicated()].unique().tolist()
        msg = f"{arg} has duplicated slide ids {dup[:10]}."
        raise ValueError(msg)
    unknown = [i for i in frame.index if i not in set(cohort_ids)]
    if unknown:
        msg = f"{arg} holds slide ids that are not in the cohort: {unknown[:10]} (cohort: {list(cohort_ids)[:10]}...)."
        raise ValueError(msg)
    return frame


# --------------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------------
def slide_embeddings(
    cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData],
    model: Any = None,
    *,
    features_key: str | None = None,
    tiles: bool = True,
    labels: pd.DataFrame | AnnData | None = None,
    image_key: str | None = None,
    tiles_key: str | None = None,
    encoder: Any = None,
    routing: str | None = None,
    tile_kwargs: Mapping[str, Any] | None = None,
    feature_kwargs: Mapping[str, Any] | None = None,
    key_added: str = "spade_slides",
    progress: bool = True,
) -> AnnData:
    """One embedding per whole slide: tile the tissue, embed every tile, mean-pool the tiles.

    For every slide, only the missing steps run:

    1. **Tiles.** When the slide has no tiles (shapes ``"<image>_tiles"``), :func:`spade_sc.pp.tile_tissue` covers
       its tissue (``tile_kwargs``), if ``tiles`` is True.
    2. **Tile embeddings.** When the tiles table lacks ``obsm[features_key]``: with a SPADE ``model``,
       :func:`spade_sc.tl.embed` on the tiles (computing the model's encoder features when missing); with an
       ``encoder`` (and no model), :func:`spade_sc.pp.image_features` on the tiles, giving base-encoder features
       (``"X_<encoder>"``) so that every comparison can be run both ways. Patches are cut at the tiling's ``mpp``
       and ``tile_size``, so each patch is exactly its tile (override with ``feature_kwargs``).
    3. **Pooling.** The mean of the tile embeddings is the slide embedding.

    Everything is validated on every slide before anything is written.

    Parameters
    ----------
    cohort
        One SpatialData, ``{slide id: SpatialData}`` or a sequence of them (ids ``slide0``, ``slide1``, ...).
    model
        A trained :class:`spade_sc.tl.SpadeModel`, used for slides whose tiles lack ``features_key``.
    features_key
        ``obsm`` key of the tile embeddings; default ``"X_spade"``, or ``"X_<encoder name>"`` when ``encoder`` is
        given. With a model, ``features_key=model.features_key`` pools the model's base-encoder features instead.
    tiles
        Tile slides that have no tiles yet; when False every slide must already be tiled.
    labels
        Slide-level annotations copied to ``obs``: a DataFrame (or an AnnData, its ``obs``) indexed by slide id.
        Ids that are not in the cohort are an error; slides absent from it get missing values.
    image_key
        The H&E image of every slide, when a slide holds several.
    tiles_key
        Name of the tiles shapes element; default ``"<image>_tiles"``.
    encoder
        Encoder spec or :class:`spade_sc.encoders.Encoder` for base-encoder features (used without a model).
    routing
        Routing of :func:`spade_sc.tl.embed` (default: the model's).
    tile_kwargs
        Passed to :func:`spade_sc.pp.tile_tissue` (``mpp``, ``tile_size``, ``min_tissue``, ...).
    feature_kwargs
        Passed to :func:`spade_sc.pp.image_features` (through :func:`spade_sc.tl.embed` with a model). Tiles are
        embedded in one view (``views=1``; a whole slide holds thousands of tiles), also with a model, whose
        :func:`~spade_sc.tl.embed` would compute 8; pass ``{"views": 8}`` for the model's own setting.
    key_added
        Name of the per-slide table.
    progress
        Progress bars (over slides, and of the feature extraction).

    Returns
    -------
    anndata.AnnData
        The cohort-level AnnData, one row per slide (index: slide id), with

        - ``obsm[features_key]``: the mean tile embedding (n_slides x d, float32);
        - ``obs["n_tiles"]``, ``obs["image_key"]``, ``obs["tiles_key"]``; the scalar entries of
          ``sdata.attrs["spade_sc"]["slide"]`` (e.g. ``organ``, ``tumour_fraction``, ``label`` of the synthetic cohort)
          and the columns of ``labels`` (which win on a name clash);
        - ``uns[key_added]``: the parameters (``features_key``, ``pooling``, model fingerprint or encoder spec).

        Writes into every slide:

        - ``tables[key_added]``: a non-annotating table holding the slide's own row (same columns as above);
        - when tiles were missing, ``shapes["<image>_tiles"]`` and ``tables["<image>_tiles_table"]``
          (see :func:`spade_sc.pp.tile_tissue`);
        - when tile embeddings were missing, ``tables["<image>_tiles_table"].obsm[features_key]`` and what
          :func:`spade_sc.tl.embed` (``obs["spade_expert"]``, ``obsm["spade_routing"]``, ``uns["spade"]``, ...) or
          :func:`spade_sc.pp.image_features` (``uns[features_key]``) write.
    """
    from tqdm.auto import tqdm

    slides = as_cohort(cohort)
    tiles_key = _check_arguments(model, encoder, key_added, tile_kwargs, tiles_key)
    label_frame = None if labels is None else labels_frame(labels, list(slides))
    enc = None
    if encoder is not None:
        from ..encoders import get_encoder

        enc = get_encoder(encoder)
    if features_key is None:
        features_key = Keys.features(enc.name) if enc is not None else Keys.SPADE

    # validation: every slide checked, and its tiles made, before anything is computed or written
    plan = _plan(slides, model, enc, features_key, tiles, image_key, tiles_key, tile_kwargs, key_added)
    tiles_encoder = _tiles_encoder(enc, model, features_key, plan)
    rows: list[dict[str, Any]] = []
    pooled: list[np.ndarray] = []
    work: dict[str, Spots] = {}
    for name, sdata in tqdm(slides.items(), desc="slide_embeddings", unit="slide", disable=not progress):
        step = plan[name]
        work[name] = _workspace(sdata, step)  # computations go into a working copy of the slide
        if step.features:
            kwargs = dict(feature_kwargs or {})
            with named_errors(name):
                _embed_tiles(work[name].sdata, step, model, tiles_encoder, features_key, routing, kwargs, progress)
        x = tile_features(work[name].table, features_key, where=f"Slide {name!r}")
        pooled.append(x.mean(axis=0))
        image = step.image_key or work[name].table.uns.get(Keys.TILING, {}).get("image_key", "")
        rows.append(
            {**slide_info(sdata), "n_tiles": int(x.shape[0]), "image_key": str(image), "tiles_key": step.tiles_key}
        )
    check_same_dimension({name: len(v) for name, v in zip(slides, pooled, strict=True)}, features_key)

    params = _params(features_key, model, enc, routing)
    adata = _cohort_table(list(slides), rows, np.stack(pooled).astype(np.float32), label_frame, features_key)
    adata.uns[key_added] = {"params": params}
    for name, sdata in slides.items():  # every slide has succeeded: write
        _commit_slide(sdata, plan[name], work[name])
    _write_slide_tables(slides, adata, key_added)
    logger.info(
        "slide_embeddings: %d slides, %s-d %r mean-pooled over %d tiles in total",
        len(slides),
        adata.obsm[features_key].shape[1],
        features_key,
        int(adata.obs["n_tiles"].sum()),
    )
    return adata


# --------------------------------------------------------------------------------------------------------------------
# steps of slide_embeddings
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Step:
    """What :func:`slide_embeddings` does to one slide: tile it and / or compute its tile features."""

    image_key: str | None
    tiles_key: str
    table_key: str  # the tiles table (the name tile_tissue will write, for slides not tiled yet)
    tile: bool
    features: bool
    made: Tiles | None = None  # the tiles made (not yet written) for a slide not tiled yet


def _check_model(model: Any) -> None:
    if model is not None and not (hasattr(model, "get_image_embedding") and hasattr(model, "features_key")):
        msg = (
            f"model must be a trained spade_sc.tl.SpadeModel (from spade_sc.tl.fit or SpadeModel.load), got "
            f"{type(model).__name__}."
        )
        raise TypeError(msg)


def _plan(
    slides: Mapping[str, SpatialData],
    model: Any,
    enc: Any,
    features_key: str,
    tiles: bool,
    image_key: str | None,
    tiles_key: str | None,
    tile_kwargs: Mapping[str, Any] | None,
    key_added: str,
) -> dict[str, _Step]:
    """What to do to every slide, after checking every slide (keys, images, tissue) and making the missing tiles."""
    plan: dict[str, _Step] = {}
    dims: dict[str, int] = {}
    for name, sdata in slides.items():
        where = f"Slide {name!r}"
        with named_errors(name):
            plan[name], dim = _plan_slide(
                sdata, where, model, enc, features_key, tiles=tiles, image_key=image_key, tiles_key=tiles_key
            )
            step = plan[name]
            _check_key_added(sdata, key_added, step.table_key, where)
            if step.features:
                _check_embeddable(sdata, step, model, enc, features_key, where)
            if step.tile:  # checks the image (channels, pixel size) and that it has tissue
                _make_tiles(sdata, step, dict(tile_kwargs or {}), tiles_key)
            elif step.features and not _has_base_features(sdata, step, model, features_key):
                spots = Spots(sdata, step.table_key, step.tiles_key)  # patches will be cut: check the image
                check_patch_source(spots, name, image_key=step.image_key)
        if dim is not None:
            dims[name] = dim
    check_same_dimension(dims, features_key)
    return plan


def _check_arguments(
    model: Any, encoder: Any, key_added: Any, tile_kwargs: Mapping[str, Any] | None, tiles_key: str | None
) -> str | None:
    """Check the arguments that do not depend on the slides; return the tiles key (``tile_kwargs["key_added"]``)."""
    _check_model(model)
    if model is not None and encoder is not None:
        msg = (
            "Pass either model= (SPADE embeddings, or the model's own base features) or encoder= (base-encoder "
            "features), not both."
        )
        raise ValueError(msg)
    if model is not None and not getattr(model, "is_trained_", False):
        msg = (
            f"model is untrained ({model!r}): its tile embeddings would come from random weights. Train it with "
            "spade_sc.tl.fit, or load a trained model folder with SpadeModel.load."
        )
        raise ValueError(msg)
    if not isinstance(key_added, str) or not key_added:
        msg = f"key_added must be a non-empty string, got {key_added!r}."
        raise ValueError(msg)
    tile_kwargs = tile_kwargs or {}
    if "image_key" in tile_kwargs:
        msg = "tile_kwargs must not hold 'image_key': pass image_key= to slide_embeddings."
        raise ValueError(msg)
    if "key_added" in tile_kwargs:
        if tiles_key is not None and tiles_key != tile_kwargs["key_added"]:
            msg = f"tiles_key={tiles_key!r} differs from tile_kwargs['key_added']={tile_kwargs['key_added']!r}."
            raise ValueError(msg)
        tiles_key = tile_kwargs["key_added"]
    return tiles_key


def _plan_slide(
    sdata: SpatialData,
    where: str,
    model: Any,
    enc: Any,
    features_key: str,
    *,
    tiles: bool,
    image_key: str | None,
    tiles_key: str | None,
) -> tuple[_Step, int | None]:
    """What to do to one slide and the width of its existing tile features (None when missing)."""
    found = find_tiles(sdata, image_key=image_key, tiles_key=tiles_key, where=where)
    dim = None
    if found is None:
        image = resolve_key(sdata, "images", image_key, what="image_key")
        shapes_name, table_name = tiles_keys(image, tiles_key)
        if not tiles:
            msg = (
                f"{where} has no tiles (shapes {shapes_name!r}) and tiles=False: tile it with "
                "spade_sc.pp.tile_tissue or pass tiles=True."
            )
            raise KeyError(msg)
        step = _Step(image, shapes_name, table_name, tile=True, features=True)
    else:
        table = sdata.tables[found[1]]
        image = image_key if image_key is not None else table.uns.get(Keys.TILING, {}).get("image_key")
        step = _Step(image, found[0], found[1], tile=False, features=features_key not in table.obsm)
        if not step.features:
            dim = tile_features(table, features_key, where=where).shape[1]
    return step, dim


def _check_embeddable(sdata: SpatialData, step: _Step, model: Any, enc: Any, features_key: str, where: str) -> None:
    """The missing tile features of a slide can be computed (with the model or the encoder)."""
    if model is None and enc is None:
        what = "has no tiles yet" if step.tile else f"has tiles without obsm[{features_key!r}]"
        msg = (
            f"{where} {what}, and there is nothing to embed them with: pass model= (a trained "
            f"spade_sc.tl.SpadeModel, for {Keys.SPADE!r}) or encoder= (e.g. 'efficientnet_lite0', for base "
            "features 'X_<encoder>'), or compute the tile features first."
        )
        raise ValueError(msg)
    has_base = not step.tile and model is not None and model.features_key in sdata.tables[step.table_key].obsm
    if model is not None and model.encoder_spec is None and not has_base:
        msg = (
            f"{where}: obsm[{features_key!r}] is missing and the model records no encoder to compute the "
            f"{model.features_key!r} features it takes; compute them on the tiles first "
            "(spade_sc.pp.image_features)."
        )
        raise ValueError(msg)


def _has_base_features(sdata: SpatialData, step: _Step, model: Any, features_key: str) -> bool:
    """Whether the SPADE embedding of existing tiles comes from base features they hold (no image is read)."""
    if model is None or features_key == model.features_key or step.tile:
        return False
    return model.features_key in sdata.tables[step.table_key].obsm


def _check_key_added(sdata: SpatialData, key_added: str, tiles_table: str, where: str) -> None:
    """``key_added`` names no element but a (replaceable) non-annotating table."""
    for kind in _KINDS:
        if kind != "tables" and key_added in getattr(sdata, kind):
            msg = f"{where}: key_added={key_added!r} already names an element of sdata.{kind}; choose another."
            raise ValueError(msg)
    if key_added == tiles_table or (key_added in sdata.tables and "spatialdata_attrs" in sdata.tables[key_added].uns):
        msg = f"{where}: key_added={key_added!r} names a table that annotates elements (tiles or spots)."
        raise ValueError(msg)


def _tiles_encoder(enc: Any, model: Any, features_key: str, plan: Mapping[str, _Step]) -> Any:
    """The encoder of missing base features: ``enc``, or the model's own when its base features are pooled."""
    if model is None or features_key != model.features_key or not any(s.features for s in plan.values()):
        return enc
    from ..encoders import encoder_from_spec

    return encoder_from_spec(model.encoder_spec)


def _make_tiles(sdata: SpatialData, step: _Step, tile_kwargs: dict[str, Any], tiles_key: str | None) -> None:
    """Make (not write) the tiles of a slide with :func:`spade_sc.pp.tile_tissue`'s core; record them in ``step``."""
    if tiles_key is not None:
        tile_kwargs["key_added"] = tiles_key
    step.made = tile_elements(sdata, image_key=step.image_key, **tile_kwargs)
    step.image_key, step.tiles_key, step.table_key = step.made.image_key, step.made.shapes_key, step.made.table_key


def _workspace(sdata: SpatialData, step: _Step) -> Spots:
    """A working copy of a slide's tiles to compute into: the tiles made, or a staged copy of the existing ones."""
    if step.made is None:
        return staged(Spots(sdata, step.table_key, step.tiles_key))
    from spatialdata import SpatialData

    work = SpatialData(
        images=dict(sdata.images),
        shapes={step.tiles_key: step.made.shapes},
        tables={step.table_key: step.made.table},
    )
    work.attrs.update(copy.deepcopy(dict(sdata.attrs)))
    return Spots(work, step.table_key, step.tiles_key)


def _commit_slide(sdata: SpatialData, step: _Step, work: Spots) -> None:
    """Write what was computed for a slide: its new tiles (with their features), or the features of its tiles."""
    if step.made is not None:
        write_tiles(sdata, replace(step.made, shapes=work.shapes, table=work.table))
    elif step.features:
        commit(work, Spots(sdata, step.table_key, step.tiles_key))


def _embed_tiles(
    sdata: SpatialData,
    step: _Step,
    model: Any,
    encoder: Any,
    features_key: str,
    routing: str | None,
    feature_kwargs: dict[str, Any],
    progress: bool,
) -> None:
    """Compute the missing tile features of one slide: SPADE embedding (``embed``) or base features.

    Patches are cut at the tiling's ``mpp`` and ``tile_size`` (each patch is its tile) unless ``feature_kwargs``
    says otherwise.
    """
    params = sdata.tables[step.table_key].uns.get(Keys.TILING, {})
    kwargs: dict[str, Any] = {"views": 1}  # thousands of tiles: one view (tl.embed would compute 8)
    if "mpp" in params and "tile_size" in params:
        kwargs.update(mpp=float(params["mpp"]), patch_size=int(params["tile_size"]))
    if step.image_key is not None:
        kwargs["image_key"] = step.image_key
    kwargs.update(feature_kwargs)
    where = {"table_key": step.table_key, "shapes_key": step.tiles_key}
    if model is not None and features_key != model.features_key:
        embed(sdata, model, routing=routing, key_added=features_key, progress=progress, feature_kwargs=kwargs, **where)
    else:
        image_features(sdata, encoder=encoder, key_added=features_key, progress=progress, **kwargs, **where)


def _params(features_key: str, model: Any, enc: Any, routing: str | None) -> dict[str, Any]:
    """``uns[key_added]["params"]``: features key, pooling, version, and the model fingerprint or encoder spec."""
    params: dict[str, Any] = {"features_key": features_key, "pooling": "mean", "spade_sc_version": __version__}
    if model is not None:
        params["model_fingerprint"] = model.fingerprint()
        params["routing"] = routing or model.init_params_["routing"]
    if enc is not None:
        params["encoder"] = uns_safe(json.loads(json.dumps(enc.spec, default=str)))
    return params


def _cohort_table(
    names: list[str],
    rows: list[dict[str, Any]],
    emb: np.ndarray,
    label_frame: pd.DataFrame | None,
    features_key: str,
) -> AnnData:
    """The cohort-level AnnData: one row per slide, ``obs`` from ``rows`` and the labels, ``obsm[features_key]``."""
    from anndata import AnnData

    obs = pd.DataFrame(rows, index=pd.Index(names, name="slide"))
    if label_frame is not None:
        obs = obs.drop(columns=[c for c in label_frame.columns if c in obs.columns])
        obs = obs.join(label_frame, how="left")
    obs.index = obs.index.astype(str)
    obs.index.name = None
    for col in obs.columns:
        if obs[col].dtype == object and obs[col].map(lambda v: isinstance(v, str) or v is None).all():
            obs[col] = pd.Categorical(obs[col])
    adata = AnnData(X=np.zeros((len(names), 0), dtype=np.float32), obs=obs)
    adata.obsm[features_key] = emb
    return adata


def _write_slide_tables(slides: Mapping[str, SpatialData], adata: AnnData, key_added: str) -> None:
    """Write each slide's own row of ``adata`` as the non-annotating table ``tables[key_added]``."""
    from spatialdata.models import TableModel

    for i, (name, sdata) in enumerate(slides.items()):
        row = adata[i : i + 1].copy()
        if key_added in sdata.tables:
            logger.info("slide_embeddings: replacing tables[%r] of slide %r", key_added, name)
            del sdata.tables[key_added]
        sdata.tables[key_added] = TableModel.parse(row)

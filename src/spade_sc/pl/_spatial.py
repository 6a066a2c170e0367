"""Spatial plots over the H&E: experts, routing entropy, and the training curves of a model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._constants import WRITERS, Keys
from .._sdata import microns_per_unit, resolve_key, shared_coordinate_system, table_region

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from spatialdata import SpatialData


def finish(ax: Axes | Sequence[Axes], show: bool | None, save: str | Path | None) -> Any:
    """Save and/or show the figure of ``ax``; return ``ax`` unless shown."""
    import matplotlib.pyplot as plt

    first = ax if not isinstance(ax, Sequence) else ax[0]
    fig = first.figure
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show is None:
        show = save is None and plt.isinteractive()
    if show:
        plt.show()
        return None
    return ax


def shapes_with_column(
    sdata: SpatialData, key: str, *, shapes_key: str | None = None, table_key: str | None = None
) -> tuple[str, str]:
    """(table key, shapes key) of the table holding ``obs[key]``; a clear error names the call that writes it."""
    candidates = []
    for tname, table in sdata.tables.items():
        if "spatialdata_attrs" not in table.uns or key not in table.obs:
            continue
        regions, _, _ = table_region(table)
        for r in regions:
            if (shapes_key is None or r == shapes_key) and (table_key is None or tname == table_key):
                candidates.append((tname, r))
    if not candidates:
        writer = WRITERS.get(key, "a spade_sc.tl function")
        msg = f"No table of this SpatialData has obs[{key!r}]; it is written by {writer}."
        raise KeyError(msg)
    if len(candidates) > 1:
        msg = f"Several (table, shapes) pairs hold obs[{key!r}]: {candidates}; pass shapes_key= or table_key=."
        raise ValueError(msg)
    return candidates[0]


def spatial_column(
    sdata: SpatialData,
    key: str,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    cmap: str | None = None,
    fill_alpha: float = 0.8,
    spot_scale: float = 1.0,
    title: str | None = None,
    legend_title: str | None = None,
    scalebar: bool = True,
    crop: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes | None:
    """Shapes coloured by ``obs[key]`` of their table, over the H&E, through spatialdata-plot.

    With ``scalebar`` (and a recorded pixel size) the axes carry a scale bar in micrometres instead of pixel ticks;
    with ``crop`` the view is the extent of the shapes plus a margin, so that the tissue fills the figure.
    """
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401

    tkey, skey = shapes_with_column(sdata, key, shapes_key=shapes_key, table_key=table_key)
    image_key = resolve_key(sdata, "images", image_key)
    cs = shared_coordinate_system(sdata, image_key, skey)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 6))
    kwargs: dict[str, Any] = {"color": key, "fill_alpha": fill_alpha, "table_name": tkey, "scale": spot_scale}
    kwargs["colorbar_params"] = {"label": legend_title or key}  # continuous values: the colour bar's title
    if cmap is not None:
        kwargs["cmap"] = cmap
    show_kwargs: dict[str, Any] = {"title": title or key, "legend_title": legend_title or key}
    um = microns_per_unit(sdata, cs) if scalebar else None
    if um is not None:
        show_kwargs |= {"scalebar_dx": um, "scalebar_units": "um", "scalebar_params": {"location": "lower right"}}
    sdata.pl.render_images(image_key).pl.render_shapes(skey, **kwargs).pl.show(
        coordinate_systems=cs, ax=ax, **show_kwargs
    )
    if crop:
        _crop_to(ax, sdata, skey, cs)
    if um is not None:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("")
        ax.set_ylabel("")
    return finish(ax, show, save)


def _crop_to(ax: Axes, sdata: SpatialData, shapes_key: str, coordinate_system: str, margin: float = 0.04) -> None:
    """Limit the view to the extent of ``shapes_key`` plus ``margin`` of its size (y axis pointing down)."""
    from spatialdata import get_extent

    extent = get_extent(sdata, elements=[shapes_key], coordinate_system=coordinate_system)
    (x0, x1), (y0, y1) = extent["x"], extent["y"]
    pad = margin * max(x1 - x0, y1 - y0)
    ax.set_xlim(x0 - pad, x1 + pad)
    ax.set_ylim(y1 + pad, y0 - pad)


def experts(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    fill_alpha: float = 0.8,
    spot_scale: float = 1.0,
    title: str | None = None,
    scalebar: bool = True,
    crop: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes | None:
    """Spots or tiles coloured by their data expert, over the H&E.

    Parameters
    ----------
    sdata
        A slide whose spot or tile table holds ``obs["spade_expert"]`` (written by :func:`spade_sc.tl.fit`,
        :func:`spade_sc.tl.embed` or :func:`spade_sc.tl.build_experts`).
    image_key, shapes_key, table_key
        Which image / shapes / table, when several.
    fill_alpha
        Opacity of the shapes.
    spot_scale
        Drawn size of the spots relative to their true size (below 1 shows more of the tissue).
    title
        Title of the axes; default ``"SPADE data experts"``.
    scalebar
        A scale bar in micrometres instead of pixel ticks (when the pixel size is recorded).
    crop
        Show the extent of the spots or tiles only, not the whole image.
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
    return spatial_column(
        sdata,
        Keys.EXPERT,
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
        fill_alpha=fill_alpha,
        spot_scale=spot_scale,
        title=title or "SPADE data experts",
        legend_title="expert",
        scalebar=scalebar,
        crop=crop,
        ax=ax,
        show=show,
        save=save,
    )


def routing(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    cmap: str = "viridis",
    fill_alpha: float = 0.8,
    spot_scale: float = 1.0,
    title: str | None = None,
    scalebar: bool = True,
    crop: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes | None:
    """Routing entropy of every spot or tile over the H&E (0: one expert; log K: all experts equally).

    Parameters
    ----------
    sdata
        A slide whose table holds ``obs["spade_routing_entropy"]`` (written by :func:`spade_sc.tl.fit` and
        :func:`spade_sc.tl.embed`).
    image_key, shapes_key, table_key
        Which image / shapes / table, when several.
    cmap
        Colormap.
    fill_alpha
        Opacity of the shapes.
    spot_scale
        Drawn size of the spots relative to their true size (below 1 shows more of the tissue).
    title
        Title of the axes; default ``"SPADE routing entropy"``.
    scalebar
        A scale bar in micrometres instead of pixel ticks (when the pixel size is recorded).
    crop
        Show the extent of the spots or tiles only, not the whole image.
    ax
        Axes to draw into.
    show
        Show the figure.
    save
        File to save the figure to.

    Returns
    -------
    The Axes when not shown.
    """
    return spatial_column(
        sdata,
        Keys.ROUTING_ENTROPY,
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
        cmap=cmap,
        fill_alpha=fill_alpha,
        spot_scale=spot_scale,
        title=title or "SPADE routing entropy",
        legend_title="entropy (nats)",
        scalebar=scalebar,
        crop=crop,
        ax=ax,
        show=show,
        save=save,
    )


def training_curves(
    model: Any, *, ax: Axes | None = None, show: bool | None = None, save: str | Path | None = None
) -> Axes | None:
    """Training and validation loss per epoch of a trained :class:`spade_sc.tl.SpadeModel`.

    Parameters
    ----------
    model
        The model (its ``history_``, filled by training).
    ax
        Axes to draw into.
    show
        Show the figure.
    save
        File to save the figure to.

    Returns
    -------
    The Axes when not shown.
    """
    import matplotlib.pyplot as plt

    history = getattr(model, "history_", None)
    if not history:
        msg = "The model has no training history; train it with spade_sc.tl.fit first."
        raise ValueError(msg)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    epochs = [h["epoch"] for h in history]
    for key, label in (("train_loss", "training"), ("val_loss", "validation")):
        pts = [(e, h[key]) for e, h in zip(epochs, history, strict=True) if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label)
    best = getattr(model, "train_params_", {}).get("best_epoch")
    if best is not None:
        ax.axvline(best, color="grey", ls="--", lw=1, label=f"best epoch ({best})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("contrastive loss")
    ax.legend(frameon=False)
    return finish(ax, show, save)

"""Diagnostics of the data experts of a fitted model: load balance, routing entropy per slide, per-expert losses.

Everything here reads what :func:`spade_sc.tl.fit` recorded (``model.train_params_``, ``model.history_``) or wrote
into the tables (``obs["spade_expert"]``, ``obs["spade_routing_entropy"]``); nothing is computed but counts. The map
of the experts over the H&E is :func:`spade_sc.pl.experts`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import Keys
from .._sdata import as_cohort
from .._validation import MIN_PAIRS, check_choice
from ._spatial import finish, shapes_with_column

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from spatialdata import SpatialData

#: Who records the per-expert entries of a model (named in the errors of the functions reading them).
_MODEL_WRITER = "spade_sc.tl.fit (through SpadeModel.train)"
_TRAIN_PAIRS = "n_train_pairs_per_expert"
_VAL_PAIRS = "n_validation_pairs_per_expert"
STAGES = ("train", "val")


def expert_colors(n: int) -> list[Any]:
    """The colours spatialdata-plot gives ``n`` categories by default, as in :func:`spade_sc.pl.experts`.

    Matplotlib's colour cycle when it is long enough, else scanpy's palettes of 20, 28 and 102 colours.
    """
    import matplotlib as mpl

    cycle = mpl.rcParams["axes.prop_cycle"].by_key().get("color", [])
    if len(cycle) >= n:
        return list(cycle[:n])
    from scanpy.plotting.palettes import default_20, default_28, default_102

    for palette in (default_20, default_28, default_102):
        if n <= len(palette):
            return list(palette[:n])
    return ["grey"] * n


def _is_model(obj: Any) -> bool:
    return hasattr(obj, "train_params_") and hasattr(obj, "history_") and hasattr(obj, "n_experts")


def _trained(model: Any, what: str) -> None:
    if not getattr(model, "is_trained_", False):
        msg = f"{what}: the model is not trained; its per-expert record is written by {_MODEL_WRITER}."
        raise ValueError(msg)


def _model_pairs(model: Any) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """(training pairs, validation pairs or None, batch size) per expert, from the model's training record."""
    _trained(model, "expert_pairs")
    tp = model.train_params_
    if tp.get(_TRAIN_PAIRS) is None:
        msg = (
            f"expert_pairs: model.train_params_ has no {_TRAIN_PAIRS!r}; it is recorded by {_MODEL_WRITER}, and this "
            "model was trained by an earlier spade_sc that did not record it. Retrain it, or pass the cohort to count "
            f"obs[{Keys.EXPERT!r}]."
        )
        raise KeyError(msg)
    val = tp.get(_VAL_PAIRS)
    return np.asarray(tp[_TRAIN_PAIRS]), None if val is None else np.asarray(val), tp.get("batch_size")


def _cohort_column(
    cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData],
    key: str,
    table_key: str | None,
    shapes_key: str | None,
) -> dict[str, Any]:
    """``{slide id: table}`` of the tables holding ``obs[key]``; the error names the slide and the writer."""
    tables = {}
    for sid, sdata in as_cohort(cohort).items():
        try:
            tkey, _ = shapes_with_column(sdata, key, shapes_key=shapes_key, table_key=table_key)
        except (KeyError, ValueError) as err:
            msg = f"Slide {sid!r}: {err.args[0]}"
            raise type(err)(msg) from err
        tables[sid] = sdata.tables[tkey]
    return tables


def _cohort_pairs(
    cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData],
    table_key: str | None,
    shapes_key: str | None,
) -> tuple[dict[str, np.ndarray], Any]:
    """Spots per expert of every slide (from ``obs["spade_expert"]``) and the training batch size when recorded."""
    tables = _cohort_column(cohort, Keys.EXPERT, table_key, shapes_key)
    experts = {}
    for sid, t in tables.items():
        col = t.obs[Keys.EXPERT].astype("category")
        codes = np.asarray(col.cat.codes)
        experts[sid] = np.asarray(col.cat.categories.astype(int))[codes[codes >= 0]]  # "0".."K-1" -> 0..K-1
    n = max(int(e.max()) + 1 if e.size else 0 for e in experts.values())
    counts = {sid: np.bincount(e, minlength=n) for sid, e in experts.items()}
    sizes = {t.uns.get(Keys.PROVENANCE, {}).get("train_params", {}).get("batch_size") for t in tables.values()}
    return counts, sizes.pop() if len(sizes) == 1 else None


def expert_pairs(
    model_or_cohort: Any,
    *,
    by_slide: bool = False,
    table_key: str | None = None,
    shapes_key: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes | None:
    """Pairs per data expert (load balance): one bar per expert, with the training batch size as a dashed line.

    From a trained :class:`~spade_sc.model.SpadeModel`: its training pairs per expert (solid) and validation pairs
    (hatched), as :func:`spade_sc.tl.fit` split them. From a cohort: the spots of every slide per expert, read from
    ``obs["spade_expert"]`` (all spots, training and validation slides alike, or the slides :func:`spade_sc.tl.embed`
    embedded). An expert under the batch size trains on one smaller batch per epoch; one under 2 pairs is not trained
    (named in the title; :func:`spade_sc.tl.fit` logs both). Colours follow :func:`spade_sc.pl.experts`.

    Parameters
    ----------
    model_or_cohort
        A trained model (its ``train_params_["n_train_pairs_per_expert"]``), or one SpatialData, a mapping
        ``{slide id: SpatialData}`` or a sequence of them whose spot tables hold ``obs["spade_expert"]``.
    by_slide
        From a cohort: stack the bars by slide (one colour per slide) instead of one bar per expert.
    table_key, shapes_key
        From a cohort: which table (or the table annotating which shapes) holds the experts, when several do.
    ax
        Axes to draw into.
    show
        Show the figure (default: when not saving and matplotlib is interactive).
    save
        File to save the figure to.

    Returns
    -------
    The Axes when not shown. Each series of bars is one :class:`~matplotlib.container.BarContainer` in
    ``ax.containers`` (training and validation, or one per slide).
    """
    import matplotlib.pyplot as plt

    is_model = _is_model(model_or_cohort)
    untrained = np.zeros(0, dtype=int)
    if is_model:  # read everything before drawing anything
        train, val, batch_size = _model_pairs(model_or_cohort)
        series = {"training": train} if val is None else {"training": train, "validation": val}
        untrained = np.flatnonzero(train < MIN_PAIRS)
    else:
        per_slide, batch_size = _cohort_pairs(model_or_cohort, table_key, shapes_key)
        series = per_slide if by_slide else {"all slides": np.sum(list(per_slide.values()), axis=0)}
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.5))
    _draw_pairs(ax, series, stacked=not is_model, batch_size=batch_size)
    ax.set_ylabel("pairs" if is_model else "spots")
    if untrained.size:
        lone = ", ".join(str(k) for k in untrained)
        ax.set_title(f"pairs per expert\n(under {MIN_PAIRS} training pairs, not trained: expert {lone})")
    return finish(ax, show, save)


def _draw_pairs(ax: Axes, series: Mapping[str, np.ndarray], *, stacked: bool, batch_size: int | None) -> None:
    """Bars of every expert: side by side (model: training, validation) or stacked (cohort: one segment a slide)."""
    n = max(len(v) for v in series.values())
    x = np.arange(n)
    colors = expert_colors(n)
    handles = []
    if stacked and len(series) > 1:
        bottom = np.zeros(n)
        for (name, values), color in zip(series.items(), _qualitative("tab20", len(series)), strict=True):
            ax.bar(x, values, 0.8, bottom=bottom, color=color, label=name, edgecolor="white", linewidth=0.3)
            bottom = bottom + values
    elif stacked or len(series) == 1:
        bars = ax.bar(x, next(iter(series.values())), 0.8, color=colors, label=next(iter(series)))
        ax.bar_label(bars, fontsize=7, padding=1)
    else:
        width = 0.4
        for i, (name, values) in enumerate(series.items()):
            style = {"alpha": 0.45, "hatch": "//", "edgecolor": "dimgrey"} if i else {}
            bars = ax.bar(x + (i - 0.5) * width, values, width, color=colors, label=name, **style)
            ax.bar_label(bars, fontsize=6, padding=1)
        handles = [_legend_patch("training", {}), _legend_patch("validation", {"alpha": 0.45, "hatch": "//"})]
    if batch_size is not None:
        handles.append(ax.axhline(batch_size, color="grey", ls="--", lw=1, label=f"batch size ({batch_size})"))
    if stacked and len(series) > 1:  # slides (and the batch size) by their labels, beside the axes
        ax.legend(frameon=False, fontsize=7, title="slide", loc="upper left", bbox_to_anchor=(1.01, 1))
    elif handles:
        ax.legend(handles=handles, frameon=False, fontsize=8, loc="best")
    ax.set_xticks(x, [str(k) for k in x])
    ax.set_xlabel("data expert")
    ax.set_title("pairs per expert")


def _qualitative(name: str, n: int) -> list[Any]:
    """``n`` colours of a qualitative matplotlib colormap (cycled)."""
    from matplotlib import colormaps

    cmap = colormaps[name]
    return [cmap(i % cmap.N) for i in range(n)]


def _legend_patch(label: str, style: Mapping[str, Any]) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor="lightgrey", edgecolor="dimgrey", label=label, **style)


def routing_entropy(
    cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData],
    *,
    table_key: str | None = None,
    shapes_key: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes | None:
    """Routing entropy of the spots of every slide, one box per slide (0: one expert; log K: all alike).

    The map of the same values over the H&E of one slide is :func:`spade_sc.pl.routing`. A dotted line marks
    ``log K``, the entropy of uniform routing over the ``K`` experts (read from ``obsm["spade_routing"]``). With
    hard routing every entropy is 0; soft routing at a low temperature on well-separated features is nearly hard.

    Parameters
    ----------
    cohort
        One SpatialData, a mapping ``{slide id: SpatialData}`` or a sequence of them whose tables hold
        ``obs["spade_routing_entropy"]`` (written by :func:`spade_sc.tl.fit` and :func:`spade_sc.tl.embed`).
    table_key, shapes_key
        Which table (or the table annotating which shapes) holds the entropy, when several do.
    ax
        Axes to draw into.
    show
        Show the figure.
    save
        File to save the figure to.

    Returns
    -------
    The Axes when not shown; the boxes are the :class:`~matplotlib.patches.PathPatch` es of ``ax.patches``, in
    slide order.
    """
    import matplotlib.pyplot as plt

    tables = _cohort_column(cohort, Keys.ROUTING_ENTROPY, table_key, shapes_key)
    names = list(tables)
    values = [np.asarray(t.obs[Keys.ROUTING_ENTROPY], dtype=float) for t in tables.values()]
    n_experts = {t.obsm[Keys.ROUTING].shape[1] for t in tables.values() if Keys.ROUTING in t.obsm}
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names) + 2), 3.5))
    x = np.arange(1, len(names) + 1)
    ax.boxplot(
        values,
        positions=x,
        widths=0.6,
        patch_artist=True,
        boxprops={"facecolor": "#cfe0f1", "edgecolor": "#3a6ea5"},
        medianprops={"color": "#1f3f66"},
        flierprops={"markersize": 2, "alpha": 0.5},
    )
    ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    if len(n_experts) == 1:
        k = n_experts.pop()
        ax.axhline(math.log(k), color="grey", ls=":", lw=1, label=f"uniform over {k} experts (log {k})")
        ax.legend(frameon=False, fontsize=8, loc="best")
        top = max([math.log(k), *(float(v.max()) for v in values if v.size)])
        top = 1.12 * top if top > 0 else 1.0
        ax.set_ylim(-0.02 * top, top)  # boxes of hard-routed slides (all 0) stay visible above the axis
    ax.set_ylabel("routing entropy (nats)")
    ax.set_title("routing entropy per slide")
    return finish(ax, show, save)


def _per_expert_rows(model: Any, stage: str) -> list[list[float | None] | None]:
    """The per-expert losses of every epoch of ``stage``; clear errors when the model never recorded them."""
    check_choice(stage, "stage", STAGES)
    _trained(model, "expert_losses")
    history = list(getattr(model, "history_", None) or [])
    key = f"{stage}_loss_per_expert"
    if not history:
        msg = f"expert_losses: the model has no training history; it is recorded by {_MODEL_WRITER}."
        raise ValueError(msg)
    if not any(key in h for h in history):
        msg = (
            f"expert_losses: model.history_ has no {key!r}; it is recorded by {_MODEL_WRITER}, and this model was "
            "trained by an earlier spade_sc that did not record it: retrain it (spade_sc.pl.training_curves draws "
            "the overall losses it has)."
        )
        raise KeyError(msg)
    rows = [h.get(key) for h in history]
    if all(r is None for r in rows):
        msg = (
            "expert_losses: the model was trained without validation (validation_fraction=0): there is no validation "
            "loss per expert; pass stage='train'."
            if stage == "val"
            else f"expert_losses: no epoch of the model recorded {key!r}."
        )
        raise ValueError(msg)
    return rows


def expert_losses(
    model: Any,
    *,
    stage: Literal["val", "train"] = "val",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes | None:
    """Contrastive loss of every data expert per epoch: one curve per expert, the loss of all experts dashed.

    Each expert's loss is computed within its own pairs (its in-batch negatives are its own pairs), so experts of
    few or very similar pairs have a lower loss by construction: compare an expert's curve with itself over the
    epochs (is it still learning? over-fitting?) more than with the others. The grey line marks the best epoch
    (lowest validation loss of all experts), whose weights the model keeps. Colours follow
    :func:`spade_sc.pl.experts`; an expert without pairs in ``stage`` has no curve (named in the title).

    Parameters
    ----------
    model
        A model trained by :func:`spade_sc.tl.fit` (its ``history_[epoch]["val_loss_per_expert"]`` /
        ``["train_loss_per_expert"]``).
    stage
        ``"val"``: the loss on the validation slides; ``"train"``: the mean loss of the training steps.
    ax
        Axes to draw into.
    show
        Show the figure.
    save
        File to save the figure to.

    Returns
    -------
    The Axes when not shown; the expert curves are the lines labelled ``"expert <k>"``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = _per_expert_rows(model, stage)
    epochs = [h["epoch"] for h in model.history_]
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.5))
    colors = expert_colors(model.n_experts)
    missing = []
    for k in range(model.n_experts):
        pts = [(e, r[k]) for e, r in zip(epochs, rows, strict=True) if r is not None and r[k] is not None]
        if not pts:
            missing.append(k)
            continue
        ax.plot(*zip(*pts, strict=True), color=colors[k], marker="o", ms=2.5, lw=1.2, label=f"expert {k}")
    overall = [(e, h.get(f"{stage}_loss")) for e, h in zip(epochs, model.history_, strict=True)]
    overall = [(e, v) for e, v in overall if v is not None]
    if overall:
        ax.plot(*zip(*overall, strict=True), color="black", ls="--", lw=1.5, label="all experts")
    best = model.train_params_.get("best_epoch")
    if best is not None:
        ax.axvline(best, color="grey", lw=1, alpha=0.7, label=f"best epoch ({best})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{'validation' if stage == 'val' else 'training'} loss")
    title = f"{'validation' if stage == 'val' else 'training'} loss per expert"
    if missing:
        title += f"\n(no {'validation' if stage == 'val' else 'training'} pairs: expert {', '.join(map(str, missing))})"
    ax.set_title(title)
    ax.legend(
        frameon=False, fontsize=7, ncol=1 if model.n_experts <= 10 else 2, loc="upper left", bbox_to_anchor=(1.01, 1)
    )
    return finish(ax, show, save)


def expert_diagnostics(
    model: Any,
    cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData] | None = None,
    *,
    stage: Literal["val", "train"] = "val",
    table_key: str | None = None,
    shapes_key: str | None = None,
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> list[Axes] | None:
    """The data experts of a fitted model at a glance: pairs per expert, per-expert loss, routing entropy per slide.

    One row of panels: :func:`expert_pairs` (from the model's record, or from the cohort's ``obs["spade_expert"]``
    for a model that did not record it), :func:`expert_losses`, and, with a cohort, :func:`routing_entropy`. The
    experts over the H&E of a slide are :func:`spade_sc.pl.experts`; the overall loss curves
    :func:`spade_sc.pl.training_curves`.

    Parameters
    ----------
    model
        A model trained by :func:`spade_sc.tl.fit`.
    cohort
        The slides it was fitted on (or embedded), as one SpatialData, a mapping or a sequence; adds the routing
        entropy panel.
    stage
        Loss panel: ``"val"`` (validation) or ``"train"``.
    table_key, shapes_key
        Which table of the slides holds the keys, when several do.
    ax
        Two Axes (three with a cohort) to draw into.
    show
        Show the figure.
    save
        File to save the figure to.

    Returns
    -------
    The list of Axes when not shown.
    """
    import matplotlib.pyplot as plt

    if not _is_model(model):
        msg = f"expert_diagnostics: model must be a model trained by spade_sc.tl.fit, got {type(model).__name__}."
        raise TypeError(msg)
    n_panels = 2 if cohort is None else 3
    if ax is not None and len(list(ax)) != n_panels:
        msg = f"expert_diagnostics: ax must hold {n_panels} Axes ({'with' if cohort else 'without'} a cohort)."
        raise ValueError(msg)
    source = model
    if cohort is not None and model.train_params_.get(_TRAIN_PAIRS) is None:
        source = cohort  # a model saved before per-expert pairs were recorded: count the cohort's spots instead
    # every key checked before a figure is made
    _ = _model_pairs(model) if source is model else _cohort_pairs(cohort, table_key, shapes_key)
    _per_expert_rows(model, stage)
    if cohort is not None:
        _cohort_column(cohort, Keys.ROUTING_ENTROPY, table_key, shapes_key)
    if ax is None:
        _, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels + 1.5, 3.8), layout="constrained")
        axes = list(axes)
    else:
        axes = list(ax)
    expert_pairs(source, table_key=table_key, shapes_key=shapes_key, ax=axes[0], show=False)
    expert_losses(model, stage=stage, ax=axes[1], show=False)
    if cohort is not None:
        routing_entropy(cohort, table_key=table_key, shapes_key=shapes_key, ax=axes[2], show=False)
    return finish(axes, show, save)

"""Elbow curves of the two clustering steps of the data experts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

_COLUMNS = ("step", "tissue", "k", "wcss")


def elbow(
    df: pd.DataFrame,
    *,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | list[Axes] | None:
    """Plot the within-cluster sum of squares of both expert clustering steps against the number of clusters.

    Reads the table of :func:`spade_sc.tl.expert_elbow`; computes nothing. The x axis is logarithmic (base 2).

    - ``ax=None``: a new figure with two panels, step 1 (one line per tissue) and step 2 (the experts).
    - ``ax`` = a sequence of two Axes: the same two panels drawn onto them.
    - ``ax`` = one Axes: every curve drawn onto it, each divided by its own maximum (WCSS / max), so that curves of
      different scales share one axis.

    Parameters
    ----------
    df
        Columns ``step`` (``"tissue"`` / ``"experts"``), ``tissue``, ``k``, ``wcss``.
    ax
        Where to draw (see above).
    show
        Whether to show the figure and return None; None means True when ``ax`` and ``save`` are None.
    save
        File to save the figure to.

    Returns
    -------
    The Axes (a list of two, or the single Axes given) when ``show`` is False, else None.
    """
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes as _Axes

    missing = [c for c in _COLUMNS if c not in df.columns]
    if missing:
        msg = f"elbow: the DataFrame lacks the columns {missing}; expected {list(_COLUMNS)} (tl.expert_elbow)."
        raise ValueError(msg)
    if len(df) == 0:
        msg = "elbow: the DataFrame is empty."
        raise ValueError(msg)
    unknown = sorted(set(df["step"].astype(str)) - {"tissue", "experts"})
    if unknown:
        msg = f"elbow: unknown step value(s) {unknown}; expected 'tissue' or 'experts'."
        raise ValueError(msg)

    normalise = False
    if ax is None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
        axes = list(axes)
    elif isinstance(ax, _Axes):
        axes = [ax, ax]
        normalise = True
        fig = ax.figure
    else:
        axes = list(ax)
        if len(axes) != 2 or not all(isinstance(a, _Axes) for a in axes):
            msg = f"elbow: ax must be one Axes or a sequence of two Axes, got {ax!r}."
            raise ValueError(msg)
        fig = axes[0].figure

    def curve(a: _Axes, sub: pd.DataFrame, label: str, **kw) -> None:
        sub = sub.sort_values("k")
        y = sub["wcss"].to_numpy(float)
        if normalise:
            top = np.nanmax(y) if len(y) else 0.0
            y = y / top if top > 0 else y
        a.plot(sub["k"].to_numpy(), y, marker="o", label=label, **kw)

    tissue = df[df["step"] == "tissue"]
    experts = df[df["step"] == "experts"]
    for t, sub in tissue.groupby("tissue", sort=True, observed=True):
        curve(axes[0], sub, f"step 1: {t}" if normalise else str(t))
    if len(experts):
        curve(axes[1], experts, "step 2: experts" if normalise else "experts", color="black" if normalise else None)
    ylabel = "WCSS / max" if normalise else "WCSS"
    titles = ("Step 1: k per tissue", "Step 2: experts K")
    for i, a in enumerate(dict.fromkeys(axes)):
        a.set_xscale("log", base=2)
        a.set_xlabel("number of clusters")
        a.set_ylabel(ylabel)
        if not normalise:
            a.set_title(titles[i])
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize="small", frameon=False)
    if normalise:
        axes[0].set_title("Elbow curves of both steps")

    if show is None:
        show = ax is None and save is None
    if save is not None:
        fig.savefig(save, bbox_inches="tight")
    if show:
        plt.show()
        return None
    return axes[0] if normalise else axes

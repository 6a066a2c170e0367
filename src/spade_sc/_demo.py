"""``spade-sc demo``: SPADE end to end on her2st (when the shared data is there) or on the synthetic cohort.

It trains on all sections but one, embeds the held-out section, and compares SPADE with the frozen encoder it is
built on, on that section: the readouts are trained on the training sections only (:func:`spade_sc.tl.evaluate`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import datasets, pl, pp, tl
from ._cohort import out_problem
from ._constants import Keys

TUTORIALS = (
    "tutorials/quickstart.ipynb (these steps on her2st, one by one), own_data.ipynb (Visium, HEST-1k, whole-slide "
    "files, the CLI), compare.ipynb (SPADE vs your encoder, every fold), whole_slides.ipynb (MIL, heatmaps), "
    "scaling.ipynb (GPUs, pathology encoders, Dask)"
)
HER2ST = "5 HER2-positive breast cancer sections, legacy ST, Andersson et al. 2021"


class DemoError(Exception):
    """A problem with the demo's input, reported in one line with exit code 2."""


def choose_data(requested: str) -> tuple[str, Path | None, str]:
    """(``"her2st"`` or ``"synthetic"``, her2st folder or None, why) from ``--data`` and ``$SPADE_SC_DATA``.

    A ``SPADE_SC_DATA`` that is set but holds no ``her2st/`` is an error, never a silent fallback.
    """
    env = os.environ.get("SPADE_SC_DATA")
    if requested == "synthetic":
        return "synthetic", None, "asked for with --data synthetic"
    if env:
        root = Path(env).expanduser()
        if (root / "her2st").is_dir():
            return "her2st", root / "her2st", f"SPADE_SC_DATA={env} holds her2st/ ({HER2ST})"
        msg = (
            f"SPADE_SC_DATA={env} has no her2st/ folder: set it to the folder that holds her2st/ "
            "(e.g. ../shared/data, or a clone of github.com/almaan/her2st's parent folder), or run on the "
            "synthetic cohort with --data synthetic (or with SPADE_SC_DATA unset)."
        )
        raise DemoError(msg)
    if requested == "her2st":
        msg = "--data her2st needs SPADE_SC_DATA set to the folder that holds her2st/."
        raise DemoError(msg)
    why = "SPADE_SC_DATA is not set (set it to the folder that holds her2st/ to run on real data)"
    return "synthetic", None, why


@contextlib.contextmanager
def _quiet_restore_line() -> Iterator[None]:
    """Hide the "Restored the weights" log line, which prints before the progress bar ends; the demo says it after."""
    lg = logging.getLogger("spade_sc.model._lightning")
    level = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(level)


def _marker(data: str, train: dict, genes: list[str]) -> str:
    """The gene whose prediction is drawn: ERBB2 (HER2) on her2st, else the panel gene varying most in training."""
    if data == "her2st":
        return "ERBB2"
    x = np.vstack([pp.gene_matrix(s.tables["table"], genes) for s in train.values()])
    return genes[int(np.argmax(x.var(0)))]


def _compare(cohort: dict, held_out: str, model: Any, data: str) -> tuple[Any, list[tuple[str, str, str, str]]]:
    """Encoder features vs ``X_spade`` on the held-out slide, readouts trained on the training slides."""
    label_key, group_key = ("label", "patient") if data == "her2st" else ("tissue_type", None)
    label_name = "region" if data == "her2st" else "tissue type"
    res = tl.evaluate(
        cohort,
        features_key=model.features_key,
        label_key=label_key,
        label_group_key=group_key,
        representations=("base", Keys.SPADE),  # X_spade as fit / embed wrote it: no retraining
        tasks=("expression", "label"),
        folds={held_out: [held_out]},
        gene_shots=(50,),
        shots=(5,),
        n_draws=10,
        pca=(False,),
        cs=(1.0,),  # the logistic penalty fixed (choosing it by inner CV takes a minute more)
        progress=False,
    )
    rows = [
        ("expression", "pearson", "all", "gene Pearson r, readout on all training spots"),
        ("expression", "pearson", "50", "gene Pearson r, readout on 50 training spots"),
        ("label", "balanced_accuracy", "all", f"{label_name} balanced accuracy, all labels"),
        ("label", "balanced_accuracy", "5", f"{label_name} balanced accuracy, 5 labelled spots per class"),
    ]
    return res, rows


def _comparison_lines(res: Any, rows: list[tuple[str, str, str, str]]) -> tuple[list[str], list[tuple]]:
    s = res.summary()
    s = s.assign(shots=s["shots"].astype(str))
    lines, bars = [f"  {'':58s} {'encoder':>8s} {'SPADE':>8s}"], []
    for task, metric, shots, label in rows:
        part = s[(s.task == task) & (s.metric == metric) & (s.shots == shots)].set_index("representation")["mean"]
        if {"base", Keys.SPADE} <= set(part.index):
            base, spade = float(part["base"]), float(part[Keys.SPADE])
            lines.append(f"  {label:58s} {base:8.3f} {spade:8.3f}")
            bars.append((label, base, spade))
    return lines, bars


def _figures(
    out: Path,
    cohort: dict,
    held_out: str,
    model: Any,
    bars: list[tuple],
    marker: str,
    r: float,
    spot_scale: float,
) -> list[str]:
    """Expression map, comparison bars, loss curves and (with several experts) the expert map and diagnostics."""
    import matplotlib.pyplot as plt

    from .pl._spatial import spatial_column

    sdata = cohort[held_out]
    names = []
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, col, title in zip(
        axes,
        (f"{marker}_measured", f"{marker}_predicted"),
        (f"{held_out}: {marker} measured", f"{held_out}: {marker} predicted from H&E (r = {r:.2f})"),
        strict=True,
    ):
        spatial_column(
            sdata,
            col,
            cmap="magma",
            spot_scale=spot_scale,
            title=title,
            legend_title="log1p expression",
            ax=ax,
            show=False,
        )
    fig.subplots_adjust(wspace=0.3)  # room for the colour bars
    names.append(f"expression_{held_out}.png")
    fig.savefig(out / names[-1], dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(10.5, 3.8))
    y = np.arange(len(bars))
    ax.barh(y + 0.2, [b[1] for b in bars], height=0.4, color="0.6", label="encoder features")
    ax.barh(y - 0.2, [b[2] for b in bars], height=0.4, color="tab:red", label="SPADE (X_spade)")
    ax.set_yticks(y, [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("score on the held-out section (higher is better)")
    ax.set_title(f"Held-out section {held_out}: frozen encoder vs SPADE")
    ax.legend(title="representation", frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    names.append("comparison.png")
    fig.savefig(out / names[-1], dpi=120, bbox_inches="tight")

    ax = pl.training_curves(model, show=False)
    ax.set_title("SPADE training: contrastive loss per epoch")
    ax.legend(title="loss", frameon=False)
    names.append("loss.png")
    ax.figure.savefig(out / names[-1], dpi=120, bbox_inches="tight")

    if model.n_experts > 1:
        names.append(f"experts_{held_out}.png")
        title = f"{held_out}: data expert of every spot"
        pl.experts(sdata, spot_scale=spot_scale, title=title, show=False, save=out / names[-1])
        names.append("experts.png")
        pl.expert_diagnostics(model, cohort, show=False, save=out / names[-1])
    plt.close("all")
    return names


def _predict_marker(cohort: dict, held_out: str, train: dict, model: Any, marker: str) -> float:
    """SPADE's retrieval prediction of ``marker`` on the held-out slide, written beside the measured one; its r."""
    sdata = cohort[held_out]
    pred = tl.predict_expression(sdata, model, reference=train, genes=[marker], inplace=False)[:, 0]
    table = sdata.tables["table"]
    measured = pp.gene_matrix(table, [marker])[:, 0]
    table.obs[f"{marker}_measured"] = measured
    table.obs[f"{marker}_predicted"] = pred
    return float(np.corrcoef(measured, pred)[0, 1])


def _write(out: Path, sdata: Any, held_out: str, model: Any) -> Path:
    """The model folder and the held-out slide with everything SPADE wrote, each written atomically."""
    import spatialdata as sd

    from ._atomic import write_sdata_atomic

    model_dir = model.save(out / "model", overwrite=True)
    with warnings.catch_warnings():  # zarr announces a future default at every array written
        warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
        write_sdata_atomic(sdata, out / f"{held_out}.zarr", overwrite=True)
    back = sd.read_zarr(out / f"{held_out}.zarr")
    assert Keys.SPADE in back.tables["table"].obsm
    return model_dir


def demo(args: argparse.Namespace) -> int:
    """Data -> features -> panel -> experts -> fit -> embed a held-out slide -> compare with the encoder; write."""
    import matplotlib

    matplotlib.use("agg")

    t0 = time.time()
    try:
        data, root, why = choose_data(args.data)
    except DemoError as err:
        print(f"spade-sc demo: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    problem = None
    if out.exists() and not out.is_dir():
        problem = f"--out {out} exists and is not a folder; choose a folder for the demo's outputs."
    elif out.exists() and any(out.iterdir()) and not args.overwrite:
        problem = f"--out {out} exists and is not empty; pass --overwrite."
    else:  # a file anywhere above it, or an unwritable folder: one line, before anything is written
        problem = out_problem(out)
    if problem:
        print(f"spade-sc demo: error: {problem}", file=sys.stderr)
        return 2
    print(f"spade-sc demo on {data}: {why}", flush=True)
    out.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print(f"[{time.time() - t0:5.0f}s] {text}", flush=True)

    if data == "her2st":
        cohort = datasets.her2st(root)
    else:
        # two organs that map the same morphology to other programs: one data expert per organ pays there
        cohort = datasets.synthetic(
            n_slides=args.n_slides,
            n_spots=args.n_spots,
            image_size=args.image_size,
            seed=args.seed,
            organ_programs=True,
        )
    names = sorted(cohort)
    held_out = names[-1]
    train = {n: cohort[n] for n in names[:-1]}
    spots = ", ".join(f"{n} {cohort[n].tables['table'].n_obs}" for n in names)
    say(f"{len(cohort)} slides (spots: {spots}); training on {', '.join(train)}; {held_out} held out")

    with _quiet_restore_line():
        model = tl.fit(
            train,
            max_epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            tissue_key=None if data == "her2st" else "organ",  # synthetic: experts per organ, routed by organ
            progress=not args.quiet,
        )
    tp = model.train_params_
    say(
        f"trained {model.n_experts} data expert(s) on {sum(s.tables['table'].n_obs for s in train.values())} spots; "
        f"kept epoch {tp['best_epoch']} of {tp['epochs_run']} (lowest loss on the validation slide(s) "
        f"{', '.join(map(str, tp['validation_groups']))})"
    )
    tl.embed(cohort[held_out], model, progress=not args.quiet)
    shape = cohort[held_out].tables["table"].obsm[Keys.SPADE].shape
    say(f"embedded the held-out slide {held_out}: obsm['{Keys.SPADE}'] {shape}")

    res, rows = _compare(cohort, held_out, model, data)
    lines, bars = _comparison_lines(res, rows)
    marker = _marker(data, train, list(model.genes))
    r = _predict_marker(cohort, held_out, train, model, marker)
    say(f"held-out slide {held_out}, readouts (ridge / logistic) trained on the training slides only:")
    print("\n".join(lines))
    print(f"  {marker} predicted from the H&E by retrieval in SPADE's joint space: Pearson r = {r:.3f}")

    # her2st's spots (100 um on a 200 um grid) leave the tissue visible at their size; the synthetic grid is denser
    spot_scale = 1.0 if data == "her2st" else 0.6
    figures = _figures(out, cohort, held_out, model, bars, marker, r, spot_scale)
    res.table.to_csv(out / "comparison.csv", index=False)
    model_dir = _write(out, cohort[held_out], held_out, model)
    say(f"wrote {out}/: {model_dir.name}/, {held_out}.zarr, comparison.csv, {', '.join(figures)}")
    if model.n_experts == 1:
        print("  (one data expert: n_experts='auto' keeps about 1000 training pairs per expert; no expert map)")
        print("  (spade-sc demo --data synthetic: two organs, one data expert each, their map and routing)")
    else:
        tissues = model.experts.tissue_key or "image features"
        print(f"  ({model.n_experts} data experts, spots routed by {tissues}: experts_{held_out}.png, experts.png)")
    print(f"next: the notebooks in the repository's tutorials/ folder: {TUTORIALS}")
    print(f"done in {time.time() - t0:.0f}s")
    return 0

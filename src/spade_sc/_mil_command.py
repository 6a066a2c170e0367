"""``spade-sc mil``: gated-attention MIL over the output of ``spade-sc slides``.

Writes metrics, predictions, the model folder of every split and attention heatmaps of the top-scored slides.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import tl
from ._atomic import atomic_path, remove_stale, write_text_atomic
from ._cohort import (
    COHORT_ATTR,
    FAILURES_FILE,
    RUN_FILE,
    Slide,
    UserError,
    digest,
    load_slide,
    merge_outputs,
    prepare_out,
    start_logging,
    stop_logging,
    summary_line,
)
from ._commands import SLIDES_FILE, _finished, _run_texts
from ._constants import Keys
from ._validation import json_safe

if TYPE_CHECKING:
    import pandas as pd
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

#: Files of a finished ``spade-sc mil`` run.
MIL_FILES = ("metrics.csv", "summary.csv", "predictions.csv", "splits.json")


def _source(path: str) -> tuple[Path, Path]:
    """(slides folder, slides.h5ad) of ``spade-sc mil``'s input."""
    src = Path(path)
    h5ad = src / SLIDES_FILE if src.is_dir() else src
    if not h5ad.is_file():
        msg = f"{path} is neither a folder of `spade-sc slides` (with {SLIDES_FILE}) nor a slides .h5ad file."
        raise UserError(msg)
    return h5ad.parent, h5ad


def _bags(folder: Path, ids: list[str]) -> tuple[dict[str, SpatialData], list[dict[str, Any]], dict[str, Any]]:
    """The tiles (shapes and tables) of every slide of the table, the slides that cannot be read, their prints."""
    import spatialdata as sd

    cohort, records, prints = {}, [], {}
    for sid in ids:
        path = folder / f"{sid}.zarr"
        try:
            sdata = sd.read_zarr(path)
            cohort[sid] = sdata
            prints[sid] = sdata.attrs.get(Keys.ATTRS, {}).get(COHORT_ATTR, {}).get("fingerprint")
        except Exception as err:
            records.append(
                {"slide_id": sid, "status": "failed", "error": f"{type(err).__name__}: {err}", "seconds": 0.0}
            )
    return cohort, records, prints


def mil(args: Any) -> int:
    """``spade-sc mil``."""
    import anndata as ad

    t0 = time.perf_counter()
    folder, h5ad = _source(args.source)
    out = prepare_out(args.out)
    if args.checkpoint_dir is not None:
        prepare_out(args.checkpoint_dir, "--checkpoint-dir")
    elif args.resume:
        msg = "--resume needs --checkpoint-dir."
        raise UserError(msg)
    labels = ad.read_h5ad(h5ad).obs
    for col in [c for c in (args.label, args.time, args.event) if c is not None]:
        if col not in labels.columns:
            msg = f"{h5ad} has no column {col!r}; it has {list(labels.columns)}."
            raise UserError(msg)
    task = "classification" if args.label is not None else "survival"
    params = {
        "task": task,
        "label": args.label,
        "time": args.time,
        "event": args.event,
        "features_key": args.features_key,
        "folds": None if args.k_shot else args.folds,
        "k_shot": args.k_shot,
        "repeats": args.repeats,
        "epochs": args.epochs,
        "lr": args.lr,
        "seed": args.seed,
        "heatmaps": args.heatmaps,
    }
    handler = start_logging(out, args.quiet)
    try:
        remove_stale(out)
        cohort, records, prints = _bags(folder, list(labels.index))
        fingerprint = digest({"command": "mil", "params": params, "slides": prints, "labels": labels.to_csv()})
        if not args.overwrite and _finished(out, fingerprint, MIL_FILES):
            print(f"spade-sc mil: {out} is complete with the same parameters and inputs; skipped.")
            return 0
        try:
            result = tl.train_mil(
                cohort,
                label_key=args.label,
                task=task,
                time_key=args.time,
                event_key=args.event,
                features_key=args.features_key,
                labels=labels,
                max_epochs=args.epochs,
                lr=args.lr,
                folds=params["folds"],
                k_shot=args.k_shot,
                n_repeats=args.repeats,
                seed=args.seed,
                checkpoint_dir=args.checkpoint_dir,
                resume=bool(args.resume),
            )
        except (ValueError, FileExistsError) as err:
            raise UserError(str(err).splitlines()[0]) from None
        _write_results(out, result)
        _heatmaps(out, result, folder, cohort, args.heatmaps)
        records += [{"slide_id": s, "status": "done", "error": "", "seconds": 0.0} for s in cohort]
        run_text, failures_text, counts = _run_texts("mil", args, params, records, t0, fingerprint=fingerprint)
        write_text_atomic(out / FAILURES_FILE, failures_text)
        write_text_atomic(out / RUN_FILE, run_text)
        print(summary_line("mil", counts, time.perf_counter() - t0, out))
        return 1 if counts["failed"] else 0
    finally:
        stop_logging(handler)


def _write_results(out: Path, result: Any) -> None:
    """Metrics, their summary, the (out-of-fold) predictions, the splits and every split's model folder."""
    write_text_atomic(out / "metrics.csv", result.metrics.to_csv(index=False))
    write_text_atomic(out / "summary.csv", result.summary().to_csv())
    write_text_atomic(out / "predictions.csv", result.predictions.to_csv(index=False))
    write_text_atomic(out / "splits.json", json.dumps(json_safe(result.splits), indent=1, default=str))
    with atomic_path(out / "models", overwrite=True) as tmp:
        tmp.mkdir()
        for split, model in zip(result.splits, result.models, strict=True):
            model.save(tmp / f"{split['split']}_{split['fold']}")


def _top_slides(predictions: pd.DataFrame, n: int) -> list[str]:
    """The ``n`` slides of highest predicted score: last class probability, or risk."""
    if n <= 0 or predictions.empty:
        return []
    score = "risk" if "risk" in predictions else [c for c in predictions.columns if c.startswith("prob_")][-1]
    best = predictions.groupby("slide")[score].mean().sort_values(ascending=False)
    return [str(s) for s in best.index[:n]]


def _heatmaps(out: Path, result: Any, slides_dir: Path, cohort: dict[str, SpatialData], n: int) -> None:
    """Attention heatmaps (PNG) of the top-scored slides over their H&E, re-read from the slides' inputs."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    from . import pl

    folder = out / "attention"
    folder.mkdir(exist_ok=True)
    for sid in _top_slides(result.predictions, n):
        record = cohort[sid].attrs.get(Keys.ATTRS, {}).get(COHORT_ATTR, {})
        try:
            source = Slide(**record["source"])
            sdata = merge_outputs(load_slide(source, record.get("hest_root")), slides_dir / f"{sid}.zarr")
        except Exception:
            sdata = None
        if sdata is None:
            logger.warning("attention heatmap of %s skipped: its input image cannot be read", sid)
            continue
        tl.attention(sdata, result.model_for(sid))
        with atomic_path(folder / f"{sid}.png", overwrite=True) as tmp:
            pl.attention(sdata, show=False, save=str(tmp) + ".png", title=f"{sid}")
            Path(str(tmp) + ".png").rename(tmp)
        plt.close("all")

"""``spade-sc demo``: SPADE end to end on her2st (when the shared data is there) or on the synthetic cohort."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from . import datasets, pl, tl
from ._constants import Keys


def _cohort(data: str, n_slides: int, n_spots: int, image_size: int, seed: int):
    if data == "her2st":
        root = os.environ.get("SPADE_SC_DATA")
        if not root or not (Path(root) / "her2st").is_dir():
            msg = "--data her2st needs SPADE_SC_DATA set to the folder that holds her2st/."
            raise SystemExit(msg)
        return datasets.her2st(Path(root) / "her2st")
    return datasets.synthetic(n_slides=n_slides, n_spots=n_spots, image_size=image_size, seed=seed)


def demo(args: argparse.Namespace) -> int:
    """Features -> panel -> experts -> fit -> embed a held-out slide; write zarr, model and figures."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    import spatialdata as sd

    t0 = time.time()
    out = Path(args.out)
    problem = None
    if out.exists() and not out.is_dir():
        problem = f"--out {out} exists and is not a folder; choose a folder for the demo's outputs."
    elif out.exists() and any(out.iterdir()) and not args.overwrite:
        problem = f"--out {out} exists and is not empty; pass --overwrite."
    if problem:
        print(f"spade-sc demo: error: {problem}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data == "auto":
        root = os.environ.get("SPADE_SC_DATA")
        data = "her2st" if root and (Path(root) / "her2st").is_dir() else "synthetic"
    cohort = _cohort(data, args.n_slides, args.n_spots, args.image_size, args.seed)
    names = sorted(cohort)
    held_out = names[-1]
    train = {n: cohort[n] for n in names[:-1]}
    print(f"[{time.time() - t0:5.0f}s] {data}: {len(train)} training slides {list(train)}, held out {held_out}")

    model = tl.fit(
        train,
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(f"[{time.time() - t0:5.0f}s] trained {model}")
    print(
        f"          best epoch {model.train_params_['best_epoch']} of {model.train_params_['epochs_run']}, "
        f"validation slides {model.train_params_['validation_groups']}"
    )
    tl.embed(cohort[held_out], model, progress=not args.quiet)
    print(f"[{time.time() - t0:5.0f}s] embedded held-out slide {held_out}")

    model_dir = model.save(out / "model", overwrite=True)
    for name, sdata in cohort.items():
        path = out / f"{name}.zarr"
        if path.exists():
            import shutil

            shutil.rmtree(path)
        with warnings.catch_warnings():  # zarr announces a future default at every array written
            warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
            sdata.write(path)
    back = sd.read_zarr(out / f"{held_out}.zarr")
    assert Keys.SPADE in back.tables["table"].obsm
    pl.experts(cohort[held_out], show=False, save=out / f"experts_{held_out}.png")
    pl.training_curves(model, show=False, save=out / "loss.png")
    plt.close("all")
    table = cohort[held_out].tables["table"]
    print(f"[{time.time() - t0:5.0f}s] wrote {model_dir}, {len(cohort)} .zarr, experts_{held_out}.png, loss.png")
    used = table.obs[Keys.EXPERT].nunique()
    print(f"held-out {held_out}: {Keys.SPADE} {table.obsm[Keys.SPADE].shape}; experts used {used}")
    print(f"done in {time.time() - t0:.0f}s -> {out}")
    return 0

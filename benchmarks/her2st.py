"""Is SPADE better than the encoder it is built on? :func:`spade_sc.tl.evaluate` on her2st, tables printed.

Leave-one-section-out over the five her2st sections with an image (B4, C2-C5): gene-expression prediction (ridge,
with and without PCA, all training spots and 25 / 50 / 100 labelled spots) and retrieval on every fold, the region
label probe on patient C's sections (C2-C5; labels are per patient) with all labels and k = 1 / 5 / 10 per class.
SPADE is trained inside each fold on the training sections only. Features: EfficientNet-Lite0 (the package's offline
default encoder), 224 px patches at ``--mpp`` um/px, computed here (about 1-2 min on 2 CPU cores) unless
``--features`` names a cache written by ``--save-features``. SPADE settings (passed explicitly, so the table does not
move with tl.fit's defaults): one expert, soft-CLIP, log1p gene input, AdamW lr 1e-3, batch 128, up to 100 epochs,
best epoch by the loss on one held-out training section, each spot alone (``spatial_context=None``, one view: the
settings before ``benchmarks/fewshot.py`` measured what ``tl.fit`` now defaults to). Every number printed is
measured in this run.

    python benchmarks/her2st.py                                   # the settings of benchmarks/README.md
    python benchmarks/her2st.py --save-features /tmp/her2st_feats.npz
    python benchmarks/her2st.py --features /tmp/her2st_feats.npz --n-experts 3    # a mixture: routings differ
    python benchmarks/her2st.py --features /tmp/her2st_feats.npz --gene-input counts --lr 1e-4 --batch-size 512
    python benchmarks/her2st.py --features /tmp/her2st_feats.npz --defaults        # whatever tl.fit defaults to
    python benchmarks/her2st.py --features /tmp/her2st_feats.npz --quick   # 5 draws, base + soft SPADE only
"""

from __future__ import annotations

import argparse
import os
import sys
import time

#: What is compared by default: tl.evaluate's six default representations and the untrained-heads control, listed
#: here so that the table does not move with tl.evaluate's defaults.
REPRESENTATIONS = (
    "base",
    "spade_soft",
    "spade_hard",
    "spade_uniform",
    "single_expert",
    "random_projection",
    "untrained_heads",
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="her2st folder (default $SPADE_SC_DATA/her2st)")
    p.add_argument("--features", default=None, help="npz of features per section (written by --save-features)")
    p.add_argument("--save-features", default=None, help="write the computed features to this npz")
    p.add_argument("--mpp", type=float, default=0.5, help="um/px of the 224 px patches (0.5: 112 um, 1.0: 224 um)")
    g = p.add_argument_group("SPADE (passed to tl.fit inside every fold)")
    g.add_argument("--n-experts", default="1", help='an integer or "auto" (tl.fit\'s rule of the day)')
    g.add_argument("--clusters", default="auto", help='step-1 clusters per tissue: "auto" or an integer')
    g.add_argument("--gene-input", default="log1p", choices=["log1p", "counts"])
    g.add_argument("--loss", default="soft_clip", choices=["soft_clip", "infonce"])
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--routing-tau", type=float, default=0.1)
    g.add_argument(
        "--spatial-context", type=float, default=0.0, help="tl.fit(spatial_context=...) radius; 0: each spot alone"
    )
    g.add_argument("--validation-fraction", type=float, default=0.2, help="0: no validation, keep the last epoch")
    g.add_argument("--defaults", action="store_true", help="pass nothing to tl.fit: measure its current defaults")
    e = p.add_argument_group("evaluation")
    e.add_argument("--draws", type=int, default=20)
    e.add_argument("--retrieval-k", type=int, default=50)
    e.add_argument("--representations", default=None, help="comma-separated (default: all six + untrained_heads)")
    e.add_argument("--quick", action="store_true", help="5 draws, base and spade_soft only")
    e.add_argument("--threads", type=int, default=1, help="BLAS / torch threads (1 avoids oversubscription)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--per-fold", action="store_true", help="also print every fold's score")
    return p.parse_args(argv)


def load(args: argparse.Namespace):
    import numpy as np

    import spade_sc as sp

    cohort = sp.datasets.her2st(args.root)
    key = "X_efficientnet_lite0" if args.mpp == 0.5 else f"X_efficientnet_lite0_mpp{args.mpp:g}"
    t0 = time.perf_counter()
    if args.features:
        stored = np.load(args.features)
        for sid, s in cohort.items():
            s.tables["table"].obsm[key] = stored[sid]
        how = f"read from {args.features}"
    else:
        from spade_sc.encoders import get_encoder

        encoder = get_encoder("efficientnet_lite0", device="cpu")
        for s in cohort.values():
            sp.pp.image_features(s, encoder=encoder, mpp=args.mpp, key_added=key, progress=False)
        how = f"computed in {time.perf_counter() - t0:.0f} s"
        if args.save_features:
            np.savez(args.save_features, **{sid: s.tables["table"].obsm[key] for sid, s in cohort.items()})
    n = {sid: s.tables["table"].n_obs for sid, s in cohort.items()}
    print(f"her2st sections {n} ({sum(n.values())} spots); features {key} {how}")
    return cohort, key


def fit_kwargs(args: argparse.Namespace) -> dict:
    if args.defaults:
        return {}
    auto = lambda v: v if v == "auto" else int(v)
    return {
        "n_experts": auto(args.n_experts),
        "n_clusters_per_tissue": auto(args.clusters),
        "gene_input": args.gene_input,
        "loss": args.loss,
        "max_epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "routing_tau": args.routing_tau,
        "validation_fraction": args.validation_fraction,
        "spatial_context": args.spatial_context or None,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*val_dataloader.*")
    import pandas as pd
    import torch
    from threadpoolctl import threadpool_limits

    import spade_sc as sp

    torch.set_num_threads(args.threads)
    reps = REPRESENTATIONS if args.representations is None else tuple(args.representations.split(","))
    draws = args.draws
    if args.quick:
        reps, draws = ("base", "spade_soft"), 5
    cohort, key = load(args)
    kwargs = fit_kwargs(args)
    print("tl.fit settings:", kwargs or "defaults", "| draws:", draws, "| command:", " ".join(sys.argv))
    t0 = time.perf_counter()
    with threadpool_limits(args.threads):
        res = sp.tl.evaluate(
            cohort,
            features_key=key,
            label_key="label",
            label_group_key="patient",
            representations=reps,
            fit_kwargs=kwargs,
            n_draws=draws,
            retrieval_k=args.retrieval_k,
            seed=args.seed,
            progress=False,
        )
    wall = time.perf_counter() - t0
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 400)
    pd.set_option("display.max_columns", 30)
    folds = res.protocol["folds"]
    spade = {f: r.get("spade", {}) for f, r in folds.items()}
    print(
        "experts per fold:",
        {f: s.get("n_experts") for f, s in spade.items()},
        "| best epoch:",
        {f: s.get("train_params", {}).get("best_epoch") for f, s in spade.items()},
        "| label folds:",
        [f for f, r in folds.items() if "label_classes" in r],
    )

    summary = res.summary()
    cmp = res.compare("base")
    table = summary.merge(cmp[["task", "metric", "shots", "representation", "ratio", "wins"]])
    table["score"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(table["mean"], table["sd"], strict=True)]
    for (task, metric), part in table.groupby(["task", "metric"], sort=False, observed=True):
        wide = part.pivot_table(index="representation", columns="shots", values="score", aggfunc="first", observed=True)
        ratio = part.pivot_table(
            index="representation", columns="shots", values="ratio", aggfunc="first", observed=True
        )
        wide = wide.reindex([r for r in reps if r in wide.index])
        ratio = ratio.reindex(wide.index)
        wins = part.pivot_table(index="representation", columns="shots", values="wins", aggfunc="first", observed=True)
        ratio = (
            ratio.round(3).astype(str) + " (" + (100 * wins.reindex(wide.index)).round(0).astype(int).astype(str) + "%)"
        )
        print(f"\n== {task} / {metric}: mean ± sd over folds (few-shot: mean of {draws} draws per fold) ==")
        print(wide.to_string())
        print("-- ratio to base (in brackets: share of the paired fold x draw scores above base) --")
        print(ratio.to_string())
        if args.per_fold:
            pf = res.table[(res.table.task == task) & (res.table.metric == metric)]
            pf = pf.groupby(["representation", "shots", "fold"], observed=True)["value"].mean().unstack("fold")
            print(pf.round(3).to_string())
    fold_s = {f: r.get("seconds") for f, r in folds.items()}
    print(f"\nwall time {wall:.0f} s (evaluation, SPADE training included); seconds per fold {fold_s}")


if __name__ == "__main__":
    main()

"""Does a mixture of data experts beat one expert where organs map morphology to expression differently?

The cohort: ``spade_sc.datasets.synthetic(organ_programs=True)``, 8 slides of two organs (breast, lung, alternating)
in which the same region morphology carries another gene program in each organ (and each organ has its own stain
hue). Features: EfficientNet-Lite0 (the package's offline default encoder), computed here unless ``--features``
names a cache written by ``--save-features``. Folds: 4, each holding out one slide of each organ
(slide0+slide1, slide2+slide3, ...). In every fold SPADE is fitted on the 6 training slides twice: one expert, and
``n_experts="auto"`` with ``tissue_key="organ"`` (one expert per organ: 2). Every number printed is measured in this
run.

Compared on the held-out slides, gene expression (log1p, the 50 most variable genes of the training slides)
predicted by a ridge regression (features standardised over all training spots, alpha by leave-one-out CV) from 50
and 200 labelled training spots (``--draws`` draws, the same spots for every representation) and from all of them;
score: Pearson r per gene, averaged over genes:

- ``base``: the frozen features;
- ``K=1``: the single expert's embedding;
- ``mixture hard, aligned`` / ``mixture soft, aligned``: the mixture's embedding with that routing, as ``tl.fit``
  writes it: each expert's space rotated into one common space (``align_experts=True``, orthogonal Procrustes
  generalised over the experts, so that the experts' gene heads agree on the expression of every training spot);
- ``mixture hard, unaligned`` / ``mixture soft, unaligned``: the same model without the rotations (the paper's
  mixture, ``align_experts=False``). The experts share no weights, so their 256-d spaces are unrelated coordinate
  systems and a linear read-out of the unaligned mixture sees them superimposed.

    python benchmarks/mixture.py                                   # ~3 min on 2 cores (features ~2.5 min of it)
    python benchmarks/mixture.py --save-features /tmp/mixture_feats.npz
    python benchmarks/mixture.py --features /tmp/mixture_feats.npz --epochs 100 --draws 20
    python benchmarks/mixture.py --features /tmp/mixture_feats.npz --evaluate --draws 10   # + tl.evaluate (~20 min)

``--evaluate`` also runs :func:`spade_sc.tl.evaluate` (expression and retrieval, leave one slide out over slide0-slide3,
the mixture's routings against ``single_expert``), whose retrieval task works in SPADE's joint space.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", help="npz cache of the features (from --save-features)")
    p.add_argument("--save-features", help="write the features to this npz")
    p.add_argument("--epochs", type=int, default=50, help="max_epochs of tl.fit")
    p.add_argument("--draws", type=int, default=20, help="draws of the few-shot read-outs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alike", action="store_true", help="organs with the same stain (organ_tints=False)")
    p.add_argument(
        "--evaluate", action="store_true", help="also run tl.evaluate (expression and retrieval) on the same folds"
    )
    return p.parse_args(argv)


def cohort_with_features(args: argparse.Namespace) -> dict:
    import numpy as np

    import spade_sc as sp

    cohort = sp.datasets.synthetic(
        n_slides=8, n_spots=300, image_size=2048, organ_programs=True, organ_tints=not args.alike, seed=0
    )
    if args.features:
        cached = np.load(args.features)
        feats = {name: cached[name] for name in cohort}
    else:
        from spade_sc.encoders import get_encoder

        encoder = get_encoder("efficientnet_lite0", device="cpu")
        t0 = time.perf_counter()
        feats = {
            name: sp.pp.image_features(s, encoder=encoder, inplace=False, progress=False) for name, s in cohort.items()
        }
        print(f"features: {sum(len(f) for f in feats.values())} patches in {time.perf_counter() - t0:.0f} s")
        if args.save_features:
            np.savez(args.save_features, **feats)
    for name, s in cohort.items():
        s.tables["table"].obsm["X_feat"] = feats[name]
    return cohort


def embedding(model, x, routing, *, aligned=True, tissues=None):
    """The model's image embedding under ``routing`` as ``tl.fit`` writes it; ``aligned=False``: without the experts'
    rotations into their common space (the paper's mixture)."""
    import torch

    from spade_sc.model import mixture_embed

    if aligned:
        return model.get_image_embedding(x, routing, tissues=tissues)[0]
    weights = torch.as_tensor(model.routing_weights(x, routing, tissues=tissues))
    with torch.no_grad():
        return mixture_embed(model.module.eval(), torch.as_tensor(x, dtype=torch.float32), weights).numpy()


def ridge_pearson(x_train, y_train, x_test, y_test, x_all) -> float:
    """Pearson r per gene (mean) of a ridge fitted on (x_train, y_train), features standardised on ``x_all``.

    As in ``tl.evaluate``: the scaler sees the features (never the expression) of every training spot.
    """
    import numpy as np
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    from spade_sc.tl._evaluate import pearson_per_gene

    scaler = StandardScaler().fit(x_all)
    ridge = RidgeCV(alphas=np.logspace(-1, 6, 15)).fit(scaler.transform(x_train), y_train)
    return float(np.nanmean(pearson_per_gene(y_test, ridge.predict(scaler.transform(x_test)))))


def run_fold(cohort: dict, held: list[str], args: argparse.Namespace) -> dict[str, list[float]]:
    import numpy as np

    import spade_sc as sp
    from spade_sc.pp import gene_matrix

    train = {k: v for k, v in cohort.items() if k not in held}
    # each spot alone (spatial_context=None): the synthetic spots' neighbours are not what is compared here
    fit = dict(features_key="X_feat", max_epochs=args.epochs, progress=False, seed=args.seed, spatial_context=None)
    single = sp.tl.fit({k: copy.copy(v) for k, v in train.items()}, n_experts=1, **fit)
    mix = dict(n_experts="auto", tissue_key="organ", **fit)
    pooled = sp.tl.fit({k: copy.copy(v) for k, v in train.items()}, tissue_experts=False, **mix)
    per_tissue = sp.tl.fit({k: copy.copy(v) for k, v in train.items()}, **mix)  # tissue_experts: the default
    x_train = np.concatenate([v.tables["table"].obsm["X_feat"] for v in train.values()])
    x_test = np.concatenate([cohort[h].tables["table"].obsm["X_feat"] for h in held])
    organ = lambda names: np.concatenate([cohort[h].tables["table"].obs["organ"].astype(str) for h in names])
    t_train, t_test = organ(list(train)), organ(held)
    k = pooled.n_experts
    reps = {
        "base": (x_train, x_test),
        "K=1": tuple(embedding(single, x, "hard") for x in (x_train, x_test)),
        f"pooled mixture (K={k}) hard, unaligned (the paper's)": tuple(
            embedding(pooled, x, "hard", aligned=False) for x in (x_train, x_test)
        ),
        f"pooled mixture (K={k}) soft, aligned": tuple(embedding(pooled, x, "soft") for x in (x_train, x_test)),
        f"per-tissue experts (K={per_tissue.n_experts}) hard, routed by organ": tuple(
            embedding(per_tissue, x, "hard", tissues=t) for x, t in ((x_train, t_train), (x_test, t_test))
        ),
        f"per-tissue experts (K={per_tissue.n_experts}) soft, routed by organ": tuple(
            embedding(per_tissue, x, "soft", tissues=t) for x, t in ((x_train, t_train), (x_test, t_test))
        ),
        f"per-tissue experts (K={per_tissue.n_experts}) hard, organ unknown (nearest centroid)": tuple(
            embedding(per_tissue, x, "hard") for x in (x_train, x_test)
        ),
    }
    genes = single.genes
    y_train = np.concatenate([gene_matrix(v.tables["table"], genes) for v in train.values()])
    y_test = np.concatenate([gene_matrix(cohort[h].tables["table"], genes) for h in held])
    top = np.argsort(-y_train.var(axis=0), kind="stable")[:50]
    y_train, y_test = y_train[:, top], y_test[:, top]
    rng = np.random.default_rng([args.seed, int(held[0].removeprefix("slide"))])
    draws = {n: [rng.choice(len(x_train), n, replace=False) for _ in range(args.draws)] for n in (50, 200)}
    out = {}
    for name, (a, b) in reps.items():
        scores = [np.mean([ridge_pearson(a[d], y_train[d], b, y_test, a) for d in draws[n]]) for n in (50, 200)]
        out[name] = [*scores, ridge_pearson(a, y_train, b, y_test, a)]
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    cohort = cohort_with_features(args)
    folds = [[f"slide{i}", f"slide{i + 1}"] for i in range(0, 8, 2)]
    t0 = time.perf_counter()
    per_fold = [run_fold(cohort, held, args) for held in folds]
    print(
        f"4 folds x 2 fits ({args.epochs} epochs), {args.draws} draws, {args.threads} threads: "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print("| representation | genes, 50 spots | genes, 200 | genes, all | / K=1 at 50 spots |")
    print("|---|---|---|---|---|")
    k1 = np.mean([f["K=1"][0] for f in per_fold])
    for name in per_fold[0]:
        m = np.array([f[name] for f in per_fold])
        cells = " | ".join(f"{mu:.3f} ± {sd:.3f}" for mu, sd in zip(m.mean(0), m.std(0), strict=True))
        print(f"| {name} | {cells} | {m[:, 0].mean() / k1:.2f} |")
    if args.evaluate:
        import pandas as pd

        import spade_sc as sp

        res = sp.tl.evaluate(
            cohort,
            features_key="X_feat",
            representations=["base", "spade_soft", "spade_hard", "spade_uniform", "single_expert"],
            tasks=("expression", "retrieval"),
            folds=[[f"slide{i}"] for i in range(4)],  # leave one slide out, over slide0-slide3
            fit_kwargs={"max_epochs": args.epochs, "n_experts": "auto", "tissue_key": "organ", "spatial_context": None},
            pca=(False,),
            n_draws=args.draws,
            seed=args.seed,
            progress=False,
        )
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(res.compare("single_expert"))


if __name__ == "__main__":
    sys.exit(main())

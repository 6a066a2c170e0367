"""What gives SPADE its few-shot gain on her2st? Each alternative of issue 15 measured alone, with tl.evaluate.

The protocol of ``benchmarks/her2st.py`` (leave one section out over B4, C2-C5; ridge on the 50 most variable genes
from 25 / 50 / 100 / all training spots; region labels of patient C from 1 / 5 / 10 / all per class; retrieval;
20 draws), run once per **variant**; every score is divided by that of the frozen encoder's features as a user
has them (EfficientNet-Lite0, one view, 224 px at 0.5 um/px: ``X_base``). The features of the 8 dihedral views of
every patch are computed once (about 3 min on 2 cores) and cached in ``--features``.

Variants (``--variants``, comma-separated; default: all):

- ``paper``: one view, each spot alone (``spatial_context=None``): the package's defaults before this benchmark;
- ``views8``: the mean of the 8 views (``pp.image_features(views=8)``), each spot alone;
- ``context``: one view, the spot in its context (``tl.fit(spatial_context=1.6)``);
- ``defaults``: 8 views and context: ``tl.fit``'s defaults now;
- ``augment``: ``defaults``, and training draws one of the 8 views per pair and step instead of their mean (a
  benchmark-only patch of the training data module; the embedding still uses the mean);
- ``centred``: ``defaults`` on features standardised per slide (mean 0, sd 1 per feature and slide);
- ``centred_expression``: ``defaults`` with the model's gene input standardised per slide (a benchmark-only patch of
  the gene input of ``tl.fit``; the read-outs' targets stay log1p expression);
- ``infonce``, ``infonce_lr3e-3``, ``infonce_lr3e-4``, ``lr3e-3``, ``lr3e-4``: the loss and learning rate;
- ``genes25``, ``genes100``: ``n_top_genes`` (HVGs per slide in the panel; default 50);
- ``proj128``, ``proj512``: the embedding dimension (default 256);
- ``experts3``, ``experts3_tau_auto``: three experts, routing temperature 0.1 and ``"auto"`` (scale-aware).

Each variant's table also holds its own base features (``base``: the 8-view mean where the variant uses it) and,
with ``--context-control``, those features in context without SPADE (``pp.spatial_context``: ``base_context``).

    python benchmarks/fewshot.py --features /tmp/her2st_views.npz                 # every variant (~1 h, 2 cores)
    python benchmarks/fewshot.py --features /tmp/her2st_views.npz --variants defaults,paper --context-control
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

#: name -> (views, per-slide centring, augmented training, tl.fit keyword arguments)
VARIANTS: dict[str, tuple[int, bool, bool, dict]] = {
    "paper": (1, False, False, {"spatial_context": None}),
    "views8": (8, False, False, {"spatial_context": None}),
    "context": (1, False, False, {}),
    "defaults": (8, False, False, {}),
    "augment": (8, False, True, {}),
    "centred": (8, True, False, {}),
    "centred_expression": (8, False, False, {}),
    "infonce": (8, False, False, {"loss": "infonce"}),
    "infonce_lr3e-3": (8, False, False, {"loss": "infonce", "lr": 3e-3}),
    "infonce_lr3e-4": (8, False, False, {"loss": "infonce", "lr": 3e-4}),
    "lr3e-3": (8, False, False, {"lr": 3e-3}),
    "lr3e-4": (8, False, False, {"lr": 3e-4}),
    "genes25": (8, False, False, {"n_top_genes": 25}),
    "genes100": (8, False, False, {"n_top_genes": 100}),
    "proj128": (8, False, False, {"model_kwargs": {"proj_dim": 128}}),
    "proj512": (8, False, False, {"model_kwargs": {"proj_dim": 512}}),
    "experts3": (8, False, False, {"n_experts": 3, "routing_tau": 0.1}),
    "experts3_tau_auto": (8, False, False, {"n_experts": 3, "routing_tau": "auto"}),
}
#: The columns of the printed table: (task, metric, shots).
COLUMNS = [("expression", "pearson", s) for s in ("25", "50", "100", "all")]
COLUMNS += [("label", "balanced_accuracy", s) for s in ("1", "5", "10", "all")]
COLUMNS += [("retrieval", "pearson", "all")]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="her2st folder (default $SPADE_SC_DATA/her2st)")
    p.add_argument("--features", default="/tmp/her2st_views.npz", help="npz cache of the 8-view features")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--context-control", action="store_true", help="also score base features in context")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def views_of(cohort, path: Path) -> dict:
    """(n_spots, 8, d) EfficientNet-Lite0 features of the 8 dihedral views of every spot's patch, cached."""
    import numpy as np

    import spade_sc as sp
    from spade_sc.encoders import get_encoder
    from spade_sc.pp._features import _ViewMean

    if path.exists():
        stored = np.load(path)
        return {sid: stored[sid] for sid in cohort}
    encoder = get_encoder("efficientnet_lite0", device="cpu")

    class One:  # one orientation of _ViewMean, so that the views are exactly those image_features(views=8) averages
        def __init__(self, v):
            self.dim, self.v = encoder.dim, v
            self.m = _ViewMean(encoder, 8)

        def __call__(self, x):
            import torch

            y = torch.rot90(x, self.m.turns[self.v], dims=(-2, -1))
            return encoder((torch.flip(y, dims=(-1,)) if self.m.mirror[self.v] else y).contiguous())

        def __getattr__(self, name):
            return getattr(encoder, name)

    t0 = time.perf_counter()
    out = {}
    for sid, s in cohort.items():
        out[sid] = np.stack(
            [sp.pp.image_features(s, encoder=One(v), inplace=False, progress=False) for v in range(8)], axis=1
        )
    print(f"8-view features of {sum(len(v) for v in out.values())} spots in {time.perf_counter() - t0:.0f} s")
    np.savez(path, **out)
    return out


def augmented_training(views: dict):
    """Patch the training data module: each step draws one of the 8 views of every pair (the mean is kept for
    validation and embedding). The training rows are found by their features (the 8-view mean). Returns the undo."""
    import numpy as np
    import torch

    from spade_sc.model import _lightning as lightning

    lookup = {}
    for v in views.values():
        for mean, row in zip(v.mean(1).astype(np.float32), v, strict=True):
            lookup[mean.tobytes()] = row
    gen = torch.Generator().manual_seed(0)

    class Augmented(lightning.PairsDataset):
        def __init__(self, base):
            self.image_feats, self.gene_feats, self.expert_idx = base.image_feats, base.gene_feats, base.expert_idx
            d = next(iter(views.values())).shape[2]
            self.d = d
            self.views = torch.as_tensor(np.stack([lookup[r[:d].numpy().tobytes()] for r in base.image_feats]))

        def __getitem__(self, i):
            i = torch.as_tensor(i, dtype=torch.long)
            v = torch.randint(self.views.shape[1], (len(i),), generator=gen)
            x = torch.cat([self.views[i, v], self.image_feats[i, self.d :]], 1)  # the context part stays
            return x, self.gene_feats[i], self.expert_idx[i]

    init = lightning.PairsDataModule.__init__

    def patched(self, train, val=None, **kw):
        init(self, Augmented(train), val, **kw)

    lightning.PairsDataModule.__init__ = patched
    return lambda: setattr(lightning.PairsDataModule, "__init__", init)


def centred_gene_input():
    """Patch tl.fit's gene input: each slide's log1p expression standardised per gene. Returns the undo."""
    import numpy as np

    from spade_sc.tl import _spade

    plain = _spade.gene_matrix

    def centred(table, genes, **kw):
        y = plain(table, genes, **kw)
        return ((y - y.mean(0)) / (y.std(0) + 1e-6)).astype(np.float32)

    _spade.gene_matrix = centred
    return lambda: setattr(_spade, "gene_matrix", plain)


def run(name: str, cohort, views: dict, args: argparse.Namespace):
    import numpy as np
    from threadpoolctl import threadpool_limits

    import spade_sc as sp

    n_views, centre, augment, kwargs = VARIANTS[name]
    for sid, s in cohort.items():
        t = s.tables["table"]
        t.obsm["X_base"] = views[sid][:, 0].copy()
        x = views[sid].mean(1).astype(np.float32) if n_views == 8 else views[sid][:, 0].copy()
        if centre:
            x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        t.obsm["X_var"] = x
        if args.context_control:
            t.obsm.pop("base_context", None)
            sp.pp.spatial_context(s, features_key="X_var", key_added="base_context")
    undo = augmented_training(views) if augment else (lambda: None)
    undo_genes = centred_gene_input() if name == "centred_expression" else (lambda: None)
    reps = ["X_base", "base", "spade_soft"] + (["base_context"] if args.context_control else [])
    t0 = time.perf_counter()
    with threadpool_limits(args.threads):
        res = sp.tl.evaluate(
            cohort,
            features_key="X_var",
            label_key="label",
            label_group_key="patient",
            representations=reps,
            fit_kwargs=kwargs,
            n_draws=args.draws,
            seed=0,
            progress=False,
            pca=(False,),
        )
    undo()
    undo_genes()
    s = res.summary()
    table = s.pivot_table(
        index="representation", columns=["task", "metric", "shots"], values="mean", aggfunc="first", observed=True
    )
    per_fold = res.table.groupby(["task", "metric", "shots", "representation", "fold"], observed=True)["value"].mean()
    per_fold = per_fold.unstack("representation")
    per_fold = (per_fold["spade_soft"] / per_fold["X_base"]).unstack("fold")
    return table[[c for c in COLUMNS if c in table.columns]], per_fold, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import pandas as pd
    import torch

    import spade_sc as sp

    torch.set_num_threads(args.threads)
    pd.set_option("display.width", 250)
    cohort = sp.datasets.her2st(args.root)
    views = views_of(cohort, Path(args.features))
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose among {list(VARIANTS)}")
        table, per_fold, seconds = run(name, cohort, views, args)
        print(f"\n== {name}: tl.fit{VARIANTS[name][3]}, views {VARIANTS[name][0]} ({seconds:.0f} s)")
        print(table.round(3).to_string())
        print("ratio to X_base (one view):")
        print((table / table.loc["X_base"]).round(3).to_string())
        print("spade_soft / X_base per fold:")
        print(per_fold.loc[[c for c in COLUMNS if c in per_fold.index]].round(3).to_string(), flush=True)


if __name__ == "__main__":
    main()

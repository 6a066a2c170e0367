"""tl.evaluate / tl.predict_expression: known answers on synthetic data, no leakage, exact shots, real her2st."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from spatialdata import SpatialData

import spade_sc as sp
from spade_sc.tl import EvaluationResult, evaluate, predict_expression

TINY_FIT = {"n_experts": 2, "n_clusters_per_tissue": 4, "max_epochs": 3, "batch_size": 64, "lr": 1e-3}


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Small SVDs on an oversubscribed machine crawl with several BLAS threads: use one."""
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


def _copy(sdata: SpatialData) -> SpatialData:
    return SpatialData(
        shapes=dict(sdata.shapes), tables={"table": sdata.tables["table"].copy()}, attrs=copy.deepcopy(sdata.attrs)
    )


@pytest.fixture
def cohort(synthetic_cohort):
    """Copies of the synthetic slides with features that determine the expression, and a shuffled control.

    ``X_expr``: log1p expression of every gene plus a little noise (a linear readout recovers any gene);
    ``X_shuffled``: the same rows permuted within each slide (no information about the spot);
    ``X_feat``: PCA (32) of ``X_expr`` over the cohort, the "encoder features" SPADE is trained on here.
    """
    from sklearn.decomposition import PCA

    out = {sid: _copy(s) for sid, s in synthetic_cohort.items()}
    rng = np.random.default_rng(0)
    genes = list(next(iter(out.values())).tables["table"].var_names)
    xs = {}
    for sid, s in out.items():
        t = s.tables["table"]
        x = sp.pp.gene_matrix(t, genes) + rng.normal(0, 0.01, (t.n_obs, len(genes))).astype(np.float32)
        t.obsm["X_expr"] = x
        t.obsm["X_shuffled"] = x[rng.permutation(t.n_obs)]
        xs[sid] = x
    pca = PCA(32, random_state=0).fit(np.concatenate(list(xs.values())))
    for sid, s in out.items():
        s.tables["table"].obsm["X_feat"] = pca.transform(xs[sid]).astype(np.float32)
    return out


def _state(cohort):
    return {
        sid: (sorted(s.tables["table"].obsm), sorted(s.tables["table"].uns), sorted(s.tables["table"].obs))
        for sid, s in cohort.items()
    }


# ---------------------------------------------------------------------------------------------------- pieces
def test_expression_task_is_loso_ridge_on_top_variable_genes_scored_by_pearson(cohort):
    """Protocol 3 by hand: top-variance genes of the training slides, standardised features, ridge whose alpha
    minimises the leave-one-training-slide-out squared error, refitted on every training spot (as sklearn's Ridge),
    Pearson r per gene over the held-out spots: NaN where the held-out expression is constant, not 0."""
    from scipy import sparse
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    tables = {sid: s.tables["table"] for sid, s in cohort.items()}
    train, held_out = ["slide1", "slide2", "slide3"], tables["slide0"]
    rng = np.random.default_rng(1)
    for t in tables.values():  # noisy features: the penalty matters
        t.obsm["X_noisy"] = (t.obsm["X_expr"] + rng.normal(0, 1.0, t.obsm["X_expr"].shape)).astype(np.float32)
    # the genes: highest variance of log1p-normalised expression over the training slides' spots
    all_genes = list(held_out.var_names)
    expr = np.concatenate([sp.pp.gene_matrix(tables[s], all_genes) for s in train]).astype(np.float64)
    genes = [all_genes[i] for i in np.argsort(-expr.var(0), kind="stable")[:10]]
    # the top gene never expressed on the held-out slide: still a target (chosen on the training slides), scored NaN
    x = held_out.X.toarray()
    x[:, held_out.var_names.get_loc(genes[0])] = 0
    held_out.X = sparse.csr_matrix(x)
    alphas = (0.1, 10.0, 1e3, 1e5)
    res = evaluate(
        cohort,
        features_key="X_noisy",
        representations=("base",),
        tasks=("expression",),
        folds={"slide0": ["slide0"]},
        n_genes=10,
        gene_shots=(40,),
        n_draws=1,
        pca=(False,),
        alphas=alphas,
        progress=False,
    )
    assert res.protocol["folds"]["slide0"]["genes"] == genes

    y = np.concatenate([sp.pp.gene_matrix(tables[s], genes) for s in train]).astype(np.float64)
    y_te = sp.pp.gene_matrix(held_out, genes).astype(np.float64)
    feats = np.concatenate([tables[s].obsm["X_noisy"] for s in train]).astype(np.float64)
    scaler = StandardScaler().fit(feats)
    z, z_te = scaler.transform(feats), scaler.transform(held_out.obsm["X_noisy"])
    groups = np.concatenate([[s] * tables[s].n_obs for s in train])
    errs = []  # the choice is the minimum of the leave-one-slide-out squared error
    for a in alphas:
        fits = {g: Ridge(alpha=a).fit(z[groups != g], y[groups != g]) for g in train}
        errs.append(sum(((fits[g].predict(z[groups == g]) - y[groups == g]) ** 2).sum() for g in train))
    row = res.table[(res.table.task == "expression") & (res.table.shots == "all")]
    alpha = row["param"].item()
    assert alpha == alphas[int(np.argmin(errs))]
    assert alpha not in (alphas[0], alphas[-1])  # an interior choice: the search did choose
    pred = Ridge(alpha=alpha).fit(z, y).predict(z_te)
    r = np.array([np.corrcoef(y_te[:, j], pred[:, j])[0, 1] for j in range(1, len(genes))])
    per_gene = res.per_gene[(res.per_gene.task == "expression") & (res.per_gene.shots == "all")]
    per_gene = per_gene.set_index("gene")["pearson"]
    assert np.isnan(per_gene[genes[0]])  # constant held-out expression: undefined, not 0
    np.testing.assert_allclose(per_gene[genes[1:]].to_numpy(), r, atol=1e-8)
    assert row["value"].item() == pytest.approx(r.mean(), abs=1e-8)  # the mean over the genes that vary


# ---------------------------------------------------------------------------------------------------- evaluate
def test_known_answer_expression_and_retrieval(cohort):
    """Features that determine the expression predict it (r near 1); shuffled features do not (r near 0)."""
    before = _state(cohort)
    res = evaluate(
        cohort,
        features_key="X_expr",
        representations=("base", "X_shuffled"),
        tasks=("expression", "retrieval"),
        n_genes=20,
        gene_shots=(40,),
        n_draws=3,
        retrieval_k=5,
        progress=False,
    )
    assert _state(cohort) == before  # nothing written into the user's cohort
    assert isinstance(res, EvaluationResult)
    t = res.table
    assert set(t["fold"]) == set(cohort)
    assert set(t["task"]) == {"expression", "expression_pca", "retrieval"}
    assert list(t["shots"].cat.categories) == ["40", "all"]
    s = res.summary().set_index(["task", "shots", "representation"])["mean"]
    for task in ("expression", "expression_pca"):
        assert s[(task, "all", "base")] > 0.9
        assert s[(task, "40", "base")] > 0.7
        assert abs(s[(task, "all", "X_shuffled")]) < 0.15
        assert abs(s[(task, "40", "X_shuffled")]) < 0.15
    assert s[("retrieval", "all", "base")] > 0.6
    assert abs(s[("retrieval", "all", "X_shuffled")]) < 0.15
    # the draws are recorded and the same for every representation
    draws = res.protocol["folds"]["slide0"]["expression_draws"]["40"]
    assert len(draws) == 3 and all(len(d) == 40 for d in draws)
    few = t[(t.shots == "40") & (t.task == "expression")]
    assert (few.groupby(["fold", "draw"], observed=True)["n_train"].nunique() == 1).all()
    # per-gene scores: one row per target gene of every fold
    pg = res.per_gene[(res.per_gene.task == "expression") & (res.per_gene.shots == "all")]
    assert (pg.groupby(["representation", "fold"]).size() == 20).all()
    # compare: ratio to base, wins in [0, 1]
    c = res.compare("base")
    assert np.allclose(c.loc[c.representation == "base", "ratio"], 1)
    assert c["wins"].between(0, 1).all()
    with pytest.raises(ValueError, match="reference"):
        res.compare("nope")
    # protocol recorded next to the scores
    p = res.protocol
    for key in ("alphas", "pca", "n_pca", "gene_shots", "n_draws", "seed", "folds", "gene_selection"):
        assert key in p
    assert p["folds"]["slide0"]["train"] == ["slide1", "slide2", "slide3"]
    assert len(p["folds"]["slide0"]["genes"]) == 20
    # same seed, same result
    again = evaluate(
        cohort,
        features_key="X_expr",
        representations=("base", "X_shuffled"),
        tasks=("expression", "retrieval"),
        n_genes=20,
        gene_shots=(40,),
        n_draws=3,
        retrieval_k=5,
        progress=False,
    )
    pd.testing.assert_frame_equal(res.table, again.table)


def test_label_probe_exact_shots_and_unseen_classes(cohort):
    # a class that only the held-out slide has: scored nowhere, recorded
    t0 = cohort["slide0"].tables["table"]
    lab = t0.obs["tissue_type"].astype(str).to_numpy().copy()
    lab[:7] = "novel"
    t0.obs["tissue_type"] = pd.Categorical(lab)
    res = evaluate(
        cohort,
        features_key="X_expr",
        label_key="tissue_type",
        representations=("base",),
        tasks=("label",),
        folds={"slide0": ["slide0"], "slide1": ["slide1"]},
        shots=(1, 3),
        n_draws=4,
        cs=(0.1, 1.0),
        progress=False,
    )
    t = res.table
    assert set(t["metric"]) == {"balanced_accuracy", "macro_f1"}
    assert set(t["shots"].astype(str)) == {"1", "3", "all"}
    assert (t.groupby(["fold", "shots"], observed=True)["draw"].nunique().to_dict()) == {
        ("slide0", "1"): 4,
        ("slide0", "3"): 4,
        ("slide0", "all"): 1,
        ("slide1", "1"): 4,
        ("slide1", "3"): 4,
        ("slide1", "all"): 1,
    }
    full = t[(t.shots == "all") & (t.metric == "balanced_accuracy")].set_index("fold")["value"]
    assert (full > 0.8).all()  # expression determines the region type
    rec = res.protocol["folds"]["slide0"]
    assert rec["label_unseen_test_classes"] == ["novel"]
    assert rec["label_unseen_test_spots"] == 7
    n_labelled = t0.n_obs - 7
    assert (t[(t.fold == "slide0") & (t.shots == "all")]["n_test"] == n_labelled).all()
    # exactly k spots of every eligible class in every draw, drawn from the training slides only
    obs = pd.concat([s.tables["table"].obs for sid, s in cohort.items() if sid != "slide0"])
    for k in ("1", "3"):
        d = rec["label_draws"][k]
        assert len(d["spots"]) == 4
        for spots in d["spots"]:
            assert len(set(spots)) == len(spots)
            counts = obs.loc[spots, "tissue_type"].astype(str).value_counts()
            assert sorted(counts.index) == sorted(d["classes"])
            assert (counts == int(k)).all()
        assert len({tuple(s) for s in d["spots"]}) > 1  # draws differ
    # label task needs the label column
    with pytest.raises(KeyError, match="nope"):
        evaluate(cohort, features_key="X_expr", label_key="nope", tasks=("label",), representations=("base",))


def test_no_leakage_and_spade_inside_folds(cohort):
    """SPADE and the gene selection only ever see the training slides; the held-out expression changes only scores."""
    kwargs = {
        "features_key": "X_feat",
        "representations": ("base", "spade_soft", "spade_hard", "spade_uniform", "single_expert"),
        "tasks": ("expression", "retrieval"),
        "folds": {"slide0": ["slide0"]},
        "fit_kwargs": TINY_FIT,
        "n_genes": 15,
        "gene_shots": (30,),
        "n_draws": 2,
        "pca": (False,),
        "progress": False,
    }
    before = _state(cohort)
    res = evaluate(cohort, **kwargs)
    # SPADE was fitted on copies: tl.fit writes its embedding into the tables it trains on, and none was written
    assert _state(cohort) == before
    rec = res.protocol["folds"]["slide0"]
    train = ["slide1", "slide2", "slide3"]
    assert rec["spade"]["slides"] == train and rec["single_expert"]["slides"] == train
    assert rec["spade"]["n_experts"] == 2 and rec["single_expert"]["n_experts"] == 1  # two fits: SPADE, single expert
    assert rec["spade"]["fingerprint"] != rec["single_expert"]["fingerprint"]
    assert rec["gene_selection_slides"] == train  # the held-out slide's expression chose no gene
    tp = rec["spade"]["train_params"]
    assert "slide0" not in tp["train_groups"] + tp["validation_groups"]
    assert set(res.table["representation"]) == set(kwargs["representations"])
    assert np.isfinite(res.table["value"]).all()

    # By construction: scramble the held-out slide's counts; genes, SPADE weights and chosen alphas stay the same.
    scrambled = dict(cohort)
    s0 = _copy(cohort["slide0"])
    t = s0.tables["table"]
    rng = np.random.default_rng(5)
    t.X = t.X[rng.permutation(t.n_obs)]
    scrambled["slide0"] = s0
    res2 = evaluate(scrambled, **kwargs)
    rec2 = res2.protocol["folds"]["slide0"]
    assert rec2["genes"] == rec["genes"]
    assert rec2["spade"]["fingerprint"] == rec["spade"]["fingerprint"]  # same seed, same model
    assert rec2["single_expert"]["fingerprint"] == rec["single_expert"]["fingerprint"]
    a = res.table[res.table.task == "expression"]
    b = res2.table[res2.table.task == "expression"]
    np.testing.assert_array_equal(a["param"].to_numpy(), b["param"].to_numpy())
    assert not np.allclose(a["value"].to_numpy(), b["value"].to_numpy())  # only the scores see the held-out slide


def test_predict_expression_joint_space(cohort):
    train = {sid: _copy(cohort[sid]) for sid in ("slide1", "slide2", "slide3")}
    # each spot alone: the expected values below are computed from the raw features
    model = sp.tl.fit(train, features_key="X_feat", seed=0, progress=False, spatial_context=None, **TINY_FIT)
    query = _copy(cohort["slide0"])
    t = query.tables["table"]
    out = predict_expression(query, model, reference=train, k=7, routing="soft", inplace=False)
    assert out.shape == (t.n_obs, len(model.genes)) and out.dtype == np.float32
    assert "spade_predicted" not in t.obsm
    predict_expression(query, model, reference=train, k=7, routing="soft")
    np.testing.assert_array_equal(t.obsm["spade_predicted"], out)
    assert t.uns["spade_predicted"]["genes"] == model.genes
    assert t.uns["spade_predicted"]["params"]["k"] == 7
    # the similarity is sum_k w_k(query) <f_k(x), g_k(y)>, and the prediction the mean of the top k references
    x = t.obsm["X_feat"]
    gene_input = model.init_params_["gene_input"]
    ref_in = np.concatenate(
        [sp.pp.gene_matrix(s.tables["table"], model.genes, gene_input=gene_input) for s in train.values()]
    )
    ref_y = np.concatenate([sp.pp.gene_matrix(s.tables["table"], model.genes) for s in train.values()])
    w = model.routing_weights(x, "soft")
    with torch.no_grad():
        f = model.module.image_embed_all(torch.as_tensor(x)).numpy()
        g = model.module.gene_embed_all(torch.as_tensor(ref_in)).numpy()
    sim = np.einsum("qkd,rkd,qk->qr", f, g, w)
    top = np.argsort(-sim, axis=1)[:, :7]
    np.testing.assert_allclose(out, ref_y[top].mean(1), rtol=1e-4, atol=1e-4)
    # hard routing: the query's own expert only
    hard = predict_expression(query, model, reference=train, k=3, routing="hard", genes=model.genes[:5], inplace=False)
    assert hard.shape == (t.n_obs, 5)
    with pytest.raises(ValueError, match="k must be"):
        predict_expression(query, model, reference=train, k=0)


def test_evaluate_validates(cohort):
    with pytest.raises(KeyError, match="X_missing"):
        evaluate(cohort, features_key="X_missing")
    with pytest.raises(ValueError, match="neither"):
        evaluate(cohort, features_key="X_expr", representations=("base", "X_unknown"))
    with pytest.raises(ValueError, match="subset"):
        evaluate(cohort, features_key="X_expr", folds={"f": ["slideX"]})
    with pytest.raises(ValueError, match="tasks"):
        evaluate(cohort, features_key="X_expr", tasks=("segmentation",))
    with pytest.raises(ValueError, match="shots"):
        evaluate(cohort, features_key="X_expr", shots=(0,))
    with pytest.raises(ValueError, match="n_draws"):
        evaluate(cohort, features_key="X_expr", n_draws=0)
    with pytest.raises(ValueError, match="n_genes"):
        evaluate(cohort, features_key="X_expr", n_genes=0)
    with pytest.raises(ValueError, match="fit_kwargs"):
        evaluate(cohort, features_key="X_expr", fit_kwargs={"key_added": "x"})


# ---------------------------------------------------------------------------------------------------- her2st
def test_evaluate_her2st_tiny(her2st_with_features):
    """Real sections, encoder features: gene task on every fold, labels only within patient C."""
    cohort = her2st_with_features
    before = _state(cohort)
    res = evaluate(
        cohort,
        features_key="X_efficientnet_lite0",
        label_key="label",
        label_group_key="patient",
        representations=("base", "spade_soft", "random_projection"),
        folds={"B4": ["B4"], "C5": ["C5"]},
        fit_kwargs=TINY_FIT,
        shots=(1, 5),
        gene_shots=(25,),
        n_draws=2,
        pca=(False, True),
        progress=False,
    )
    assert _state(cohort) == before
    t = res.table
    assert set(t.loc[t.task == "label", "fold"]) == {"C5"}  # B4 is patient B's only section
    rec = res.protocol["folds"]["C5"]
    assert rec["label_train"] == ["C2", "C3", "C4"]
    assert "label_skipped" in res.protocol["folds"]["B4"]
    assert rec["train"] == ["B4", "C2", "C3", "C4"]
    assert "C5" not in rec["spade"]["train_params"]["train_groups"] + rec["spade"]["train_params"]["validation_groups"]
    assert set(t["task"]) == {"expression", "expression_pca", "retrieval", "label"}
    assert np.isfinite(t["value"]).all()
    s = res.summary()
    base_full = s[(s.task == "expression") & (s.shots == "all") & (s.representation == "base")]["mean"].item()
    assert 0.05 < base_full < 0.6  # images carry some, not all, of the expression
    # five classes of patient C with at least 5 training spots each: exactly 5 each
    d = rec["label_draws"]["5"]
    obs = pd.concat([cohort[s].tables["table"].obs for s in ("C2", "C3", "C4")])
    for spots in d["spots"]:
        assert (obs.loc[spots, "label"].astype(str).value_counts() == 5).all()


def test_untrained_heads_control(cohort):
    """The architecture-only control is the image head a single expert starts its training from."""
    from spade_sc.model import BatchedExperts

    a = BatchedExperts(1, 32, 1, seed=3).image_heads.state_dict()
    b = BatchedExperts(1, 32, 57, seed=3).image_heads.state_dict()  # the gene panel size does not matter
    assert all(torch.equal(a[k], b[k]) for k in a)
    res = evaluate(
        cohort,
        features_key="X_feat",
        representations=("base", "untrained_heads"),
        tasks=("expression",),
        n_genes=10,
        gene_shots=(30,),
        n_draws=2,
        pca=(False,),
        seed=3,
        progress=False,
    )
    assert set(res.table["representation"]) == {"base", "untrained_heads"}
    assert np.isfinite(res.table["value"]).all()


def test_shared_work_leaves_every_score_unchanged(cohort):
    """Each fold computes every expert's embedding, the retrieval reference and each slide's gene moments once and
    shares them between routings and folds: a routing scored alone gets the same scores, bit for bit, as next to
    the others; with one expert the single-expert row is SPADE's soft routing; the folds' target genes are
    top_variable_genes of their training tables."""
    from spade_sc.tl._evaluate import top_variable_genes

    kw = {
        "features_key": "X_feat",
        "tasks": ("expression", "retrieval"),
        "n_genes": 10,
        "gene_shots": (25,),
        "n_draws": 2,
        "pca": (False,),
        "retrieval_k": 5,
        "progress": False,
        "fit_kwargs": {**TINY_FIT, "n_experts": 1, "max_epochs": 2},
        "folds": {"slide0": ["slide0"], "slide1": ["slide1"]},
    }
    every = evaluate(cohort, representations=("spade_soft", "spade_hard", "spade_uniform", "single_expert"), **kw)
    for rep in ("spade_hard", "spade_soft"):
        alone = evaluate(cohort, representations=(rep,), **kw)
        part = every.table[every.table.representation == rep].reset_index(drop=True)
        pd.testing.assert_frame_equal(alone.table, part, check_exact=True, check_categorical=False)
    t = every.table.set_index(["representation", "task", "fold", "shots", "draw"])["value"]
    np.testing.assert_array_equal(t.loc["single_expert"].to_numpy(), t.loc["spade_soft"].to_numpy())
    tables = {sid: s.tables["table"] for sid, s in cohort.items()}
    for rec in every.protocol["folds"].values():
        assert rec["genes"] == top_variable_genes([tables[s] for s in rec["train"]], 10)

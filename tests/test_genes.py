"""Gene panel and gene matrix: real her2st sections (all five) plus small hand-made tables for the errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from spatialdata import SpatialData

import spade_sc as sp


def _copy(sdata: SpatialData, table: ad.AnnData | None = None) -> SpatialData:
    """A SpatialData sharing the shapes of ``sdata`` with a copy of its table (or ``table``)."""
    t = sdata.tables["table"].copy() if table is None else table
    return SpatialData(shapes=dict(sdata.shapes), tables={"table": t})


def _table(X, genes) -> ad.AnnData:
    return ad.AnnData(X=X, obs=pd.DataFrame(index=[f"s{i}" for i in range(X.shape[0])]), var=pd.DataFrame(index=genes))


def _toy(n=30, g=40, seed=0, genes=None) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(1.0, 3.0, (n, g))).astype(np.float32)
    return _table(X, genes or [f"G{i}" for i in range(g)])


@pytest.fixture(scope="module")
def panel(her2st):
    return sp.pp.gene_panel(her2st, inplace=False)


def test_panel_her2st(her2st, panel):
    tables = [s.tables["table"] for s in her2st.values()]
    assert len(tables) == 5
    assert 50 <= len(panel) <= 250
    assert panel == sorted(panel)
    assert len(set(panel)) == len(panel)
    for t in tables:
        assert set(panel) <= set(t.var_names)
        assert "spade_panel" not in t.uns  # inplace=False writes nothing


def test_panel_is_union_of_section_hvgs(her2st, panel, tmp_path):
    import scanpy as sc

    cohort = {sid: _copy(s) for sid, s in her2st.items()}
    assert sp.pp.gene_panel(cohort) == panel
    shared = sorted(set.intersection(*(set(s.tables["table"].var_names) for s in her2st.values())))
    rec = cohort["C3"].tables["table"].uns["spade_panel"]
    assert rec["genes"] == panel
    assert rec["params"]["n_top_genes"] == 50
    assert rec["params"]["flavor"] == "seurat"
    assert rec["params"]["n_shared_genes"] == len(shared)
    # Recompute one section with scanpy directly.
    direct = her2st["C3"].tables["table"][:, shared].copy()
    sc.pp.normalize_total(direct)
    sc.pp.log1p(direct)
    sc.pp.highly_variable_genes(direct, n_top_genes=50, flavor="seurat")
    hvg = set(direct.var_names[direct.var["highly_variable"]])
    assert set(rec["slide_genes"]) == hvg
    assert len(hvg) >= 50
    union = set().union(*(set(s.tables["table"].uns["spade_panel"]["slide_genes"]) for s in cohort.values()))
    assert union == set(panel)
    # The record can be written (no None values in uns).
    cohort["C3"].tables["table"].write_h5ad(tmp_path / "c3.h5ad")


def test_panel_matched_by_name(her2st, panel):
    cohort = {sid: _copy(s) for sid, s in her2st.items()}
    rng = np.random.default_rng(0)
    t = cohort["B4"].tables["table"]
    perm = t[:, rng.permutation(t.n_vars)].copy()
    cohort["B4"] = _copy(her2st["B4"], perm)
    assert sp.pp.gene_panel(cohort, inplace=False) == panel
    for gene_input in ("counts", "log1p"):
        a = sp.pp.gene_matrix(her2st["B4"].tables["table"], panel, gene_input=gene_input)
        b = sp.pp.gene_matrix(perm, panel, gene_input=gene_input)
        np.testing.assert_array_equal(a, b)


def test_gene_matrix_counts_vs_log1p(her2st, panel):
    t = her2st["C2"].tables["table"]
    counts = sp.pp.gene_matrix(t, panel, gene_input="counts")
    logn = sp.pp.gene_matrix(t, panel)
    assert counts.dtype == logn.dtype == np.float32
    assert counts.shape == logn.shape == (t.n_obs, len(panel))
    j = list(t.var_names).index(panel[3])
    np.testing.assert_array_equal(counts[:, 3], t.X[:, j].toarray().ravel())
    totals = np.asarray(t.X.sum(1)).ravel()  # over all genes of the table, not the panel
    np.testing.assert_allclose(logn, np.log1p(counts / totals[:, None] * 1e4), rtol=1e-5, atol=1e-6)
    assert ((counts == 0) == (logn == 0)).all()
    # A reordered panel gives reordered columns.
    np.testing.assert_array_equal(sp.pp.gene_matrix(t, panel[::-1]), logn[:, ::-1])


def test_counts_layer_is_preferred(her2st):
    t = her2st["C4"].tables["table"].copy()
    genes = list(t.var_names[:20])
    ref = sp.pp.gene_matrix(t, genes, gene_input="counts")
    t.layers["counts"] = t.X.copy()
    t.X = sparse.csr_matrix(np.log1p(t.X.toarray().astype(np.float32)))
    np.testing.assert_array_equal(sp.pp.gene_matrix(t, genes, gene_input="counts"), ref)
    assert not np.array_equal(sp.pp.gene_matrix(t, genes, gene_input="counts", layer=None), t.X[:, :20].toarray())
    with pytest.raises(KeyError, match="raw"):
        sp.pp.gene_matrix(t, genes, layer="raw")


def test_gene_matrix_errors():
    t = _toy()
    with pytest.raises(KeyError, match=r"2 of the 3 panel genes.*NOPE1"):
        sp.pp.gene_matrix(t, ["G1", "NOPE1", "NOPE2"])
    with pytest.raises(ValueError, match="gene_input"):
        sp.pp.gene_matrix(t, ["G1"], gene_input="zscore")
    bad = t.copy()
    bad.X[0, 5] = -1
    with pytest.raises(ValueError, match="negative"):
        sp.pp.gene_matrix(bad, ["G1"])  # G5 is outside the panel but enters the per-spot totals


def test_panel_errors():
    a = SpatialData(tables={"table": _toy(genes=[f"A{i}" for i in range(40)])})
    b = SpatialData(tables={"table": _toy(seed=1, genes=[f"B{i}" for i in range(40)])})
    with pytest.raises(ValueError, match=r"share no gene.*'left'.*'right'"):
        sp.pp.gene_panel({"left": a, "right": b})
    assert "spade_panel" not in a.tables["table"].uns

    good = SpatialData(tables={"table": _toy()})
    nan = _toy(seed=2)
    nan.X[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"'s_nan'.*NaN"):
        sp.pp.gene_panel({"s_ok": good, "s_nan": SpatialData(tables={"table": nan})}, n_top_genes=5)
    neg = _toy(seed=3)
    neg.X[1, 1] = -2
    with pytest.raises(ValueError, match=r"'s_neg', table 'table'.*negative"):
        sp.pp.gene_panel({"s_ok": good, "s_neg": SpatialData(tables={"table": neg})}, n_top_genes=5)
    inf = sparse.csr_matrix(_toy(seed=4).X)
    inf.data[0] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        sp.pp.gene_panel([good, SpatialData(tables={"table": _table(inf, [f"G{i}" for i in range(40)])})])
    # Validation runs on every slide before writing: nothing written on the good slide.
    assert "spade_panel" not in good.tables["table"].uns


def test_panel_small_cohort_inplace():
    slides = {f"s{i}": SpatialData(tables={"table": _toy(n=40, seed=i)}) for i in range(3)}
    panel = sp.pp.gene_panel(slides, n_top_genes=5)
    assert 5 <= len(panel) <= 15
    for s in slides.values():
        assert s.tables["table"].uns["spade_panel"]["genes"] == panel
        assert s.tables["table"].uns["spade_panel"]["params"]["layer"] == "X"

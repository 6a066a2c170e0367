"""Data experts (two-step k-means), the elbow table and its plot, on features made from the synthetic cohort."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score
from spatialdata import SpatialData

import spade_sc as sp
import spade_sc.pl
import spade_sc.tl

FEATURES = "X_pca"


def _copy(sdata: SpatialData) -> SpatialData:
    """Same shapes, a copy of the table and of the attrs: the session fixture stays untouched."""
    return SpatialData(
        shapes=dict(sdata.shapes), tables={"table": sdata.tables["table"].copy()}, attrs=copy.deepcopy(sdata.attrs)
    )


@pytest.fixture(scope="module")
def cohort(synthetic_cohort):
    """Copies of the synthetic slides with obsm["X_pca"]: PCA (20) of log1p expression over the whole cohort.

    The synthetic gene programs depend on the region type, so these features carry ``obs["tissue_type"]``.
    """
    from sklearn.decomposition import PCA

    out = {sid: _copy(s) for sid, s in synthetic_cohort.items()}
    tables = [s.tables["table"] for s in out.values()]
    genes = list(tables[0].var_names)
    x = np.concatenate([sp.pp.gene_matrix(t, genes) for t in tables])
    z = PCA(20, random_state=0).fit_transform(x).astype(np.float32)
    start = 0
    for t in tables:
        t.obsm[FEATURES] = z[start : start + t.n_obs]
        start += t.n_obs
    return out


def fresh(cohort) -> dict[str, SpatialData]:
    return {sid: _copy(s) for sid, s in cohort.items()}


def _obs(cohort, key) -> np.ndarray:
    return np.concatenate([s.tables["table"].obs[key].astype(str).to_numpy() for s in cohort.values()])


def test_experts_recover_tissue_types(cohort, tmp_path):
    c = fresh(cohort)
    n_types = len(set(_obs(c, "tissue_type")))
    experts = sp.tl.build_experts(
        c, features_key=FEATURES, tissue_key="organ", n_clusters_per_tissue=8, n_experts=n_types
    )
    assert isinstance(experts, sp.tl.DataExperts)
    assert experts.centroids.shape == (16, 20) and experts.centroids.dtype == np.float32
    assert sorted(set(experts.centroid_tissue)) == ["breast", "lung"]
    assert set(experts.centroid_expert) == set(range(n_types))
    labels = _obs(c, "spade_expert")
    assert adjusted_rand_score(_obs(c, "tissue_type"), labels) > 0.9
    t = c["slide0"].tables["table"]
    assert isinstance(t.obs["spade_expert"].dtype, pd.CategoricalDtype)
    assert list(t.obs["spade_expert"].cat.categories) == [str(k) for k in range(n_types)]
    rec = t.uns["spade_experts"]
    assert rec["params"]["clusters_per_tissue"] == {"breast": 8, "lung": 8}
    assert rec["params"]["tissue_key"] == "organ"
    assert rec["counts"].sum() == t.n_obs
    t.write_h5ad(tmp_path / "t.h5ad")  # what was written is serialisable
    # assign() follows the nearest step-1 centroid among all of them and reproduces what was written.
    x = t.obsm[FEATURES]
    np.testing.assert_array_equal(experts.assign(x), t.obs["spade_expert"].astype(int).to_numpy())
    d = ((x[:, None, :] - experts.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(experts.assign(x), experts.centroid_expert[d.argmin(1)])
    # With one group, same recovery; every category present even with more experts than types.
    c2 = fresh(cohort)
    sp.tl.build_experts(c2, features_key=FEATURES, n_experts=n_types + 2)
    cats = c2["slide1"].tables["table"].obs["spade_expert"].cat.categories
    assert list(cats) == [str(k) for k in range(n_types + 2)]


def test_determinism_and_serialisation(cohort):
    kw = dict(features_key=FEATURES, n_clusters_per_tissue=6, n_experts=3, inplace=False)
    a = sp.tl.build_experts(cohort, seed=3, **kw)
    b = sp.tl.build_experts(cohort, seed=3, **kw)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.centroid_expert, b.centroid_expert)
    x = cohort["slide2"].tables["table"].obsm[FEATURES]
    np.testing.assert_array_equal(a.assign(x), b.assign(x))
    assert "spade_expert" not in cohort["slide2"].tables["table"].obs  # inplace=False
    others = [sp.tl.build_experts(cohort, seed=s, **kw) for s in (4, 5)]
    assert any(not np.allclose(a.centroids, o.centroids) for o in others)  # seeds matter
    # JSON round trip, and config() + arrays() (the model-file split).
    back = sp.tl.DataExperts.from_dict(json.loads(json.dumps(a.to_dict())))
    np.testing.assert_array_equal(back.centroids, a.centroids)
    np.testing.assert_array_equal(back.assign(x), a.assign(x))
    assert back.params == a.params and back.features_key == FEATURES
    json.dumps(a.config())
    assert {k: v.dtype for k, v in a.arrays().items()} == {"centroids": np.float32, "centroid_expert": np.int64}
    again = sp.tl.DataExperts.from_dict({**a.config(), **a.arrays()})
    np.testing.assert_array_equal(again.centroid_tissue, a.centroid_tissue)
    with pytest.raises(ValueError, match=r"shape \(N, 20\)"):
        a.assign(x[:, :5])


def test_small_tissue_gets_fewer_clusters(cohort):
    c = fresh(cohort)
    for s in c.values():
        t = s.tables["table"]
        t.obs["zone"] = "big"
    c["slide0"].tables["table"].obs.loc[c["slide0"].tables["table"].obs_names[:5], "zone"] = "tiny"
    with pytest.warns(UserWarning, match=r"'tiny' has 5 spot\(s\).*gets 5 cluster"):
        experts = sp.tl.build_experts(
            c, features_key=FEATURES, tissue_key="zone", n_clusters_per_tissue=10, n_experts=4
        )
    assert experts.params["clusters_per_tissue"] == {"big": 10, "tiny": 5}
    assert list(experts.centroid_tissue).count("tiny") == 5


def test_errors_before_writing(cohort):
    c = fresh(cohort)
    with pytest.raises(ValueError, match=r"n_experts=40 exceeds the number of step-1 centroids \(32"):
        sp.tl.build_experts(c, features_key=FEATURES, tissue_key="organ", n_experts=40)
    assert all("spade_expert" not in s.tables["table"].obs for s in c.values())
    # Tissue column present in some tables only.
    del c["slide2"].tables["table"].obs["tissue_type"]
    with pytest.raises(KeyError, match=r"missing from the tables of slide\(s\): \['slide2'\]"):
        sp.tl.build_experts(c, features_key=FEATURES, tissue_key="tissue_type", n_experts=2)
    with pytest.raises(KeyError, match="neither an obs column"):
        sp.tl.build_experts(c, features_key=FEATURES, tissue_key="nope", n_experts=2)
    # Features: missing key, NaN, different dimensions.
    with pytest.raises(KeyError, match=r"'slide0'.*obsm\['X_uni'\] is missing.*X_pca"):
        sp.tl.build_experts(c, features_key="X_uni")
    c["slide1"].tables["table"].obsm["X_bad"] = c["slide1"].tables["table"].obsm[FEATURES].copy()
    for sid in ("slide0", "slide2", "slide3"):
        c[sid].tables["table"].obsm["X_bad"] = c[sid].tables["table"].obsm[FEATURES].copy()
    c["slide1"].tables["table"].obsm["X_bad"][4, 2] = np.nan
    with pytest.raises(ValueError, match=r"'slide1'.*NaN or infinite values in 1 row"):
        sp.tl.build_experts(c, features_key="X_bad", n_experts=2)
    c["slide3"].tables["table"].obsm["X_bad"] = c["slide3"].tables["table"].obsm[FEATURES][:, :10].copy()
    with pytest.raises(ValueError, match="different dimensions"):
        sp.tl.build_experts(c, features_key="X_bad", n_experts=2)
    assert all("spade_expert" not in s.tables["table"].obs for s in c.values())


def test_tissue_from_slide_attrs(cohort):
    c = fresh(cohort)
    for s in c.values():
        del s.tables["table"].obs["organ"]
    experts = sp.tl.build_experts(c, features_key=FEATURES, tissue_key="organ", n_clusters_per_tissue=8, n_experts=4)
    assert experts.params["n_spots_per_tissue"] == {
        o: sum(s.tables["table"].n_obs for s in c.values() if s.attrs["spade_sc"]["slide"]["organ"] == o)
        for o in ("breast", "lung")
    }
    assert adjusted_rand_score(_obs(c, "tissue_type"), _obs(c, "spade_expert")) > 0.9
    # Same as the obs column of the same name.
    ref = sp.tl.build_experts(
        cohort, features_key=FEATURES, tissue_key="organ", n_clusters_per_tissue=8, n_experts=4, inplace=False
    )
    np.testing.assert_array_equal(experts.centroids, ref.centroids)
    del c["slide1"].attrs["spade_sc"]["slide"]["organ"]
    with pytest.raises(KeyError, match=r"missing from: \['slide1'\]"):
        sp.tl.build_experts(c, features_key=FEATURES, tissue_key="organ", n_experts=4)


def test_minibatch_path(cohort):
    c = fresh(cohort)
    experts = sp.tl.build_experts(
        c, features_key=FEATURES, tissue_key="organ", n_clusters_per_tissue=8, n_experts=4, minibatch_threshold=100
    )
    assert experts.params["algorithm_per_tissue"] == {"breast": "minibatch", "lung": "minibatch"}
    assert adjusted_rand_score(_obs(c, "tissue_type"), _obs(c, "spade_expert")) > 0.8
    full = sp.tl.build_experts(
        cohort, features_key=FEATURES, tissue_key="organ", n_clusters_per_tissue=8, n_experts=4, inplace=False
    )
    assert full.params["algorithm_per_tissue"] == {"breast": "kmeans", "lung": "kmeans"}
    # Mini-batch WCSS stays close to full k-means.
    assert experts.params["wcss_step1"] < 1.3 * full.params["wcss_step1"]


def test_elbow_table_and_plot(cohort, tmp_path):
    import matplotlib.pyplot as plt

    with pytest.warns(UserWarning) as record:
        df = sp.tl.expert_elbow(cohort, features_key=FEATURES, tissue_key="organ", k_values=(2, 4, 8, 512))
    messages = [str(w.message) for w in record]
    assert any("tissue 'breast'" in m and "skipping k=[512]" in m for m in messages)
    assert any("32 step-1 centroids; skipping n_experts=[512]" in m for m in messages)
    assert list(df.columns) == ["step", "tissue", "k", "wcss"]
    tissue = df[df.step == "tissue"]
    assert set(tissue.tissue) == {"breast", "lung"}
    assert sorted(tissue.k.unique()) == [2, 4, 8]
    for _, sub in tissue.groupby("tissue"):
        assert (np.diff(sub.sort_values("k").wcss.to_numpy()) < 0).all()  # WCSS decreases with k
    experts = df[df.step == "experts"]
    assert sorted(experts.k) == [2, 4, 8]  # step 2 over 2 x 16 centroids; 512 skipped
    assert (experts.tissue == "all").all()

    axes = sp.pl.elbow(df, show=False)
    assert len(axes) == 2
    assert len(axes[0].get_lines()) == 2 and len(axes[1].get_lines()) == 1
    np.testing.assert_array_equal(axes[1].get_lines()[0].get_xdata(), [2, 4, 8])
    assert axes[0].get_lines()[0].get_ydata().size == 3
    plt.close("all")
    _, ax = plt.subplots()
    out = sp.pl.elbow(df, ax=ax, save=tmp_path / "elbow.png")
    assert out is ax and len(ax.get_lines()) == 3
    assert max(float(np.max(line.get_ydata())) for line in ax.get_lines()) == pytest.approx(1.0)
    assert (tmp_path / "elbow.png").stat().st_size > 0
    plt.close("all")
    with pytest.raises(ValueError, match="lacks the columns"):
        sp.pl.elbow(df.drop(columns="wcss"), show=False)


def test_kmeans_subsampled_init():
    """Above 16384 rows, k-means++ seeds each restart on a sample, then runs Lloyd on all rows: same quality."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    means = rng.normal(0, 4, (5, 8))
    truth = rng.integers(0, 5, 20_000)
    x = (means[truth] + rng.normal(0, 1, (20_000, 8))).astype(np.float32)

    def fit():
        return sp.model.DataExperts.fit(x, n_clusters_per_tissue=5, n_experts=1, seed=0, minibatch_threshold=10**9)

    experts = fit()
    assert experts.params["algorithm_per_tissue"] == {"all": "kmeans"}
    full = KMeans(n_clusters=5, n_init=3, random_state=0).fit(x).inertia_  # k-means++ on every row
    wcss = experts.params["wcss_tissue"]["all"]
    assert wcss == pytest.approx(full, rel=0.02)
    assert fit().params["wcss_tissue"]["all"] == wcss  # deterministic
    labels = experts.nearest_centroid(x)
    assert adjusted_rand_score(truth, labels) > 0.95

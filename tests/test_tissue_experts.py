"""Per-tissue data experts (tl.fit(tissue_experts=True)): step 2 within each tissue, routing within the tissue."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spade_sc as sp
from spade_sc.model import DataExperts, route
from spade_sc.model._kmeans import two_step_kmeans


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two tissues with the same four feature clusters (the tissues look alike), 3:1 rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 8)) * 5
    rows = []
    for n in (600, 200):
        rows.append(centres[rng.integers(0, 4, n)] + rng.normal(size=(n, 8)))
    return np.concatenate(rows).astype(np.float32), np.repeat(["a", "b"], [600, 200])


def test_per_tissue_step_two_never_mixes_tissues():
    x, tissues = _blobs()
    experts, labels = two_step_kmeans(x, tissues, n_clusters_per_tissue=6, n_experts=4, seed=0, per_tissue=True)
    assert experts.per_tissue and experts.params["per_tissue"] is True
    owner = {e: set(experts.centroid_tissue[experts.centroid_expert == e]) for e in range(4)}
    assert all(len(t) == 1 for t in owner.values())  # every expert serves one tissue
    assert sorted(next(iter(t)) for t in owner.values()) == ["a", "a", "a", "b"]  # shared 3:1, as the rows
    # rows are assigned within their own tissue, although the tissues' features overlap
    assert all(next(iter(owner[e])) == t for e, t in zip(labels, tissues, strict=True))
    np.testing.assert_array_equal(labels, experts.assign(x, tissues=tissues))
    # without tissues, the nearest centroid of any tissue (the pooled behaviour)
    assert (experts.assign(x) != labels).any()
    # the pooled step 2 mixes them
    pooled, _ = two_step_kmeans(x, tissues, n_clusters_per_tissue=6, n_experts=4, seed=0)
    assert not pooled.per_tissue
    assert any(len(set(pooled.centroid_tissue[pooled.centroid_expert == e])) == 2 for e in range(4))
    with pytest.raises(ValueError, match="fewer than the 2 tissues"):
        two_step_kmeans(x, tissues, n_clusters_per_tissue=6, n_experts=1, per_tissue=True)
    back = DataExperts.from_dict(experts.to_dict())
    assert back.per_tissue


def test_routing_within_the_tissue():
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 0.0]])
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1.0, 0.0]])
    expert = torch.tensor([0, 1, 2])
    groups = {"row_group": torch.tensor([1, 0, -1]), "centroid_group": torch.tensor([0, 0, 1])}
    hard = route(x, centroids, expert, 3, mode="hard", **groups)
    # row 0 (tissue 1): only centroid 2; row 1 (tissue 0): centroid 1; row 2 (unknown): any, centroid 0
    np.testing.assert_array_equal(hard.argmax(1).numpy(), [2, 1, 0])
    soft = route(x, centroids, expert, 3, mode="soft", tau=1.0, **groups)
    assert soft[0, 2] == 1.0 and soft[1, 2] == 0.0 and torch.allclose(soft.sum(1), torch.ones(3))
    uniform = route(x, centroids, expert, 3, mode="uniform", **groups)
    np.testing.assert_allclose(uniform.numpy(), [[0, 0, 1], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-7)


def test_tissue_experts_need_a_tissue_key(synthetic_features):
    with pytest.raises(ValueError, match="tissue_experts=True needs a tissue_key"):
        sp.tl.fit(synthetic_features(), features_key="X_efficientnet_lite0", tissue_experts=True)


@pytest.fixture(scope="module")
def alike_organs():
    """Two organs whose same morphology carries other programs, with the same stain: the image cannot tell them."""
    from spade_sc.encoders import get_encoder

    cohort = sp.datasets.synthetic(
        n_slides=6, n_spots=150, image_size=1024, organ_programs=True, organ_tints=False, seed=0
    )
    encoder = get_encoder("efficientnet_lite0", device="cpu")
    for s in cohort.values():
        sp.pp.image_features(s, encoder=encoder, progress=False)
    return cohort


def test_per_tissue_experts_beat_one_expert_where_organs_look_alike(alike_organs, tmp_path, one_torch_thread):
    """The mixture's case: one expert cannot learn both organs' maps; one expert per organ, routed by organ, can."""
    kwargs = {
        "tissue_key": "organ",
        "tissue_experts": True,
        "n_experts": "auto",
        "max_epochs": 40,
        "batch_size": 128,
        "spatial_context": None,
    }
    res = sp.tl.evaluate(
        alike_organs,
        features_key="X_efficientnet_lite0",
        representations=("base", "single_expert", "spade_hard", "spade_soft"),
        tasks=("expression",),
        folds={"slide4+5": ["slide4", "slide5"]},
        fit_kwargs=kwargs,
        gene_shots=(50,),
        n_draws=5,
        pca=(False,),
        progress=False,
    )
    t = res.table
    score = {r: t[(t.representation == r) & (t.shots == "50")]["value"].mean() for r in t.representation.unique()}
    rec = res.protocol["folds"]["slide4+5"]["spade"]
    assert rec["n_experts"] == 2  # one per organ ("auto" with per-tissue experts)
    assert score["spade_hard"] > 1.2 * score["single_expert"] > 1.2 * 0.9 * score["base"]
    assert score["spade_soft"] > 1.2 * score["single_expert"]
    # the model: each organ's spots go to its own expert, in fit and in embed
    train = {k: alike_organs[k] for k in ("slide0", "slide1", "slide2", "slide3")}
    model = sp.tl.fit(train, features_key="X_efficientnet_lite0", seed=0, progress=False, **kwargs)
    for name, s in train.items():
        table = s.tables["table"]
        organ_expert = {"breast": 0, "lung": 1}[table.obs["organ"].iloc[0]]
        assert (table.obs["spade_expert"].astype(int) == organ_expert).all(), name
    held = alike_organs["slide5"]
    sp.tl.embed(held, model)
    assert (held.tables["table"].obs["spade_expert"].astype(int) == 1).all()  # slide5 is lung
    model.save(tmp_path / "m")
    back = sp.model.SpadeModel.load(tmp_path / "m")
    assert back.experts.per_tissue and back.experts.tissue_key == "organ"
    np.testing.assert_array_equal(sp.tl.embed(held, back, inplace=False)[1], held.tables["table"].obsm["spade_routing"])

"""tl.fit / tl.embed / SpadeModel on real her2st sections and on synthetic data."""

import json

import numpy as np
import pytest
import torch

import spade_sc as sp
from spade_sc.tl import SpadeModel

FEAT = "X_efficientnet_lite0"
# spatial_context=None: these tests compare the model's embedding of raw features with what fit / embed wrote
# (the model in context has its own tests in test_context.py)
SMALL = {
    "n_experts": 4,
    "n_clusters_per_tissue": 8,
    "max_epochs": 4,
    "batch_size": 64,
    "lr": 1e-3,
    "progress": False,
    "spatial_context": None,
}


@pytest.fixture
def fitted(her2st_with_features):
    cohort = her2st_with_features
    train = {sid: cohort[sid] for sid in ["B4", "C2", "C3", "C4"]}
    model = sp.tl.fit(train, validation_slides=["C4"], seed=0, **SMALL)
    return cohort, train, model


def test_fit_on_her2st_and_embed_held_out(fitted, tmp_path):
    cohort, train, model = fitted
    assert model.is_trained_ and model.n_experts == 4
    for sdata in train.values():
        t = sdata.tables["table"]
        assert t.obsm["X_spade"].shape == (t.n_obs, 256)
        assert t.obsm["spade_routing"].shape == (t.n_obs, 4)
        np.testing.assert_allclose(t.obsm["spade_routing"].sum(1), 1, atol=1e-5)
        assert list(t.obs["spade_expert"].cat.categories) == ["0", "1", "2", "3"]
        assert t.uns["spade"]["fingerprint"] == model.fingerprint()
        assert t.uns["spade"]["genes"] == model.genes
    # held out: never seen by fit
    c5 = cohort["C5"]
    assert "X_spade" not in c5.tables["table"].obsm
    sp.tl.embed(c5, model)
    t5 = c5.tables["table"]
    assert t5.obsm["X_spade"].shape == (181, 256)
    assert np.isfinite(t5.obsm["X_spade"]).all()
    np.testing.assert_allclose(t5.obsm["spade_routing"].sum(1), 1, atol=1e-5)

    x = t5.obsm[FEAT]
    hard, w_hard = model.get_image_embedding(x, "hard")
    assert set(np.unique(w_hard)) <= {0.0, 1.0} and (w_hard.sum(1) == 1).all()
    assert (w_hard.argmax(1) == model.experts.assign(x)).all()
    uniform, _ = model.get_image_embedding(x, "uniform")
    with torch.no_grad():
        per_expert = model.module.image_embed_all(torch.as_tensor(x)).numpy()
    assert model.alignment_.shape == (4, 256, 256)  # each expert's space rotated into the common one
    per_expert = np.einsum("nkd,kde->nke", per_expert, model.alignment_)
    np.testing.assert_allclose(uniform, per_expert.mean(1), atol=1e-5)
    rows = np.arange(len(x))
    np.testing.assert_allclose(hard, per_expert[rows, w_hard.argmax(1)], atol=1e-5)

    # save / load: bit-identical embeddings, no pickle in the folder
    path = model.save(tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    back = SpadeModel.load(path)
    for routing in ("soft", "hard", "uniform"):
        a, wa = model.get_image_embedding(x, routing)
        b, wb = back.get_image_embedding(x, routing)
        assert np.array_equal(a, b) and np.array_equal(wa, wb)
    assert back.genes == model.genes and back.history_ == model.history_
    with pytest.raises(FileExistsError):
        model.save(path)


def test_best_checkpoint_split_and_history(fitted):
    _, train, model = fitted
    tp = model.train_params_
    assert tp["validation_groups"] == ["C4"]
    assert "C4" not in tp["train_groups"] and set(tp["train_groups"]) == {"B4", "C2", "C3"}
    assert tp["n_validation_pairs"] == train["C4"].tables["table"].n_obs
    val = [h["val_loss"] for h in model.history_]
    assert len(val) == 4 and all(v is not None for v in val)
    assert tp["best_epoch"] == int(np.argmin(val))
    assert tp["best_val_loss"] == pytest.approx(min(val), rel=1e-5)
    train_loss = [h["train_loss"] for h in model.history_]
    assert train_loss[-1] < train_loss[0]


def test_restored_weights_are_the_best_epoch(her2st_with_features):
    """Train longer with a high learning rate so the last epoch is not the best; the model keeps the best."""
    cohort = {sid: her2st_with_features[sid] for sid in ["C2", "C3", "C4"]}
    model = sp.tl.fit(cohort, validation_slides=["C4"], seed=1, **{**SMALL, "max_epochs": 8, "lr": 3e-2})
    val = [h["val_loss"] for h in model.history_]
    best = int(np.argmin(val))
    # recompute the validation loss of the restored weights: equals the best epoch's, not the last one's
    t = cohort["C4"].tables["table"]
    from spade_sc.model import ExpertBatchSampler, soft_clip_loss

    x = torch.as_tensor(t.obsm[FEAT])
    y = torch.as_tensor(sp.pp.gene_matrix(t, model.genes, gene_input=model.init_params_["gene_input"]))
    e = torch.as_tensor(model.experts.assign(t.obsm[FEAT]))
    model.module.eval()
    total = n = 0
    with torch.no_grad():
        for batch in ExpertBatchSampler(e.numpy(), 64, shuffle=False):
            i, g = model.module(x[batch], y[batch], e[batch])
            total += float(soft_clip_loss(i, g)) * len(batch)
            n += len(batch)
    assert total / n == pytest.approx(val[best], rel=1e-4)
    if best != len(val) - 1:
        assert total / n != pytest.approx(val[-1], rel=1e-4)


def test_same_seed_same_model(synthetic_features):
    cohort = synthetic_features
    a = sp.tl.fit({k: copy for k, copy in cohort().items()}, seed=3, **SMALL)
    b = sp.tl.fit({k: copy for k, copy in cohort().items()}, seed=3, **SMALL)
    c = sp.tl.fit({k: copy for k, copy in cohort().items()}, seed=4, **SMALL)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()


def test_single_slide_uses_a_spatial_block(synthetic_features):
    one = {"slide0": synthetic_features()["slide0"]}
    model = sp.tl.fit(one, seed=0, **{**SMALL, "n_experts": 2})
    tp = model.train_params_
    assert tp["validation_groups"] == ["slide0:validation"]
    t = one["slide0"].tables["table"]
    assert tp["n_train_pairs"] + tp["n_validation_pairs"] == t.n_obs
    assert 0.1 < tp["n_validation_pairs"] / t.n_obs < 0.3


def test_auto_number_of_experts(synthetic_features):
    cohort = synthetic_features()
    model = sp.tl.fit(cohort, seed=0, **{**SMALL, "n_experts": "auto"})
    n = sum(s.tables["table"].n_obs for s in cohort.values())
    assert model.n_experts == int(np.clip(n // 1000, 1, 16))  # the documented rule: about 1000 pairs per expert
    assert cohort["slide0"].tables["table"].uns["spade"]["train_params"]["n_experts_auto"] is True


def test_auto_number_of_experts_is_tissue_aware(synthetic_features, caplog):
    from spade_sc.tl._spade import auto_n_experts

    assert auto_n_experts(1200) == 1
    assert auto_n_experts(1200, tissue_pairs=[600, 600]) == 2  # one expert per tissue of 500 pairs or more
    assert auto_n_experts(1200, tissue_pairs=[1100, 100]) == 1  # a small tissue gets no expert of its own
    assert auto_n_experts(40_000, tissue_pairs=[20_000, 20_000]) == 16
    cohort = synthetic_features()
    per_organ = {}
    for s in cohort.values():
        t = s.tables["table"]
        per_organ[t.obs["organ"].iloc[0]] = per_organ.get(t.obs["organ"].iloc[0], 0) + t.n_obs
    with caplog.at_level("INFO", logger="spade_sc"):
        # the pooled experts: the rule of auto_n_experts itself (per-tissue experts: test_tissue_experts.py)
        model = sp.tl.fit(cohort, seed=0, tissue_key="organ", tissue_experts=False, **{**SMALL, "n_experts": "auto"})
    assert model.n_experts == auto_n_experts(sum(per_organ.values()), tissue_pairs=list(per_organ.values()))
    assert f"in tissues {per_organ}" in caplog.text


def test_load_validates_everything(fitted, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, model = fitted
    path = model.save(tmp_path / "m")
    # missing file
    broken = tmp_path / "missing"
    model.save(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        SpadeModel.load(broken)
    # changed tensor shape
    changed = model.save(tmp_path / "changed")
    tensors = load_file(str(changed / "model.safetensors"))
    tensors["experts.image_heads.fc_bias"] = torch.zeros(4, 128)
    save_file(tensors, str(changed / "model.safetensors"))
    with pytest.raises(ValueError, match="fc_bias"):
        SpadeModel.load(changed)
    # unknown format version
    cfg = json.loads((path / "config.json").read_text())
    cfg["format_version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version"):
        SpadeModel.load(path)
    # a different gene panel
    ok = model.save(tmp_path / "ok")
    with pytest.raises(ValueError, match="gene panel"):
        SpadeModel.load(ok, genes=[*model.genes[:-1], "NOT_A_GENE"])
    # tampered weights with the same shapes
    tampered = model.save(tmp_path / "tampered")
    tensors = load_file(str(tampered / "model.safetensors"))
    tensors["experts.gene_heads.fc_bias"] = tensors["experts.gene_heads.fc_bias"] + 1
    save_file(tensors, str(tampered / "model.safetensors"))
    with pytest.raises(ValueError, match="fingerprint"):
        SpadeModel.load(tampered)


def test_embed_refuses_other_features(fitted, copy_slide):
    cohort, _, model = fitted
    c5 = copy_slide(cohort["C5"])
    t = c5.tables["table"]
    with pytest.raises(ValueError, match="another encoder"):
        sp.tl.embed(c5, model, features_key="X_resnet18")
    t.obsm[FEAT] = t.obsm[FEAT][:, :100]
    with pytest.raises(ValueError, match="1280"):
        sp.tl.embed(c5, model)
    assert "X_spade" not in t.obsm
    t.obsm[FEAT] = np.zeros((t.n_obs, 1280), dtype=np.float32)
    t.uns[FEAT] = {"encoder": {"name": "resnet18"}}
    with pytest.raises(ValueError, match="resnet18"):
        sp.tl.embed(c5, model)
    assert "X_spade" not in t.obsm


def test_fit_bad_input_writes_nothing(her2st_with_features, copy_slide):
    cohort = {sid: her2st_with_features[sid] for sid in ["C2", "C3"]}

    def untouched():
        return all(
            "X_spade" not in s.tables["table"].obsm and "spade" not in s.tables["table"].uns for s in cohort.values()
        )

    bad = {k: copy_slide(v) for k, v in cohort.items()}
    bad["C3"].tables["table"].obsm[FEAT] = bad["C3"].tables["table"].obsm[FEAT][:, :64]
    with pytest.raises(ValueError, match="dimension"):
        sp.tl.fit(bad, **SMALL)
    bad = {k: copy_slide(v) for k, v in cohort.items()}
    bad["C2"].tables["table"].obsm[FEAT] = bad["C2"].tables["table"].obsm[FEAT].copy()
    bad["C2"].tables["table"].obsm[FEAT][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sp.tl.fit(bad, **SMALL)
    with pytest.raises(ValueError, match="n_experts"):
        sp.tl.fit(cohort, **{**SMALL, "n_experts": 50, "n_clusters_per_tissue": 4})
    with pytest.raises(ValueError, match="validation_slides"):
        sp.tl.fit(cohort, validation_slides=["Z1"], **SMALL)
    with pytest.raises(ValueError, match="gene_input"):
        sp.tl.fit(cohort, gene_input="tpm", **SMALL)
    bad = {k: copy_slide(v) for k, v in cohort.items()}
    bad["C2"].tables["table"].var_names = [f"X{i}" for i in range(bad["C2"].tables["table"].n_vars)]
    with pytest.raises(ValueError, match="share no gene"):
        sp.tl.fit(bad, **SMALL)
    assert untouched()


def test_infonce_option(synthetic_features):
    cohort = synthetic_features()
    model = sp.tl.fit(cohort, loss="infonce", seed=0, **SMALL)
    assert model.init_params_["loss"] == "infonce"
    assert "loss.logit_scale" in model.state_tensors()


def test_fit_with_shapes_key_or_table_key_on_slides_that_hold_tiles(synthetic_features):
    """Slides holding tissue tiles too (a second shapes element and table): shapes_key= or table_key= says which are
    the spots, and everything (gene panel, experts, training, embedding) reads those spots only."""
    for kwargs in ({"shapes_key": "spots"}, {"table_key": "table"}):
        cohort = synthetic_features()
        for s in cohort.values():
            sp.pp.tile_tissue(s, mpp=2.0, tile_size=64)
            assert len(s.shapes) == 2 and len(s.tables) == 2
        with pytest.raises(ValueError, match="several"):
            sp.tl.fit(cohort, seed=0, **SMALL)
        model = sp.tl.fit(cohort, seed=0, **kwargs, **SMALL)
        assert model.is_trained_
        for s in cohort.values():
            assert s.tables["table"].obsm["X_spade"].shape == (s.tables["table"].n_obs, 256)
            assert "spade_panel" not in s.tables["table"].uns  # fit computes the panel without writing it
            tiles_table = next(k for k in s.tables if k != "table")
            assert "X_spade" not in s.tables[tiles_table].obsm

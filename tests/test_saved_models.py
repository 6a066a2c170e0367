"""Model folders written by an earlier spade_sc (before the model classes moved to spade_sc.model) still load."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import spade_sc as sp

DATA = Path(__file__).parent / "data"


def test_spade_model_folder_written_before_the_move_loads():
    model = sp.tl.SpadeModel.load(DATA / "spade_model_v0")
    assert isinstance(model, sp.model.SpadeModel)
    assert model.is_trained_ and model.n_experts == 2 and model.genes == [f"g{i}" for i in range(6)]
    probe = np.load(DATA / "spade_model_v0_probe.npy")  # features, embedding and routing computed when written
    x, emb, weights = probe[:, :8], probe[:, 8:24], probe[:, 24:]
    got_emb, got_weights = model.get_image_embedding(x)
    np.testing.assert_array_equal(got_emb, emb)
    np.testing.assert_array_equal(got_weights, weights)


def test_mil_model_folder_written_before_the_move_loads():
    model = sp.tl.MILModel.load(DATA / "mil_model_v0")
    assert isinstance(model, sp.model.MILModel)
    probe = np.load(DATA / "mil_model_v0_probe.npy")  # a bag of 5 tiles x 8 features, then its predicted probabilities
    bag, probs = probe[:40].reshape(5, 8).astype(np.float32), probe[40:]
    np.testing.assert_allclose(np.ravel(model.predict(bag)), probs, rtol=0, atol=1e-7)

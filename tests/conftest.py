"""Shared fixtures: real data from ../shared/data (or $SPADE_SC_DATA) and a small synthetic cohort."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "agg")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder holding her2st/ and visium_heart_tiny/; the tests need it (CI passes SPADE_SC_DATA)."""
    root = Path(os.environ.get("SPADE_SC_DATA", DEFAULT_DATA)).resolve()
    if not (root / "her2st").is_dir():
        pytest.skip(f"real data not found at {root} (set SPADE_SC_DATA)")
    return root


@pytest.fixture(scope="session")
def her2st(data_root):
    """All her2st sections, loaded once per test session. Tests must not modify them: use copies."""
    import spade_sc as sp

    return sp.datasets.her2st(data_root / "her2st")


@pytest.fixture(scope="session")
def visium_tiny(data_root):
    import spade_sc as sp

    return sp.datasets.visium(data_root / "visium_heart_tiny")


@pytest.fixture(scope="session")
def synthetic_cohort():
    import spade_sc as sp

    return sp.datasets.synthetic(n_slides=4, n_spots=150, image_size=1024, seed=0)


def _copy_slide(sdata):
    """A SpatialData sharing the image and shapes of ``sdata`` with copies of its tables and attrs."""
    import copy

    from spatialdata import SpatialData

    out = SpatialData(
        images=dict(sdata.images),
        shapes=dict(sdata.shapes),
        tables={k: t.copy() for k, t in sdata.tables.items()},
    )
    out.attrs.update(copy.deepcopy(sdata.attrs))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (the tests run on 2 shared cores: avoids oversubscription); restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def copy_slide():
    """Function making a cheap copy of a slide whose tables can be written to without touching the original."""
    return _copy_slide


def _default_features(cohort):
    """(features per slide, uns record) of the default encoder (EfficientNet-Lite0), written nowhere."""
    import spade_sc as sp
    from spade_sc.encoders import get_encoder

    encoder = get_encoder("efficientnet_lite0", device="cpu")
    feats = {
        name: sp.pp.image_features(sdata, encoder=encoder, inplace=False, progress=False)
        for name, sdata in cohort.items()
    }
    return feats, {"encoder": encoder.spec, "mpp": 0.5, "patch_size": 224}


def _with_features(cohort, cached):
    """Copies of the slides of ``cohort`` with obsm/uns["X_efficientnet_lite0"] set from ``cached``."""
    feats, params = cached
    out = {}
    for name, sdata in cohort.items():
        s = _copy_slide(sdata)
        s.tables["table"].obsm["X_efficientnet_lite0"] = feats[name]
        s.tables["table"].uns["X_efficientnet_lite0"] = dict(params)
        out[name] = s
    return out


@pytest.fixture(scope="session")
def her2st_features(her2st):
    """Default-encoder features of every her2st section, computed once."""
    return _default_features(her2st)


@pytest.fixture
def her2st_with_features(her2st, her2st_features):
    """Copies of the her2st sections with obsm["X_efficientnet_lite0"] set."""
    return _with_features(her2st, her2st_features)


@pytest.fixture(scope="session")
def _synthetic_features_cache(synthetic_cohort):
    """Default-encoder features of the small synthetic cohort, computed once."""
    return _default_features(synthetic_cohort)


@pytest.fixture
def synthetic_features(synthetic_cohort, _synthetic_features_cache):
    """Function returning fresh copies of the synthetic cohort with obsm["X_efficientnet_lite0"] set."""
    return lambda: _with_features(synthetic_cohort, _synthetic_features_cache)

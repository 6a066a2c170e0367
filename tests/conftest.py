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


@pytest.fixture(scope="session")
def copy_slide():
    """Function making a cheap copy of a slide whose tables can be written to without touching the original."""
    return _copy_slide


@pytest.fixture(scope="session")
def her2st_features(her2st):
    """Default-encoder (EfficientNet-Lite0) features of every her2st section, computed once."""
    import spade_sc as sp
    from spade_sc.encoders import get_encoder

    encoder = get_encoder("efficientnet_lite0", device="cpu")
    feats = {
        sid: sp.pp.image_features(sdata, encoder=encoder, inplace=False, progress=False)
        for sid, sdata in her2st.items()
    }
    return feats, {"encoder": encoder.spec, "mpp": 0.5, "patch_size": 224}


@pytest.fixture
def her2st_with_features(her2st, her2st_features):
    """Copies of the her2st sections with obsm["X_efficientnet_lite0"] set."""
    out = {}
    for sid, sdata in her2st.items():
        s = _copy_slide(sdata)
        feats, params = her2st_features
        s.tables["table"].obsm["X_efficientnet_lite0"] = feats[sid]
        s.tables["table"].uns["X_efficientnet_lite0"] = dict(params)
        out[sid] = s
    return out


@pytest.fixture(scope="session")
def _synthetic_features_cache(synthetic_cohort):
    """Default-encoder features of the small synthetic cohort, computed once."""
    import spade_sc as sp
    from spade_sc.encoders import get_encoder

    encoder = get_encoder("efficientnet_lite0", device="cpu")
    feats = {
        name: sp.pp.image_features(sdata, encoder=encoder, inplace=False, progress=False)
        for name, sdata in synthetic_cohort.items()
    }
    return feats, {"encoder": encoder.spec, "mpp": 0.5, "patch_size": 224}


@pytest.fixture
def synthetic_features(synthetic_cohort, _synthetic_features_cache):
    """Function returning fresh copies of the synthetic cohort with obsm["X_efficientnet_lite0"] set."""

    def make():
        feats, params = _synthetic_features_cache
        out = {}
        for name, sdata in synthetic_cohort.items():
            s = _copy_slide(sdata)
            s.tables["table"].obsm["X_efficientnet_lite0"] = feats[name]
            s.tables["table"].uns["X_efficientnet_lite0"] = dict(params)
            out[name] = s
        return out

    return make

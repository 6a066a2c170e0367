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

"""Datasets: real loaders (her2st, Visium) and a procedural synthetic cohort."""

from ._her2st import her2st
from ._synthetic import synthetic, synthetic_regions
from ._visium import visium

__all__ = ["her2st", "synthetic", "synthetic_regions", "visium"]

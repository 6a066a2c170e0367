"""spade_sc: SPADE (mixture of data experts aligning H&E features with spatial transcriptomics) for scverse."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, pl, pp, tl

try:
    __version__ = version("spade_sc")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["datasets", "pl", "pp", "tl"]

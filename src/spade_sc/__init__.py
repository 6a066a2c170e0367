"""spade_sc: SPADE (mixture of data experts aligning H&E features with spatial transcriptomics) for scverse."""

from __future__ import annotations

import importlib
from typing import Any

from . import datasets, io, pl, pp, tl
from ._version import __version__ as __version__

#: Subpackages that import torch: reached as ``spade_sc.encoders`` / ``spade_sc.model`` on first use (PEP 562).
_LAZY = ("encoders", "model")

__all__ = ["datasets", "encoders", "io", "model", "pl", "pp", "tl"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
